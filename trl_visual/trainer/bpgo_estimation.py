"""BPGO's priors from the base model: sampling it like a training rollout and averaging the rewards.

A mixin of :class:`~trl_visual.trainer.BPGOTrainer` (before :class:`DiffusionGRPOTrainer`): it uses the
trainer's :meth:`sample` and :meth:`compute_rewards`, and fills the trainer's
:class:`~trl_visual.trainer.bpgo_priors.BaseModelPriors` store when training starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from ..checkpointing import METHOD_STATE_NAME
from ..core.advantages import weighted_reward_sum
from ..state_files import load_state_file
from .bpgo_priors import (
    PRIOR_CACHE_NAME,
    BaseModelPriors,
    base_model_fingerprint,
    first_row_per_prompt,
    mean_per_prompt,
    variance_per_prompt,
)
from .seeds import prior_estimation_seed


class BaseModelPriorEstimation:
    """``estimate_priors`` (public) and the ``prior_source="base_model"`` set-up before training."""

    @torch.no_grad()
    def estimate_priors(
        self, dataset: Dataset, num_rollouts: int | None = None, with_variance: bool = False
    ) -> Dataset:
        """``dataset`` with a ``prior_column`` ("prior") holding each prompt's expected reward under the
        base model: ``R_prior = mean_k R(x_k)`` over ``num_rollouts`` (default ``prior_num_rollouts``)
        rollouts per distinct prompt, sampled like training rollouts (same sampler, steps and guidance)
        and scored by the trainer's reward functions (weighted sum). With a LoRA the adapter is disabled
        while sampling, so this is the base model whenever it is called; without one it is the current
        weights. An existing prior column is replaced. The result feeds ``prior_source="column"``.
        ``with_variance``: also a ``prior_var_column`` ("prior_var") with the reward's unbiased variance over the
        rollouts, the anchor's ``v_i`` of ``ras_mode="uncertainty"`` with ``ras_consistency``.
        """
        first_rows = first_row_per_prompt(list(dataset), self.args.prompt_column)
        priors, variances = self._estimate_prompt_stats(
            first_rows, num_rollouts or self.args.prior_num_rollouts
        )
        columns = {self.args.prior_column: priors}
        if with_variance:
            columns[self.args.prior_var_column] = variances
        for name, values in columns.items():
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
            dataset = dataset.add_column(name, [values[row] for row in dataset[self.args.prompt_column]])
        return dataset

    @contextlib.contextmanager
    def _base_model_weights(self) -> Iterator[None]:
        """Sample from the base model: the LoRA adapter disabled (nothing to do without LoRA), eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.is_peft:
                with self._reference_model(self.model):
                    yield
            else:
                yield
        finally:
            self.model.train(was_training)

    def _estimate_prompt_priors(
        self, first_rows: dict[str, dict[str, Any]], num_rollouts: int
    ) -> dict[str, float]:
        """Mean reward of ``num_rollouts`` rollouts per prompt (:meth:`_estimate_prompt_stats`)."""
        return self._estimate_prompt_stats(first_rows, num_rollouts)[0]

    def _estimate_prompt_stats(
        self, first_rows: dict[str, dict[str, Any]], num_rollouts: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Mean and unbiased variance of the reward over ``num_rollouts`` rollouts per prompt (the variance is
        the uncertainty RAS's ``v_i``). Rollouts are sampled in chunks of ``per_device_train_batch_size``, chunks
        shared out over the processes, results gathered."""
        if num_rollouts < 1:
            raise ValueError(f"num_rollouts must be at least 1; got {num_rollouts}.")
        flat = [prompt for prompt in first_rows for _ in range(num_rollouts)]
        size = self.args.per_device_train_batch_size
        chunks = list(range(0, len(flat), size))
        mine = chunks[self.accelerator.process_index :: self.accelerator.num_processes]
        scored: list[tuple[str, float]] = []
        with self._base_model_weights():
            for start in mine:
                prompts = flat[start : start + size]
                rows = [first_rows[p] for p in prompts]
                group_ids = torch.arange(len(prompts)) // self.args.num_generations
                rollouts = self.sample(prompts, group_ids, seed=self._prior_seed(start // size))
                reward = weighted_reward_sum(
                    self.compute_rewards(prompts, rollouts.samples, rows), self.reward_weights
                )
                scored.extend(zip(prompts, reward.tolist()))
        if self.accelerator.num_processes > 1:
            scored = gather_object(scored)
        return mean_per_prompt(scored, num_rollouts), variance_per_prompt(scored)

    def _prior_seed(self, chunk: int) -> int:
        """Seeds for prior estimation, apart from the training seeds (:mod:`trl_visual.trainer.seeds`)."""
        return prior_estimation_seed(self.args.seed, chunk)

    def _prior_fingerprint(self) -> dict[str, Any]:
        """What the estimated priors depend on (:func:`~trl_visual.trainer.bpgo_priors.base_model_fingerprint`)."""
        return base_model_fingerprint(
            self.args,
            self.base_model_name,
            self.pipeline,
            self.adapter.dtype,
            self.reward_names,
            self.reward_weights,
            self.latent_shape,
        )

    def _ensure_estimated_priors(self, checkpoint: str | None) -> None:
        """``prior_source="base_model"``: priors from the checkpoint being resumed, else from the cache in
        ``output_dir``, else estimated now for the prompts the cache lacks (and cached)."""
        store = self.prior_store
        if not isinstance(store, BaseModelPriors) or store.values is not None:
            return
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, METHOD_STATE_NAME)):
            store.load_state_dict(load_state_file(os.path.join(checkpoint, METHOD_STATE_NAME)))
            if store.values:
                return
            store.values = None
        store.load_or_estimate(
            os.path.join(self.args.output_dir, PRIOR_CACHE_NAME),
            self._prior_fingerprint(),
            first_row_per_prompt(list(self.train_dataset), self.args.prompt_column),
            partial(self._estimate_for_store, num_rollouts=self.args.prior_num_rollouts),
            write=self.accelerator.is_main_process,
            with_variances=self.args.ras_mode == "uncertainty",
        )

    def _estimate_for_store(self, missing: dict[str, dict[str, Any]], num_rollouts: int) -> Any:
        """The means (and, for ``ras_mode="uncertainty"``, the variances) of the prompts the cache lacks."""
        if self.args.ras_mode == "uncertainty":
            return self._estimate_prompt_stats(missing, num_rollouts)
        return self._estimate_prompt_priors(missing, num_rollouts)

    def _before_train(self, checkpoint: str | None) -> None:
        """Make the priors when ``prior_source="base_model"``, once the checkpoint (if any) is checked."""
        self._ensure_estimated_priors(checkpoint)
