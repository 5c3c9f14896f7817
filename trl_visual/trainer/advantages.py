"""GRPO's advantages, what :meth:`~trl_visual.trainer.DiffusionGRPOTrainer.compute_advantages` returns by default:
the global batch's ``(B, F)`` rewards → an :class:`~trl_visual.trainer.hooks.Advantages`."""

from __future__ import annotations

from typing import Any

import torch

from ..core.advantages import combine_rewards, group_advantages, invalid_to_nan, weighted_reward_sum
from ..core.branching import branch_advantages, num_branch_points
from ..core.interpretations import ensemble_interpretations
from ..core.stat_tracking import PerPromptStatTracker
from .diffusion_grpo_config import DiffusionGRPOConfig
from .hooks import Advantages
from .reward_calls import interpretation_metrics


def weighted_interpretation_var(
    per_func: torch.Tensor | None, rewards_per_func: torch.Tensor, reward_weights: torch.Tensor
) -> torch.Tensor | None:
    """``(B,)`` interpretation variance of the weighted reward ``R = Σ_f w_f R_f``: ``Σ_f w_f² Var_interp(R_f)`` from
    each function's ``per_func`` ``(B, F)`` (interpretations of different functions taken as independent; a
    function without interpretations adds 0; NaN where none has any), or ``None`` when no reward returned
    interpretations (:func:`~trl_visual.core.interpretations.interpretation_mean_var`)."""
    if per_func is None or per_func.shape != rewards_per_func.shape or bool(torch.isnan(per_func).all()):
        return None
    weighted = per_func * reward_weights.to(per_func) ** 2
    return weighted.nansum(dim=1).masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))


def grpo_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    args: DiffusionGRPOConfig,
    interpretation_var: torch.Tensor | None,
    stat_tracker: PerPromptStatTracker | None = None,
    inputs: list[dict[str, Any]] | None = None,
) -> Advantages:
    """Weighted aggregation of the rewards, then ``A = (R − R̄_group) / (std + 1e-4)`` clamped to ``±adv_clip_max``
    (:func:`~trl_visual.core.advantages.combine_rewards`). With ``reward_ensemble`` the functions are
    interpretations of one reward instead: each standardized over the batch, the reward their mean
    (:func:`~trl_visual.core.interpretations.ensemble_interpretations`), whose spread is the interpretation
    variance. With a ``stat_tracker`` (``per_prompt_stat_tracking``) the weighted reward is normalized against its
    prompt's running statistics instead of the group's (:class:`~trl_visual.core.stat_tracking.PerPromptStatTracker`;
    ``inputs`` are the global batch's rows, whose ``args.prompt_column`` keys the record).
    ``interpretation_var`` (:func:`weighted_interpretation_var`) goes to the result, its figures to ``metrics``.
    Under ``trajectory_branching`` the advantages are normalized per prompt and branch point instead
    (:func:`branching_advantages`)."""
    if stat_tracker is not None:
        reward = weighted_reward_sum(invalid_to_nan(rewards_per_func), reward_weights)
        prompts = [row[args.prompt_column] for row in inputs or []]
        advantages = stat_tracker.advantages(prompts, reward, args.scale_rewards, clip=args.adv_clip_max)
    elif args.reward_ensemble:
        reward, interpretation_var = ensemble_interpretations(invalid_to_nan(rewards_per_func))
        advantages = group_advantages(
            reward, args.num_generations, args.scale_rewards, clip=args.adv_clip_max
        )
    else:
        reward, advantages = combine_rewards(
            rewards_per_func,
            reward_weights,
            args.num_generations,
            args.multi_objective_aggregation,
            args.scale_rewards,
            args.adv_clip_max,
        )
    if args.trajectory_branching != "none":
        advantages = branching_advantages(reward, args)
    metrics = interpretation_metrics(reward, interpretation_var, args.num_generations)
    return Advantages(
        reward=reward, advantages=advantages, interpretation_var=interpretation_var, metrics=metrics
    )


def branching_advantages(reward: torch.Tensor, args: DiffusionGRPOConfig) -> torch.Tensor:
    """TempFlow-GRPO's advantages under ``trajectory_branching``: ``(R − R̄) / (std + 1e-4)`` within each sub-group of
    the samples of one prompt branched at the same step (``num_generations / P`` consecutive samples), ``std`` the
    population std (1 with ``scale_rewards="none"``), 0 for a sub-group whose rewards do not spread
    (:func:`~trl_visual.core.branching.branch_advantages`)."""
    points = num_branch_points(args.trajectory_branching, args.num_inference_steps, args.num_branch_points)
    scale = args.scale_rewards != "none"
    return branch_advantages(reward, args.num_generations // points, scale, clip=args.adv_clip_max)
