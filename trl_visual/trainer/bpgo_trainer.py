"""BPGO (Bayesian Prior-Guided Optimization) on top of :class:`DiffusionGRPOTrainer`, through its hooks only."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cached_property
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from ..core.advantages import group_advantages
from ..core.bpgo import (
    anchor_consistency,
    batch_reward_scale,
    crt_transform_paper,
    crt_transform_reference,
    prior_delta,
    ras_weights_posterior,
    ras_weights_sigmoid,
    ras_weights_uncertainty,
)
from ..core.interpretations import ambiguity_share
from .bpgo_config import BPGOConfig
from .bpgo_estimation import PriorEstimator
from .bpgo_priors import (
    check_prior_source,
    make_prior_store,
)
from .diffusion_grpo_trainer import DiffusionGRPOTrainer
from .hooks import Advantages, AuxiliaryObjective

logger = logging.getLogger(__name__)

LOSS_WEIGHT_MODES = ("sigmoid", "uncertainty")
"""RAS modes whose weight multiplies the group's GRPO loss (the posterior one multiplies its advantages)."""


class BPGOTrainer(DiffusionGRPOTrainer):
    r"""BPGO: GRPO that weighs each group by how it compares with a per-prompt prior reward.

    Liu et al., "Learning What to Trust: Bayesian Prior-Guided Optimization for Visual Generation"
    (arXiv 2511.18919). Each prompt has a prior reward ``R_prior,i``; with ``Δ_i = R̄_i − R_prior,i``:

    - **RAS** gives group i a weight ``w_i``. ``ras_mode="sigmoid"`` (paper, Eq. 2):
      ``w_i = 1 + α (2 sigmoid(k Δ_i / s) − 1)`` *multiplies the group's GRPO loss*
      (``s`` the batch reward std by default, 1 for the literal form). ``ras_mode="posterior"`` (released
      code): ``w_i = clamp(1 + α (P(post > R_prior) − ½), 0.01, 10)`` *multiplies the z-scored
      advantages*, ``A = clamp(w_i · A_GRPO, ±adv_clip_max)``.
    - **CRT** contrasts each reward with the prior. ``crt_mode="auxiliary"`` (paper, Eq. 4):
      ``R̃ = [λ (R − R_prior) + 1{R > R_prior}] exp(R)`` and the per-transition loss becomes
      ``w_i · L(A) + ς · L(Ã)``, both clipped objectives evaluated on the same log-ratio of the same
      transitions (``Ã`` the GRPO advantages of R̃). ``crt_mode="replace"`` (released code):
      ``R̃ = [a (R − R_prior) + 1{R > R_prior}] sigmoid(R / τ) R`` replaces R before the advantages, and
      RAS then reads R̃ (as the released code does). The logged ``reward`` is always the untransformed one.

    Example::

        from datasets import Dataset
        from peft import LoraConfig
        from trl_visual.trainer.bpgo_config import BPGOConfig
        from trl_visual.trainer.bpgo_trainer import BPGOTrainer

        trainer = BPGOTrainer(
            model="tiny:sd3",
            reward_funcs="red_channel",
            args=BPGOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8, max_steps=30,
                            height=32, width=32, prior_source="column", ras_mode="sigmoid",
                            crt_mode="auxiliary"),
            train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"],
                                             "prior": [-0.02, -0.02, -0.01, -0.02]}),
            peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        )
        trainer.train()

        # or estimate the priors from the base model first, and keep them as a data set:
        priors = trainer.estimate_priors(Dataset.from_dict({"prompt": ["a cat", "a dog"]}), num_rollouts=8)

    Priors come from ``prior_source``: a dataset column (checked before training), the base model's
    mean reward over ``prior_num_rollouts`` rollouts per prompt (or a separate model's, with
    ``prior_model_name_or_path``; estimated when training starts, cached in ``output_dir/bpgo_priors.json``),
    the reward of each row's conditioning image (``"first_frame"``, image-to-video; cached the same way), or a
    per-prompt EMA of group means. EMA and estimated priors are saved in every checkpoint and restored by
    ``resume_from_checkpoint``. Logged figures:
    ``bpgo/prior_mean``, ``bpgo/delta_mean``, ``bpgo/ras_weight_mean|min|max``,
    ``bpgo/frac_groups_above_prior`` and, with auxiliary CRT, ``bpgo/crt_loss`` (the unweighted
    auxiliary loss ``L(Ã)``).
    """

    _tag_names = ["trl-visual", "bpgo"]
    _method_name = "BPGO"
    _citations = ["BPGO", "DanceGRPO", "Flow-GRPO"]
    config_class = BPGOConfig

    def _prepare_method(self, args: BPGOConfig, train_dataset: Dataset | IterableDataset | None) -> None:
        """The prior source is checked against the data set (a missing column, say) and the prior store made,
        before the pipeline loads."""
        super()._prepare_method(args, train_dataset)
        check_prior_source(train_dataset, args)
        self.prior_store = make_prior_store(
            args.prior_source, args.prior_column, args.prior_ema_decay, args.prior_var_column
        )

    @cached_property
    def prior_estimator(self) -> PriorEstimator:
        """Estimates the priors from the base model (or a prior model, or the conditioning images)."""
        return PriorEstimator(self)

    def _before_train(self, checkpoint: str | None) -> None:
        """Make the priors when ``prior_source="base_model"`` or ``"first_frame"``, once the checkpoint (if any) is
        checked (:meth:`PriorEstimator.prepare`)."""
        self.prior_estimator.prepare(self.prior_store, checkpoint, self.train_dataset)

    def estimate_priors(
        self, dataset: Dataset, num_rollouts: int | None = None, with_variance: bool = False
    ) -> Dataset:
        """``dataset`` with a ``prior_column`` ("prior") holding each prompt's expected reward under the base
        model, the mean reward of ``num_rollouts`` (default ``prior_num_rollouts``) rollouts per distinct prompt;
        ``with_variance`` adds their variance as ``prior_var_column`` (:meth:`PriorEstimator.estimate_priors`).
        The result feeds ``prior_source="column"``."""
        return self.prior_estimator.estimate_priors(dataset, num_rollouts, with_variance)

    # ------------------------------------------------------------------------------------------------
    # Hooks: rewards → advantages, and the loss
    # ------------------------------------------------------------------------------------------------
    def compute_advantages(self, rewards_per_func: torch.Tensor, inputs: list[dict[str, Any]]) -> Advantages:
        """GRPO's reward and advantages, then BPGO's prior, CRT and RAS (see the class docstring).

        Sigmoid RAS gives the per-sample ``weight`` ``w`` of the main term; auxiliary CRT adds the objective
        ``ς · L(Ã)`` (logged as ``bpgo/crt_loss``); the prior figures go to ``metrics``. CRT and the priors
        act on the weighted sum of the rewards.
        """
        args, G = self.args, self.args.num_generations
        base = super().compute_advantages(rewards_per_func, inputs)
        advantages = base.advantages
        grouped = base.reward.reshape(-1, G)
        rows = inputs[::G]
        prompts = [row[args.prompt_column] for row in rows]
        group_means = grouped.nanmean(dim=1)  # once: the prior store reads them twice
        priors = self.prior_store.priors(prompts, rows, group_means)
        signal = grouped  # what RAS reads: the rewards, or the transformed ones under crt_mode="replace"
        if args.crt_mode == "replace":
            self._warn_negative_rewards(grouped)
            signal = crt_transform_reference(grouped, priors, args.crt_a, args.crt_tau)
            advantages = group_advantages(signal.reshape(-1), G, args.scale_rewards, clip=None)
        weights = self._ras_weights(signal, priors, self._uncertainty(grouped, base, prompts, rows, priors))
        if args.ras_mode == "posterior":
            advantages = advantages * weights.repeat_interleave(G)
        auxiliary = list(base.auxiliary)
        if args.crt_mode == "auxiliary":
            scale = batch_reward_scale(grouped) if args.crt_delta_scale == "batch_std" else None
            transformed = crt_transform_paper(grouped, priors, args.crt_lambda, scale)
            crt = group_advantages(transformed.reshape(-1), G, args.scale_rewards, clip=args.adv_clip_max)
            auxiliary.append(AuxiliaryObjective(args.crt_weight, crt, name="bpgo/crt_loss"))
        self.prior_store.update(prompts, group_means)
        return replace(
            base,
            advantages=advantages.clamp(-args.adv_clip_max, args.adv_clip_max),
            weight=weights.repeat_interleave(G) if args.ras_mode in LOSS_WEIGHT_MODES else base.weight,
            auxiliary=auxiliary,
            metrics={**base.metrics, **self._prior_metrics(grouped, priors, weights)},
        )

    def _warn_negative_rewards(self, grouped: torch.Tensor) -> None:
        """The released CRT ends with a factor R: negative rewards reverse its order. Warn once."""
        if getattr(self, "_warned_negative", False) or not bool((grouped < 0).any()):
            return
        self._warned_negative = True
        logger.warning(
            "crt_mode='replace' (the released code's CRT) multiplies by the reward R itself, so for negative "
            "rewards a higher reward gets a LOWER transformed reward and training pushes the reward down. "
            "Shift the reward to be positive (as HPSv2, PickScore and CLIP scores are), or use crt_mode='auxiliary'."
        )

    def _uncertainty(
        self,
        grouped: torch.Tensor,
        base: Advantages,
        prompts: list[str],
        rows: list[dict[str, Any]],
        priors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """For ``ras_mode="uncertainty"``: each group's ambiguity share ``ρ_i`` (0 without interpretations, and a
        warning once) and, with ``ras_consistency``, its ``z_i`` against the fixed prior (:func:`anchor_consistency`,
        ``K = prior_num_rollouts``). ``None`` for the other modes."""
        args = self.args
        if args.ras_mode != "uncertainty":
            return None
        if base.interpretation_var is None:
            self._warn_no_interpretations()
            ambiguity = torch.zeros_like(priors)
        else:
            ambiguity = ambiguity_share(grouped, base.interpretation_var.reshape(grouped.shape).to(grouped))
        z = None
        if args.ras_consistency:
            variances = self.prior_store.variances(prompts, rows, priors)
            z = anchor_consistency(grouped, priors, variances, args.prior_num_rollouts)
        return ambiguity, z

    def _warn_no_interpretations(self) -> None:
        if getattr(self, "_warned_no_interpretations", False):
            return
        self._warned_no_interpretations = True
        logger.warning(
            "ras_mode='uncertainty' but no reward returned interpretations, so the ambiguity share is 0 for every "
            "group and every group gets the same weight (only `ras_consistency` can tell them apart). Give the "
            "reward interpretations: a `prompt_variants` column for text-matching rewards, "
            "`shapes_judge`'s `num_draws`, a reward returning M floats per sample, or `reward_ensemble=True`."
        )

    def _ras_weights(
        self,
        signal: torch.Tensor,
        priors: torch.Tensor,
        uncertainty: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``(N,)`` RAS weights of the groups ``signal`` ``(N, G)`` against their priors; ``uncertainty`` is
        :meth:`_uncertainty`'s ``(ρ, z)`` for ``ras_mode="uncertainty"``."""
        args = self.args
        if args.ras_mode == "uncertainty":
            ambiguity, z = uncertainty
            return ras_weights_uncertainty(ambiguity, args.ras_alpha, z)
        if args.ras_mode == "posterior":
            return ras_weights_posterior(signal, priors, args.ras_alpha, args.ras_prior_var)
        if args.ras_mode == "sigmoid":
            scale = batch_reward_scale(signal) if args.ras_delta_scale == "batch_std" else None
            return ras_weights_sigmoid(prior_delta(signal, priors), args.ras_alpha, args.ras_k, scale)
        return torch.ones_like(priors)

    @staticmethod
    def _prior_metrics(
        grouped: torch.Tensor, priors: torch.Tensor, weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Δ and the fraction above the prior use the untransformed rewards; the weights are RAS's."""
        delta = prior_delta(grouped, priors)
        return {
            "bpgo/prior_mean": priors.nanmean(),
            "bpgo/delta_mean": delta.nanmean(),
            "bpgo/frac_groups_above_prior": (delta > 0).float().mean(),
            "bpgo/ras_weight_mean": weights.mean(),
            "bpgo/ras_weight_min": weights.min(),
            "bpgo/ras_weight_max": weights.max(),
        }

    # ------------------------------------------------------------------------------------------------
    # State kept in checkpoints
    # ------------------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        """The priors of :attr:`prior_store` (EMA or estimated), kept in every checkpoint, with GRPO's state (the
        ``per_prompt_stat_tracking`` record)."""
        priors = {"ema_priors": {}, "estimated_priors": None, **self.prior_store.state_dict()}
        return {**super().method_state(), **priors}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore the priors (and GRPO's state) saved by :meth:`method_state`."""
        super().load_method_state(state)
        self.prior_store.load_state_dict(state)
