"""An exponential moving average (EMA) of the trained weights, with diffusers' ``EMAModel``.

After every optimizer step ``t`` (``use_ema=True``)::

    θ̄_t = d_t θ̄_{t−1} + (1 − d_t) θ_t,    d_t = min(ema_decay, (1 + s) / (10 + s)),  s = t − 1,

with ``d_1 = 0`` (``θ̄`` starts at the first trained weights): diffusers' warm-up, which lets the average
follow the early steps closely and reach ``ema_decay`` after ``(10 d − 1) / (1 − d)`` steps. Only the
trainable parameters are averaged (the LoRA, or the whole denoiser without one), in float32.

A step that the non-finite guard skips leaves the weights as they were; the average still takes its step
towards them. :class:`~trl_visual.trainer.DiffusionGRPOTrainer` holds an :class:`EMA` (``trainer.ema``, ``None``
without ``use_ema``): evaluation, the model card's samples and the exported weights (``save_model`` outside a
checkpoint, ``push_to_hub``) run within :func:`ema_weights`; checkpoints keep the trained weights and the
average's state (``ema_state.safetensors``, a :mod:`~trl_visual.state_files` file that runs no code when read),
so resuming continues both exactly.
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

__all__ = ["EMA", "EMA_STATE_NAME", "EMAUpdateCallback", "ema_weights", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, in a fixed order."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class EMAUpdateCallback(TrainerCallback):
    """Steps the EMA after every optimizer step (``on_step_end``)."""

    def __init__(self, ema: EMAModel, parameters: list[torch.nn.Parameter]):
        self.ema = ema
        self.parameters = parameters

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The average follows the parameters to their device: DeepSpeed places the model only when training
        starts, after the average was made on the CPU."""
        if self.parameters:
            self.ema.to(device=self.parameters[0].device)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ema.step(self.parameters)


def check_ema_engine(use_ema: bool, is_fsdp: bool) -> None:
    """Refuse ``use_ema`` where each process holds a shard of the trained weights (FSDP, ZeRO-3)."""
    if use_ema and (is_fsdp or is_deepspeed_zero3_enabled()):
        raise ValueError(
            "`use_ema=True` is not supported with FSDP or DeepSpeed ZeRO-3 yet: each process holds a shard of "
            "the trained weights, and the average would be of shards. Use DDP or ZeRO-1/2 (LoRA weights are "
            "small enough to replicate), or set `use_ema=False`."
        )


class EMA:
    """The average ``θ̄`` of ``parameters`` (the trainable ones, in a fixed order) with decay ``decay``: diffusers'
    ``EMAModel`` (:attr:`average`), stepped by :meth:`callback` after every optimizer step."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.average = EMAModel(parameters, decay=decay)

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """``θ̄``, one tensor per trained parameter."""
        return self.average.shadow_params

    @property
    def optimization_step(self) -> int:
        """How many optimizer steps the average has taken."""
        return self.average.optimization_step

    def callback(self) -> EMAUpdateCallback:
        """The callback that steps the average after every optimizer step."""
        return EMAUpdateCallback(self.average, self.parameters)

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Within, the trained parameters hold the average (``store``, ``copy_to``); afterwards the trained
        weights are back (``restore``)."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def save(self, folder: str) -> None:
        """Write the average's state into the checkpoint ``folder`` being staged."""
        save_state_file(self.average.state_dict(), os.path.join(folder, EMA_STATE_NAME))

    def check_checkpoint(self, folder: str, resume_weights_only: bool) -> None:
        """Refuse a checkpoint without ``ema_state.safetensors`` unless ``resume_weights_only`` (then the average
        restarts from the resumed weights)."""
        if os.path.isfile(os.path.join(folder, EMA_STATE_NAME)):
            return
        if not resume_weights_only:
            raise CheckpointError(
                f"{folder} has no {EMA_STATE_NAME}, the EMA of the weights that `use_ema=True` keeps (the run "
                "that wrote it had use_ema=False, or the file was deleted). Set `resume_weights_only=True` to "
                "restart the EMA from the resumed weights, or `use_ema=False`."
            )
        logger.warning(f"{folder} has no {EMA_STATE_NAME}: the EMA restarts from the resumed weights.")

    def load(self, folder: str) -> None:
        """Restore the average from the checkpoint ``folder``, or restart it at the resumed weights."""
        path = os.path.join(folder, EMA_STATE_NAME)
        if os.path.isfile(path):
            self.average.load_state_dict(load_state_file(path))
        else:
            self.average.load_state_dict({"shadow_params": [p.detach().clone() for p in self.parameters]})
            self.average.optimization_step = 0
        device = self.parameters[0].device if self.parameters else None
        self.average.to(device=device)


def ema_weights(ema: EMA | None) -> contextlib.AbstractContextManager[None]:
    """The average's weights within (:meth:`EMA.weights`); without ``use_ema`` (``ema`` is ``None``), the trained
    ones."""
    return contextlib.nullcontext() if ema is None else ema.weights()
