"""Rewards with several *interpretations* per sample: their mean is the reward, their spread its uncertainty.

A reward may score each sample several ways (``M`` interpretations): against ``M`` paraphrases of the prompt,
with ``M`` draws of a judge that completes an ambiguous prompt, or with ``M`` reward models of an ensemble. For
sample ``j`` of group ``i`` with interpretations ``r_ij1 … r_ijM``:

- the reward is their mean, ``R_ij = (1/M) Σ_m r_ijm`` (what GRPO, BPGO and ViPO train on);
- the **interpretation variance** of that reward is the squared standard error of the mean,
  ``Var_interp(R_ij) = S²_ij / M`` with ``S²_ij = Σ_m (r_ijm − R_ij)² / (M − 1)``: the part of ``R_ij``'s
  variance that another set of interpretations would change. Dividing by ``M`` keeps it in the units of the
  reward that is trained on: for independent draws, ``E[S²/M]`` is exactly the judge's share of ``Var(R_ij)``.
- the group's **ambiguity share** (:func:`ambiguity_share`) is
  ``ρ_i = clamp(mean_j Var_interp(R_ij) / s_i², 0, 1)``, ``s_i²`` the unbiased variance of the group's
  rewards: the fraction of the group's spread that is disagreement between interpretations, not between
  images.

A reward with one value per sample has no interpretation variance: NaN marks it, and :func:`ambiguity_share`
reads it as 0. Pure tensor math, no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AMBIGUOUS_SHARE", "ambiguity_share", "ensemble_interpretations", "interpretation_mean_var"]

AMBIGUOUS_SHARE: float = 0.5
"""A group counts as *ambiguous* (``frac_ambiguous_groups``) when ``ρ_i`` exceeds this: more than half of its
spread is interpretation disagreement."""


def interpretation_mean_var(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and interpretation variance of ``(B, M)`` interpretations (rows of NaN: a skipped sample).

    ``R = mean_m r_m`` and ``Var_interp(R) = S² / M`` with the unbiased ``S²`` (module docstring); with
    ``M = 1`` the variance is NaN (no interpretations). Returns two ``(B,)`` tensors.
    """
    if values.dim() != 2:
        raise ValueError(f"interpretations must be (B, M), got shape {tuple(values.shape)}.")
    count = values.shape[1]
    mean = values.mean(dim=1)
    if count < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, values.var(dim=1, unbiased=True) / count


def ensemble_interpretations(rewards_per_func: Tensor) -> tuple[Tensor, Tensor]:
    """Several reward functions ``(B, F)`` as ``F`` interpretations of one reward, each standardized first.

    ``z_f = (R_f − mean_b R_f) / std_b R_f`` over the valid samples of the batch (population std, floored at
    1e-6), so PickScore near 22 and HPSv2 near 0.25 become comparable; then the reward is ``mean_f z_f`` and its
    interpretation variance ``var_f(z_f) / F`` (:func:`interpretation_mean_var`). A sample missing one
    function's reward (NaN) uses the others; missing all, it stays NaN. Returns ``(B,)`` reward and variance.
    """
    valid = torch.isfinite(rewards_per_func)
    filled = torch.where(valid, rewards_per_func, torch.zeros_like(rewards_per_func))
    count = valid.sum(dim=0).clamp_min(1)
    mean = filled.sum(dim=0) / count
    var = (torch.where(valid, rewards_per_func - mean, torch.zeros_like(filled)) ** 2).sum(dim=0) / count
    z = torch.where(valid, (rewards_per_func - mean) / var.sqrt().clamp_min(1e-6), torch.nan)
    present = valid.sum(dim=1)
    reward = z.nanmean(dim=1)
    squared = torch.where(valid, (z - reward.unsqueeze(1)) ** 2, torch.zeros_like(z)).sum(dim=1)
    spread = squared / (present - 1).clamp_min(1) / present.clamp_min(1)
    spread = torch.where(present >= 2, spread, torch.full_like(spread, float("nan")))
    return reward, spread


def ambiguity_share(rewards: Tensor, interpretation_var: Tensor, eps: float = 1e-12) -> Tensor:
    """``ρ_i = clamp(mean_j Var_interp(R_ij) / s_i², 0, 1)`` per group of ``(N, G)`` rewards.

    ``interpretation_var`` is ``(N, G)``, NaN where a sample has no interpretations (read as 0, so a reward
    without any gives ``ρ = 0``); samples whose reward is NaN are left out of both means. ``s_i²`` is the
    unbiased variance of the group's valid rewards; a group with interpretation variance but no spread
    (``s_i² ≤ eps``) gets ``ρ = 1``, one with neither ``ρ = 0``.
    """
    if rewards.shape != interpretation_var.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and interpretation_var {tuple(interpretation_var.shape)} must have "
            "the same (N, G) shape."
        )
    valid = ~torch.isnan(rewards)
    n = valid.sum(dim=-1).to(rewards.dtype)
    mean = torch.where(valid, rewards, torch.zeros_like(rewards)).sum(dim=-1) / n.clamp_min(1)
    deviations = torch.where(valid, rewards - mean.unsqueeze(-1), torch.zeros_like(rewards))
    s2 = (deviations**2).sum(dim=-1) / (n - 1).clamp_min(1)
    interp = torch.where(valid, torch.nan_to_num(interpretation_var, nan=0.0), torch.zeros_like(rewards))
    interp_mean = interp.sum(dim=-1) / n.clamp_min(1)
    share = torch.where(s2 > eps, interp_mean / s2.clamp_min(eps), (interp_mean > 0).to(rewards.dtype))
    return share.clamp(0.0, 1.0)
