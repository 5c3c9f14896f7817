"""CLIP-family reward models: CLIPScore, PickScore and the LAION aesthetic predictor.

Every reward here follows the reward contract of :mod:`trl_visual.rewards`::

    reward(prompts: list[str], images: Tensor, **columns) -> list[float]

with ``images`` float in ``[0, 1]`` of shape ``(B, 3, H, W)``. Each reward is a frozen ``torch.nn.Module`` in
eval mode: the trainer moves it to the training device once with ``.to(device)``, and every call runs under
``torch.no_grad()`` in the dtype given to the constructor. Images are preprocessed in torch, on the device they
are on, with the resize / center-crop / normalization settings of the model's image processor (no PIL round
trip), so the scores match the reference pipelines up to the small difference between torch's and PIL's
bicubic resampling.

Weights load with ``from_pretrained`` (CLIP towers, tokenizer, processor settings) or ``huggingface_hub``
(single-file heads), so a Hub id and a local path work the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trl_visual.backbones import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from trl_visual.rewards.registry import register_reward
from trl_visual.rewards.variants import prompt_variants, score_variants

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# PIL resampling codes as stored in ``preprocessor_config.json`` -> torch interpolation modes.
_PIL_RESAMPLE_TO_TORCH: dict[int, str] = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


# ---------------------------------------------------------------------------------------------------------------
# Small shared helpers
# ---------------------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn ``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` (and the same for float32 / float16) into a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown reward dtype {dtype!r}; use one of 'float32', 'bfloat16' or 'float16'.")
    return _DTYPES[key]


def resolve_file(name_or_path: str | Path, filename: str) -> str:
    """Return a local path to ``filename``.

    ``name_or_path`` may be a local file (used as it is), a local folder (``filename`` inside it) or a Hub repo id
    (the file is downloaded, or taken from the cache, with ``huggingface_hub.hf_hub_download``).
    """
    path = Path(name_or_path)
    if path.is_file():
        return str(path)
    if path.is_dir():
        candidate = path / filename
        if not candidate.is_file():
            raise FileNotFoundError(
                f"{candidate} does not exist; pass the file itself or the right `filename`."
            )
        return str(candidate)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=str(name_or_path), filename=filename)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a ``.safetensors`` file or a torch pickle (loaded with ``weights_only=True``).

    A checkpoint that wraps its weights as ``{"state_dict": {...}}`` (open_clip / Lightning style) is unwrapped,
    and a DDP ``module.`` prefix is removed.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict: Any = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if (
        isinstance(state_dict, dict)
        and "state_dict" in state_dict
        and isinstance(state_dict["state_dict"], dict)
    ):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state_dict).__name__}).")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def check_image_batch(
    images: Tensor | None, videos: Tensor | None, num_prompts: int, reward_name: str
) -> Tensor:
    """Validate the ``images`` argument of an image reward and return it.

    Raises a ``ValueError`` naming the fix when videos are passed to an image reward, when the shape is not
    ``(B, 3, H, W)``, or when the number of images differs from the number of prompts.
    """
    if images is None:
        if videos is not None:
            raise ValueError(
                f"The reward {reward_name!r} scores images but received `videos`; wrap it with "
                "`trl_visual.rewards.video.FrameAveraged(reward)` to score videos frame by frame."
            )
        raise ValueError(f"The reward {reward_name!r} needs `images` of shape (B, 3, H, W), float in [0, 1].")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"The reward {reward_name!r} expects images of shape (B, 3, H, W); got {tuple(images.shape)}. "
            "Videos (B, T, 3, H, W) go through `FrameAveraged` or a video reward."
        )
    if images.shape[0] != num_prompts:
        raise ValueError(
            f"The reward {reward_name!r} got {num_prompts} prompts for {images.shape[0]} images; pass one prompt per image."
        )
    return images


def _chunks(total: int, size: int) -> list[slice]:
    """Slices that cover ``range(total)`` in pieces of at most ``size``."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def check_batch_size(batch_size: int) -> None:
    """A reward model's ``batch_size`` is a positive integer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> Any:
    """``prompts`` padded (or truncated) to ``max_length`` tokens, as PyTorch tensors on ``device``."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).to(device)


def _pooled(output: Any) -> Tensor:
    """The projected embedding from ``get_image_features`` / ``get_text_features``.

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projection; older
    releases return the tensor itself.
    """
    return output if isinstance(output, Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing in torch
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """A CLIP image processor written in torch, for float images in ``[0, 1]`` of shape ``(B, 3, H, W)``.

    Attributes:
        resize_mode: ``"shortest_edge"`` (scale so the short side is ``size``, as CLIPImageProcessor does),
            ``"exact"`` (resize to ``size`` x ``size``), ``"longest_edge_pad"`` (scale so the long side is ``size``
            and zero-pad to a centered square, as HPSv2's evaluation transform does) or ``None`` (no resize).
        size: the target of the resize, in pixels.
        crop_size: ``(height, width)`` of the center crop, or ``None``.
        mean / std: per-channel normalization, or ``None`` to skip it.
        interpolation: a ``torch.nn.functional.interpolate`` mode; bicubic and bilinear use antialiasing, as PIL
            does when downsampling.
    """

    resize_mode: str | None = "shortest_edge"
    size: int = 224
    crop_size: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    interpolation: str = "bicubic"

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> ImageTransform:
        """Read the settings of a Hub repo's / local folder's ``preprocessor_config.json`` (no PIL involved)."""
        from transformers.image_processing_utils import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(str(name_or_path))
        return cls.from_processor_dict(config)

    @classmethod
    def from_processor_dict(cls, config: dict[str, Any]) -> ImageTransform:
        """Build a transform from the dictionary of a CLIP-style ``preprocessor_config.json``."""
        resize_mode: str | None = None
        size = 224
        if config.get("do_resize", True) and config.get("size") is not None:
            raw = config["size"]
            if isinstance(raw, int):
                resize_mode, size = "shortest_edge", raw
            elif "shortest_edge" in raw:
                resize_mode, size = "shortest_edge", int(raw["shortest_edge"])
            elif raw.get("height") == raw.get("width") and raw.get("height") is not None:
                resize_mode, size = "exact", int(raw["height"])
            else:
                raise ValueError(
                    f"Unsupported image processor size {raw!r}: expected shortest_edge or a square."
                )
        crop_size: tuple[int, int] | None = None
        if config.get("do_center_crop", False) and config.get("crop_size") is not None:
            raw_crop = config["crop_size"]
            crop_size = (
                (raw_crop, raw_crop) if isinstance(raw_crop, int) else (raw_crop["height"], raw_crop["width"])
            )
        normalize = config.get("do_normalize", True)
        resample = config.get("resample", 3)
        return cls(
            resize_mode=resize_mode,
            size=size,
            crop_size=crop_size,
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
            interpolation=_PIL_RESAMPLE_TO_TORCH.get(int(resample), "bicubic"),
        )

    def __call__(self, images: Tensor) -> Tensor:
        """Resize, crop and normalize ``images`` (computed in float32, on the images' device)."""
        images = images.float()
        if self.resize_mode == "shortest_edge":
            images = resize_shortest_edge(images, self.size, self.interpolation)
        elif self.resize_mode == "exact":
            images = resize(images, (self.size, self.size), self.interpolation)
        elif self.resize_mode == "longest_edge_pad":
            images = resize_longest_edge_and_pad(images, self.size, self.interpolation)
        elif self.resize_mode is not None:
            raise ValueError(f"Unknown resize_mode {self.resize_mode!r}.")
        if self.crop_size is not None:
            images = center_crop(images, self.crop_size)
        if self.mean is not None and self.std is not None:
            images = normalize(images, self.mean, self.std)
        return images


def resize(images: Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """Resize ``(B, C, H, W)`` images to ``size`` = ``(height, width)``, clamped back to ``[0, 1]``.

    Bicubic overshoots; PIL clips to the uint8 range, so the result is clamped the same way.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    smooth = interpolation in ("bilinear", "bicubic")
    kwargs: dict[str, Any] = {"align_corners": False, "antialias": True} if smooth else {}
    return F.interpolate(images, size=size, mode=interpolation, **kwargs).clamp(0.0, 1.0)


def resize_shortest_edge(images: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Scale so the shorter side is ``size``; the long side is ``int(size * long / short)`` as in transformers."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if height <= width else (new_long, size)
    return resize(images, new_hw, interpolation)


def resize_longest_edge_and_pad(images: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Scale so the longer side is ``size``, then zero-pad (black) to a centered ``size`` x ``size`` square."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    images = resize(images, (new_h, new_w), interpolation)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def center_crop(images: Tensor, crop_size: tuple[int, int]) -> Tensor:
    """Center-crop ``(B, C, H, W)`` images to ``crop_size``, zero-padding first if an image is smaller."""
    crop_h, crop_w = crop_size
    height, width = images.shape[-2:]
    if height < crop_h or width < crop_w:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        height, width = images.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


# ---------------------------------------------------------------------------------------------------------------
# The shared CLIP reward machinery
# ---------------------------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A reward model under the reward contract, ``reward(prompts, images=None, *, videos=None, **columns)``:
    :meth:`forward` takes the batch as the trainer passes it and, without gradient, hands it to
    :meth:`score_batch`, which checks it and scores it."""

    name: str = "reward_model"

    @torch.no_grad()
    def forward(
        self,
        prompts: list[str],
        images: Tensor | None = None,
        *,
        videos: Tensor | None = None,
        **columns: Any,
    ) -> list[float | None]:
        """The score of each sample with its prompt and dataset columns (:meth:`score_batch`)."""
        return self.score_batch(prompts, images, videos, columns)

    def score_batch(
        self, prompts: list[str], images: Tensor | None, videos: Tensor | None, columns: dict[str, Any]
    ) -> list[float | None]:
        """Hook: check the batch (images or videos, as the subclass reads) and score it."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> RewardModel:
        """Rewards stay in eval mode whatever the trainer asks (the aesthetic head has dropout)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device the reward's weights are on (those of its first parameter: its model's)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the reward's weights are in (that of its first parameter: its model's)."""
        return next(self.parameters()).dtype


class ImageScorer(RewardModel):
    """An image reward model: :meth:`score_batch` checks the batch (:func:`check_image_batch`) and returns
    :meth:`score_images` as floats, so subclasses only say how a batch is scored."""

    name: str = "image_scorer"
    #: whether the score reads the prompt: then a ``prompt_variants`` column is scored variant by variant
    reads_prompts: bool = True

    def score_batch(
        self, prompts: list[str], images: Tensor | None, videos: Tensor | None, columns: dict[str, Any]
    ) -> list[float] | list[list[float]]:
        """The score of each (prompt, image) pair; images ``(B, 3, H, W)``, float in ``[0, 1]``. With a
        ``prompt_variants`` column (:mod:`trl_visual.rewards.variants`), each image's scores against its ``M``
        paraphrases instead: ``M`` interpretations per sample."""
        images = check_image_batch(images, videos, len(prompts), self.name)
        variants = prompt_variants(prompts, columns) if self.reads_prompts else None
        if variants is not None:
            return score_variants(self.score_images, variants, images)
        return self.score_images(prompts, images).float().tolist()

    def score_images(self, prompts: list[str], images: Tensor) -> Tensor:
        """Hook: ``(B,)`` scores of a checked batch of images with their prompts."""
        raise NotImplementedError


class CLIPRewardBase(ImageScorer):
    """A frozen CLIP model with batched, normalized image and text embeddings; subclasses define the score.

    Args:
        model: a ``transformers.CLIPModel`` (any object with ``get_image_features`` / ``get_text_features``).
        tokenizer: its tokenizer, or ``None`` for image-only rewards.
        transform: the torch preprocessing of the model's image processor.
        dtype: the dtype the model runs in.
        batch_size: the most images (and prompts) sent through the model at once.
        scale: what the cosine similarity is multiplied by (:meth:`score_scale`).
    """

    name: str = "clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None,
        transform: ImageTransform,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        self.model = model.to(resolve_dtype(dtype))
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.scale = float(scale)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm float32 image embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        outputs = []
        for part in _chunks(images.shape[0], self.batch_size):
            pixels = self.transform(images[part].to(self.device)).to(self.dtype)
            outputs.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float())
        return F.normalize(torch.cat(outputs), dim=-1)

    @torch.no_grad()
    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm float32 text embeddings ``(B, D)``; each distinct prompt is encoded once."""
        if self.tokenizer is None:
            raise ValueError(f"The reward {self.name!r} has no tokenizer: it does not read prompts.")
        unique = list(dict.fromkeys(prompts))
        max_length = self.model.config.text_config.max_position_embeddings
        outputs = []
        for part in _chunks(len(unique), self.batch_size):
            tokens = tokenize(self.tokenizer, unique[part], max_length, self.device)
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            outputs.append(_pooled(features).float())
        embeddings = F.normalize(torch.cat(outputs), dim=-1)
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeddings[torch.tensor([index[p] for p in prompts], device=embeddings.device)]

    def score_scale(self) -> float:
        """The factor the cosine similarity is multiplied by: the constructor's ``scale``, unless a subclass
        says otherwise."""
        return self.scale

    def score_images(self, prompts: list[str], images: Tensor) -> Tensor:
        """``score_scale() * cosine(image embedding, prompt embedding)`` for each (prompt, image) pair."""
        similarity = (self.embed_images(images) * self.embed_prompts(prompts)).sum(dim=-1)
        return self.score_scale() * similarity


def _load_clip(model_name_or_path: str, dtype: torch.dtype | str) -> nn.Module:
    """``CLIPModel.from_pretrained`` in ``dtype``, frozen and in eval mode."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_name_or_path, dtype=resolve_dtype(dtype))
    return model.eval().requires_grad_(False)


def _load_tokenizer(name_or_path: str) -> Any:
    """``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def pretrained_clip_parts(
    model_name_or_path: str,
    processor_name_or_path: str,
    dtype: torch.dtype | str,
    *,
    reads_prompts: bool = True,
) -> tuple[nn.Module, Any | None, ImageTransform]:
    """The ``(model, tokenizer, transform)`` :class:`CLIPRewardBase` takes, from a transformers CLIP checkpoint
    and the folder (or Hub id) of its tokenizer and image processor; no tokenizer when the reward does not
    read prompts."""
    tokenizer = _load_tokenizer(processor_name_or_path) if reads_prompts else None
    transform = ImageTransform.from_pretrained(processor_name_or_path)
    return _load_clip(model_name_or_path, dtype), tokenizer, transform


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------


@register_reward("clipscore")
class CLIPScoreReward(CLIPRewardBase):
    """Text-image alignment: ``scale * cosine(CLIP image embedding, CLIP text embedding)``.

    With the default ``openai/clip-vit-large-patch14`` and ``scale=1.0`` the score is the raw cosine, about
    0.15-0.40 for generated images (a matching caption is usually above 0.25). ``scale=100`` gives the
    ``logit_scale``-like range used by many papers; Hessel et al.'s CLIP-S is ``2.5 * max(cosine, 0)``.

    Args:
        model_name_or_path: Hub id or local folder of a transformers CLIP checkpoint.
        processor_name_or_path: where the tokenizer and ``preprocessor_config.json`` live; defaults to
            ``model_name_or_path``.
        scale: multiplies the cosine similarity.
        dtype: dtype the model runs in (``torch.float32``, ``"bfloat16"``, ...).
        batch_size: the most images sent through the model at once.

    Example:
        ```python
        reward = CLIPScoreReward().to("cuda")
        reward(["a red apple"], images)  # images: (1, 3, H, W) in [0, 1] -> [0.31]
        ```
    """

    name = "clipscore"

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        *,
        processor_name_or_path: str | None = None,
        scale: float = 1.0,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        processor = processor_name_or_path or model_name_or_path
        parts = pretrained_clip_parts(model_name_or_path, processor, dtype)
        super().__init__(*parts, dtype=dtype, batch_size=batch_size, scale=scale)


@register_reward("pickscore")
class PickScoreReward(CLIPRewardBase):
    """PickScore (Kirstain et al., 2023): human preference for text-to-image generations.

    A CLIP ViT-H/14 fine-tuned on Pick-a-Pic; the score is ``logit_scale.exp() * cosine`` as the authors
    compute it, with ``logit_scale.exp()`` about 100 for ``yuvalkirstain/PickScore_v1``, so scores are roughly
    17-24 for typical generations (Flow-GRPO divides by 26 to bring them near [0, 1]).

    Args:
        model_name_or_path: the PickScore CLIP checkpoint (Hub id or local folder).
        processor_name_or_path: tokenizer and image processor settings; PickScore uses those of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest edge 224 bicubic, center crop 224, OpenAI
            mean/std, 77 tokens).
        dtype: dtype the model runs in.
        batch_size: the most images sent through the model at once.
    """

    name = "pickscore"

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        *,
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        parts = pretrained_clip_parts(model_name_or_path, processor_name_or_path, dtype)
        super().__init__(*parts, dtype=dtype, batch_size=batch_size)

    def score_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint, computed in float32."""
        return math.exp(float(self.model.logit_scale.float()))


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: linear layers without activations, dropout between the first ones.

    Layout of ``sac+logos+ava1-l14-linearMSE.pth``: ``layers.0`` 768->1024, dropout 0.2, ``layers.2`` 1024->128,
    dropout 0.2, ``layers.4`` 128->64, dropout 0.1, ``layers.6`` 64->16, ``layers.7`` 16->1. The widths are
    read from the weights, so smaller heads with the same layout load too.

    Args:
        dims: the six widths, input first (``(768, 1024, 128, 64, 16, 1)`` for ViT-L/14).
    """

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        if len(dims) != 6:
            raise ValueError(
                f"The aesthetic head has five linear layers (six widths); got dims={tuple(dims)}."
            )
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]),
            nn.Dropout(0.2),
            nn.Linear(d[1], d[2]),
            nn.Dropout(0.2),
            nn.Linear(d[2], d[3]),
            nn.Dropout(0.1),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> AestheticMLP:
        """Build a head whose widths match ``state_dict`` and load it (strictly)."""
        linear_keys = (
            "layers.0.weight",
            "layers.2.weight",
            "layers.4.weight",
            "layers.6.weight",
            "layers.7.weight",
        )
        missing = [key for key in linear_keys if key not in state_dict]
        if missing:
            raise ValueError(
                f"Not a LAION aesthetic predictor state dict: missing {missing}; found {sorted(state_dict)[:8]}."
            )
        dims = [state_dict[linear_keys[0]].shape[1]] + [state_dict[key].shape[0] for key in linear_keys]
        head = cls(dims)
        head.load_state_dict({key: value.float() for key, value in state_dict.items()})
        return head

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores ``(B,)`` of unit-norm CLIP image embeddings ``(B, D)``."""
        return self.layers(embeddings).squeeze(-1)


@register_reward("aesthetic")
class AestheticReward(CLIPRewardBase):
    """LAION aesthetic predictor v2: how beautiful an image looks, on the 1-10 scale of its rating data.

    The unit-norm CLIP ViT-L/14 image embedding goes through a small linear head (:class:`AestheticMLP`).
    Prompts are ignored. Typical values: 4.5-6.5 for Stable Diffusion outputs, above 7 for very polished images.

    Args:
        model_name_or_path: the CLIP image tower, ``openai/clip-vit-large-patch14`` as in training the head.
        head_name_or_path: where the head's weights are: a Hub repo id, a local folder, or the file itself. The
            default ``trl-lib/ddpo-aesthetic-predictor`` is the copy TRL's DDPO example uses of LAION's
            ``sac+logos+ava1-l14-linearMSE.pth`` (github.com/christophschuhmann/improved-aesthetic-predictor).
        head_filename: the file inside ``head_name_or_path`` (``aesthetic-model.pth``); a ``.safetensors`` file
            works too.
        processor_name_or_path: image processor settings; defaults to ``model_name_or_path``.
        dtype: dtype the CLIP tower and the head run in.
        batch_size: the most images sent through the model at once.
    """

    reads_prompts = False

    name = "aesthetic"

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        *,
        head_name_or_path: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        processor_name_or_path: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        processor = processor_name_or_path or model_name_or_path
        parts = pretrained_clip_parts(model_name_or_path, processor, dtype, reads_prompts=False)
        super().__init__(*parts, dtype=dtype, batch_size=batch_size)
        head = AestheticMLP.from_state_dict(load_weights_file(resolve_file(head_name_or_path, head_filename)))
        self.head = head.to(resolve_dtype(dtype)).requires_grad_(False).eval()

    def score_images(self, prompts: list[str], images: Tensor) -> Tensor:
        """The head's score of each image's unit-norm CLIP embedding; ``prompts`` only fix the batch size."""
        embeddings = self.embed_images(images).to(self.dtype)
        return self.head(embeddings).float()
