"""BPGO (Bayesian Prior-Guided Optimization): the pure tensor math.

Liu et al., "Learning What to Trust: Bayesian Prior-Guided Optimization for Visual Generation",
arXiv 2511.18919. Each prompt ``i`` has a prior reward ``R_prior,i``; a group's rewards are compared
with it at two levels:

- **RAS** (Reliability-Adaptive Scaling): one weight per group, :func:`ras_weights_sigmoid` (the
  paper's Eq. 2) or :func:`ras_weights_posterior` (the authors' released code, a Normal–Normal
  posterior).
- **CRT** (Contrastive Reward Transformation): a per-sample transform of the rewards,
  :func:`crt_transform_paper` (the paper's Eq. 4) or :func:`crt_transform_reference` (the released
  code's gated form).
- **Priors** kept as a per-prompt moving average of group means: :func:`update_ema_prior`.
- **Uncertainty-aware RAS** (our extension, not the paper's Eq. 2): :func:`ras_weights_uncertainty` weighs a
  group by how little of its spread is disagreement between the reward's interpretations
  (:func:`~trl_visual.core.interpretations.ambiguity_share`), optionally times its consistency with a fixed
  anchor (:func:`anchor_consistency`).

Conventions shared by every function here:

- ``rewards`` is a float tensor ``(N, G)``: N groups (prompts) of G samples. NaN marks a missing
  reward and is left out of every statistic (counts, means, variances).
- ``priors`` is ``(N,)``, one per group. It may also be a 0-d tensor (one prior for every group).
- Nothing here moves tensors between devices or synchronises with the device: no ``.item()``, no
  data-dependent Python branching. Only argument values given as Python numbers are checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RAS_K",
    "POSTERIOR_VAR_EPS",
    "batch_reward_scale",
    "crt_transform_paper",
    "crt_transform_reference",
    "anchor_consistency",
    "prior_delta",
    "ras_weights_posterior",
    "ras_weights_sigmoid",
    "ras_weights_uncertainty",
    "update_ema_prior",
]

DEFAULT_RAS_K: float = 2.0
"""Default slope ``k`` of the sigmoid RAS weight for the scale-free form (Δ in batch stds).

With ``k = 2`` the weight is ``w = 1 + α tanh(Δ / s)`` (since ``2 sigmoid(2x) − 1 = tanh(x)``), so
with α = 0.5: Δ = 0.25 s → w = 1.122; Δ = 0.5 s → 1.231; Δ = 1 s → 1.381; Δ = 2 s → 1.482 (and
symmetrically below 1 for Δ < 0). A group mean one batch std from its prior thus gets 76 % of the
maximal adjustment α, and the weight saturates only beyond about 2 s. The noise alone in a mean of
G = 8 samples is about s / √8 ≈ 0.35 s, which moves w by only about ±0.17: the weight responds to
real gaps between group and prior, not just to sampling noise, yet keeps a useful spread inside
(1 − α, 1 + α) instead of collapsing to its two limits, which a much larger k (say 10) would do.
"""

POSTERIOR_VAR_EPS: float = 1e-8
#: Variance the posterior RAS gives a group with fewer than 2 valid rewards (the released code's 1.0).
SINGLE_REWARD_VAR: float = 1.0
"""Added to the group's sample variance in :func:`ras_weights_posterior` (as the released code does)."""

_SIGMOID_EXP_CLAMP: float = 30.0


def _as_column(priors: Tensor | float, rewards: Tensor) -> Tensor:
    """Return ``priors`` shaped to broadcast against ``rewards`` ``(N, G)``: ``(N,) -> (N, 1)``."""
    priors = torch.as_tensor(priors, dtype=rewards.dtype, device=rewards.device)
    if priors.dim() == 0:
        return priors
    if priors.dim() != rewards.dim() - 1 or priors.shape != rewards.shape[:-1]:
        raise ValueError(
            f"priors must have shape {tuple(rewards.shape[:-1])} (one per group of the rewards of shape "
            f"{tuple(rewards.shape)}), got {tuple(priors.shape)}."
        )
    return priors.unsqueeze(-1)


def _group_count_mean_var(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """NaN-aware per-group statistics over the last dimension.

    Returns ``(n, mean, var)``, each ``(N,)``: ``n`` the number of valid (non-NaN) values, ``mean``
    their mean (NaN when ``n = 0``), ``var`` their unbiased variance ``Σ (R − R̄)² / (n − 1)``, set
    to 0 when ``n < 2`` (a single value carries no spread).
    """
    valid = ~torch.isnan(rewards)
    n = valid.sum(dim=-1).to(rewards.dtype)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=-1) / n  # 0 / 0 = NaN for an empty group
    sq_dev = torch.where(valid, (rewards - mean.unsqueeze(-1)) ** 2, torch.zeros_like(rewards))
    var = sq_dev.sum(dim=-1) / (n - 1).clamp_min(1.0)
    var = torch.where(n >= 2, var, torch.zeros_like(var))
    return n, mean, var


def prior_delta(rewards: Tensor, priors: Tensor | float) -> Tensor:
    """The uncertainty signal ``Δ_i = R̄_i − R_prior,i`` (BPGO paper §3 and its released code alike).

    ``R̄_i`` is the NaN-aware mean of group i. Positive Δ means the group did better than its
    prior (a reliable, well-aligned group). A group with no valid reward gives ``Δ_i = NaN``.

    Args:
        rewards: ``(N, G)`` rewards, NaN for missing ones.
        priors: ``(N,)`` prior rewards.

    Returns:
        ``(N,)`` tensor of Δ.
    """
    return torch.nanmean(rewards, dim=-1) - _as_column(priors, rewards).squeeze(-1)


def batch_reward_scale(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """NaN-aware standard deviation of all rewards of the batch, floored at ``eps``.

    ``s = max(sqrt(mean_k (R_k − R̄)²), eps)`` over every valid reward ``R_k`` of the batch (population
    std, as Flow-GRPO's global std). It is the unit of the scale-free RAS: ``Δ / s`` does not change
    when every reward and prior is multiplied by the same constant (HPSv2 near 0.25 and PickScore
    near 22 then use the same ``k``). A constant batch, or one with no valid reward, gives ``eps``.

    Args:
        rewards: rewards of any shape, NaN for missing ones.
        eps: floor of the result, so that dividing by it is always safe.

    Returns:
        0-d tensor.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    flat = rewards.reshape(-1)
    valid = ~torch.isnan(flat)
    n = valid.sum().to(rewards.dtype)
    filled = torch.where(valid, flat, torch.zeros_like(flat))
    mean = filled.sum() / n.clamp_min(1.0)
    var = torch.where(valid, (flat - mean) ** 2, torch.zeros_like(flat)).sum() / n.clamp_min(1.0)
    return var.sqrt().clamp_min(eps)


def ras_weights_sigmoid(
    delta: Tensor,
    alpha: float = 0.5,
    k: float = DEFAULT_RAS_K,
    scale: Tensor | float | None = None,
) -> Tensor:
    """RAS weight per group, the **paper's form** (Eq. 2), optionally scale-free.

    ``w_i = 1 + α · (2 · sigmoid(k · Δ_i / s) − 1)``, with values in ``(1 − α, 1 + α)``.

    - ``scale=None``: ``s = 1``, the paper's equation literally; then ``k`` is in units of 1/reward
      and must be chosen for the reward's scale (the paper does not give it).
    - ``scale=s`` (e.g. :func:`batch_reward_scale` of the batch's rewards): Δ is measured in batch
      standard deviations, which is the scale-free option this project adds. The default
      ``k = 2`` (:data:`DEFAULT_RAS_K`) is chosen for this form: ``w = 1 + α tanh(Δ / s)``, so with
      α = 0.5, Δ = 0.5 s → w = 1.231, Δ = 1 s → w = 1.381, Δ = 2 s → w = 1.482.

    A NaN Δ (a group without any valid reward) gets the neutral weight 1.

    Args:
        delta: ``(N,)`` tensor of ``Δ_i = R̄_i − R_prior,i`` (see :func:`prior_delta`).
        alpha: strength α in [0, 1]; the paper's sweep found 0.5 best. Above 1 weights could turn
            negative and flip the sign of a group's loss, so that is refused.
        k: slope of the sigmoid, positive.
        scale: positive unit of Δ (float or 0-d / broadcastable tensor), or None for none.

    Returns:
        Tensor of weights with the shape and dtype of ``delta``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] so that weights stay in (1 - alpha, 1 + alpha), got {alpha}."
        )
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}.")
    x = delta
    if scale is not None:
        if isinstance(scale, (int, float)) and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        x = x / scale
    w = 1.0 + alpha * (2.0 * torch.sigmoid(k * x) - 1.0)
    return torch.where(torch.isnan(delta), torch.ones_like(w), w)


def ras_weights_posterior(
    rewards: Tensor, priors: Tensor | float, alpha: float = 1.0, prior_var: float = 1.0
) -> Tensor:
    """RAS weight per group, the **released code's form** ("bayes"): a Normal–Normal posterior.

    For group i with ``n`` valid rewards (NaN left out; the released code has ``n = G``), mean
    ``R̄`` and unbiased variance ``var`` (1.0 when ``n < 2``, as the released code: a single reward
    carries no spread and must not count as certain, which ``var = 0`` would make it, ``w → 1 ± α/2``):

    - ``s² = var + 1e-8``
    - ``v_post = 1 / (n / s² + 1 / v_0)``
    - ``μ_post = v_post · (n R̄ / s² + R_prior / v_0)``
    - ``p = P(post > R_prior) = 1 − Φ((R_prior − μ_post) / sqrt(v_post))``
    - ``w_b = 0.5 + p``;  ``w = clamp(1 + α (w_b − 1), 0.01, 10)``

    ``μ_post`` is evaluated as the algebraically identical ``R_prior + v_post (n / s²)(R̄ − R_prior)``
    in float64, so a zero-variance group (``s² = 1e-8``, ``n / s²`` ~ 1e8) keeps full precision:
    its weight tends to ``1 ± α/2`` by the sign of ``R̄ − R_prior``, and is exactly 1 when
    ``R̄ = R_prior``. A group without any valid reward has ``n = 0``, so ``μ_post = R_prior``,
    ``p = 0.5`` and ``w = 1``.

    Args:
        rewards: ``(N, G)`` rewards, NaN for missing ones.
        priors: ``(N,)`` prior rewards.
        alpha: strength α ≥ 0 (the released code uses 1; weights then lie in [0.5, 1.5]).
        prior_var: prior variance ``v_0`` > 0 (the released code uses 1.0, in squared reward units).

    Returns:
        ``(N,)`` weights in the dtype of ``rewards``.
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}.")
    if not prior_var > 0:
        raise ValueError(f"prior_var must be positive, got {prior_var}.")
    r = rewards.to(torch.float64)
    prior = _as_column(priors, r).squeeze(-1)
    n, mean, var = _group_count_mean_var(r)
    var = torch.where(n >= 2, var, torch.full_like(var, SINGLE_REWARD_VAR))
    mean = torch.where(n > 0, mean, prior)  # n = 0: the data term vanishes; avoid 0 · NaN
    s2 = var + POSTERIOR_VAR_EPS
    precision_data = n / s2
    v_post = 1.0 / (precision_data + 1.0 / prior_var)
    mu_post = prior + v_post * precision_data * (mean - prior)
    z = (prior - mu_post) / v_post.sqrt()
    p = 1.0 - torch.special.ndtr(z)
    w = (1.0 + alpha * ((0.5 + p) - 1.0)).clamp(0.01, 10.0)
    return w.to(rewards.dtype)


def anchor_consistency(
    rewards: Tensor, anchor_mean: Tensor | float, anchor_var: Tensor | float, num_rollouts: int
) -> Tensor:
    """How far each group's mean is above its fixed anchor, in standard errors: ``z_i``.

    ``z_i = (R̄_i − m_i) / sqrt(s_i² / G_i + v_i / K)``, with ``R̄_i``, ``s_i²`` (unbiased) and ``G_i`` the mean,
    variance and count of group i's valid rewards, ``m_i`` and ``v_i`` the anchor's mean and variance (the
    base model's reward on that prompt, from ``K`` rollouts) and ``K = num_rollouts``. The denominator is the
    standard error of the difference of the two means. A zero denominator (no spread anywhere) gives ``z = 0``;
    a group without valid rewards ``z = 0``.

    Returns ``(N,)`` in the dtype of ``rewards``.
    """
    if num_rollouts < 1:
        raise ValueError(f"num_rollouts must be at least 1, got {num_rollouts}.")
    n, mean, var = _group_count_mean_var(rewards)
    m = _as_column(anchor_mean, rewards).squeeze(-1)
    v = _as_column(anchor_var, rewards).squeeze(-1)
    se2 = var / n.clamp_min(1.0) + v / num_rollouts
    z = (mean - m) / se2.clamp_min(1e-24).sqrt()
    return torch.where((n > 0) & (se2 > 0), z, torch.zeros_like(z))


def ras_weights_uncertainty(
    ambiguity: Tensor,
    alpha: float = 0.5,
    consistency: Tensor | None = None,
) -> Tensor:
    """RAS weight per group from the reward's **uncertainty** (our extension; not the paper's Eq. 2).

    With ``ρ_i`` the group's ambiguity share (:func:`~trl_visual.core.interpretations.ambiguity_share`,
    ``ρ_i = clamp(mean_j Var_interp(R_ij) / s_i², 0, 1)``):

    - ``u_i = 1 + α (1 − 2 ρ_i)``: reliable groups (``ρ = 0``) get ``1 + α``, groups whose spread is all
      interpretation disagreement (``ρ = 1``) ``1 − α``;
    - with ``consistency = z`` (:func:`anchor_consistency`), ``u_i ← u_i · 2 Φ(z_i)``: the paper's "groups
      consistent with the prior", a group far above its anchor counts up to twice, one far below it down to 0;
    - ``w_i = u_i / mean_k u_k``: renormalized to mean 1 over the groups given (the whole global batch: the
      trainer computes it after gathering every process's rewards), so the step size does not change, only how
      it is shared out. Should every ``u`` be 0 (α = 1 and ``ρ = 1`` everywhere), every group gets 1.

    Unlike the sigmoid and posterior forms, which read where a group's mean lands relative to its prior (odd
    around it, so a noisy group is as often up-weighted as down), ``ρ_i`` is large exactly when a group's
    rewards disagree with themselves: the weight tracks the reward's reliability.

    Args:
        ambiguity: ``(N,)`` ambiguity shares in [0, 1].
        alpha: strength α in [0, 1] (above 1 a weight could turn negative and flip a group's loss).
        consistency: ``(N,)`` ``z_i``, or ``None`` for no consistency factor.

    Returns:
        ``(N,)`` weights, mean 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] so that no weight turns negative, got {alpha}.")
    u = 1.0 + alpha * (1.0 - 2.0 * ambiguity)
    if consistency is not None:
        u = u * 2.0 * torch.special.ndtr(consistency)
    total = u.mean()
    return torch.where(total > 0, u / total.clamp_min(torch.finfo(u.dtype).tiny), torch.ones_like(u))


def crt_transform_paper(
    rewards: Tensor, priors: Tensor | float, lam: float, scale: Tensor | float | None = None
) -> Tensor:
    """Contrastive Reward Transformation, the **paper's form** (Eq. 4).

    ``R̃_i^j = [λ (R_i^j − R_prior,i) / s + 1{R_i^j > R_prior,i}] · exp(R_i^j)``

    ``s = 1`` (``scale=None``) is the paper's literal equation, where λ has the reward's units (λ = 50 suits
    HPSv2's spread of ~0.02, not PickScore's ~1). ``scale=s`` (e.g. :func:`batch_reward_scale`) measures the
    contrast in batch reward stds, as the sigmoid RAS can: λ ≈ 1 then weighs it against the step for
    any reward.

    The paper adds an auxiliary GRPO loss on the transformed group (weight ς); λ is not given in the
    paper. For λ > 0: R̃ < 0 below the prior, R̃ = 0 at it, R̃ > 0 above it with a jump of
    ``exp(R_prior)`` there, and R̃ increases with R above the prior. ``exp`` overflows float32
    beyond R ≈ 88; rewards are expected to be far below that. NaN rewards stay NaN.

    Args:
        rewards: ``(N, G)`` rewards, NaN for missing ones.
        priors: ``(N,)`` prior rewards.
        lam: λ, the weight of the linear contrast.
        scale: ``s > 0``, the unit of ``R − R_prior``; ``None`` for 1.

    Returns:
        ``(N, G)`` transformed rewards.
    """
    prior = _as_column(priors, rewards)
    above = (rewards > prior).to(rewards.dtype)
    contrast = rewards - prior if scale is None else (rewards - prior) / scale
    return (lam * contrast + above) * torch.exp(rewards)


def crt_transform_reference(
    rewards: Tensor, priors: Tensor | float, a: float = 50.0, tau: float = 5.0
) -> Tensor:
    """Contrastive Reward Transformation, the **released code's form** (gated; replaces the rewards).

    ``R̃ = [a (R − R_prior) + 1{R > R_prior}] · sigmoid(R / τ) · R``, with
    ``sigmoid(x) = 1 / (1 + exp(−clamp(x, −30, 30)))`` (the exponent clamped to ±30 as released),
    a = 50 and τ = 5 by default.

    Unlike the paper's form, the trailing factor ``R`` makes the sign depend on the reward's sign: for
    positive rewards R̃ has the sign of ``R − R_prior`` (and is 0 at the prior), for negative rewards
    the sign is flipped, and R = 0 always maps to 0. NaN rewards stay NaN.

    Args:
        rewards: ``(N, G)`` rewards, NaN for missing ones.
        priors: ``(N,)`` prior rewards.
        a: weight of the linear contrast.
        tau: temperature of the sigmoid gate, positive.

    Returns:
        ``(N, G)`` transformed rewards.
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    prior = _as_column(priors, rewards)
    above = (rewards > prior).to(rewards.dtype)
    x = (rewards / tau).clamp(-_SIGMOID_EXP_CLAMP, _SIGMOID_EXP_CLAMP)
    gate = 1.0 / (1.0 + torch.exp(-x))
    return (a * (rewards - prior) + above) * gate * rewards


def update_ema_prior(priors: Tensor, group_means: Tensor, decay: float) -> Tensor:
    """One moving-average update of per-prompt priors (the paper's text-to-image prior), batched.

    For each entry: ``P' = m`` on a first visit (``P`` is NaN, "prompt never seen");
    ``P' = decay · P + (1 − decay) · m`` otherwise; ``P' = P`` when the group mean ``m`` is NaN (all
    of the group's rewards missing). The inputs are not modified.

    Args:
        priors: ``(N,)`` current priors, NaN for prompts not seen yet.
        group_means: ``(N,)`` NaN-aware group means of this step (``torch.nanmean(rewards, -1)``).
        decay: weight of the old prior, in [0, 1].

    Returns:
        ``(N,)`` new priors.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    if priors.shape != group_means.shape:
        raise ValueError(
            f"priors and group_means must have the same shape, got {tuple(priors.shape)} and "
            f"{tuple(group_means.shape)}."
        )
    group_means = group_means.to(priors.dtype)
    blended = decay * priors + (1.0 - decay) * group_means
    updated = torch.where(torch.isnan(priors), group_means, blended)
    return torch.where(torch.isnan(group_means), priors, updated)
