"""The per-timestep options of the policy loss, applied by :func:`~trl_visual.trainer.timestep_losses.timestep_losses`
to every trainer (GRPO, BPGO, ViPO): TempFlow-GRPO's ``noise_aware_weight``, GRPO-Guard's ``ratio_norm`` and
``dt_invariant_weight`` (the math: :mod:`trl_visual.core.step_weights`)."""

from __future__ import annotations

import torch

from ..core.sde import SDEStep
from ..core.step_weights import (
    dt_invariant_weights,
    noise_aware_weights,
    ratio_norm_log_ratio,
    transition_stds,
)
from .diffusion_grpo_config import DiffusionGRPOConfig
from .rollout import Rollouts, Transition


def step_loss_weights(rollouts: Rollouts, args: DiffusionGRPOConfig) -> torch.Tensor | None:
    """``(B, K)``: the factor on each sample's k-th trained step's policy loss (``rollouts.train_steps[:, k]``), the
    product of the enabled options; ``None`` when none is (the loss is then exactly the unweighted one).

    ``noise_aware_weight``: ``Norm(s_k) = s_k / mean_j s_j`` over the distinct steps this process trains this
    round; ``dt_invariant_weight``: ``δ_k = β / Δt_k``.
    """
    positions = rollouts.train_steps
    weights = None
    if args.noise_aware_weight:
        stds = transition_stds(
            args.sde_type, rollouts.sigmas, rollouts.sigmas_next, args.noise_level, rollouts.sigma_max
        )
        weights = noise_aware_weights(stds, trained=positions.unique())[positions]
    if args.dt_invariant_weight:
        delta = dt_invariant_weights(args.sde_type, rollouts.sigmas, rollouts.sigmas_next, args.noise_level)
        weights = delta[positions] if weights is None else weights * delta[positions]
    return weights


def policy_log_probs(
    step: SDEStep, transition: Transition, args: DiffusionGRPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair ``(log p, log p_old)`` the method's ``policy_loss`` takes the ratio of: the current and stored
    log-probs, or with ``ratio_norm`` ``(log r̂, 0)``, GRPO-Guard's normalized log-ratio
    (:func:`~trl_visual.core.step_weights.ratio_norm_log_ratio`, ``Δμ`` from the mean stored at sampling), so that
    every method's clipped objective (scalar or ViPO's dense one) runs on ``log r̂`` unchanged."""
    if not args.ratio_norm:
        return step.log_prob, transition.old_log_prob
    if transition.old_mean is None:
        raise RuntimeError(
            "`ratio_norm` needs the transition means stored at sampling; these rollouts have none."
        )
    mean_delta = step.mean - transition.old_mean
    log_ratio = ratio_norm_log_ratio(step.log_prob, transition.old_log_prob, mean_delta, step.std)
    return log_ratio, torch.zeros_like(log_ratio)
