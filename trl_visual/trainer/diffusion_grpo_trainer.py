"""GRPO for flow-matching diffusion models, on top of :class:`transformers.Trainer`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from trl.trainer.utils import RepeatSampler

from ..core.policy_loss import clipped_policy_loss
from ..data import check_prompt_values
from ..models import DiffusionAdapter, get_adapter
from ..models.loading import load_pipeline
from ..rewards import RewardFunc, reward_name
from .advantages import grpo_advantages, weighted_interpretation_var
from .checkpoint_io import CheckpointIO
from .denoiser import enable_vae_memory_options, prepare_denoiser
from .diffusion_grpo_config import DiffusionGRPOConfig
from .ema import EMA, check_ema_engine, ema_weights, trainable_parameters
from .engines import Engine
from .evaluation import EvaluationRunner, FinalEvaluationCallback
from .finite_updates import FiniteUpdateGuard
from .hooks import Advantages, PolicyLoss, host_values, record_metrics, weighted_policy_loss
from .iteration_state import checkpoint_step, iteration_of, restore_rollouts, save_iteration_rollouts
from .logging_utils import PendingMedia, SampleBatch, log_samples
from .memory import check_decode_memory, place_frozen_modules
from .model_card import CARD_ARGUMENTS, CARD_SETTINGS, ModelCardWriter, push_error, repository_error
from .output_dir import check_writable_dir, remove_leftover_staging
from .output_lock import OutputDirLock, check_output_dir_free
from .prompt_sampler import EpochSeededRepeatSampler
from .reward_calls import (
    RewardCaller,
    drop_infinite_rewards,
    record_reward_metrics,
    resolve_eval_rewards,
    resolve_rewards,
    reward_kwargs,
)
from .rollout import (
    BatchPlacement,
    PromptEncoder,
    Rollouts,
    SamplingContext,
    sample_rollouts,
    select_train_steps,
)
from .run_settings import RunSettingsCallback, check_resumed_settings
from .seeds import MicroStepCounter, generation_seed
from .setup_checks import check_columns, check_inputs, check_reward_weights, check_sampling, method_config
from .stat_tracking import load_stat_tracker_state, stat_tracker_state, tracker_for
from .stopping import TrainingTerminated, save_before_stopping, stop_after, terminate_on_sigterm
from .timestep_losses import adapter_disabled, timestep_losses

logger = logging.getLogger(__name__)


#: ``Trainer``'s ``optimizers`` argument: an optimizer and a learning-rate scheduler, each ``None`` for the default
Optimizers = tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]


def _identity_collator(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return features


class DiffusionGRPOTrainer(Trainer):
    """GRPO for flow-matching diffusion models (Flow-GRPO, DanceGRPO).

    Each step samples ``num_generations`` trajectories per prompt with a stochastic sampler that keeps
    the log-probability of every transition, scores the decoded samples with the reward functions,
    turns rewards into group-relative advantages, and takes the clipped policy-gradient step on the
    stochastic transitions (with an optional exact KL to the LoRA-disabled model).

    Example::

        from datasets import Dataset
        from peft import LoraConfig
        from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

        trainer = DiffusionGRPOTrainer(
            model="tiny:sd3",
            reward_funcs="red_channel",
            args=DiffusionGRPOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8,
                                     max_steps=30, height=32, width=32),
            train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]}),
            peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        )
        trainer.train()
        trainer.save_model("out/final")   # diffusers LoRA format: pipe.load_lora_weights("out/final")

    Subclasses change the method through a few hooks only, which exchange the dataclasses of
    :mod:`trl_visual.trainer.hooks`: :meth:`compute_advantages` (rewards → ``Advantages``),
    :meth:`expand_advantages` (their shape), :meth:`clipped_objective` (one set of advantages) and
    :meth:`policy_loss` (the method's whole per-sample loss, a ``PolicyLoss``). Hooks return their metrics;
    the trainer logs them.

    It is the one class that overrides ``transformers.Trainer`` methods (the section "Trainer overrides"); each
    override is a few lines that call a collaborator: :attr:`checkpoints` (:class:`CheckpointIO`), :attr:`ema`
    (:class:`EMA`, ``None`` without ``use_ema``), :attr:`engine` (:class:`Engine`), :attr:`finite_guard`
    (:class:`FiniteUpdateGuard`), :attr:`evaluation` (:class:`EvaluationRunner`), :attr:`model_card`
    (:class:`ModelCardWriter`).
    """

    _tag_names = ["trl-visual", "diffusion-grpo"]
    _method_name = "GRPO"
    #: the config class this trainer takes (and builds when ``args`` is None)
    config_class: type[DiffusionGRPOConfig] = DiffusionGRPOConfig
    #: keys of :data:`trl_visual.hub.CITATIONS` cited by this method's model cards
    _citations = ["Flow-GRPO", "DanceGRPO"]
    #: config fields listed in the model card's settings table
    _card_settings = list(CARD_SETTINGS)

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | str | list[RewardFunc | str],
        args: DiffusionGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: Optimizers = (None, None),
        peft_config: LoraConfig | None = None,
        eval_reward_funcs: RewardFunc | str | list[RewardFunc | str] | None = None,
    ):
        args = method_config(self.config_class, type(self).__name__, self._method_name, model, args)
        self._prepare_method(args, train_dataset)
        if args.should_save:
            check_writable_dir(args.output_dir)
        if args.process_index == 0:  # the process that takes the lock in train()
            check_output_dir_free(args.output_dir)
        self.reward_funcs = resolve_rewards(reward_funcs)
        self.reward_names = [reward_name(r) for r in self.reward_funcs]
        self.reward_weights = check_reward_weights(args.reward_weights, self.reward_names)
        self.eval_reward_funcs = resolve_eval_rewards(
            args.eval_reward_funcs if eval_reward_funcs is None else eval_reward_funcs, self.reward_names
        )
        self.eval_reward_names = [reward_name(r) for r in self.eval_reward_funcs]
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        rewards = self.reward_funcs + self.eval_reward_funcs
        check_inputs(args, datasets, rewards, self.reward_names + self.eval_reward_names, peft_config)

        pipeline = load_pipeline(model, args.model_init_kwargs)
        named = pipeline.config.get("_name_or_path") or "unknown"
        self.base_model_name = model if isinstance(model, str) else named
        self.adapter: DiffusionAdapter = get_adapter(pipeline)
        self.pipeline = pipeline
        for split, dataset in datasets.items():
            check_columns(dataset, split, self.adapter.required_columns(args), type(pipeline).__name__)
        self.is_peft = peft_config is not None
        self.weight_dtype = self.adapter.dtype  # the loading dtype, also the LoRA export dtype
        denoiser = prepare_denoiser(self.adapter, peft_config, args)
        self._check_resolution(args)
        check_sampling(self.adapter, args, self.latent_shape)
        enable_vae_memory_options(pipeline, args)

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=_identity_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[*(callbacks or []), FinalEvaluationCallback()],
            optimizers=optimizers,
        )
        self.add_callback(RunSettingsCallback(self._method_name, args.num_generations, args.seed))
        self._place_frozen_modules()
        check_ema_engine(args.use_ema, self.is_fsdp_enabled)
        self.ema = EMA(trainable_parameters(denoiser), args.ema_decay) if args.use_ema else None
        if self.ema is not None:
            self.add_callback(self.ema.callback())
        self.checkpoints = CheckpointIO(
            args, pipeline, self.adapter.denoiser_name, self.is_peft, self.weight_dtype, self.ema
        )
        self.finite_guard = FiniteUpdateGuard(self.accelerator, args)
        self._metrics: dict[str, dict[str, list[float]]] = {
            mode: defaultdict(list) for mode in ("train", "eval")
        }
        samples, score = self._evaluation_samples, self.compute_rewards
        self.evaluation = EvaluationRunner(args, self.accelerator, samples, score, self._metrics["eval"])
        self.model_card = ModelCardWriter(self)
        for reward in rewards:
            if isinstance(reward, torch.nn.Module):
                reward.to(self.accelerator.device)
        self._pending_media, self.stat_tracker = PendingMedia(), tracker_for(args)  # grids wait for their log
        self._rollouts: Rollouts | None = None
        self._rollouts_iteration = -1  # the iteration (generation round) `_rollouts` were sampled for
        self._micro_steps = MicroStepCounter(args.gradient_accumulation_steps)
        self._prompt_encoder = PromptEncoder.for_config(self.adapter, args)

    # -- Set-up and input checks (all before any expensive work) ---------------------------------------------
    def _prepare_method(
        self, args: DiffusionGRPOConfig, train_dataset: Dataset | IterableDataset | None
    ) -> None:
        """Hook: the method's own set-up that needs only the config and the data set, run first, before the
        pipeline loads, so that bad input fails fast (BPGO's prior store, ViPO's backbone). GRPO has none."""

    def _check_resolution(self, args: DiffusionGRPOConfig) -> None:
        """The sample size: the config's, else the model's default."""
        default = self.adapter.default_resolution()
        self.height = args.height or default[0]
        self.width = args.width or default[1]
        self.num_frames = args.num_frames or self.adapter.default_num_frames()
        check_decode_memory(self.adapter.pipeline, args, self.height, self.width, self.num_frames or 1)
        self.latent_shape = self.adapter.latent_shape(self.height, self.width, self.num_frames)

    def _place_frozen_modules(self) -> None:
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        place_frozen_modules(self.adapter, self.accelerator.device, dtype, self.args.offload_text_encoders)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> RepeatSampler:
        """Whole groups of ``num_generations`` copies per global batch, reseeded per epoch.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        args, dataset = self.args, train_dataset if train_dataset is not None else self.train_dataset
        groups = args.per_device_train_batch_size * args.world_size // args.num_generations
        return EpochSeededRepeatSampler(
            dataset, args.num_generations, groups, args.num_iterations, seed=args.seed
        )

    def _generation_seed(self) -> int:
        """One seed per generation round, the same on every process (so shared noise agrees), derived from the
        trainer state alone so that a resumed run samples exactly what the uninterrupted run would have."""
        return generation_seed(self.args.seed, self._micro_steps.count // self.args.num_iterations)

    def sampling_sigmas(self) -> torch.Tensor:
        """The T + 1 values ``σ_0 = 1 > … > σ_T = 0`` every rollout samples on: the model's scheduler, or with
        ``time_shift=s`` ``σ' = sσ / (1 + (s − 1)σ)`` on ``linspace(1, 0, T + 1)`` (:meth:`DiffusionAdapter.sigmas`)."""
        return self.adapter.sigmas(self.args.num_inference_steps, self.latent_shape, self.args.time_shift)

    @property
    def placement(self) -> BatchPlacement:
        """This process's rows of the global training batch."""
        return BatchPlacement(
            self.accelerator.process_index, self.args.world_size, self.args.per_device_train_batch_size
        )

    def sample(
        self,
        prompts: list[str],
        group_ids: torch.Tensor,
        seed: int,
        stochastic: bool = True,
        training: bool = True,
        rows: list[dict[str, Any]] | None = None,
    ) -> Rollouts:
        """Sample one trajectory per prompt with the current policy, keeping the stochastic transitions and
        their log-probs (:func:`~trl_visual.trainer.rollout.sample_rollouts`). ``group_ids`` are the global
        group index of each sample; ``rows`` the dataset rows, for conditioning beyond the prompt."""
        context = SamplingContext(
            self.args, self._prompt_encoder, self.placement, self.sampling_sigmas(), self.latent_shape,
            self.accelerator.device, self.compute_loss_context_manager, self.state.global_step,
        )  # fmt: skip
        return sample_rollouts(
            self.adapter, self.model, prompts, group_ids, seed, context,
            stochastic=stochastic, training=training, rows=rows,
        )  # fmt: skip

    # -- Rewards and advantages ------------------------------------------------------------------------------
    def compute_rewards(
        self,
        prompts: list[str],
        samples: torch.Tensor,
        inputs: list[dict[str, Any]],
        reward_funcs: list[RewardFunc] | None = None,
        reward_names: list[str] | None = None,
    ) -> torch.Tensor:
        """Call every reward (``reward_funcs`` named ``reward_names``, by default the training ones): ``(B, F)`` float32
        on the device, NaN where a reward gave ``None``, NaN or ±inf (±inf counted in ``rewards/<name>/num_inf``). A
        reward that raises, returns the wrong length or type, or times out is an error naming it; ``async`` ones run
        concurrently (:class:`~trl_visual.trainer.reward_calls.RewardCaller`). Wall times: ``timing/reward/<name>``."""
        kwargs = reward_kwargs(self.adapter, prompts, samples, inputs, self.args.prompt_column)
        mode = "train" if self.model.training else "eval"
        funcs = self.reward_funcs if reward_funcs is None else reward_funcs
        names = self.reward_names if reward_names is None else reward_names
        caller = RewardCaller(funcs, names, self.args.reward_timeout, self._reward_stop_note)
        scores, interpretation_var = caller(kwargs, len(prompts), self._metrics[mode])
        self._local_interpretation_var = interpretation_var.to(self.accelerator.device)
        return drop_infinite_rewards(scores, names, self._metrics[mode]).to(self.accelerator.device)

    def _reward_stop_note(self) -> str:
        """What a reward timeout does to the run, once the weights trained so far are saved."""
        return (
            f"training stops at step {self.state.global_step} (the checkpoints already written are kept)."
            f"{self._save_before_stopping()}"
        )

    def compute_advantages(self, rewards_per_func: torch.Tensor, inputs: list[dict[str, Any]]) -> Advantages:
        """Hook: ``(B_global, F)`` rewards of the whole global batch → per-sample
        :class:`~trl_visual.trainer.hooks.Advantages` over the global batch (``reward`` and ``advantages``
        ``(B_global,)``, plus what the method's loss needs: a per-sample ``weight``, ``auxiliary`` objectives,
        ``metrics`` to log). The trainer slices it to this process's samples. ``inputs`` are the global batch's
        dataset rows, in the same order. GRPO's: :func:`~trl_visual.trainer.advantages.grpo_advantages`."""
        variance, tracker = self.reward_interpretation_var(rewards_per_func), self.stat_tracker
        return grpo_advantages(rewards_per_func, self.reward_weights, self.args, variance, tracker, inputs)

    def reward_interpretation_var(self, rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` interpretation variance of the weighted reward of the batch being scored, or ``None``
        (:func:`~trl_visual.trainer.advantages.weighted_interpretation_var`)."""
        per_func = getattr(self, "interpretation_var", None)
        return weighted_interpretation_var(per_func, rewards_per_func, self.reward_weights)

    def expand_advantages(self, advantages: Advantages, rollouts: Rollouts) -> Advantages:
        """Hook: the shape of this process's advantages. GRPO keeps one scalar per sample ``(B,)``; ViPO
        spreads every set of them over a map of the latent positions."""
        return advantages

    def _score(self, rollouts: Rollouts, inputs: list[dict[str, Any]], mode: str = "train") -> None:
        """Rewards on this process, gathered so every group is whole, then advantages for our slice."""
        local_rewards = self.compute_rewards(rollouts.prompts, rollouts.samples, inputs)
        rewards_per_func = gather(local_rewards)
        self.interpretation_var = gather(self._local_interpretation_var)  # read by compute_advantages
        all_inputs = gather_object(inputs) if self.accelerator.num_processes > 1 else inputs
        computed = self.compute_advantages(rewards_per_func, all_inputs)
        local = computed.local(self.placement.local)
        rollouts.rewards = local.reward
        rollouts.advantages = self.expand_advantages(local, rollouts)
        metrics, names, group = self._metrics[mode], self.reward_names, self.args.num_generations
        record_reward_metrics(metrics, rewards_per_func, computed.reward, names, group)
        record_metrics(self._metrics[mode], rollouts.advantages.metrics)

    # -- Training --------------------------------------------------------------------------------------------
    def _make_rollouts(self, inputs: list[dict[str, Any]]) -> Rollouts:
        prompts = [row[self.args.prompt_column] for row in inputs]
        check_prompt_values(prompts, "a batch of the train_dataset")  # a streaming dataset is only seen here
        offset = self.placement.offset
        group_ids = torch.arange(offset, offset + len(prompts)) // self.args.num_generations
        rollouts = self.sample(prompts, group_ids, seed=self._generation_seed(), rows=inputs)
        rollouts.train_steps = select_train_steps(self.adapter, rollouts, self.args, self._generation_seed())
        if not self.finite_guard.rollouts_are_finite(rollouts):
            return rollouts  # not scored: no advantages, so training_step skips this step
        self._score(rollouts, inputs)
        if self.args.log_images and self.accelerator.is_main_process:
            samples = SampleBatch.of(rollouts, self.args.num_images_to_log)
            self._pending_media.add("samples", self.state.global_step, partial(log_samples, self, samples))
        return rollouts

    def clipped_objective(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: the clipped objective of one transition for ONE set of advantages, per sample ``(B,)``, with its
        clipped fraction ``(B,)``. GRPO: ``ρ = exp(mean_elements(log p_θ − log p_old))``, ``L = max(−A ρ, −A clip(ρ,
        1 − ε, 1 + ε_high))``. ViPO's is dense; :meth:`policy_loss` calls it once per set of advantages, so methods compose."""
        log_ratio = (log_prob - old_log_prob).flatten(1).mean(dim=1)
        loss, clipped = clipped_policy_loss(log_ratio, advantages, self.args.epsilon, self.args.epsilon_high)
        return loss, clipped.float()

    def policy_loss(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: Advantages
    ) -> PolicyLoss:
        """Hook: the method's whole per-sample loss of one transition,
        ``L = w · L(A) + Σ_j c_j · L(A_j)``, each ``L`` a :meth:`clipped_objective` on the same log-ratio
        (``w`` = ``advantages.weight``, 1 when absent; ``(c_j, A_j)`` = ``advantages.auxiliary``). The
        clipped fraction is the main term's; each named auxiliary term's unweighted ``L(A_j)`` is returned
        in ``metrics``. GRPO has neither weight nor auxiliary terms: ``L = L(A)``."""
        return weighted_policy_loss(self.clipped_objective, log_prob, old_log_prob, advantages)

    def _reference_model(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The reference policy: the same network with its LoRA adapter disabled."""
        return adapter_disabled(model, self.accelerator.unwrap_model)

    def training_step(
        self, model: torch.nn.Module, inputs: list[dict[str, Any]], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Sample (once per iteration: every ``num_iterations`` micro-steps), score, then one backward per
        trained timestep so memory does not grow with the number of timesteps.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        model.train()
        iteration = iteration_of(self._micro_steps.advance(self.state.global_step), self.args.num_iterations)
        if self._rollouts is None or self._rollouts_iteration != iteration:
            self._rollouts, self._rollouts_iteration = self._make_rollouts(inputs), iteration
        rollouts = self._rollouts
        if rollouts.advantages is None:  # non-finite samples or log-probs: nothing to learn from them
            return torch.tensor(float("nan"), device=self.accelerator.device)
        sums = timestep_losses(
            self.adapter, model, rollouts, self.args, self.engine, self.policy_loss, self._reference_model,
            self.compute_loss_context_manager, self.accelerator.backward, self.current_gradient_accumulation_steps,
        )  # fmt: skip
        values = host_values(sums)  # one host sync for every figure of the micro-step
        for name in values.keys() - {"loss"}:
            self._metrics["train"][name].append(values[name])
        if not math.isfinite(values["loss"]):
            self.finite_guard.note("loss")
        return sums["loss"] / self.current_gradient_accumulation_steps

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train`` (``trial``, ``ignore_keys_for_eval`` in ``kwargs``) after checking the checkpoint to resume
        (:meth:`CheckpointIO.checked`), before anything is loaded from it, and after :meth:`_before_train`, under
        ``output_dir``'s lock (:class:`OutputDirLock`); an error that stops it saves what was trained (:func:`stop_after`).
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        with OutputDirLock(self.args.output_dir, enabled=self.is_world_process_zero()):
            if self.args.should_save:  # under the lock: a leftover of a dead run, not another run's
                remove_leftover_staging(self.args.output_dir)
            denoiser = self.accelerator.unwrap_model(self.model)
            checkpoint = self.checkpoints.checked(resume_from_checkpoint, denoiser, bool(self.method_state()))
            if checkpoint is not None:
                settings = RunSettingsCallback(self._method_name, self.args.num_generations, self.args.seed)
                check_resumed_settings(checkpoint, settings, bool(self.method_state()))
            self.model_card.keep_base_samples()
            # the rollouts the next micro-steps reuse when the checkpoint was written in the middle of an iteration
            restored = restore_rollouts(checkpoint, self.args, self.accelerator.device)
            self._rollouts, self._rollouts_iteration = restored
            start_step, self.checkpoints.stopped_checkpoint = checkpoint_step(checkpoint), None
            with terminate_on_sigterm():
                try:
                    self._before_train(checkpoint)
                    return super().train(resume_from_checkpoint=checkpoint, **kwargs)
                except BaseException as error:
                    step, save = self.state.global_step, self._save_before_stopping
                    stop_after(error, start_step, step, self.checkpoints, save)
                    if isinstance(error, TrainingTerminated):  # saved and said: exit as SIGTERM would have
                        raise SystemExit(error.exit_status) from error
                    raise

    def _save_before_stopping(self) -> str:
        """Save what the run trained as ``output_dir/stopped-at-step-N`` before an error stops it (once per run; a
        single-process run only); returns the sentence for the error (:func:`~trl_visual.trainer.stopping.save_before_stopping`)."""
        save = partial(self._save_checkpoint, self.model_wrapped, trial=None)
        return save_before_stopping(
            self.checkpoints, save, self.state.global_step, self.accelerator.num_processes
        )

    def _before_train(self, checkpoint: str | None) -> None:
        """Hook: work before training starts, with the checked checkpoint being resumed (or ``None``).
        BPGO makes its priors here."""

    # -- Evaluation, logging, saving -------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the metrics gathered since the last log (TRL's way); after a train log, send the
        step's sample grids, so that they land under the same step as its metrics.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        logs = dict(logs)  # Trainer.log adds keys: never touch the caller's dict
        if mode == "train":
            logs.update({k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)
        if mode == "train":
            self._pending_media.flush()

    def method_state(self) -> dict[str, Any]:
        """Hook: the method's own state a checkpoint must keep (BPGO's priors), saved as ``trl_visual_state.safetensors``
        (:mod:`~trl_visual.state_files`: reading it runs no code) and handed to :meth:`load_method_state`. GRPO: its tracker's."""
        return stat_tracker_state(self.stat_tracker)

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Hook: restore what :meth:`method_state` returned."""
        load_stat_tracker_state(self.stat_tracker, state)

    # -- Trainer overrides: each calls a collaborator (the private ones are listed in trl_visual/_upstream.py) --
    def create_accelerator_and_postprocess(self) -> None:
        """``Trainer``'s accelerator, then the :class:`Engine` fitting one backward per trained timestep to it. Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        super().create_accelerator_and_postprocess()
        engines = self.is_deepspeed_enabled, self.is_fsdp_enabled
        self.engine = Engine(self.accelerator, self.args, self.adapter, self.latent_shape, *engines)

    @property
    def shards_parameters(self) -> bool:
        """Whether the engine splits the denoiser's weights across processes (FSDP, ZeRO-3)."""
        return self.engine.shards_parameters

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """The global gradient norm, then the step guarded (:meth:`FiniteUpdateGuard.guard`). Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        skipped = self._metrics["train"]["nonfinite_steps"]
        self.finite_guard.guard(model, grad_norm, self.state.global_step, skipped, self._save_before_stopping)
        return grad_norm

    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Score ``eval_dataset`` from fixed seeds with the EMA's weights under ``use_ema`` (:class:`EvaluationRunner`):
        ``eval_reward`` (the weighted training reward) and ``eval_rewards/<name>/mean`` for the training rewards and
        the ``eval_reward_funcs``; with ``log_images`` a captioned grid. Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset.")
        self.model.eval()
        rewards = self.reward_funcs + self.eval_reward_funcs, self.reward_names + self.eval_reward_names
        with ema_weights(self.ema):
            result = self.evaluation.run(dataset, *rewards, self.reward_weights, metric_key_prefix)
            self.log({**result.metrics, **result.timings})
            if result.shown is not None:
                prefix = metric_key_prefix
                log_samples(self, result.shown, key=f"{prefix}_samples", file_prefix=f"{prefix}_step")
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, result.metrics
            )
        return result.metrics

    def _evaluation_samples(
        self, prompts: list[str], ids: torch.Tensor, seed: int, rows: list[dict[str, Any]]
    ) -> torch.Tensor:
        """What evaluation scores: one deterministic (ODE) sample per prompt."""
        return self.sample(prompts, ids, seed=seed, stochastic=False, training=False, rows=rows).samples

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the weights (the EMA's when exporting, the trained ones in a checkpoint), never non-finite ones.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        with ema_weights(self.ema if self.checkpoints.staging_dir is None else None):
            denoiser = self.accelerator.unwrap_model(self.model)
            self.finite_guard.check_savable(
                denoiser, output_dir or self.args.output_dir, self.state.global_step
            )
            super().save_model(output_dir, _internal_call=_internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The LoRA in diffusers' format, or the whole denoiser (:meth:`CheckpointIO.write_weights`). Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        denoiser = self.accelerator.unwrap_model(self.model)
        self.checkpoints.write_weights(output_dir or self.args.output_dir, denoiser, state_dict)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """``Trainer``'s checkpoint, staged and renamed into place (:meth:`CheckpointIO.save_atomically`).
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        run_dir = super()._get_output_dir(trial=trial)
        write = partial(super()._save_checkpoint, model, trial)
        final = self.checkpoints.save_atomically(
            run_dir, self.state, write, self._save_iteration_rollouts, self.method_state(),
            self.accelerator.wait_for_everyone,
        )  # fmt: skip
        if self.args.push_to_hub and self.checkpoints.stop_name is None:
            self._push_from_checkpoint(final)

    def _save_iteration_rollouts(self, folder: str) -> None:
        """Every process: its rollouts, when the micro-steps after the checkpoint reuse them."""
        save_iteration_rollouts(
            self._rollouts, self._rollouts_iteration, folder, self.state.global_step, self.args
        )

    def _get_output_dir(self, trial: Any) -> str:
        """The staging folder while a checkpoint is being written (:attr:`CheckpointIO.staging_dir`).
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        return self.checkpoints.staging_dir or super()._get_output_dir(trial=trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer``'s push of a renamed checkpoint, with the LoRA file. Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        if self.checkpoints.staging_dir is None:
            self.checkpoints.copy_lora_for_push(checkpoint_folder, self.is_world_process_zero())
            super()._push_from_checkpoint(checkpoint_folder)

    def _prepare_for_training(
        self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
    ):
        """The engine's wrapping, with what it does not load on resume under FSDP and DeepSpeed.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        if resume_from_checkpoint is not None and self.is_fsdp_enabled:
            self.checkpoints.load_weights(resume_from_checkpoint, self.accelerator.unwrap_model(self.model))
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if resume_from_checkpoint is not None and self.is_deepspeed_enabled:
            self.checkpoints.load_beside_deepspeed(resume_from_checkpoint, self.load_method_state)
        return prepared

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """The method's state and the trained weights (and the EMA's; under FSDP loaded before sharding).
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        self.checkpoints.load_method_state(resume_from_checkpoint, self.load_method_state)
        if not self.is_fsdp_enabled:
            denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
            self.checkpoints.load_weights(resume_from_checkpoint, denoiser)

    def create_model_card(self, **kwargs: Any) -> None:
        """Write ``README.md`` and the pictures it shows to ``output_dir`` (:meth:`ModelCardWriter.write`: its
        ``model_name``, ``tags``, ``license``, ``dataset_tags``). Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        self.model_card.write(**{k: v for k, v in kwargs.items() if k in CARD_ARGUMENTS})

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repository as ``Trainer`` does; when the Hub refuses, say so before any training.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        from huggingface_hub.errors import HTTPError

        try:  # transformers < 5.23 has no `private` here; it is passed only by the versions that have it
            super().init_hf_repo(token=token, **({} if private is None else {"private": private}))
        except (HTTPError, OSError) as error:  # no network, no token, no write access, a bad repository name
            raise repository_error(error, self.args) from error

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any
    ) -> Any:
        """Save the weights and the model card to ``output_dir``, then upload it; ``kwargs`` go to the card.
        Checked against transformers 5.3.0 (the floor) and 5.25.0."""
        self.save_model(self.args.output_dir, _internal_call=True)
        self.create_model_card(**{k: v for k, v in kwargs.items() if k in CARD_ARGUMENTS})
        with self.model_card.pushing():  # Trainer.push_to_hub asks for the card again: keep its pictures
            try:
                return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
            except Exception as error:
                raise push_error(error, self.args.output_dir) from error
