"""The trainer's side of ``per_prompt_stat_tracking``: the tracker a config asks for, and its part of the method
state a checkpoint keeps (:meth:`~trl_visual.trainer.DiffusionGRPOTrainer.method_state`)."""

from __future__ import annotations

from typing import Any

from ..core.stat_tracking import PerPromptStatTracker
from .diffusion_grpo_config import DiffusionGRPOConfig


def tracker_for(args: DiffusionGRPOConfig) -> PerPromptStatTracker | None:
    """The per-prompt statistics tracker ``per_prompt_stat_tracking`` asks for (``None`` without it)."""
    if not args.per_prompt_stat_tracking:
        return None
    return PerPromptStatTracker(args.per_prompt_stat_tracking_buffer_size)


#: the key of the tracker's buffers in the method's checkpointed state (``trl_visual_state.safetensors``)
STAT_TRACKER_KEY = "per_prompt_stats"


def stat_tracker_state(stat_tracker: PerPromptStatTracker | None) -> dict[str, Any]:
    """The tracker's part of the checkpointed method state: ``{}`` without one (so GRPO writes no state file)."""
    return {} if stat_tracker is None else {STAT_TRACKER_KEY: stat_tracker.state_dict()}


def load_stat_tracker_state(stat_tracker: PerPromptStatTracker | None, state: dict[str, Any]) -> None:
    """Restore the tracker's buffers from a checkpoint's method state (a checkpoint without them: left empty)."""
    if stat_tracker is not None and STAT_TRACKER_KEY in state:
        stat_tracker.load_state_dict(state[STAT_TRACKER_KEY])
