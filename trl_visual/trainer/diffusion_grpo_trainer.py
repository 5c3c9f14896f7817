"""GRPO for flow-matching diffusion models, on top of :class:`transformers.Trainer`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from trl.trainer.utils import RepeatSampler

from ..core.advantages import combine_rewards, group_advantages, invalid_to_nan
from ..core.interpretations import ensemble_interpretations
from ..core.policy_loss import clipped_policy_loss, gaussian_kl
from ..data import check_prompt_values
from ..models import DiffusionAdapter, get_adapter
from ..models.loading import load_pipeline
from ..rewards import RewardFunc, reward_name
from .denoiser import enable_vae_memory_options, prepare_denoiser
from .diffusion_grpo_config import DiffusionGRPOConfig
from .ema import EMAMixin
from .engines import EnginesMixin
from .evaluation import EvaluationMixin
from .finite_updates import FiniteUpdatesMixin
from .hooks import Advantages, PolicyLoss, record_metrics
from .iteration_state import checkpoint_step, iteration_of, restore_rollouts, save_iteration_rollouts
from .logging_utils import (
    PendingMedia,
    SampleBatch,
    log_samples,
)
from .memory import check_decode_memory, place_frozen_modules
from .model_card import ModelCardMixin
from .output_dir import check_writable_dir, remove_leftover_staging
from .output_lock import OutputDirLock, check_output_dir_free
from .prompt_sampler import EpochSeededRepeatSampler
from .reward_calls import (
    RewardCaller,
    dataset_columns,
    drop_infinite_rewards,
    interpretation_metrics,
    record_reward_metrics,
    resolve_eval_rewards,
    resolve_rewards,
)
from .rollout import (
    BatchPlacement,
    PromptEncoder,
    Rollouts,
    SamplingContext,
    rescore_transition,
    sample_rollouts,
    select_train_steps,
    transition_at,
)
from .run_settings import RunSettingsCallback, check_resumed_settings
from .saving import CheckpointSavingMixin
from .seeds import generation_seed
from .setup_checks import (
    check_columns,
    check_dataset,
    check_kl_reference,
    check_lora_config,
    check_reward_prompts,
    check_reward_weights,
    check_scheduler,
    check_trained_steps,
    method_config,
)
from .stopping import TrainingTerminated, terminate_on_sigterm

logger = logging.getLogger(__name__)


def _identity_collator(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return features


class DiffusionGRPOTrainer(
    EMAMixin,
    EvaluationMixin,
    ModelCardMixin,
    CheckpointSavingMixin,
    EnginesMixin,
    FiniteUpdatesMixin,
    Trainer,
):
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
    """

    _tag_names = ["trl-visual", "diffusion-grpo"]
    _method_name = "GRPO"
    #: the config class this trainer takes (and builds when ``args`` is None)
    config_class: type[DiffusionGRPOConfig] = DiffusionGRPOConfig
    #: keys of :data:`trl_visual.hub.CITATIONS` cited by this method's model cards
    _citations = ["Flow-GRPO", "DanceGRPO"]
    #: config fields listed in the model card's settings table
    _card_settings = [
        "learning_rate",
        "num_generations",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "num_inference_steps",
        "guidance_scale",
        "sde_type",
        "noise_level",
        "epsilon",
        "beta",
        "timestep_fraction",
        "sde_window_size",
        "height",
        "width",
        "num_frames",
    ]

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | str | list[RewardFunc | str],
        args: DiffusionGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (
            None,
            None,
        ),
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
        for dataset, split in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_dataset(dataset, split, args)
        check_reward_prompts(
            self.reward_funcs + self.eval_reward_funcs,
            self.reward_names + self.eval_reward_names,
            {"train_dataset": train_dataset, "eval_dataset": eval_dataset},
            args.prompt_column,
        )
        check_lora_config(peft_config)
        check_kl_reference(args.beta, peft_config)

        pipeline = load_pipeline(model, args.model_init_kwargs)
        self.base_model_name = (
            model if isinstance(model, str) else pipeline.config.get("_name_or_path") or "unknown"
        )
        self.adapter: DiffusionAdapter = get_adapter(pipeline)
        self.pipeline = pipeline
        for dataset, split in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_columns(dataset, split, self.adapter.required_columns(args), type(pipeline).__name__)
        self.is_peft = peft_config is not None
        self.weight_dtype = self.adapter.dtype  # the loading dtype, also the LoRA export dtype
        denoiser = prepare_denoiser(self.adapter, peft_config, args)
        self._check_resolution(args)
        check_scheduler(self.adapter, args, self.latent_shape)
        check_trained_steps(self.adapter, args, self.latent_shape)
        enable_vae_memory_options(pipeline, args)

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=_identity_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(RunSettingsCallback(self._method_name, args.num_generations, args.seed))
        self._place_frozen_modules()
        self._setup_ema(denoiser)
        for reward in self.reward_funcs + self.eval_reward_funcs:
            if isinstance(reward, torch.nn.Module):
                reward.to(self.accelerator.device)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._pending_media = PendingMedia()  # sample grids wait for their step's log
        self._rollouts: Rollouts | None = None
        self._rollouts_iteration = -1  # the iteration (generation round) `_rollouts` were sampled for
        self._micro_step, self._micro_in_step, self._micro_step_origin = 0, 0, -1
        self._prompt_encoder = PromptEncoder(
            self.adapter,
            args.max_sequence_length,
            args.negative_prompt,
            cache_size=args.prompt_embeds_cache_size if args.cache_prompt_embeds else 0,
        )

    # ------------------------------------------------------------------------------------------------
    # Set-up and input checks (all before any expensive work)
    # ------------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------------------
    # Data: each global batch holds whole groups of `num_generations` copies of a prompt
    # ------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> RepeatSampler:
        """Whole groups of ``num_generations`` copies per global batch, reseeded per epoch.
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSeededRepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.per_device_train_batch_size
            * self.args.world_size
            // self.args.num_generations,
            repeat_count=self.args.num_iterations,
            seed=self.args.seed,
        )

    # ------------------------------------------------------------------------------------------------
    # Sampling with log-probabilities
    # ------------------------------------------------------------------------------------------------
    def _generation_seed(self) -> int:
        """One seed per generation round, the same on every process (so shared noise agrees), derived
        from the trainer state alone so that a resumed run samples exactly what the uninterrupted run
        would have."""
        return generation_seed(self.args.seed, self._micro_step // self.args.num_iterations)

    def _advance_micro_step(self) -> None:
        """``_micro_step`` counts micro-batches since the start of the run: ``global_step ×
        gradient_accumulation_steps`` plus the micro-batches already done in the current step."""
        if self.state.global_step != self._micro_step_origin:
            self._micro_step_origin, self._micro_in_step = self.state.global_step, 0
        self._micro_step = (
            self.state.global_step * self.args.gradient_accumulation_steps + self._micro_in_step
        )
        self._micro_in_step += 1

    def sampling_sigmas(self) -> torch.Tensor:
        """The T + 1 values ``σ_0 = 1 > … > σ_T = 0`` every rollout samples on (``T = num_inference_steps``).

        ``time_shift=None``: the model's own scheduler. ``time_shift=s``: ``σ' = sσ / (1 + (s − 1)σ)`` on
        ``linspace(1, 0, T + 1)``, the papers' released samplers (see :meth:`DiffusionAdapter.sigmas`).
        """
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
            args=self.args,
            encoder=self._prompt_encoder,
            placement=self.placement,
            sigmas=self.sampling_sigmas(),
            latent_shape=self.latent_shape,
            device=self.accelerator.device,
            autocast=self.compute_loss_context_manager,
        )
        return sample_rollouts(
            self.adapter,
            self.model,
            prompts,
            group_ids,
            seed,
            context,
            stochastic=stochastic,
            training=training,
            rows=rows,
        )

    # ------------------------------------------------------------------------------------------------
    # Rewards and advantages
    # ------------------------------------------------------------------------------------------------
    def compute_rewards(
        self, prompts: list[str], samples: torch.Tensor, inputs: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Call every reward function; returns ``(B, F)`` float32 on the training device, NaN where a
        reward gave ``None``, NaN or ±inf (±inf is counted in ``rewards/<name>/num_inf``). A reward that
        raises, returns the wrong length or type, only invalid values, or does not return within
        ``reward_timeout`` seconds is an error naming it (see :mod:`trl_visual.trainer.reward_calls`).

        Plain functions run one after the other; ``async`` reward functions (as in TRL) run
        concurrently with each other. Each reward's wall time is logged as ``timing/reward/<name>`` (of the
        eval metrics while the model is in eval mode, in ``evaluate()``).
        """
        kwargs = {
            "prompts": prompts,
            self.adapter.output_kind: samples,
            **self.adapter.reward_inputs(inputs),
            **dataset_columns(inputs, self.args.prompt_column),
        }
        mode = "train" if self.model.training else "eval"
        caller = RewardCaller(
            self.reward_funcs, self.reward_names, self.args.reward_timeout, self._reward_stop_note
        )
        scores, interpretation_var = caller(kwargs, len(prompts), self._metrics[mode])
        self._local_interpretation_var = interpretation_var.to(self.accelerator.device)
        return drop_infinite_rewards(scores, self.reward_names, self._metrics[mode]).to(
            self.accelerator.device
        )

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
        ``metrics`` to log). The trainer slices it to this process's samples
        (:meth:`~trl_visual.trainer.hooks.Advantages.local`). ``inputs`` are the global batch's dataset rows,
        in the same order.

        The base method is GRPO's: weighted aggregation of the rewards, then
        ``A = (R − R̄_group) / (std + 1e-4)`` clamped to ``±adv_clip_max`` (see
        :func:`trl_visual.core.advantages.combine_rewards`).
        With ``reward_ensemble`` the functions are interpretations of one reward instead: each standardized over
        the batch, the reward their mean (:func:`~trl_visual.core.interpretations.ensemble_interpretations`). The
        per-sample interpretation variance of the reward (see :meth:`reward_interpretation_var`) goes to
        ``interpretation_var``, with its figures in ``metrics``.
        """
        args = self.args
        interpretation_var = self.reward_interpretation_var(rewards_per_func)
        if args.reward_ensemble:
            reward, interpretation_var = ensemble_interpretations(invalid_to_nan(rewards_per_func))
            advantages = group_advantages(
                reward, args.num_generations, args.scale_rewards, clip=args.adv_clip_max
            )
        else:
            reward, advantages = combine_rewards(
                rewards_per_func,
                self.reward_weights,
                args.num_generations,
                args.multi_objective_aggregation,
                args.scale_rewards,
                args.adv_clip_max,
            )
        metrics = interpretation_metrics(reward, interpretation_var, args.num_generations)
        return Advantages(
            reward=reward, advantages=advantages, interpretation_var=interpretation_var, metrics=metrics
        )

    def reward_interpretation_var(self, rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` interpretation variance of the weighted reward ``R = Σ_f w_f R_f`` of the batch being scored,
        ``Σ_f w_f² Var_interp(R_f)`` (interpretations of different functions taken as independent; a function
        without interpretations adds 0; NaN where none has any), or ``None`` when no reward returned
        interpretations (:func:`~trl_visual.core.interpretations.interpretation_mean_var`)."""
        per_func = getattr(self, "interpretation_var", None)
        if per_func is None or per_func.shape != rewards_per_func.shape or bool(torch.isnan(per_func).all()):
            return None
        weighted = per_func * self.reward_weights.to(per_func) ** 2
        return weighted.nansum(dim=1).masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))

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
        record_reward_metrics(
            self._metrics[mode],
            rewards_per_func,
            computed.reward,
            self.reward_names,
            self.args.num_generations,
        )
        record_metrics(self._metrics[mode], rollouts.advantages.metrics)

    # ------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------
    def _make_rollouts(self, inputs: list[dict[str, Any]]) -> Rollouts:
        prompts = [row[self.args.prompt_column] for row in inputs]
        check_prompt_values(prompts, "a batch of the train_dataset")  # a streaming dataset is only seen here
        offset = self.placement.offset
        group_ids = torch.arange(offset, offset + len(prompts)) // self.args.num_generations
        rollouts = self.sample(prompts, group_ids, seed=self._generation_seed(), rows=inputs)
        rollouts.train_steps = select_train_steps(self.adapter, rollouts, self.args, self._generation_seed())
        if not self._rollouts_are_finite(rollouts):
            return rollouts  # not scored: no advantages, so training_step skips this step
        self._score(rollouts, inputs)
        if self.args.log_images and self.accelerator.is_main_process:
            samples = SampleBatch.of(rollouts, self.args.num_images_to_log)
            self._pending_media.add("samples", self.state.global_step, partial(log_samples, self, samples))
        return rollouts

    def clipped_objective(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: the clipped objective of one transition for ONE set of advantages, per sample ``(B,)``,
        with its clipped fraction ``(B,)``.

        GRPO: ``ρ = exp(mean_elements(log p_θ − log p_old))`` and
        ``L = max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε_high))`` (``ε_high = epsilon_high``, else ε). ViPO overrides this with its dense form;
        :meth:`policy_loss` calls it once per set of advantages, so methods compose.
        """
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
        loss, clipped = self.clipped_objective(log_prob, old_log_prob, advantages.advantages)
        if advantages.weight is not None:
            loss = loss * advantages.weight
        metrics = {}
        for term in advantages.auxiliary:
            value, _ = self.clipped_objective(log_prob, old_log_prob, term.advantages)
            loss = loss + term.coefficient * value
            if term.name:
                metrics[term.name] = value.detach()
        return PolicyLoss(loss, clipped, metrics)

    @contextlib.contextmanager
    def _reference_model(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The reference policy: the same network with its LoRA adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.disable_adapters()
        try:
            yield unwrapped
        finally:
            unwrapped.enable_adapters()

    def training_step(
        self, model: torch.nn.Module, inputs: list[dict[str, Any]], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Sample (once per iteration: every ``num_iterations`` micro-steps), score, then one backward per
        trained timestep so memory does not grow with the number of timesteps."""
        model.train()
        self._advance_micro_step()
        iteration = iteration_of(self._micro_step, self.args.num_iterations)
        if self._rollouts is None or self._rollouts_iteration != iteration:
            self._rollouts, self._rollouts_iteration = self._make_rollouts(inputs), iteration
        rollouts = self._rollouts
        if rollouts.advantages is None:  # non-finite samples or log-probs: nothing to learn from them
            return torch.tensor(float("nan"), device=self.accelerator.device)
        num_trained = rollouts.train_steps.shape[1]
        scale = self._backward_scale(num_trained)
        sums: dict[str, torch.Tensor] = {}  # detached running sums: one device sync per metric, not per step

        def add(name: str, value: torch.Tensor) -> None:
            sums[name] = sums.get(name, 0) + value.detach().mean() / num_trained

        for k in self._backward_steps(model, num_trained):  # gradients reduced at the window's last backward
            transition = transition_at(rollouts, k)
            with self.compute_loss_context_manager():
                step = rescore_transition(self.adapter, model, rollouts, transition, self.args)
                result = self.policy_loss(step.log_prob, transition.old_log_prob, rollouts.advantages)
                loss, clipped = result.loss, result.clipped
                for name, term in {"policy_loss": loss, **result.metrics}.items():
                    add(name, term)
                if self.args.beta > 0:
                    with torch.no_grad(), self._reference_model(model) as reference:
                        # the stored v_u is the policy's: the reference predicts its own
                        reference_step = rescore_transition(
                            self.adapter,
                            reference,
                            rollouts,
                            replace(transition, uncond_velocity=None),
                            self.args,
                        )
                    kl = gaussian_kl(step.mean, reference_step.mean, step.std).flatten(1).mean(dim=1)
                    loss = loss + self.args.beta * kl
                    add("kl", kl)
                loss = loss.mean()
            self.accelerator.backward(loss / scale)
            add("loss", loss)
            add("clip_ratio", clipped)
        for name in sums.keys() - {"loss"}:
            self._metrics["train"][name].append(sums[name].item())
        if not math.isfinite(sums["loss"].item()):
            self._nonfinite_stage = self._nonfinite_stage or "loss"
        return sums["loss"] / self.current_gradient_accumulation_steps

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """:meth:`transformers.Trainer.train`, after checking that the checkpoint to resume (if any) is
        complete, readable and fits the model (:func:`~trl_visual.checkpointing.check_checkpoint`), before
        anything is loaded from it, and after :meth:`_before_train`. The main process holds ``output_dir``'s
        lock throughout (:mod:`~trl_visual.trainer.output_lock`): a second run on the folder is refused. Training the whole denoiser,
        the model card's samples of the base weights are taken first (:meth:`keep_base_samples`)."""
        with OutputDirLock(self.args.output_dir, enabled=self.is_world_process_zero()):
            if self.args.should_save:  # under the lock: a leftover of a dead run, not another run's
                remove_leftover_staging(self.args.output_dir)
            checkpoint = self._checked_checkpoint(resume_from_checkpoint)
            if checkpoint is not None:
                settings = RunSettingsCallback(self._method_name, self.args.num_generations, self.args.seed)
                check_resumed_settings(checkpoint, settings, bool(self.method_state()))
            self.keep_base_samples()
            self._restore_iteration_state(checkpoint)
            start_step, self._stopped_checkpoint = checkpoint_step(checkpoint), None
            with terminate_on_sigterm():
                try:
                    self._before_train(checkpoint)
                    return super().train(
                        resume_from_checkpoint=checkpoint,
                        trial=trial,
                        ignore_keys_for_eval=ignore_keys_for_eval,
                        **kwargs,
                    )
                except BaseException as error:
                    self._stop_after(error, start_step)
                    if isinstance(error, TrainingTerminated):  # saved and said: exit as SIGTERM would have
                        raise SystemExit(error.exit_status) from error
                    raise

    def _stop_after(self, error: BaseException, start_step: int) -> None:
        """``error`` ends training: when this run made an update (``global_step > start_step``), save what it
        trained as a resumable checkpoint ``output_dir/stopped-at-step-N`` (:meth:`_save_before_stopping`, which
        the non-finite and reward-timeout stops have already called), then say so in one log line and in a note
        on the error, which the caller re-raises."""
        if self.state.global_step <= start_step:
            if isinstance(error, TrainingTerminated):
                logger.error(f"{error.reason} before the first update: there was nothing to save.")
            return
        already_saved = self._stopped_checkpoint is not None
        saved = self._save_before_stopping()
        if already_saved:  # the error's own message says where
            return
        if not saved:
            saved = (
                " Under several processes nothing more is saved when stopping; the checkpoints already written are kept."
                if self.accelerator.num_processes > 1
                else " Saving what it trained failed (see the warning above)."
            )
        stopped = f"Training stopped at step {self.state.global_step}"
        cause = error.reason if isinstance(error, TrainingTerminated) else f"{type(error).__name__}: {error}"
        cause = cause.splitlines()[0] if cause.strip() else type(error).__name__
        logger.error(f"{stopped} ({cause[:200]}).{saved}")
        if hasattr(error, "add_note"):  # Python 3.11+: a line under the traceback, after the error's message
            error.add_note(f"{stopped}.{saved}")

    def _restore_iteration_state(self, checkpoint: str | None) -> None:
        """Before resuming ``checkpoint``: the rollouts its next micro-steps reuse when it was written in the
        middle of an iteration (:func:`~trl_visual.trainer.iteration_state.restore_rollouts`)."""
        self._rollouts, self._rollouts_iteration = restore_rollouts(
            checkpoint, self.args, self.accelerator.device
        )

    def _save_iteration_state(self, checkpoint_dir: str) -> None:
        """Every process, while a checkpoint is written: its rollouts, when the micro-steps after the checkpoint
        reuse them (:func:`~trl_visual.trainer.iteration_state.save_iteration_rollouts`)."""
        save_iteration_rollouts(
            self._rollouts, self._rollouts_iteration, checkpoint_dir, self.state.global_step, self.args
        )

    def _before_train(self, checkpoint: str | None) -> None:
        """Hook: work before training starts, with the checked checkpoint being resumed (or ``None``).
        BPGO makes its priors here."""

    # ------------------------------------------------------------------------------------------------
    # Evaluation, logging, saving
    # ------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of the metrics gathered since the last log (TRL's way); after a train log, send the
        step's sample grids, so that they land under the same step as its metrics."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        logs = dict(logs)  # Trainer.log adds keys: never touch the caller's dict
        if mode == "train":
            logs.update({k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)
        if mode == "train":
            self._pending_media.flush()

    def method_state(self) -> dict[str, Any]:
        """Hook: the method's own state that a checkpoint must keep (BPGO's priors, say). Saved as
        ``trl_visual_state.safetensors`` in every checkpoint (:mod:`~trl_visual.state_files`: tensors, numbers,
        strings, lists and dicts with string keys, so that reading it runs no code) and handed back to
        :meth:`load_method_state` on resume. GRPO has none."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Hook: restore what :meth:`method_state` returned."""
