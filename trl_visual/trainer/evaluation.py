"""Evaluation of :class:`~trl_visual.DiffusionGRPOTrainer`: deterministic sampling from fixed seeds, the training
rewards and the ``eval_reward_funcs`` (scored here only), and a captioned grid of the samples."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import gather
from datasets import Dataset

from ..core.advantages import weighted_reward_sum
from .logging_utils import SampleBatch, log_samples


class EvaluationMixin:
    """``evaluate()`` for the trainer (which provides ``sample``, ``compute_rewards``, the reward lists and the
    ``transformers.Trainer`` state)."""

    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Score ``eval_dataset`` with deterministic (ODE) sampling from fixed seeds; metrics get the
        ``eval_`` prefix. Every evaluation of a run sees the same initial noise.

        ``eval_reward`` is the weighted training reward; every reward, the training ones and the
        ``eval_reward_funcs`` (scored here only), is logged as ``eval_rewards/<name>/mean``. With
        ``log_images``, the first ``num_images_to_log`` samples go out as one captioned grid
        (``eval_samples``) at the current step."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset.")
        self.model.eval()
        shard = dataset.shard(self.accelerator.num_processes, self.accelerator.process_index, contiguous=True)
        rewards, shown_prompts, shown_samples = [], [], []
        batch = self.args.per_device_eval_batch_size
        self._metrics["eval"].clear()  # from here, the reward timings of this evaluation (model in eval mode)
        with self._scoring_eval_rewards():
            for start in range(0, len(shard), batch):
                rows = [shard[i] for i in range(start, min(start + batch, len(shard)))]
                prompts = [row[self.args.prompt_column] for row in rows]
                ids = torch.arange(start, start + len(rows))
                rollouts = self.sample(
                    prompts, ids, seed=self.args.seed + start, stochastic=False, training=False, rows=rows
                )
                rewards.append(self.compute_rewards(prompts, rollouts.samples, rows))
                if self.args.log_images and len(shown_prompts) < self.args.num_images_to_log:
                    shown_prompts += prompts
                    shown_samples.append(rollouts.samples)
        rewards_per_func = gather(torch.cat(rewards))
        metrics = {f"{metric_key_prefix}_reward": self._training_reward(rewards_per_func).nanmean().item()}
        for f, name in enumerate(self.reward_names + self.eval_reward_names):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = rewards_per_func[:, f].nanmean().item()
        timings = {f"{metric_key_prefix}_{k}": sum(v) / len(v) for k, v in self._metrics["eval"].items() if v}
        self.log({**metrics, **timings})
        if self.args.log_images and self.accelerator.is_main_process:
            local_reward = self._training_reward(torch.cat(rewards))
            shown = SampleBatch(shown_prompts, torch.cat(shown_samples), local_reward[: len(shown_prompts)])
            log_samples(
                self, shown, key=f"{metric_key_prefix}_samples", file_prefix=f"{metric_key_prefix}_step"
            )
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _training_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """``Σ_f w_f R_f`` over the training rewards (the first columns), as in training."""
        return weighted_reward_sum(rewards_per_func[:, : len(self.reward_funcs)], self.reward_weights)

    @contextlib.contextmanager
    def _scoring_eval_rewards(self) -> Iterator[None]:
        """Within, :meth:`compute_rewards` calls the training rewards followed by ``eval_reward_funcs``
        (columns ``F`` onwards of its output), with the same checks, timeouts and timings."""
        trained = self.reward_funcs, self.reward_names
        self.reward_funcs = trained[0] + self.eval_reward_funcs
        self.reward_names = trained[1] + self.eval_reward_names
        try:
            yield
        finally:
            self.reward_funcs, self.reward_names = trained
