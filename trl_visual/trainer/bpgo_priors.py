"""BPGO's per-prompt prior rewards ``R_prior``: one store per source, one interface.

=====================  ==============================================================================
``prior_source``       store
=====================  ==============================================================================
``"column"``           :class:`ColumnPriors`: a numeric dataset column, checked before training
``"ema"``              :class:`EMAPriors`: ``P' = decay · P + (1 − decay) · R̄`` of each prompt's group means
``"base_model"``       :class:`BaseModelPriors`: the base model's mean reward (or, with
                       ``prior_model_name_or_path``, a separate model's), estimated when training
                       starts and cached in ``output_dir/bpgo_priors.json``
``"first_frame"``      :class:`FirstFramePriors`: image-to-video, the reward of each row's conditioning
                       image (a still video) against its prompt, keyed by prompt and image, computed when
                       training starts and cached like the base model's
=====================  ==============================================================================

Every store answers :meth:`PriorStore.priors` for the groups of a batch, learns from a batch with
:meth:`PriorStore.update`, and round-trips through checkpoints with ``state_dict`` / ``load_state_dict`` (like
ddpo-pytorch's per-prompt stat tracker, typed and checkpointed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import torch

from .._version import __version__
from ..core.bpgo import update_ema_prior
from ..models.loading import registered_loader
from ..preflight import check_hub_id
from .bpgo_config import PRIOR_SOURCES, BPGOConfig
from .diffusion_grpo_config import redact_tokens
from .setup_checks import missing_columns

logger = logging.getLogger(__name__)

PRIOR_CACHE_NAME = "bpgo_priors.json"
"""File in ``output_dir`` where ``prior_source="base_model"`` keeps its estimated priors across restarts."""


def check_prior_value(value: Any, where: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``where`` when it is not a finite number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(
        f"The prior of {where} is {value!r}: priors must be finite numbers (no NaN, None or text). Fix the "
        "value, or use prior_source='base_model' or 'ema' to let the trainer make the priors."
    )


def first_row_per_prompt(rows: list[dict[str, Any]], prompt_column: str) -> dict[str, dict[str, Any]]:
    """The first row of each distinct prompt, in first-seen order."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row[prompt_column], row)
    return first


def mean_per_prompt(scored: list[tuple[str, float]], num_rollouts: int) -> dict[str, float]:
    """Each prompt's mean over its non-NaN rewards; a prompt without any is an error naming it."""
    values: dict[str, list[float]] = {}
    for prompt, value in scored:
        if not math.isnan(value):
            values.setdefault(prompt, []).append(value)
    missing = sorted({p for p, _ in scored} - set(values))
    if missing:
        raise ValueError(
            f"No valid reward in {num_rollouts} rollouts for the prompts {missing[:5]}: their prior cannot be "
            "estimated. Raise prior_num_rollouts or check the reward function."
        )
    return {prompt: sum(v) / len(v) for prompt, v in values.items()}


def variance_per_prompt(scored: list[tuple[str, float]]) -> dict[str, float]:
    """Each prompt's unbiased variance over its non-NaN rewards (0 with fewer than two): the anchor's ``v_i``."""
    values: dict[str, list[float]] = {}
    for prompt, value in scored:
        if not math.isnan(value):
            values.setdefault(prompt, []).append(value)
    return {
        prompt: sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else 0.0
        for prompt, v in values.items()
    }


class PriorStore:
    """The interface of a prior source. ``prompts`` are the prompts of the N groups of a global batch, ``rows``
    their first dataset rows, ``group_means`` ``(N,)`` their mean rewards."""

    def priors(
        self, prompts: list[str], rows: list[dict[str, Any]], group_means: torch.Tensor
    ) -> torch.Tensor:
        """``(N,)`` priors, same dtype and device as ``group_means``."""
        raise NotImplementedError

    def variances(self, prompts: list[str], rows: list[dict[str, Any]], like: torch.Tensor) -> torch.Tensor:
        """``(N,)`` variances ``v_i`` of the prior's reward (the uncertainty RAS's anchor), like ``like``; a store
        without them says so."""
        raise ValueError(
            f"The prior source {type(self).__name__} has no variances; `ras_consistency` needs prior_source="
            "'base_model' or 'column' with a `prior_var_column`."
        )

    def update(self, prompts: list[str], group_means: torch.Tensor) -> None:
        """Learn from a batch after its advantages are computed (only the EMA does)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this store."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ColumnPriors(PriorStore):
    """Priors read from the ``column`` of each group's dataset row."""

    def __init__(self, column: str, var_column: str = "prior_var"):
        self.column, self.var_column = column, var_column

    def priors(
        self, prompts: list[str], rows: list[dict[str, Any]], group_means: torch.Tensor
    ) -> torch.Tensor:
        values = [
            check_prior_value(row.get(self.column), f"the row with prompt {p!r}")
            for row, p in zip(rows, prompts)
        ]
        return torch.tensor(values, dtype=group_means.dtype, device=group_means.device)

    def variances(self, prompts: list[str], rows: list[dict[str, Any]], like: torch.Tensor) -> torch.Tensor:
        values = [
            check_prior_value(
                row.get(self.var_column), f"the row with prompt {p!r} (column {self.var_column!r})"
            )
            for row, p in zip(rows, prompts)
        ]
        return torch.tensor(values, dtype=like.dtype, device=like.device)


class EMAPriors(PriorStore):
    """``P' = decay · P + (1 − decay) · R̄`` per prompt. A prompt seen for the first time gets its own group mean
    as prior (so ``Δ = 0`` on a first visit)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.values: dict[str, float] = {}

    def priors(
        self, prompts: list[str], rows: list[dict[str, Any]], group_means: torch.Tensor
    ) -> torch.Tensor:
        values = [self.values.get(p, math.nan) for p in prompts]
        priors = torch.tensor(values, dtype=group_means.dtype, device=group_means.device)
        return torch.where(torch.isnan(priors), group_means, priors)

    def update(self, prompts: list[str], group_means: torch.Tensor) -> None:
        """A prompt that appears in several groups of one batch is updated once with the mean of its group
        means (first visit: ``P' = R̄``)."""
        positions: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            positions.setdefault(prompt, []).append(i)
        unique = list(positions)
        # each prompt once (the usual batch): its group mean as it is, no reduction per prompt
        if len(unique) == len(prompts):
            means = group_means.double().cpu()
        else:
            means = torch.stack([group_means[idx].nanmean() for idx in positions.values()]).double().cpu()
        old = torch.tensor([self.values.get(p, math.nan) for p in unique], dtype=torch.float64)
        new = update_ema_prior(old, means, self.decay)
        for prompt, value in zip(unique, new.tolist()):
            if not math.isnan(value):
                self.values[prompt] = value

    def state_dict(self) -> dict[str, Any]:
        return {"ema_priors": dict(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = dict(state.get("ema_priors") or {})


class BaseModelPriors(PriorStore):
    """The base model's mean reward per prompt, made once before training (:meth:`load_or_estimate`)."""

    def __init__(self) -> None:
        self.values: dict[str, float] | None = None
        self.prior_vars: dict[str, float] = {}

    def priors(
        self, prompts: list[str], rows: list[dict[str, Any]], group_means: torch.Tensor
    ) -> torch.Tensor:
        values = [self._prior(p) for p in prompts]
        return torch.tensor(values, dtype=group_means.dtype, device=group_means.device)

    def _prior(self, prompt: str) -> float:
        if self.values is None:
            raise RuntimeError(
                "prior_source='base_model' but no priors were estimated: they are made when `train()` starts."
            )
        if prompt not in self.values:
            raise KeyError(f"No estimated prior for the prompt {prompt!r}; was it in the train_dataset?")
        return self.values[prompt]

    def variances(self, prompts: list[str], rows: list[dict[str, Any]], like: torch.Tensor) -> torch.Tensor:
        missing = [p for p in prompts if p not in self.prior_vars]
        if missing:
            raise KeyError(
                f"No estimated prior variance for the prompt {missing[0]!r}; was it in the train_dataset?"
            )
        return torch.tensor([self.prior_vars[p] for p in prompts], dtype=like.dtype, device=like.device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"estimated_priors": dict(self.values) if self.values is not None else None}
        if self.prior_vars:
            state["estimated_prior_vars"] = dict(self.prior_vars)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("estimated_priors") is not None:
            self.values = dict(state["estimated_priors"])
        self.prior_vars = dict(state.get("estimated_prior_vars") or {})

    def load_or_estimate(
        self,
        path: str,
        fingerprint: dict[str, Any],
        first_rows: dict[str, dict[str, Any]],
        estimate: Callable[[dict[str, dict[str, Any]]], Any],
        write: bool,
        with_variances: bool = False,
    ) -> None:
        """Priors from the cache at ``path`` (when made with the same ``fingerprint``), ``estimate``-d now for
        the prompts of ``first_rows`` it lacks, and the cache rewritten (when ``write``: the main process).
        ``with_variances``: ``estimate`` returns ``(means, variances)``, and a prompt cached without a variance
        is estimated again."""
        priors = read_prior_cache(path, fingerprint)
        variances = read_prior_cache(path, fingerprint, key="variances") if priors else {}
        missing = {
            p: row
            for p, row in first_rows.items()
            if p not in priors or (with_variances and p not in variances)
        }
        if missing:
            logger.info("Estimating BPGO priors for %d prompts from the base model.", len(missing))
            estimated = estimate(missing)
            if with_variances:
                estimated, estimated_vars = estimated
                variances.update(estimated_vars)
            priors.update(estimated)
            if write:
                write_prior_cache(path, fingerprint, priors, variances)
        self.values, self.prior_vars = priors, variances


def read_prior_cache(path: str, fingerprint: dict[str, Any], key: str = "priors") -> dict[str, float]:
    """The cached priors in ``path`` (``key="variances"``: their variances, ``{}`` in a cache without them), or
    ``{}`` (estimate again) when there are none, they were made with other settings (another ``fingerprint``),
    or the file is unreadable (truncated by a crash, edited by hand): a warning names it."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
        cached_fingerprint, priors = (
            cache["fingerprint"],
            cache["priors"] if key == "priors" else cache.get(key, {}),
        )
        priors = {prompt: check_prior_value(value, f"prompt {prompt!r}") for prompt, value in priors.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        logger.warning(
            "The cached BPGO priors in %s are unreadable (%s: %s); estimating them again and rewriting the file.",
            path,
            type(error).__name__,
            error,
        )
        return {}
    if cached_fingerprint != fingerprint:
        logger.warning("The cached priors in %s were made with other settings; estimating them again.", path)
        return {}
    return priors


def write_prior_cache(
    path: str,
    fingerprint: dict[str, Any],
    priors: dict[str, float],
    variances: dict[str, float] | None = None,
) -> None:
    """Written atomically: a temporary file, then renamed. ``variances`` (the uncertainty RAS's ``v_i``) are kept
    beside the priors when given."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp"
    content: dict[str, Any] = {"fingerprint": fingerprint, "priors": priors}
    if variances:
        content["variances"] = variances
    with open(temporary, "w") as f:
        json.dump(content, f)
    os.replace(temporary, path)


def check_prior_source(dataset: Any, args: BPGOConfig) -> None:
    """``column``: the column exists and every value is a finite number. ``base_model`` and ``first_frame``:
    the rows can be listed; ``prior_model_name_or_path`` can be found. All before the pipeline is even loaded."""
    check_prior_model_reference(args.prior_model_name_or_path)
    if dataset is None:
        return
    others = ", ".join(repr(s) for s in PRIOR_SOURCES if s != args.prior_source)
    if args.prior_source in ("base_model", "first_frame") and not hasattr(dataset, "__len__"):
        raise ValueError(
            f"prior_source={args.prior_source!r} makes a prior for every row before training, so it needs a "
            f"map-style Dataset, not a streaming one; use prior_source={others} instead."
        )
    if args.prior_source != "column":
        return
    if missing_columns(dataset, [args.prior_column]):
        raise ValueError(
            f"prior_source='column' needs a numeric {args.prior_column!r} column in the train_dataset, but "
            f"its columns are {dataset.column_names}. Add it (for example with `trainer.estimate_priors(dataset)`), set "
            f"`prior_column` to the right name, or use prior_source={others}."
        )
    needs_var = args.ras_mode == "uncertainty" and args.ras_consistency
    if needs_var and missing_columns(dataset, [args.prior_var_column]):
        raise ValueError(
            f"`ras_consistency=True` with prior_source='column' needs the prior's variance in a numeric "
            f"{args.prior_var_column!r} column, but the train_dataset's columns are {dataset.column_names}. Add it "
            "(the reward's variance over the anchor's samples of each prompt), set `prior_var_column`, or use "
            "prior_source='base_model'."
        )
    if hasattr(dataset, "__len__"):
        prompts = dataset[args.prompt_column]
        for column in [args.prior_column] + ([args.prior_var_column] if needs_var else []):
            for i, value in enumerate(dataset[column]):
                check_prior_value(value, f"row {i} (prompt {prompts[i]!r})")


# ------------------------------------------------------------------------------------------------
# Priors
# ------------------------------------------------------------------------------------------------


def base_model_fingerprint(
    args: BPGOConfig,
    model_name: str,
    pipeline: Any,
    denoiser_dtype: torch.dtype,
    reward_names: list[str],
    reward_weights: torch.Tensor,
    latent_shape: tuple[int, ...],
) -> dict[str, Any]:
    """Everything the estimated priors depend on, as JSON values; a cache made with a different
    fingerprint is not reused. The estimate samples the base model like a training rollout, from seeds
    derived from ``seed``, and scores the samples with the weighted rewards: so the model (name, loading
    options such as ``revision``/``variant``/dtype, the denoiser's dtype, mixed precision), the
    scheduler's config (its sigmas), the prompt encoding (``max_sequence_length``), every sampling
    setting, how noise is drawn (batch and group sizes, processes, shared noise), the rewards and the
    package version all count. A ``token`` in ``model_init_kwargs`` is redacted: the file must not hold it."""
    fingerprint = {
        "model": model_name,
        "pipeline": type(pipeline).__name__,
        "model_init_kwargs": redact_tokens({"model_init_kwargs": args.model_init_kwargs or {}})[
            "model_init_kwargs"
        ],
        "denoiser_dtype": denoiser_dtype,
        "mixed_precision": [args.bf16, args.fp16],
        "scheduler": dict(pipeline.scheduler.config),
        "rewards": reward_names,
        "reward_weights": reward_weights.tolist(),
        "num_rollouts": args.prior_num_rollouts,
        "seed": args.seed,
        "sampling": [
            args.num_inference_steps,
            args.guidance_scale,
            args.cfg_in_training,
            list(latent_shape),
            args.sde_type,
            args.noise_level,
            args.sde_window_size,
            args.sde_window_range,
            args.negative_prompt,
            args.max_sequence_length,
        ],
        "noise": [
            args.per_device_train_batch_size,
            args.world_size,
            args.num_generations,
            args.init_same_noise,
        ],
        "trl_visual": __version__,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def check_prior_model_reference(name: str | None) -> None:
    """``prior_model_name_or_path`` that can be loaded: a registered name (``tiny:…``), an existing local path,
    or a Hub id that is cached or reachable; otherwise one line now, before any model loads."""
    if name is None or registered_loader(name) is not None or os.path.exists(os.path.expanduser(name)):
        return
    check_hub_id(name, "model", "`prior_model_name_or_path`")


def prior_model_fingerprint(fingerprint: dict[str, Any], prior_model: str, dtype: Any) -> dict[str, Any]:
    """:func:`base_model_fingerprint` of the run, with the model that is actually sampled for the priors:
    ``prior_model`` (name or path, loaded with ``dtype``). Like the base model's, it names the model and does not
    hash its weights."""
    return json.loads(
        json.dumps({**fingerprint, "prior_model": [prior_model, dtype]}, sort_keys=True, default=str)
    )


def first_frame_fingerprint(
    model_name: str,
    pipeline: Any,
    image_column: str,
    output_shape: tuple[int, ...],
    reward_names: list[str],
    reward_weights: torch.Tensor,
    seed: int,
) -> dict[str, Any]:
    """What the first-frame priors depend on: the pipeline that resizes the conditioning images (name and class),
    the image column, the size of the still video the rewards score, the rewards and their weights, the seed (a
    reward may draw at random) and the package version. Nothing is sampled, so no sampling setting counts."""
    fingerprint = {
        "prior": "first_frame",
        "model": model_name,
        "pipeline": type(pipeline).__name__,
        "image_column": image_column,
        "still_video": list(output_shape),
        "rewards": reward_names,
        "reward_weights": reward_weights.tolist(),
        "seed": seed,
        "trl_visual": __version__,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def image_key(prompt: str, image: Any) -> str:
    """The key of a (prompt, conditioning image) pair: the prompt and the SHA-1 of the image's pixels and size
    (a PIL image), so that rows sharing a prompt but not an image get their own first-frame prior."""
    digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]
    return f"{prompt}\x00{digest}"


class FirstFramePriors(BaseModelPriors):
    """Image-to-video: ``R_prior,i = R(still video of the row's conditioning image, prompt)``, one value per
    (prompt, image) pair (:func:`image_key`), made once before training (:meth:`load_or_estimate` with
    those keys). ``row_key(rows)`` gives the keys of dataset rows (set by the trainer once its pipeline can
    read images). The prior is one deterministic evaluation, not a sample mean, so its variance ``v_i`` is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.row_key: Callable[[list[dict[str, Any]]], list[str]] | None = None

    def priors(
        self, prompts: list[str], rows: list[dict[str, Any]], group_means: torch.Tensor
    ) -> torch.Tensor:
        if self.values is None or self.row_key is None:
            raise RuntimeError(
                "prior_source='first_frame' but the first-frame priors were not made: they are made when "
                "`train()` starts."
            )
        keys = self.row_key(rows)
        missing = [p for p, key in zip(prompts, keys) if key not in self.values]
        if missing:
            raise KeyError(
                f"No first-frame prior for the row with prompt {missing[0]!r} and its image; was it in the "
                "train_dataset?"
            )
        return torch.tensor(
            [self.values[k] for k in keys], dtype=group_means.dtype, device=group_means.device
        )

    def variances(self, prompts: list[str], rows: list[dict[str, Any]], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(prompts), dtype=like.dtype, device=like.device)


def make_prior_store(source: str, column: str, ema_decay: float, var_column: str = "prior_var") -> PriorStore:
    """The store of ``prior_source`` ``source``."""
    if source == "column":
        return ColumnPriors(column, var_column)
    if source == "ema":
        return EMAPriors(ema_decay)
    if source == "first_frame":
        return FirstFramePriors()
    return BaseModelPriors()
