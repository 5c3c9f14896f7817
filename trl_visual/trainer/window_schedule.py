"""Where a rollout's SDE window starts (``sde_window_size > 0``): ``sde_window_schedule`` of a run's config."""

from __future__ import annotations

import torch

from ..core.timesteps import progressive_window_start, sample_window_start
from .diffusion_grpo_config import DiffusionGRPOConfig


def sde_window_start(args: DiffusionGRPOConfig, seed: int, step: int) -> int:
    """The first stochastic step of this round's window: ``'random'`` draws it uniformly from ``sde_window_range``
    with a generator seeded by the round's ``seed`` (Flow-GRPO-Fast); ``'progressive'`` (MixGRPO) reads it off the
    optimizer ``step`` (:func:`~trl_visual.core.timesteps.progressive_window_start`), so that a resumed run places
    it where the uninterrupted run would."""
    window = args.sde_window_size, tuple(args.sde_window_range), args.num_inference_steps, args.sde_type
    if args.sde_window_schedule == "progressive":
        return progressive_window_start(*window, step, args.sde_window_shift, args.sde_window_interval)
    return sample_window_start(*window, torch.Generator().manual_seed(seed))
