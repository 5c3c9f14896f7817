"""Which prompts a training step sees: whole groups of ``num_generations`` copies, reproducible on resume."""

from __future__ import annotations

from collections.abc import Iterator

from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` (each prompt ``num_generations`` times in a row, whole groups per global
    batch), reseeded from ``seed + epoch`` at every epoch so that a resumed run draws the same prompts
    as an uninterrupted one (``Trainer`` calls :meth:`set_epoch`)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return super().__iter__()
