"""Evaluation of :class:`~trl_visual.DiffusionGRPOTrainer`: deterministic sampling from fixed seeds, scored by the
rewards it is given (the training ones and the ``eval_reward_funcs``), and a captioned grid of the samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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
        args, accelerator = self.args, self.accelerator
        mine = evaluation_batches(
            len(dataset),
            args.per_device_eval_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
        )
        rows_scored: list[int] = []  # the rows of the evaluation set this process scored, in order
        local, shown_prompts, shown_samples = [], [], []
        self.timings.clear()  # from here, the reward timings of this evaluation
        for batch, counts in mine:
            rows = [dataset[i] for i in batch]
            prompts = [row[args.prompt_column] for row in rows]
            samples = self.sample(
                prompts, torch.arange(batch.start, batch.stop), args.seed + batch.start, rows
            )
            rewards = self.score(prompts, samples, rows, reward_funcs, reward_names)
            if not counts:  # a repeated batch, so that every process runs as many forward passes
                continue
            rows_scored += batch
            local.append(rewards)
            if args.log_images and len(shown_prompts) < args.num_images_to_log:
                shown_prompts += prompts
                shown_samples.append(samples)
        values = torch.cat(local).tolist() if local else []  # one host sync for the whole evaluation
        scored = list(zip(rows_scored, values))
        if accelerator.num_processes > 1:
            scored = gather_object(scored)
        rewards_per_func = torch.tensor([values for _, values in sorted(scored)], dtype=torch.float32)
        trained = len(reward_weights)
        training_reward = weighted_reward_sum(rewards_per_func[:, :trained], reward_weights)
        metrics = {f"{prefix}_reward": training_reward.nanmean().item()}
        for f, name in enumerate(reward_names):
            metrics[f"{prefix}_rewards/{name}/mean"] = rewards_per_func[:, f].nanmean().item()
        shown = None
        if args.log_images and accelerator.is_main_process:
            local_reward = weighted_reward_sum(torch.cat(local)[:, :trained], reward_weights)
            shown = SampleBatch(shown_prompts, torch.cat(shown_samples), local_reward[: len(shown_prompts)])
        timings = {f"{prefix}_{k}": sum(v) / len(v) for k, v in self.timings.items() if v}
        return EvaluationResult(metrics, timings, shown)


def evaluation_batches(
    num_rows: int, batch_size: int, process_index: int, num_processes: int
) -> list[tuple[range, bool]]:
    """This process's batches of the evaluation set, each with whether it counts: the batches one process would
    run (rows ``[s, s + batch_size)`` for ``s = 0, batch_size, …``) dealt out in turn, so that every row is
    sampled from the seed it gets on one process and the figures do not depend on the number of processes. A
    process dealt fewer batches repeats its first one, not counted, so that all run as many forward passes (an
    uneven count would hang FSDP and ZeRO-3). 5 rows, batches of 2, 2 processes: ``[0, 2)`` and ``[4, 5)`` on the
    first, ``[2, 4)`` and ``[2, 4)`` again (not counted) on the second."""
    batches = [range(start, min(start + batch_size, num_rows)) for start in range(0, num_rows, batch_size)]
    mine = [(batch, True) for batch in batches[process_index::num_processes]]
    rounds = -(-len(batches) // num_processes)
    return mine + [(mine[0][0] if mine else batches[0], False)] * (rounds - len(mine))


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
