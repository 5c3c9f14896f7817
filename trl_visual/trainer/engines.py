"""Training under accelerate's engines: DDP, FSDP2 and DeepSpeed ZeRO-2/3, on one node or several.

The engine is accelerate's (``accelerate launch --config_file …``, or ``trl-visual … --accelerate_config``);
this module only fits the one thing GRPO does differently from a language-model trainer: a micro-step takes
**one backward per trained timestep** (``K`` of them), so that memory does not grow with ``K``. An optimizer
step is therefore ``gradient_accumulation_steps × K`` backwards, and the engines must reduce gradients (and,
for DeepSpeed, step) once per optimizer step, not once per backward:

* DDP / FSDP2: ``Trainer`` already runs every micro-step but the last of an accumulation window under
  ``accelerator.no_sync(model)``; :meth:`Engine.backward_steps` does the same for every trained
  timestep but the last of that last micro-step, so gradients are all-reduced (reduce-scattered) once.
* DeepSpeed counts micro-steps per backward and divides each loss by its own gradient accumulation. Of the two
  ways to fit that (Flow-GRPO's, a DeepSpeed accumulation of ``gradient_accumulation_steps × K``; or one
  backward per micro-step over the sum of the ``K`` losses), the first is taken: the second would hold the
  activations of all ``K`` forwards at once, the memory the per-timestep backward exists to save. So
  :func:`deepspeed_gradient_accumulation` rewrites the DeepSpeed config, the trainer hands DeepSpeed the
  loss undivided (DeepSpeed divides by ``gradient_accumulation_steps × K``), and every backward but the last
  of the window is marked as no accumulation boundary (accelerate passes ``sync_gradients`` to DeepSpeed as
  the boundary). This needs ``K`` to be the same at every step: a run where it changes (an SDE window that
  sometimes covers the excluded last step, or a frozen expert's steps) is refused under DeepSpeed.

Saving under each engine is in :mod:`trl_visual.trainer.checkpoint_io` (the LoRA is taken from the state dict that
``Trainer.save_model`` gathers). The trainer makes its :class:`Engine` right after ``Trainer`` made the accelerator
(``create_accelerator_and_postprocess``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..core.timesteps import num_train_timesteps, stochastic_step_indices, window_starts
from ..models import DiffusionAdapter
from .diffusion_grpo_config import DiffusionGRPOConfig
from .rollout import trainable_steps

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator


def trained_timesteps_per_micro_step(
    adapter: DiffusionAdapter, args: DiffusionGRPOConfig, latent_shape: tuple[int, ...]
) -> set[int]:
    """Every count ``K`` of trained timesteps (backwards) a micro-step can take, over all SDE window positions.

    Per window: ``K = max(1, round(timestep_fraction · S))`` of the ``S`` stochastic steps that can be trained
    (where the trained denoiser predicts, and not the step landing on ``σ = 0`` with ``exclude_last_step``),
    as :func:`~trl_visual.trainer.rollout.select_train_steps` selects them. A window with ``S = 0`` adds
    nothing (the trainer refuses it when it is drawn).
    """
    num_steps = args.num_inference_steps
    sigmas = adapter.sigmas(num_steps, latent_shape, args.time_shift)
    if args.sde_window_size > 0:
        starts = window_starts(args.sde_window_size, tuple(args.sde_window_range), num_steps, args.sde_type)
    else:
        starts = range(1)
    counts = set()
    for start in starts:
        steps = torch.tensor(stochastic_step_indices(num_steps, args.sde_type, args.sde_window_size, start))
        if len(steps) == 0:
            continue
        trainable = int(
            trainable_steps(adapter, sigmas[steps], sigmas[steps + 1], args.exclude_last_step).sum()
        )
        if trainable:
            counts.add(num_train_timesteps(trainable, args.timestep_fraction))
    return counts


def deepspeed_gradient_accumulation(
    config: dict[str, Any], gradient_accumulation_steps: int, num_trained_timesteps: int, world_size: int
) -> dict[str, Any]:
    """Rewrite, in place, a DeepSpeed config that ``Trainer`` filled from the ``TrainingArguments`` so that one
    DeepSpeed micro-step is one backward:

    ``gradient_accumulation_steps_ds = gradient_accumulation_steps × K`` and
    ``train_batch_size = micro_batch × gradient_accumulation_steps_ds × world_size``

    (DeepSpeed checks the second identity). The micro-batch is unchanged: each backward sees the whole
    micro-batch at one timestep. Returns ``config``.
    """
    accumulation = gradient_accumulation_steps * num_trained_timesteps
    config["gradient_accumulation_steps"] = accumulation
    micro_batch = config.get("train_micro_batch_size_per_gpu")
    if isinstance(micro_batch, int):
        config["train_batch_size"] = micro_batch * accumulation * world_size
    return config


def check_engine_settings(accelerator_state: Any) -> None:
    """Refuse, before training, engine settings under which the trained LoRA could not be saved whole:
    FSDP without ``FULL_STATE_DICT`` (``Trainer.save_model`` then writes no weights) and ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save`` (nothing to gather the LoRA from)."""
    fsdp = getattr(accelerator_state, "fsdp_plugin", None)
    if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
        raise ValueError(
            f"FSDP with state_dict_type={fsdp.state_dict_type}: the trained weights are saved from the full "
            "state dict only. Set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config (as the "
            "shipped `fsdp` config does)."
        )
    deepspeed = getattr(accelerator_state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.zero_stage == 3:
        zero = deepspeed.deepspeed_config.get("zero_optimization", {})
        if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
            raise ValueError(
                "DeepSpeed ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`: the partitioned LoRA "
                "could not be gathered into one file. Set `zero3_save_16bit_model: true` in the accelerate "
                "config (as the shipped `zero3` config does)."
            )


class Engine:
    """The trainer's side of accelerate's engines (see the module's docstring) for ``accelerator``: checks its
    settings and, under DeepSpeed, rewrites its gradient accumulation in backwards for the ``K`` trained timesteps
    that ``adapter`` and ``args`` give on ``latent_shape``."""

    def __init__(
        self,
        accelerator: Accelerator,
        args: DiffusionGRPOConfig,
        adapter: DiffusionAdapter,
        latent_shape: tuple[int, ...],
        is_deepspeed: bool,
        is_fsdp: bool,
    ):
        self.accelerator = accelerator
        self.is_fsdp = is_fsdp
        check_engine_settings(accelerator.state)
        #: DeepSpeed's micro-steps per micro-step (``K``); ``None`` outside DeepSpeed
        self.deepspeed_timesteps: int | None = None
        if is_deepspeed:
            self.deepspeed_timesteps = constant_trained_timesteps(adapter, args, latent_shape)
            deepspeed_gradient_accumulation(
                accelerator.state.deepspeed_plugin.deepspeed_config,
                args.gradient_accumulation_steps,
                self.deepspeed_timesteps,
                args.world_size,
            )

    @property
    def shards_parameters(self) -> bool:
        """Whether the denoiser's weights are split across processes (FSDP, ZeRO-3): then every forward is a
        collective, which all ranks must run together (the model card's samples included)."""
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_fsdp or (deepspeed is not None and deepspeed.zero_stage == 3)

    def backward_scale(self, num_trained: int, gradient_accumulation_steps: int) -> int:
        """What each of the ``num_trained`` backwards of a micro-step divides its loss by, so the step's
        gradient is the mean over the window's micro-steps and timesteps: ``K × gradient_accumulation_steps``,
        or 1 under DeepSpeed, which divides by its own accumulation (the same product)."""
        if self.deepspeed_timesteps is None:
            return num_trained * gradient_accumulation_steps
        if num_trained != self.deepspeed_timesteps:
            raise RuntimeError(
                f"This micro-step trains {num_trained} timesteps, DeepSpeed was set up for "
                f"{self.deepspeed_timesteps}; please report this with your config."
            )
        return 1

    def backward_steps(self, model: torch.nn.Module, num_trained: int) -> Iterator[int]:
        """``0 … num_trained − 1``, the trained timesteps of a micro-step. Every one but the last runs (forward and
        backward, as DDP requires) under ``accelerator.no_sync(model)`` with accelerate's ``sync_gradients`` off,
        when this micro-step is the one that syncs: gradients are then reduced, and DeepSpeed steps, once per
        optimizer step. (In the other micro-steps ``Trainer`` has turned syncing off already.)"""
        syncs = self.accelerator.sync_gradients
        for k in range(num_trained):
            deferred = syncs and k < num_trained - 1
            with self._deferred_sync(model) if deferred else contextlib.nullcontext():
                yield k

    @contextlib.contextmanager
    def _deferred_sync(self, model: torch.nn.Module) -> Iterator[None]:
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(model):
                yield
        finally:
            state._set_sync_gradients(True)


def constant_trained_timesteps(
    adapter: DiffusionAdapter, args: DiffusionGRPOConfig, latent_shape: tuple[int, ...]
) -> int:
    """The one count ``K`` of trained timesteps every micro-step takes, which DeepSpeed needs; an error naming the
    settings when it varies with the SDE window's position."""
    counts = trained_timesteps_per_micro_step(adapter, args, latent_shape)
    if len(counts) != 1:
        raise ValueError(
            f"Under DeepSpeed every step must train the same number of timesteps, but these settings train "
            f"{sorted(counts)} depending on where the SDE window falls (`exclude_last_step` drops the step "
            "landing on σ = 0, a frozen expert's steps are skipped). Keep the window clear of them "
            "(`sde_window_range`), set `exclude_last_step=False`, or use DDP or FSDP (`--accelerate_config "
            "multi_gpu` or `fsdp`)."
        )
    return counts.pop()
