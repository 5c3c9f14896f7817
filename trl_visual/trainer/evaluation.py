"""Evaluation of :class:`~trl_visual.DiffusionGRPOTrainer`: deterministic sampling from fixed seeds, scored by the
rewards it is given (the training ones and the ``eval_reward_funcs``), and a captioned grid of the samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from ..core.advantages import weighted_reward_sum
from ..rewards import RewardFunc
from .diffusion_grpo_config import DiffusionGRPOConfig
from .logging_utils import SampleBatch

#: ``sample(prompts, ids, seed, rows)``: deterministic (ODE) samples of the current weights, ``(B, …)``
Sampler = Callable[[list[str], torch.Tensor, int, list[dict[str, Any]]], torch.Tensor]
#: ``score(prompts, samples, rows, reward_funcs, reward_names)``: ``(B, F)`` rewards (the trainer's
#: ``compute_rewards``: the same checks, timeouts and timings as in training)
Scorer = Callable[[list[str], torch.Tensor, list[dict[str, Any]], list[RewardFunc], list[str]], torch.Tensor]


@dataclass
class EvaluationResult:
    """What one evaluation measured: the metrics to log and return, and the samples to show."""

    metrics: dict[str, float]
    #: each reward's mean wall time in this evaluation, ``<prefix>_timing/reward/<name>``
    timings: dict[str, float]
    shown: SampleBatch | None


class EvaluationRunner:
    """Runs ``evaluate()`` for a trainer: ``sample`` draws, ``score`` scores (see :data:`Sampler`, :data:`Scorer`),
    on this process's shard of the evaluation set; ``score`` records its timings in ``timings``."""

    def __init__(
        self,
        args: DiffusionGRPOConfig,
        accelerator: Accelerator,
        sample: Sampler,
        score: Scorer,
        timings: dict[str, list[float]],
    ):
        self.args = args
        self.accelerator = accelerator
        self.sample = sample
        self.score = score
        self.timings = timings

    @torch.no_grad()
    def run(
        self,
        dataset: Dataset,
        reward_funcs: list[RewardFunc],
        reward_names: list[str],
        reward_weights: torch.Tensor,
        prefix: str = "eval",
    ) -> EvaluationResult:
        """Score ``dataset`` with deterministic (ODE) sampling from fixed seeds (row ``i`` of a batch starting at
        ``start`` gets seed ``args.seed + start``): every evaluation of a run sees the same initial noise.

        ``reward_funcs`` are the training rewards (the first ``len(reward_weights)``) followed by the rewards scored
        only here. ``<prefix>_reward`` is the weighted training reward ``Σ_f w_f R_f``; every reward is
        ``<prefix>_rewards/<name>/mean``. With ``log_images``, the first ``num_images_to_log`` samples are returned
        to be shown."""
        args = self.args
        shard = dataset.shard(self.accelerator.num_processes, self.accelerator.process_index, contiguous=True)
        rewards, shown_prompts, shown_samples = [], [], []
        self.timings.clear()  # from here, the reward timings of this evaluation
        for start in range(0, len(shard), args.per_device_eval_batch_size):
            rows = [shard[i] for i in range(start, min(start + args.per_device_eval_batch_size, len(shard)))]
            prompts = [row[args.prompt_column] for row in rows]
            samples = self.sample(prompts, torch.arange(start, start + len(rows)), args.seed + start, rows)
            rewards.append(self.score(prompts, samples, rows, reward_funcs, reward_names))
            if args.log_images and len(shown_prompts) < args.num_images_to_log:
                shown_prompts += prompts
                shown_samples.append(samples)
        trained = len(reward_weights)
        rewards_per_func = gather(torch.cat(rewards))
        training_reward = weighted_reward_sum(rewards_per_func[:, :trained], reward_weights)
        metrics = {f"{prefix}_reward": training_reward.nanmean().item()}
        for f, name in enumerate(reward_names):
            metrics[f"{prefix}_rewards/{name}/mean"] = rewards_per_func[:, f].nanmean().item()
        shown = None
        if args.log_images and self.accelerator.is_main_process:
            local_reward = weighted_reward_sum(torch.cat(rewards)[:, :trained], reward_weights)
            shown = SampleBatch(shown_prompts, torch.cat(shown_samples), local_reward[: len(shown_prompts)])
        timings = {f"{prefix}_{k}": sum(v) / len(v) for k, v in self.timings.items() if v}
        return EvaluationResult(metrics, timings, shown)


class FinalEvaluationCallback(TrainerCallback):
    """Evaluate at the last step also when it is not a multiple of ``eval_steps``, so a run's final figure is its
    final weights'. transformers 5.25's ``DefaultFlowCallback`` does this itself and 5.3's does not (both checked);
    where it does, the flag is set twice and the evaluation runs once."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if (
            state.global_step >= state.max_steps
            and args.eval_strategy == IntervalStrategy.STEPS
            and state.eval_steps
            and state.global_step % state.eval_steps != 0
            and (args.eval_delay or 0) <= state.global_step
        ):
            control.should_evaluate = True
        return control
