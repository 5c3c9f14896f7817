"""Every private name of an upstream library (transformers, accelerate, TRL, diffusers, peft) that this package
overrides or calls, in one place, with the parameters we rely on.

A private name can move or change its signature in any release. ``tests/test_upstream.py`` checks each entry of
:data:`PRIVATE_NAMES` against the installed versions (the newest in the main CI job, the declared floors in the
floors job), so a release that breaks one fails with the name and the version instead of deep inside training.

Checked against transformers 5.3.0 and 5.25.0, TRL 1.0.0 and 1.16.0, accelerate 1.6.0 and 1.16.0 (the floors in
``setup.cfg`` and the newest releases on 2026-12-07). When a name is missing from an older release we still
support, it gets a small fallback here (e.g. :func:`is_async_callable`) rather than a raised floor.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateName:
    """One upstream name: ``module.qualname`` must exist and, when ``parameters`` is given, take at least those
    parameters (by name; ``self`` excluded). ``fallback`` says what we use where the name is missing."""

    module: str
    qualname: str
    parameters: tuple[str, ...] | None = None
    why: str = ""
    fallback: str | None = None


_TRAINER = "transformers.trainer"

#: the transformers releases every ``Trainer`` override of :class:`~trl_visual.trainer.DiffusionGRPOTrainer` was
#: checked against; each override's docstring ends "Checked against transformers <this>." (tested)
CHECKED_TRANSFORMERS = "5.3.0 (the floor) and 5.25.0"

#: the private upstream names this package overrides (``Trainer`` methods) or calls
PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # transformers.Trainer methods our trainer overrides (all in trl_visual/trainer/diffusion_grpo_trainer.py)
    PrivateName(_TRAINER, "Trainer._get_train_sampler", ("train_dataset",), "whole GRPO groups per batch"),
    PrivateName(_TRAINER, "Trainer._get_output_dir", ("trial",), "checkpoints staged, then renamed"),
    PrivateName(_TRAINER, "Trainer._save_checkpoint", ("model", "trial"), "atomic checkpoints"),
    PrivateName(_TRAINER, "Trainer._push_from_checkpoint", ("checkpoint_folder",), "the LoRA file pushed"),
    PrivateName(_TRAINER, "Trainer._save", ("output_dir", "state_dict"), "LoRA in diffusers' format"),
    PrivateName(_TRAINER, "Trainer._load_from_checkpoint", ("resume_from_checkpoint", "model"), "resuming"),
    PrivateName(
        _TRAINER,
        "Trainer._prepare_for_training",
        ("max_steps", "train_dataloader", "resume_from_checkpoint"),
        "resuming under FSDP / DeepSpeed",
    ),
    PrivateName(_TRAINER, "Trainer._get_grad_norm", ("model", "grad_norm"), "the non-finite update guard"),
    # transformers names we call
    PrivateName(
        "transformers.trainer_utils",
        "rotate_checkpoints",
        ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"),
        "rotating checkpoints after the atomic rename",
    ),
    PrivateName("transformers.trainer_utils", "PREFIX_CHECKPOINT_DIR", None, "checkpoint folder names"),
    PrivateName(
        "transformers.trainer", "TRAINER_STATE_NAME", None, "the best checkpoint renamed in the state"
    ),
    PrivateName(
        "transformers.trainer_utils", "get_last_checkpoint", ("folder",), "resume_from_checkpoint=True"
    ),
    PrivateName("transformers.integrations", "is_deepspeed_zero3_enabled", (), "EMA under ZeRO-3"),
    PrivateName("transformers.initialization", "no_init_weights", (), "reward models built without init"),
    PrivateName(
        "transformers.image_processing_utils",
        "ImageProcessingMixin.get_image_processor_dict",
        ("pretrained_model_name_or_path",),
        "CLIP preprocessing read from a checkpoint",
    ),
    # TRL
    PrivateName(
        "trl.trainer.utils",
        "RepeatSampler",
        ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"),
        "subclassed by EpochSeededRepeatSampler",
    ),
    PrivateName(
        "trl.trainer.utils",
        "is_async_callable",
        ("func",),
        "async rewards",
        fallback="trl_visual._upstream.is_async_callable (TRL < 1.14)",
    ),
    # accelerate
    PrivateName("accelerate.commands.launch", "launch_command", ("args",), "trl-visual launch"),
    PrivateName("accelerate.commands.launch", "launch_command_parser", ("subparsers",), "trl-visual launch"),
)


def _own_is_async_callable(func: Callable) -> bool:
    """Whether calling ``func`` returns a coroutine: a plain ``async def``, a ``functools.partial`` of one, or
    an instance whose ``__call__`` is ``async`` (what TRL's ``is_async_callable`` answers, TRL ≥ 1.14)."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


try:
    from trl.trainer.utils import is_async_callable
except ImportError:  # TRL < 1.14
    is_async_callable = _own_is_async_callable
