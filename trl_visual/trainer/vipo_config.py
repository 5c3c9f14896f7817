"""Configuration of :class:`~trl_visual.trainer.vipo_trainer.ViPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core.validation import check_choice
from ..core.vipo import AGGREGATIONS, NORMALIZATIONS, SIGN_RULES, VARIANTS
from .diffusion_grpo_config import DiffusionGRPOConfig

MAP_TARGETS: tuple[str, ...] = ("advantage", "reward")
DENSE_LEVELS: tuple[str, ...] = ("position", "sample")
BACKBONE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MULTI_OBJECTIVE_LOSSES: tuple[str, ...] = ("sum", "per_reward")
MAP_AGGREGATIONS: tuple[str, ...] = (*AGGREGATIONS, "shuffled", "oracle")
"""The PCA aggregations and the two controls: ``"shuffled"`` (another sample's map) and ``"oracle"`` (the
reward's own region)."""


@dataclass
class ViPOConfig(DiffusionGRPOConfig):
    r"""Configuration of ViPO (Visual Preference Policy Optimization, Ni et al., arXiv 2511.18719).

    Everything of :class:`DiffusionGRPOConfig`, plus the Perceptual Structuring Module (how a decoded
    sample becomes a map ``M ∈ [0, 1]`` over latent positions) and how the map enters the loss:
    ``A_i(p) = M_i(p) · A_i`` at each latent position ``p``, with one policy ratio per position.

    Example::

        ViPOConfig(output_dir="out", backbone="facebook/dinov2-large", pca_components=3)
    """

    #: BPGO and ViPO normalize advantages per prompt group: no trajectory branching
    _branching_advantages: ClassVar[bool] = False

    backbone: str = field(
        default="facebook/dinov2-large",
        metadata={
            "help": "Vision backbone giving patch features: a Hub id or local folder loaded with "
            "transformers.AutoModel (DINOv2, CLIP/SigLIP vision towers, ResNet, …). To use a torch.nn.Module "
            "returning (B, h, w, D) features, pass it to the trainer as `backbone=`."
        },
    )
    backbone_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Shorter side the backbone sees (rounded to its patch size). Default: the decoded image's "
            "own size, as in the paper."
        },
    )
    backbone_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Precision of a backbone loaded from `backbone`: 'float32', 'bfloat16' or 'float16'. None: the "
            "training precision (bfloat16 with bf16=True, float16 with fp16=True, else float32). The released code "
            "runs DINOv2 in float32 even when training in bf16; its features come out float32 either way."
        },
    )
    pca_components: int = field(
        default=3, metadata={"help": "K: principal components of the patch features per image (per frame)."}
    )
    aggregation: str = field(
        default="weighted",
        metadata={
            "help": "How components become one map: 'weighted' by explained variance (the paper), 'average', "
            "'first_pc', or 'ones' (all-ones map: GRPO with a per-position ratio; no backbone is loaded). Controls "
            "for experiments: 'shuffled' (the 'weighted' map, or map_fn's, of another sample of the batch: same mass, "
            "wrong place) and 'oracle' (the region of the reward function that declares one, a `region` attribute; "
            "no backbone is loaded)."
        },
    )
    map_fn: str | None = field(
        default=None,
        metadata={
            "help": "A registered map function used instead of the backbone's PCA map: (images (N, 3, H, W) in [0, 1], "
            "prompts) -> maps (N, h, w) >= 0, resized to the latent grid and normalized by `map_normalization` "
            "(video: called per frame). Built in: 'tiny:scenes-objects' (the miniature world's object region from "
            "the prompt). From Python pass any callable as ViPOTrainer(map_fn=...)."
        },
    )
    sign_rule: str = field(
        default="border",
        metadata={
            "help": "Orientation of each principal component: 'border' (subject away from the image border, "
            "then the minority side; independent of the SVD's sign), 'skew' (minority side only), or "
            "'reference' (the released code: more negative = subject, which depends on the solver's sign)."
        },
    )
    map_variant: str = field(
        default="default",
        metadata={
            "help": "'default': this library's map (the `sign_rule` above; video frames resampled with the end frames "
            "aligned, as causal video VAEs line them up). 'released': the authors' released map, reproduced to 1e-4: "
            "PCA signed like scikit-learn >= 1.5 then more negative = subject, +1e-8 min-max denominators, scipy's "
            "gaussian_filter (reflect, truncate 4), trilinear align_corners=False time resampling. `sign_rule` is "
            "then unused."
        },
    )
    smoothing_sigma: float = field(
        default=1.0, metadata={"help": "σ of the spatial Gaussian smoothing, in backbone patches (0: none)."}
    )
    temporal_sigma: float = field(
        default=0.3, metadata={"help": "Video: σ of the temporal Gaussian, in latent frames (0: none)."}
    )
    map_normalization: str = field(
        default="minmax",
        metadata={
            "help": "'minmax': maps in [0, 1] (the paper; the mean advantage shrinks), or 'mean_one': each map "
            "rescaled to mean 1 so the average advantage of a sample is kept."
        },
    )
    map_target: str = field(
        default="advantage",
        metadata={
            "help": "'advantage': A(p) = M(p) · A (the paper). 'reward': the paper's ablation, R(p) = M(p) · R "
            "and then group-relative advantages at each position."
        },
    )
    dense_level: str = field(
        default="position",
        metadata={
            "help": "'position': one ratio and one advantage per latent position (the paper's loss). 'sample': "
            "the released image code, the scalar GRPO loss with each advantage scaled by mean(M)."
        },
    )

    multi_objective_loss: str = field(
        default="sum",
        metadata={
            "help": "With several reward functions: 'sum' (one advantage per sample from "
            "`multi_objective_aggregation`, one clipped loss) or 'per_reward' (each reward gets its own "
            "group-relative advantages, maps and clipped loss, L = Σ_f w_f L(M · A_f), with `reward_weights` w_f: "
            "the released ViPO video code's form). Needs map_target='advantage'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("aggregation", self.aggregation, MAP_AGGREGATIONS)
        if self.aggregation == "shuffled" and self.per_device_train_batch_size < 2:
            raise ValueError(
                "aggregation='shuffled' moves each map to another sample of the batch, which needs "
                f"per_device_train_batch_size >= 2 (got {self.per_device_train_batch_size})."
            )
        check_choice("sign_rule", self.sign_rule, SIGN_RULES)
        check_choice("map_normalization", self.map_normalization, NORMALIZATIONS)
        if self.backbone_dtype is not None:
            check_choice("backbone_dtype", self.backbone_dtype, BACKBONE_DTYPES)
        check_choice("map_variant", self.map_variant, VARIANTS)
        if self.map_variant == "released" and self.sign_rule != "border":
            raise ValueError(
                f"`sign_rule={self.sign_rule!r}` has no effect with map_variant='released', which signs the PCA "
                "components as the released code does. Drop `sign_rule`, or use map_variant='default'."
            )
        check_choice("map_target", self.map_target, MAP_TARGETS)
        check_choice("dense_level", self.dense_level, DENSE_LEVELS)
        check_choice("multi_objective_loss", self.multi_objective_loss, MULTI_OBJECTIVE_LOSSES)
        if self.multi_objective_loss == "per_reward" and self.map_target != "advantage":
            raise ValueError(
                "multi_objective_loss='per_reward' needs map_target='advantage': each reward's advantages are "
                "spread by the maps and get their own clipped loss."
            )
        if self.pca_components < 1:
            raise ValueError(f"`pca_components` must be at least 1; got {self.pca_components}.")
        for name in ("smoothing_sigma", "temporal_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`{name}` must be >= 0 (0 disables the smoothing); got {getattr(self, name)}."
                )
        if self.backbone_image_size is not None and self.backbone_image_size < 1:
            raise ValueError(
                f"`backbone_image_size` must be positive or None; got {self.backbone_image_size}."
            )
        if not isinstance(self.backbone, str) or not self.backbone:
            raise TypeError(
                "`backbone` in the config must be a Hub id or a local path; pass a torch.nn.Module to the trainer "
                "as `ViPOTrainer(..., backbone=module)` instead."
            )
