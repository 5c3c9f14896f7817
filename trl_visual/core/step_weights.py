"""Per-timestep reweighting of the clipped objective: TempFlow-GRPO's noise-aware weight and GRPO-Guard's
ratio normalization and dt-invariant gradient weight.

One trained transition goes from ``σ`` to ``σ'`` (``Δt = σ − σ' > 0``) through the Gaussian ``x' ~ N(μ, s²)`` of
:mod:`trl_visual.core.sde`. The plain loss's gradient at a step scales with the step's noise and size, so the
low-noise late steps dominate it; each function here removes one of those dependences.

- TempFlow-GRPO (He et al., arXiv 2508.04324, Eq. 8): the clipped term of each step times ``Norm(s)``, its
  transition std normalized to mean 1 over the trained steps.
- GRPO-Guard (arXiv 2510.22319), RatioNorm (Eq. 8): ``log r̂ = s · (log r + Δμ² / (2 s²))`` in place of
  ``log r``, per element, with ``Δμ = μ_θ − μ_old``.
- GRPO-Guard, gradient reweight (Eq. 12): the step's policy loss times ``δ = β / Δt``.
"""

from __future__ import annotations

import torch

from .sde import sde_mean_std

#: where the dt-invariant weight floors ``t`` in DanceGRPO's ``β = 1 + η² (1 − t) / (2t)``
DT_WEIGHT_MIN_SIGMA = 1e-3


def transition_stds(
    sde_type: str, sigmas: torch.Tensor, sigmas_next: torch.Tensor, noise_level: float, sigma_max: float = 1.0
) -> torch.Tensor:
    """The std ``s`` of each step ``σ → σ'`` of a schedule, ``(K,)``: it depends on the schedule only.

    ``flow_grpo``: ``s = σ_t sqrt(Δt)``, ``σ_t = a sqrt(σ / (1 − σ))``; ``dance_grpo``: ``s = η sqrt(Δt)``;
    ``cps``: ``s = σ' sin(aπ / 2)`` (:func:`~trl_visual.core.sde.sde_mean_std`).
    """
    sigmas = sigmas.float()
    zeros = torch.zeros_like(sigmas)
    _, std = sde_mean_std(sde_type, zeros, zeros, sigmas, sigmas_next.float(), noise_level, sigma_max)
    return std.expand_as(sigmas)


def noise_aware_weights(stds: torch.Tensor, trained: torch.Tensor | None = None) -> torch.Tensor:
    """TempFlow-GRPO's ``Norm(s_k) = s_k / mean_{j ∈ trained} s_j``: the steps' stds ``(K,)`` scaled so that the
    ``trained`` ones (indices; all when ``None``) average 1, so the weights move the gradient between steps without
    changing its overall scale. All-equal stds give all 1."""
    reference = stds if trained is None else stds[trained]
    return stds / reference.mean()


def dt_invariant_weights(
    sde_type: str, sigmas: torch.Tensor, sigmas_next: torch.Tensor, noise_level: float
) -> torch.Tensor:
    """GRPO-Guard's ``δ = β / Δt`` per step ``(K,)``, ``Δt = σ − σ'``: ``β = 1`` for ``flow_grpo`` and
    ``β = 1 + η² (1 − t) / (2t)`` for ``dance_grpo`` (``t = σ`` floored at :data:`DT_WEIGHT_MIN_SIGMA`).

    The velocity enters the step's mean with ``∂μ/∂v = −Δt (1 + a²/2)`` for ``flow_grpo`` and ``−β Δt`` for
    ``dance_grpo``, so ``δ · ∂μ/∂v`` is ``−(1 + a²/2)`` (one constant) and ``−β²`` respectively: free of the step
    size either way. (For ``dance_grpo`` the weight that makes it one constant too would be ``1 / (β Δt)``; this is
    the form of ``../shared/ALGORITHMS.md`` §5, kept until the paper's Eq. 12 is checked.) ``cps`` has no such
    weight in the paper.
    """
    sigmas, sigmas_next = sigmas.float(), sigmas_next.float()
    dt = sigmas - sigmas_next
    if sde_type == "flow_grpo":
        beta = torch.ones_like(sigmas)
    elif sde_type == "dance_grpo":
        t = sigmas.clamp_min(DT_WEIGHT_MIN_SIGMA)
        beta = 1 + noise_level**2 * (1 - t) / (2 * t)
    else:
        raise ValueError(
            f"The dt-invariant weight is defined for sde_type 'flow_grpo' and 'dance_grpo', not {sde_type!r}."
        )
    return beta / dt


def ratio_norm_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean_delta: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm, elementwise: ``log r̂ = s · (log r + Δμ² / (2 s²))`` with ``log r = log p_θ − log p_old``
    of the stored ``x'``, ``Δμ = μ_θ − μ_old`` and ``s`` the transition std.

    For ``x' = μ_old + s ε`` it equals ``Δμ · ε``: ``log r = (Δμ ε) / s − Δμ² / (2 s²)`` carries a bias
    ``−Δμ² / (2s²)`` that is always negative and grows as ``s`` shrinks, which makes the clip fire unevenly across
    steps; removing it and scaling by ``s`` centres the ratio at every step. (The paper writes ``−Δμ · ε`` with
    ``Δμ = μ_old − μ_θ``: the same quantity.)
    """
    std = std.to(log_prob.dtype)
    return std * (log_prob - old_log_prob + mean_delta**2 / (2 * std**2))
