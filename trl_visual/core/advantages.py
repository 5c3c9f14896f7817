"""Group-relative advantages (GRPO), with NaN and ±inf rewards left out of every statistic."""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def nan_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation over the finite entries (0 where fewer than two are finite)."""
    valid = torch.isfinite(values)
    count = valid.sum(dim=dim, keepdim=True) if dim is not None else valid.sum()
    mean = values.nanmean(dim=dim, keepdim=True) if dim is not None else values.nanmean()
    squared = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values))
    total = squared.sum(dim=dim, keepdim=True) if dim is not None else squared.sum()
    std = torch.sqrt(total / (count - 1).clamp_min(1))
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return std if keepdim or dim is None else std.squeeze(dim)


def invalid_to_nan(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` with every NaN and ±inf as NaN: an infinite reward is no value to average (it would make its
    group's mean infinite), so it is a missing sample, like ``None``."""
    return torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, float("nan")))


def weighted_reward_sum(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``R = Σ_f w_f R_f`` per sample of ``(B, F)`` rewards, NaN terms skipped; a sample with no reward at all
    (every term NaN) stays NaN, so that it is left out of the statistics rather than counted as 0."""
    weighted = rewards_per_func * weights.to(rewards_per_func)
    all_missing = torch.isnan(rewards_per_func).all(dim=1)
    return weighted.nansum(dim=1).masked_fill(all_missing, float("nan"))


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> torch.Tensor:
    """``A_i^j = (R_i^j − R̄_i) / (std + eps)``, clamped to ``±clip``.

    ``rewards`` is ``(N · G,)`` with the G samples of a group consecutive. ``std`` is the group's
    (``"group"``), the whole batch's (``"batch"``) or 1 (``"none"``). NaN and ±inf rewards get
    advantage 0 and are left out of the means and standard deviations.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; choose one of {SCALE_REWARDS}.")
    rewards = invalid_to_nan(rewards)
    grouped = rewards.reshape(-1, num_generations)
    centred = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (nan_std(grouped, dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (nan_std(rewards) + eps)
    advantages = torch.nan_to_num(centred.reshape(-1), nan=0.0)
    return advantages.clamp(-clip, clip) if clip is not None else advantages


def combine_rewards(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    clip: float | None = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn several rewards ``(B, F)`` into one reward and one advantage per sample.

    ``sum_then_normalize``: ``R = Σ_f w_f R_f`` (NaN and ±inf terms skipped; none left: NaN), then
    advantages of R. ``normalize_then_sum``: ``A = Σ_f w_f A(R_f)``, then clamped.
    Returns ``(reward, advantage)``, both ``(B,)``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"Unknown multi_objective_aggregation {aggregation!r}; choose one of {AGGREGATIONS}."
        )
    rewards_per_func = invalid_to_nan(rewards_per_func)
    reward = weighted_reward_sum(rewards_per_func, weights)
    if aggregation == "sum_then_normalize":
        return reward, group_advantages(reward, num_generations, scale_rewards, clip=clip)
    per_func = [
        group_advantages(rewards_per_func[:, f], num_generations, scale_rewards, clip=None)
        for f in range(rewards_per_func.shape[1])
    ]
    advantage = (torch.stack(per_func, dim=1) * weights.to(rewards_per_func)).sum(dim=1)
    return reward, advantage.clamp(-clip, clip) if clip is not None else advantage
