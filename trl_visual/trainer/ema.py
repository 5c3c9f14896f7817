"""An exponential moving average (EMA) of the trained weights, with diffusers' ``EMAModel``.

After every optimizer step ``t`` (``use_ema=True``)::

    θ̄_t = d_t θ̄_{t−1} + (1 − d_t) θ_t,    d_t = min(ema_decay, (1 + s) / (10 + s)),  s = t − 1,

with ``d_1 = 0`` (``θ̄`` starts at the first trained weights): diffusers' warm-up, which lets the average
follow the early steps closely and reach ``ema_decay`` after ``(10 d − 1) / (1 − d)`` steps. Only the
trainable parameters are averaged (the LoRA, or the whole denoiser without one), in float32.

A step that the non-finite guard skips leaves the weights as they were; the average still takes its step
towards them. Mixed into :class:`~trl_visual.trainer.DiffusionGRPOTrainer` first, before :class:`EvaluationMixin`: evaluation,
the model card's samples and the exported weights (``save_model`` outside a checkpoint, ``push_to_hub``) use
the average; checkpoints keep the trained weights and the average's state (``ema_state.safetensors``, a
:mod:`~trl_visual.state_files` file that runs no code when read), so resuming
continues both exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from ..checkpointing import EMA_STATE_NAME, CheckpointError
from ..state_files import load_state_file, save_state_file

logger = logging.getLogger(__name__)

__all__ = ["EMA_STATE_NAME", "EMAMixin", "EMAUpdateCallback", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, in a fixed order."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class EMAUpdateCallback(TrainerCallback):
    """Steps the EMA after every optimizer step (``on_step_end``)."""

    def __init__(self, ema: EMAModel, parameters: list[torch.nn.Parameter]):
        self.ema = ema
        self.parameters = parameters

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ema.step(self.parameters)


class EMAMixin:
    """``use_ema``: an EMA of the trained weights for a trainer with ``args``, ``model``, ``accelerator`` and
    :class:`~trl_visual.trainer.saving.CheckpointSavingMixin`'s ``_staging_dir``."""

    ema: EMAModel | None = None
    _ema_parameters: list[torch.nn.Parameter]

    def _setup_ema(self, denoiser: torch.nn.Module) -> None:
        """Start the average at ``denoiser``'s trainable weights and step it after every optimizer step."""
        if not self.args.use_ema:
            return
        if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            raise ValueError(
                "`use_ema=True` is not supported with FSDP or DeepSpeed ZeRO-3 yet: each process holds a shard of "
                "the trained weights, and the average would be of shards. Use DDP or ZeRO-1/2 (LoRA weights are "
                "small enough to replicate), or set `use_ema=False`."
            )
        self._ema_parameters = trainable_parameters(denoiser)
        self.ema = EMAModel(self._ema_parameters, decay=self.args.ema_decay)
        self.add_callback(EMAUpdateCallback(self.ema, self._ema_parameters))

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within, the trained parameters hold the average (``store``, ``copy_to``); afterwards the trained
        weights are back (``restore``). Without ``use_ema`` nothing changes."""
        if self.ema is None:
            yield
            return
        self.ema.store(self._ema_parameters)
        self.ema.copy_to(self._ema_parameters)
        try:
            yield
        finally:
            self.ema.restore(self._ema_parameters)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Evaluation of the average's weights (the trained weights without ``use_ema``)."""
        with self.ema_weights():
            return super().evaluate(*args, **kwargs)

    def _card_samples(self, rows: list[dict[str, Any]], reference: bool) -> list[Any]:
        """The model card's samples from the average's weights (the reference is the base, without LoRA)."""
        with self.ema_weights():
            return super()._card_samples(rows, reference)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Export the average's weights; a checkpoint (being staged) keeps the trained ones."""
        context = self.ema_weights() if self._staging_dir is None else contextlib.nullcontext()
        with context:
            super().save_model(output_dir, _internal_call=_internal_call)

    def _save_ema_state(self, folder: str) -> None:
        """Write the average's state into the checkpoint ``folder`` being staged."""
        if self.ema is not None and self.args.should_save:
            save_state_file(self.ema.state_dict(), os.path.join(folder, EMA_STATE_NAME))

    def _checked_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """Also refuse, with ``use_ema``, a checkpoint without ``ema_state.safetensors`` unless ``resume_weights_only``
        (then the average restarts from the resumed weights)."""
        folder = super()._checked_checkpoint(resume_from_checkpoint)
        if folder is None or self.ema is None or os.path.isfile(os.path.join(folder, EMA_STATE_NAME)):
            return folder
        if not self.args.resume_weights_only:
            raise CheckpointError(
                f"{folder} has no {EMA_STATE_NAME}, the EMA of the weights that `use_ema=True` keeps (the run "
                "that wrote it had use_ema=False, or the file was deleted). Set `resume_weights_only=True` to "
                "restart the EMA from the resumed weights, or `use_ema=False`."
            )
        logger.warning(f"{folder} has no {EMA_STATE_NAME}: the EMA restarts from the resumed weights.")
        return folder

    def _load_ema_state(self, folder: str) -> None:
        """Restore the average from the checkpoint ``folder``, or restart it at the resumed weights."""
        if self.ema is None:
            return
        path = os.path.join(folder, EMA_STATE_NAME)
        if os.path.isfile(path):
            self.ema.load_state_dict(load_state_file(path))
        else:
            self.ema.load_state_dict({"shadow_params": [p.detach().clone() for p in self._ema_parameters]})
            self.ema.optimization_step = 0
        device = self._ema_parameters[0].device if self._ema_parameters else None
        self.ema.to(device=device)
