"""TempFlow-GRPO's trajectory branching (He et al., arXiv 2508.04324, Def. 1): every sample follows the ODE to its
branch step ``k``, takes one SDE step at ``k`` and follows the ODE to the end, so all of its randomness sits at
``k`` and the reward credits step ``k`` alone.

Each group of ``G`` samples of one prompt (sharing their initial noise, hence their ODE path up to ``k``) is split
into ``P`` consecutive sub-groups of ``G / P`` samples, one per branch point; advantages are normalized within a
sub-group, the samples of one prompt branched at the same ``k``.
"""

from __future__ import annotations

import torch

from .advantages import invalid_to_nan

#: how the branch points of a round are chosen ("none": no branching)
BRANCH_MODES = ("none", "all", "first", "sampled")
#: a sub-group whose rewards spread less than this (population std) gets advantage 0
ZERO_STD = 1e-6


def num_branch_points(mode: str, num_steps: int, num_points: int) -> int:
    """``P``: every step but the last (``"all"``: ``T − 1``), else ``num_points``."""
    return num_steps - 1 if mode == "all" else num_points


def branch_points(mode: str, num_steps: int, num_points: int, generator: torch.Generator) -> list[int]:
    """The ``P`` sampling steps samples branch at this round, ascending, never the last step (``σ' = 0``, where
    the noise can no longer change the sample's content): ``"all"`` ``0 … T − 2``; ``"first"`` the first ``P``
    (the high-noise ones); ``"sampled"`` ``P`` of ``0 … T − 2`` drawn without replacement from ``generator``."""
    candidates = num_steps - 1
    if mode == "all":
        return list(range(candidates))
    if mode == "first":
        return list(range(num_points))
    if mode == "sampled":
        return sorted(torch.randperm(candidates, generator=generator)[:num_points].tolist())
    raise ValueError(f"No branch points for trajectory_branching={mode!r}; choose one of {BRANCH_MODES[1:]}.")


def branch_positions(global_indices: torch.Tensor, num_generations: int, num_points: int) -> torch.Tensor:
    """For each sample (its index in the global batch, groups of ``G`` consecutive), the position ``p`` of its branch
    point among the ``P``: sample ``j`` of its group is in sub-group ``p = j // (G / P)``."""
    return (global_indices % num_generations) // (num_generations // num_points)


def branch_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4, clip: float | None = 5.0
) -> torch.Tensor:
    """``A = (R − R̄_g) / (std_g + eps)`` within consecutive sub-groups ``g`` of ``group_size`` samples (one prompt,
    one branch point), ``std_g`` the population std ``sqrt(mean((R − R̄_g)²))`` (1 when not ``scale``). A sub-group
    whose std is below :data:`ZERO_STD` gets advantage 0; NaN and ±inf rewards get 0 and are left out. Clamped to
    ``±clip``."""
    grouped = invalid_to_nan(rewards).reshape(-1, group_size)
    centred = grouped - grouped.nanmean(dim=1, keepdim=True)
    std = centred.pow(2).nanmean(dim=1, keepdim=True).sqrt()
    if scale:
        centred = centred / (std + eps)
    centred = torch.where(std < ZERO_STD, torch.zeros_like(centred), centred)
    advantages = torch.nan_to_num(centred.reshape(-1), nan=0.0)
    return advantages.clamp(-clip, clip) if clip is not None else advantages
