"""BPGO's priors made before training: sampling the base model (or a separate prior model) like a training
rollout and averaging the rewards, or scoring image-to-video's conditioning images (the first-frame prior).

:class:`PriorEstimator` is a collaborator of :class:`~trl_visual.trainer.BPGOTrainer`: it reads what it needs
from the trainer through :class:`PriorTrainer` (its :meth:`sample`, :meth:`compute_rewards` and settings), and
fills the trainer's :class:`~trl_visual.trainer.bpgo_priors.BaseModelPriors` (or
:class:`~trl_visual.trainer.bpgo_priors.FirstFramePriors`) store when training starts.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from ..checkpointing import METHOD_STATE_NAME
from ..core.advantages import weighted_reward_sum
from ..models import get_adapter, load_pipeline
from ..state_files import load_state_file
from .bpgo_priors import (
    PRIOR_CACHE_NAME,
    BaseModelPriors,
    FirstFramePriors,
    PriorStore,
    base_model_fingerprint,
    first_frame_fingerprint,
    first_row_per_prompt,
    image_key,
    mean_per_prompt,
    prior_model_fingerprint,
    variance_per_prompt,
)
from .memory import place_frozen_modules
from .rollout import BatchPlacement, PromptEncoder, Rollouts, SamplingContext, sample_rollouts
from .seeds import prior_estimation_seed

logger = logging.getLogger(__name__)

Sampler = Callable[[list[str], torch.Tensor, int, list[dict[str, Any]]], Rollouts]
"""``(prompts, group_ids, seed, rows) → Rollouts``: how the prior's rollouts are drawn."""


class PriorTrainer(Protocol):
    """What the prior estimation reads from the trainer (:class:`~trl_visual.trainer.BPGOTrainer` has it)."""

    args: Any
    accelerator: Any
    model: torch.nn.Module
    is_peft: bool
    adapter: Any
    pipeline: Any
    base_model_name: str
    reward_names: list[str]
    reward_weights: list[float]
    height: int
    width: int
    num_frames: int | None
    latent_shape: tuple[int, ...]

    @property
    def placement(self) -> BatchPlacement: ...

    def sample(
        self,
        prompts: list[str],
        group_ids: torch.Tensor,
        seed: int,
        *,
        rows: list[dict[str, Any]] | None = None,
    ) -> Rollouts: ...

    def compute_rewards(
        self, prompts: list[str], samples: torch.Tensor, inputs: list[dict[str, Any]]
    ) -> torch.Tensor: ...

    def compute_loss_context_manager(self) -> contextlib.AbstractContextManager: ...

    def _reference_model(self, model: torch.nn.Module) -> contextlib.AbstractContextManager: ...


class PriorEstimator:
    """BPGO's estimated priors: :meth:`estimate_priors` (a data set with a prior column), and :meth:`prepare`, the
    ``prior_source="base_model"`` / ``"first_frame"`` set-up of the prior store before training."""

    def __init__(self, trainer: PriorTrainer):
        self.trainer = trainer
        self.args = trainer.args

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
        priors, variances = self.prompt_stats(first_rows, num_rollouts or self.args.prior_num_rollouts)
        columns = {self.args.prior_column: priors}
        if with_variance:
            columns[self.args.prior_var_column] = variances
        for name, values in columns.items():
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
            dataset = dataset.add_column(name, [values[row] for row in dataset[self.args.prompt_column]])
        return dataset

    @contextlib.contextmanager
    def base_model_weights(self) -> Iterator[None]:
        """Sample from the base model: the LoRA adapter disabled (nothing to do without LoRA), eval mode."""
        was_training = self.trainer.model.training
        self.trainer.model.eval()
        try:
            if self.trainer.is_peft:
                with self.trainer._reference_model(self.trainer.model):
                    yield
            else:
                yield
        finally:
            self.trainer.model.train(was_training)

    def prompt_means(self, first_rows: dict[str, dict[str, Any]], num_rollouts: int) -> dict[str, float]:
        """Mean reward of ``num_rollouts`` rollouts per prompt (:meth:`prompt_stats`)."""
        return self.prompt_stats(first_rows, num_rollouts)[0]

    def prompt_stats(
        self, first_rows: dict[str, dict[str, Any]], num_rollouts: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Mean and unbiased variance of the reward over ``num_rollouts`` rollouts per prompt (the variance is
        the uncertainty RAS's ``v_i``). Rollouts are sampled (:meth:`prior_sampler`: the base model, or
        ``prior_model_name_or_path``) in chunks of ``per_device_train_batch_size``, chunks shared out over the
        processes, results gathered."""
        if num_rollouts < 1:
            raise ValueError(f"num_rollouts must be at least 1; got {num_rollouts}.")
        flat = [prompt for prompt in first_rows for _ in range(num_rollouts)]
        size = self.args.per_device_train_batch_size
        chunks = list(range(0, len(flat), size))
        mine = chunks[self.trainer.accelerator.process_index :: self.trainer.accelerator.num_processes]
        scored: list[tuple[str, float]] = []
        with self.prior_sampler() as sample:
            for start in mine:
                prompts = flat[start : start + size]
                rows = [first_rows[p] for p in prompts]
                group_ids = torch.arange(len(prompts)) // self.args.num_generations
                rollouts = sample(prompts, group_ids, self._prior_seed(start // size), rows)
                reward = weighted_reward_sum(
                    self.trainer.compute_rewards(prompts, rollouts.samples, rows), self.trainer.reward_weights
                )
                scored.extend(zip(prompts, reward.tolist()))
        if self.trainer.accelerator.num_processes > 1:
            scored = gather_object(scored)
        return mean_per_prompt(scored, num_rollouts), variance_per_prompt(scored)

    @contextlib.contextmanager
    def prior_sampler(self) -> Iterator[Sampler]:
        """The prior's rollouts: the base model's (:meth:`sample` under :meth:`base_model_weights`), or, with
        ``prior_model_name_or_path``, those of that model's pipeline, loaded here, sampled with the run's settings
        and size, and freed on leaving."""
        if self.args.prior_model_name_or_path is None:
            with self.base_model_weights():
                yield lambda prompts, group_ids, seed, rows: self.trainer.sample(
                    prompts, group_ids, seed=seed, rows=rows
                )
            return
        adapter = self._load_prior_model()
        latent_shape = adapter.latent_shape(self.trainer.height, self.trainer.width, self.trainer.num_frames)
        context = SamplingContext(
            args=self.args,
            encoder=PromptEncoder(adapter, self.args.max_sequence_length, self.args.negative_prompt),
            placement=self.trainer.placement,
            sigmas=adapter.sigmas(self.args.num_inference_steps, latent_shape, self.args.time_shift),
            latent_shape=latent_shape,
            device=self.trainer.accelerator.device,
            autocast=self.trainer.compute_loss_context_manager,
        )

        # emptied on leaving, so the pipeline goes even while the caller still holds `sample`
        loaded = {"adapter": adapter, "context": context}

        def sample(
            prompts: list[str], group_ids: torch.Tensor, seed: int, rows: list[dict[str, Any]]
        ) -> Rollouts:
            model, settings = loaded["adapter"], loaded["context"]
            return sample_rollouts(model, model.denoiser, prompts, group_ids, seed, settings, rows=rows)

        del adapter, context
        try:
            yield sample
        finally:  # the pipeline is freed now, not at the next garbage collection
            loaded.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load_prior_model(self) -> Any:
        """The adapter of ``prior_model_name_or_path``'s pipeline (loaded with the ``torch_dtype`` of
        ``model_init_kwargs``), frozen, in eval mode, on the training device."""
        name = self.args.prior_model_name_or_path
        dtype = (self.args.model_init_kwargs or {}).get("torch_dtype")
        logger.info("Loading %s to estimate the BPGO priors with.", name)
        adapter = get_adapter(load_pipeline(name, {"torch_dtype": dtype} if dtype is not None else None))
        adapter.required_columns(self.args)  # image-to-video: which column holds the conditioning image
        adapter.pipeline.set_progress_bar_config(disable=True)
        for module in [*adapter.frozen_modules, adapter.denoiser]:
            module.requires_grad_(False).eval()
        place_frozen_modules(adapter, self.trainer.accelerator.device, None, self.args.offload_text_encoders)
        adapter.denoiser.to(self.trainer.accelerator.device)
        return adapter

    def _prior_seed(self, chunk: int) -> int:
        """Seeds for prior estimation, apart from the training seeds (:mod:`trl_visual.trainer.seeds`)."""
        return prior_estimation_seed(self.args.seed, chunk)

    def fingerprint(self) -> dict[str, Any]:
        """What the estimated priors depend on (:func:`~trl_visual.trainer.bpgo_priors.base_model_fingerprint`,
        with the prior model when there is one; :func:`~trl_visual.trainer.bpgo_priors.first_frame_fingerprint`
        for the first-frame prior)."""
        if self.args.prior_source == "first_frame":
            return first_frame_fingerprint(
                self.trainer.base_model_name,
                self.trainer.pipeline,
                self.args.image_column,
                self._still_video_shape(),
                self.trainer.reward_names,
                self.trainer.reward_weights,
                self.args.seed,
            )
        fingerprint = base_model_fingerprint(
            self.args,
            self.trainer.base_model_name,
            self.trainer.pipeline,
            self.trainer.adapter.dtype,
            self.trainer.reward_names,
            self.trainer.reward_weights,
            self.trainer.latent_shape,
        )
        if self.args.prior_model_name_or_path is None:
            return fingerprint
        dtype = (self.args.model_init_kwargs or {}).get("torch_dtype")
        return prior_model_fingerprint(fingerprint, self.args.prior_model_name_or_path, dtype)

    def prepare(self, store: PriorStore, checkpoint: str | None, dataset: Dataset) -> None:
        """Fill ``store`` when it is estimated (``prior_source="base_model"`` or ``"first_frame"``): priors from the
        checkpoint being resumed, else from the cache in ``output_dir``, else estimated now for the prompts (or
        prompt-image pairs) of ``dataset`` the cache lacks (and cached). Other stores are left as they are."""
        if isinstance(store, FirstFramePriors):
            self._check_first_frame_source()
            store.row_key = self.first_frame_keys
        if not isinstance(store, BaseModelPriors) or store.values is not None:
            return
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, METHOD_STATE_NAME)):
            store.load_state_dict(load_state_file(os.path.join(checkpoint, METHOD_STATE_NAME)))
            if store.values:
                return
            store.values = None
        if isinstance(store, FirstFramePriors):
            rows, estimate = self._first_frame_rows(list(dataset)), self.first_frame_rewards
        else:
            rows = first_row_per_prompt(list(dataset), self.args.prompt_column)
            estimate = partial(self._estimate_for_store, num_rollouts=self.args.prior_num_rollouts)
        store.load_or_estimate(
            os.path.join(self.args.output_dir, PRIOR_CACHE_NAME),
            self.fingerprint(),
            rows,
            estimate,
            write=self.trainer.accelerator.is_main_process,
            with_variances=self.args.ras_mode == "uncertainty" and not isinstance(store, FirstFramePriors),
        )

    def _estimate_for_store(self, missing: dict[str, dict[str, Any]], num_rollouts: int) -> Any:
        """The means (and, for ``ras_mode="uncertainty"``, the variances) of the prompts the cache lacks."""
        if self.args.ras_mode == "uncertainty":
            return self.prompt_stats(missing, num_rollouts)
        return self.prompt_means(missing, num_rollouts)

    # -- the first-frame prior (image-to-video) ------------------------------------------------------------
    def _check_first_frame_source(self) -> None:
        """``prior_source="first_frame"`` needs a pipeline conditioned on an image (image-to-video)."""
        if not self.trainer.adapter.required_columns(self.args):
            raise ValueError(
                f"prior_source='first_frame' scores each row's conditioning image against its prompt, but "
                f"{type(self.trainer.pipeline).__name__} takes no conditioning image (only image-to-video pipelines do, "
                "e.g. WanImageToVideoPipeline). Use prior_source='base_model', 'column' or 'ema'."
            )

    def first_frame_keys(self, rows: list[dict[str, Any]]) -> list[str]:
        """One key per row: its prompt and its conditioning image (:func:`image_key`)."""
        images = self.trainer.adapter.conditioning_images(rows)
        return [image_key(row[self.args.prompt_column], image) for row, image in zip(rows, images)]

    def _first_frame_rows(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The first row of each distinct (prompt, image) pair, by key, in first-seen order."""
        first: dict[str, dict[str, Any]] = {}
        for row, key in zip(rows, self.first_frame_keys(rows)):
            first.setdefault(key, row)
        return first

    def _still_video_shape(self) -> tuple[int, ...]:
        """``(T, 3, H, W)``: what a first frame is scored as, a still video the size of the samples."""
        return (self.trainer.num_frames or 1, 3, self.trainer.height, self.trainer.width)

    @torch.no_grad()
    def first_frame_rewards(self, rows: dict[str, dict[str, Any]]) -> dict[str, float]:
        """``R_prior = Σ_f w_f R_f(still video of the conditioning image, prompt)`` per key of ``rows``: the
        image as the model is conditioned on it (``images_in``, at the generation size), repeated over the
        ``num_frames`` frames. Chunks of ``per_device_train_batch_size`` shared out over the processes, results
        gathered. A pair whose reward is NaN is an error naming its prompt."""
        keys = list(rows)
        size = self.args.per_device_train_batch_size
        chunks = list(range(0, len(keys), size))
        scored: list[tuple[str, float]] = []
        for start in chunks[self.trainer.accelerator.process_index :: self.trainer.accelerator.num_processes]:
            chunk = [rows[key] for key in keys[start : start + size]]
            images = self.trainer.adapter.reward_inputs(chunk)["images_in"]
            still = images.unsqueeze(1).expand(-1, self._still_video_shape()[0], -1, -1, -1).contiguous()
            prompts = [row[self.args.prompt_column] for row in chunk]
            reward = weighted_reward_sum(
                self.trainer.compute_rewards(prompts, still, chunk), self.trainer.reward_weights
            )
            scored.extend(zip(keys[start : start + size], reward.tolist()))
        if self.trainer.accelerator.num_processes > 1:
            scored = gather_object(scored)
        invalid = [rows[key][self.args.prompt_column] for key, value in scored if value != value]
        if invalid:
            raise ValueError(
                f"The reward of the conditioning image is NaN for the prompts {invalid[:5]}: their first-frame "
                "prior cannot be made. Check the reward function on still videos, or use prior_source='base_model'."
            )
        return dict(scored)
