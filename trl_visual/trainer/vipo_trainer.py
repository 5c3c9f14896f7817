"""ViPO: GRPO whose advantage is a perceptual map over latent positions, with a truly dense loss."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset

from ..backbones import VisionBackbone
from ..core.vipo import (
    check_user_maps,
    dense_policy_loss,
    function_map,
    function_video_map,
    heat_overlay,
    per_reward_advantages,
    perceptual_map,
    perceptual_video_map,
    pool_to_tokens,
    reward_map_advantages,
    shuffle_maps,
    spread_advantages,
)
from ..images import to_pil
from ..named_backbones import is_named_backbone, named_backbone
from .diffusion_grpo_trainer import DiffusionGRPOTrainer
from .hooks import Advantages, PolicyLoss
from .logging_utils import Media, SampleBatch, captioned_grid, send_media
from .map_functions import MapFunction, named_map_fn
from .rollout import Rollouts
from .vipo_config import ViPOConfig


class ViPOTrainer(DiffusionGRPOTrainer):
    """ViPO (Ni et al., "Seeing What Matters", arXiv 2511.18719): GRPO with perceptual advantage maps.

    Each decoded sample goes through a frozen vision backbone; PCA of its patch features gives a map
    ``M ∈ [0, 1]`` of the perceptually important regions on the latent grid (see
    :func:`trl_visual.core.vipo.perceptual_map`). The scalar GRPO advantage ``A`` becomes ``A(p) = M(p)·A``
    and the loss has one ratio per latent position (:func:`dense_policy_loss`). Works for every adapter:
    the latent is viewed as ``(channels, *grid)`` through ``adapter.to_position_grid`` (SD3 ``(C, H, W)``,
    packed tokens on their token grid, video ``(C, T, H, W)``).

    Example::

        from datasets import Dataset
        from trl_visual import ViPOConfig, ViPOTrainer

        trainer = ViPOTrainer(
            model="stabilityai/stable-diffusion-3.5-medium",
            reward_funcs="red_channel",
            args=ViPOConfig(output_dir="out", backbone="facebook/dinov2-large", pca_components=3),
            train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]}),
        )
        trainer.train()

    ``backbone`` (a Hub id, a local path, a :class:`~trl_visual.backbones.VisionBackbone` or any
    ``torch.nn.Module`` returning ``(B, h, w, D)`` features) overrides ``args.backbone``. The backbone is
    built and checked once, before the pipeline is loaded; a map that cannot be built at a step (the
    backbone raises, features are not finite) falls back to all ones, is counted in
    ``vipo/map_fallbacks`` and warned about once per cause.

    ``map_fn`` (a callable, or a name registered with :func:`~trl_visual.trainer.map_functions.register_map_fn`)
    overrides ``args.map_fn``: a function ``(images (N, 3, H, W) in [0, 1], prompts) → (N, h, w)`` maps ``≥ 0``
    used instead of the backbone's PCA map (video: called on the frames, one prompt per frame). Controls:
    ``aggregation="shuffled"`` gives each sample another sample's map, ``aggregation="oracle"`` the region of
    the reward function that declares one (a ``region`` attribute with ``map_fn``'s signature).
    """

    _tag_names = ["trl-visual", "diffusion-grpo", "vipo"]
    _method_name = "ViPO"
    _citations = ["ViPO", "DanceGRPO", "Flow-GRPO"]
    config_class = ViPOConfig

    def __init__(
        self,
        *args: Any,
        backbone: str | os.PathLike | torch.nn.Module | None = None,
        map_fn: MapFunction | str | None = None,
        **kwargs: Any,
    ):
        """:class:`DiffusionGRPOTrainer`'s arguments (``model``, ``reward_funcs``, ``args``, ``train_dataset``,
        …), ``backbone``, which overrides ``args.backbone``, and ``map_fn``, which overrides ``args.map_fn``
        (see the class docstring)."""
        self._backbone_source = backbone
        self._map_fn_source = map_fn
        self.map_fn: MapFunction | None = None
        super().__init__(*args, **kwargs)
        if self.backbone is not None:
            self.backbone.to(self.accelerator.device)
        self.position_grid, self.token_patch_size = self._position_layout()
        self._warned: set[str] = set()
        self._shuffle_generator = torch.Generator().manual_seed(
            self.args.seed + self.accelerator.process_index
        )

    # ------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------
    def _prepare_method(self, args: ViPOConfig, train_dataset: Dataset | IterableDataset | None) -> None:
        """The backbone is built and checked before the pipeline loads: fail fast."""
        super()._prepare_method(args, train_dataset)
        if self._map_fn_source is not None or args.map_fn is not None:
            self._check_map_fn_options(args)
        self.backbone = self._build_backbone(self._backbone_source, args, self._uses_backbone(args))

    def _uses_backbone(self, args: ViPOConfig) -> bool:
        """Only PCA maps need the backbone: not ``aggregation="ones"`` or ``"oracle"``, nor a ``map_fn``."""
        user_map = self._map_fn_source is not None or args.map_fn is not None
        return args.aggregation not in ("ones", "oracle") and not user_map

    @staticmethod
    def _check_map_fn_options(args: ViPOConfig) -> None:
        """A ``map_fn`` replaces the PCA map: it combines with ``aggregation`` "weighted" (the default: used as
        is) or "shuffled" (moved to other samples), with nothing else."""
        if args.aggregation not in ("weighted", "shuffled"):
            raise ValueError(
                f"`map_fn` replaces the PCA map, so `aggregation={args.aggregation!r}` has no meaning with it. Leave "
                "`aggregation` at 'weighted' (the map as map_fn gives it) or set 'shuffled' (each sample gets another "
                "sample's map), or drop `map_fn`."
            )

    @staticmethod
    def _build_backbone(
        backbone: str | os.PathLike | torch.nn.Module | None, args: ViPOConfig, needed: bool = True
    ) -> VisionBackbone | None:
        """The frozen backbone (``None`` when the maps need none: ``aggregation="ones"``/``"oracle"``, a
        ``map_fn``)."""
        if not needed:
            return None
        source = backbone if backbone is not None else args.backbone
        if is_named_backbone(source):  # "tiny:shapes-features", as the CLI takes it
            source = named_backbone(source)
        if isinstance(source, VisionBackbone):
            return ViPOTrainer._with_image_size(source, args.backbone_image_size)
        kwargs: dict[str, Any] = {"image_size": args.backbone_image_size}
        dtype = ViPOTrainer._backbone_dtype(args)
        if isinstance(source, (str, os.PathLike)) and dtype is not None:
            kwargs["dtype"] = dtype
        return VisionBackbone(source, **kwargs)

    @staticmethod
    def _backbone_dtype(args: ViPOConfig) -> torch.dtype | None:
        """``backbone_dtype`` when set, else the training precision (``None``: the checkpoint's own, float32)."""
        if getattr(args, "backbone_dtype", None) is not None:
            return getattr(torch, args.backbone_dtype)
        if args.bf16 or args.fp16:
            return torch.bfloat16 if args.bf16 else torch.float16
        return None

    @staticmethod
    def _with_image_size(backbone: VisionBackbone, image_size: int | None) -> VisionBackbone:
        """A built backbone (the CLI's ``tiny:dinov2``, a user's) takes ``backbone_image_size`` when it has no
        size of its own; two different sizes are refused rather than one silently ignored."""
        if image_size is None or backbone.image_size == image_size:
            return backbone
        if backbone.image_size is not None:
            raise ValueError(
                f"`backbone_image_size={image_size}` disagrees with the image_size={backbone.image_size} the given "
                "VisionBackbone was built with. Set one of them only (or both to the same value)."
            )
        backbone.image_size = image_size
        return backbone

    def _check_resolution(self, args: ViPOConfig) -> None:
        """Also refuse a backbone input under 2×2 patches: its PCA has one token (or one row of them), so every
        map would be constant, all ones, and ViPO would silently be GRPO. Checked before any sampling, for
        backbones whose patch size is known (transformers models; user modules report their own grid)."""
        super()._check_resolution(args)
        self.map_fn = self._resolve_map_fn(args)
        if self.backbone is None or not self.backbone.patch_size:
            return
        patch = self.backbone.patch_size
        size = self.backbone.input_size(self.height, self.width)
        grid = tuple(side // patch for side in size)
        if min(grid) < 2:
            raise ValueError(
                f"ViPO's backbone {self.backbone.name!r} would see the {self.height}×{self.width} samples at "
                f"{size[0]}×{size[1]} pixels (backbone_image_size={self.backbone.image_size}), a {grid[0]}×{grid[1]} "
                f"grid of {patch}-pixel patches: a map needs at least 2×2 patches, or it is all ones. Set "
                f"`backbone_image_size` to at least {2 * patch} (or leave it unset to use the samples' size), raise "
                "`height`/`width`, or use a backbone with smaller patches."
            )

    def _resolve_map_fn(self, args: ViPOConfig) -> MapFunction | None:
        """The function that makes the maps instead of the backbone: the trainer's ``map_fn``, else the config's
        (a registered name), else, for ``aggregation="oracle"``, the ``region`` of the first reward function
        that has one. Resolved before any sampling, so that a missing region fails fast."""
        source = self._map_fn_source if self._map_fn_source is not None else args.map_fn
        if isinstance(source, str):
            return named_map_fn(source)
        if source is not None:
            if not callable(source):
                raise TypeError(
                    f"`map_fn` must be callable (images, prompts) -> (N, h, w) maps, got {source!r}."
                )
            return source
        if args.aggregation != "oracle":
            return None
        regions = [getattr(reward, "region", None) for reward in self.reward_funcs]
        found = [region for region in regions if callable(region)]
        if not found:
            raise ValueError(
                "aggregation='oracle' needs a reward function that knows its region: a `region(images, prompts)` "
                f"attribute returning (N, h, w) maps. None of {self.reward_names} has one. Give the reward a "
                "`region`, or pass the map as `map_fn`."
            )
        return found[0]

    def _position_layout(self) -> tuple[tuple[int, ...], int]:
        """The latent position grid (``(H, W)`` or ``(T, H, W)``) and the latent pixels per token side.

        Packed-token adapters may declare ``token_patch_size`` (FLUX: 2); the map is then built on the
        latent pixel grid and average-pooled onto the tokens. Without it the map is resized straight to the
        position grid.
        """
        probe = torch.zeros(1, *self.latent_shape)
        grid = tuple(self.adapter.to_position_grid(probe).shape[2:])
        expected = 3 if self.adapter.output_kind == "videos" else 2
        if len(grid) != expected:
            raise ValueError(
                f"ViPO needs the adapter's position grid to be {'(T, H, W)' if expected == 3 else '(H, W)'} "
                f"for {self.adapter.output_kind}; {type(self.adapter).__name__}.to_position_grid gives {grid}."
            )
        return grid, int(getattr(self.adapter, "token_patch_size", 1) or 1)

    # ------------------------------------------------------------------------------------------------
    # Maps
    # ------------------------------------------------------------------------------------------------
    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            warnings.warn(f"ViPO: {message}", RuntimeWarning, stacklevel=3)

    def _features(self, samples: torch.Tensor) -> torch.Tensor:
        """Backbone patch features: images ``(B, 3, H, W)`` → ``(B, h, w, D)``; videos ``(B, F, 3, H, W)``
        → ``(B, F, h, w, D)`` (all frames in one batch)."""
        if samples.ndim == 5:
            return self.backbone(samples.flatten(0, 1)).unflatten(0, samples.shape[:2])
        return self.backbone(samples)

    def _maps_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.args
        options = dict(
            components=args.pca_components,
            aggregation="weighted" if args.aggregation == "shuffled" else args.aggregation,
            smoothing_sigma=args.smoothing_sigma,
            sign_rule=args.sign_rule,
            normalization=args.map_normalization,
            variant=args.map_variant,
        )
        if len(self.position_grid) == 3:
            return perceptual_video_map(
                features, self.position_grid, temporal_sigma=args.temporal_sigma, **options
            )
        p = self.token_patch_size
        maps, fallback = perceptual_map(
            features, (self.position_grid[0] * p, self.position_grid[1] * p), **options
        )
        return (pool_to_tokens(maps, p) if p > 1 else maps), fallback

    def _maps_from_function(
        self, samples: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``map_fn``'s maps on the latent position grid (:func:`function_map`, :func:`function_video_map`):
        images ``(B, 3, H, W)`` → ``(B, h, w)``; videos: frames ``(B·F, 3, H, W)``, each with its video's prompt."""
        args = self.args
        if samples.ndim == 5:
            b, f = samples.shape[:2]
            frame_prompts = [prompt for prompt in prompts for _ in range(f)]
            raw = torch.as_tensor(self.map_fn(samples.flatten(0, 1), frame_prompts), device=samples.device)
            check_user_maps(raw, b * f)
            return function_video_map(
                raw.unflatten(0, (b, f)),
                self.position_grid,
                temporal_sigma=args.temporal_sigma,
                normalization=args.map_normalization,
            )
        p = self.token_patch_size
        raw = torch.as_tensor(self.map_fn(samples, list(prompts)), device=samples.device)
        grid = (self.position_grid[0] * p, self.position_grid[1] * p)
        maps, fallback = function_map(raw, grid, args.map_normalization)
        return (pool_to_tokens(maps, p) if p > 1 else maps), fallback

    @torch.no_grad()
    def compute_maps(
        self, samples: torch.Tensor, prompts: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of decoded samples on the latent position grid: the backbone's PCA map, or ``map_fn``'s (which
        gets ``prompts``), moved to other samples of the batch with ``aggregation="shuffled"``
        (:func:`shuffle_maps`).

        Returns ``(maps (B, *grid), fallback (B,) bool)``. A sample whose map cannot be built gets all ones
        (the whole batch when the backbone raises) and ``fallback = True``.
        """
        maps, fallback = self._unshuffled_maps(samples, prompts)
        if self.args.aggregation == "shuffled":
            maps = shuffle_maps(maps, self._shuffle_generator)
        return maps, fallback

    def _unshuffled_maps(
        self, samples: torch.Tensor, prompts: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = samples.shape[0]
        ones = torch.ones(batch, *self.position_grid, device=samples.device)
        if self.map_fn is not None:
            maps, fallback = self._maps_from_function(samples, prompts or [""] * batch)
            return maps.float(), fallback
        if self.backbone is None:  # aggregation="ones"
            return ones, torch.zeros(batch, dtype=torch.bool, device=samples.device)
        try:
            features = self._features(samples)
        except Exception as error:  # noqa: BLE001 - any backbone failure falls back, loudly
            self._warn_once(
                "backbone",
                f"the backbone {getattr(self.backbone, 'name', '')!r} raised {type(error).__name__}: {error}. "
                "Maps of the affected batches fall back to all ones (counted in vipo/map_fallbacks).",
            )
            return ones, torch.ones(batch, dtype=torch.bool, device=samples.device)
        maps, fallback = self._maps_from_features(features)
        if fallback.any():
            self._warn_once(
                "features",
                f"{int(fallback.sum())} sample(s) had non-finite backbone features (NaN/Inf in the decoded "
                "samples or the backbone); their maps fall back to all ones (counted in vipo/map_fallbacks).",
            )
        return maps.float(), fallback

    def _maps_for(
        self, advantages: Advantages, rollouts: Rollouts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`compute_maps` of the samples whose map can change the loss: ``A(p) = M(p) · A`` is 0 wherever
        every set of advantages of a sample (main, auxiliary, per reward) is 0, so those samples (a group whose
        rewards are all equal, say) get no backbone call and an all-ones map. Returns ``(maps, fallback,
        computed)``, ``computed (B,)`` bool or ``None`` when every map was computed. Every map is computed when
        other samples' maps are read (``aggregation="shuffled"``, ``map_target="reward"``) or logged
        (``log_images``)."""
        samples, prompts = rollouts.samples, rollouts.prompts
        args = self.args
        if args.aggregation == "shuffled" or args.map_target == "reward" or args.log_images:
            return (*self.compute_maps(samples, prompts), None)
        sets = [advantages.advantages, *(term.advantages for term in advantages.auxiliary)]
        if advantages.per_reward is not None:
            sets.append(advantages.per_reward)
        needed = torch.stack([s.reshape(len(samples), -1).ne(0).any(dim=1) for s in sets]).any(dim=0)
        if bool(needed.all()):  # one host sync: which samples get a backbone call
            return (*self.compute_maps(samples, prompts), None)
        maps = torch.ones(len(samples), *self.position_grid, device=samples.device)
        fallback = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
        rows = needed.nonzero().squeeze(1)
        if len(rows):
            subset = [prompts[i] for i in rows.tolist()] if prompts is not None else None
            maps[rows], fallback[rows] = self.compute_maps(samples[rows], subset)
        return maps, fallback, needed

    @staticmethod
    def _map_metrics(
        maps: torch.Tensor, fallback: torch.Tensor, computed: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The maps' mean and spread over the global batch, and how many fell back to all ones; with
        ``computed``, over the maps that were computed only (NaN when none was)."""
        flat = maps.flatten(1)
        stats = torch.stack([flat.mean(dim=1), flat.std(dim=1, correction=0), fallback.float()], dim=1)
        if computed is not None:
            stats[~computed, :2] = float("nan")
        stats = gather(stats)
        return {
            "vipo/map_mean": stats[:, 0].nanmean(),
            "vipo/map_std": stats[:, 1].nanmean(),
            "vipo/map_fallbacks": stats[:, 2].sum(),
        }

    # ------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------
    def compute_advantages(self, rewards_per_func: torch.Tensor, inputs: list[dict[str, Any]]) -> Advantages:
        """The parent's advantages; with ``multi_objective_loss="per_reward"`` also each reward's own,
        ``(B, F)`` in ``per_reward`` (:func:`per_reward_advantages`)."""
        out = super().compute_advantages(rewards_per_func, inputs)
        if self.args.multi_objective_loss != "per_reward":
            return out
        args = self.args
        per_reward = per_reward_advantages(
            rewards_per_func, args.num_generations, args.scale_rewards, args.adv_clip_max
        )
        return replace(out, per_reward=per_reward)

    def expand_advantages(self, advantages: Advantages, rollouts: Rollouts) -> Advantages:
        """Every set of advantages spread over the samples' maps, ``A(p) = M(p) · A`` ``(B, *grid)``
        (:meth:`apply_maps`): the main ones, the auxiliary objectives' (BPGO's CRT) and each reward's.

        ``dense_level="sample"``: ``A · mean(M)`` ``(B,)`` (the released image code). ``map_target="reward"``:
        group-relative advantages of ``M(p) · R`` (:func:`reward_map_advantages`). The maps are kept in
        ``maps``, their figures (``vipo/map_mean|std|fallbacks``) in ``metrics``. A sample whose every advantage
        is 0 gets no map (all ones, :meth:`_maps_for`): its loss is the same with any map.
        """
        maps, fallback, computed = self._maps_for(advantages, rollouts)
        metrics = {**advantages.metrics, **self._map_metrics(maps, fallback, computed)}
        if self.args.map_target == "reward":
            shaped = self._reward_target_advantages(advantages.reward, self._loss_maps(maps))
            return replace(advantages, advantages=shaped, maps=maps, metrics=metrics)
        shaped = advantages.reshaped(partial(self.apply_maps, maps=maps))
        return replace(shaped, maps=maps, metrics=metrics)

    def _make_rollouts(self, inputs: list[dict[str, Any]]) -> Rollouts:
        """The parent's rollouts; with ``log_images``, each step's map overlays wait for the step's log."""
        rollouts = super()._make_rollouts(inputs)
        maps = rollouts.advantages.maps if rollouts.advantages is not None else None
        if maps is not None and self.args.log_images and self.accelerator.is_main_process:
            count = self.args.num_images_to_log
            send = partial(
                self.log_map_overlays, SampleBatch.of(rollouts, count), maps[:count].detach().clone()
            )
            self._pending_media.add("vipo/maps", self.state.global_step, send)
        return rollouts

    def _loss_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The maps at the loss's level: ``(B, *grid)``, or ``mean(M)`` ``(B,)`` for ``dense_level="sample"``."""
        return maps.flatten(1).mean(dim=1) if self.args.dense_level == "sample" else maps

    def apply_maps(self, advantages: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``A(p) = clamp(M(p) · A, ±adv_clip_max)`` for per-sample advantages ``(B,)`` (``A · mean(M)`` at the
        sample level), re-clamped per position as the released code does (:func:`spread_advantages`)."""
        return spread_advantages(advantages, self._loss_maps(maps), self.args.adv_clip_max)

    def _reward_target_advantages(self, local_rewards: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Group statistics need whole groups: gather rewards and maps, compute, keep this process's rows."""
        rewards, all_maps = gather(local_rewards.contiguous()), gather(maps.contiguous())
        advantages = reward_map_advantages(
            rewards, all_maps, self.args.num_generations, self.args.scale_rewards, self.args.adv_clip_max
        )
        return advantages[self.placement.local]

    def clipped_objective(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss and clipped fraction ``(B,)`` for one set of advantages of either shape.

        Maps ``(B, *grid)``: the dense loss, one ratio per position (:func:`dense_policy_loss`), on the
        adapter's position grid. ``(B,)`` (``dense_level="sample"``): GRPO's scalar loss,
        ``ρ = exp(mean_elements(log p_θ − log p_old))``. :meth:`policy_loss` calls this once per set of
        advantages (BPGO's auxiliary CRT included), so they all take the dense form.
        """
        if advantages.ndim == 1:
            return super().clipped_objective(log_prob, old_log_prob, advantages)
        log_ratio = self.adapter.to_position_grid(log_prob - old_log_prob)
        return dense_policy_loss(log_ratio, advantages, self.args.epsilon, self.args.epsilon_high)

    def policy_loss(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: Advantages
    ) -> PolicyLoss:
        """With ``multi_objective_loss="per_reward"``: ``L = Σ_f w_f L(M · A_f)``, one
        :meth:`clipped_objective` per reward function (clipped fraction averaged over them). Otherwise the
        parent's loss."""
        if advantages.per_reward is None:
            return super().policy_loss(log_prob, old_log_prob, advantages)
        terms = [
            self.clipped_objective(log_prob, old_log_prob, column)
            for column in advantages.per_reward.unbind(dim=1)
        ]
        weights = self.reward_weights.to(log_prob.device)
        loss = sum(weight * term for weight, (term, _) in zip(weights, terms))
        return PolicyLoss(loss, torch.stack([clipped for _, clipped in terms]).mean(dim=0))

    # ------------------------------------------------------------------------------------------------
    # Seeing the maps
    # ------------------------------------------------------------------------------------------------
    def log_map_overlays(self, rollouts: Rollouts | SampleBatch, maps: torch.Tensor) -> str:
        """Each logged sample beside its map as a heat-map overlay: a PNG in ``output_dir/samples/`` and
        images for the active loggers. Video: the first frame and the first latent frame's map."""
        count = min(self.args.num_images_to_log, len(rollouts.prompts))
        pairs = []
        for i in range(count):
            image = rollouts.samples[i] if rollouts.samples.ndim == 4 else rollouts.samples[i, 0]
            heat = maps[i] if maps.ndim == 3 else maps[i, 0]
            pairs.append(torch.cat([image.float().clamp(0, 1), heat_overlay(image, heat)], dim=-1))
        images = [to_pil(pair) for pair in pairs]
        captions = SampleBatch.of(rollouts, count).captions()
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"vipo_maps_step_{step:06d}.png")
        grid = captioned_grid(images, captions, columns=2)
        grid.save(path)
        send_media(self, Media("vipo/maps", images, captions, path, grid))
        return path
