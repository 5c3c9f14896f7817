"""Frozen vision backbones that turn images into patch features ``(B, h, w, D)`` for ViPO's maps.

:class:`VisionBackbone` wraps

* a Hub id or local path, loaded with ``transformers.AutoModel`` (DINOv2 with or without registers, CLIP
  and SigLIP vision towers, or their full dual-encoder checkpoints, whose ``vision_model`` is used; ResNet
  and other convolutional models), with mean/std from the checkpoint's own image-processor settings;
* an already built ``transformers`` model;
* any ``torch.nn.Module`` that maps preprocessed images ``(B, 3, H, W)`` to ``(B, h, w, D)``.

Preprocessing happens in torch on the model's device: images in [0, 1] are resized (bilinear,
antialiased) to a multiple of the patch size (the total stride for convolutional models) and normalized
with the processor's mean and std. The processor's own resizing and center-cropping are deliberately not
used: a crop would cut the image, and the features must cover the whole image to line up with the latent
grid. The processor's ``do_rescale`` is not applied either: inputs are already in [0, 1].

The constructor does a dry run on a small dummy image, so a model whose output cannot be read as patch
features fails at construction with an error that says what was expected, not at step 1000.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .core.vipo import as_pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Used only when a checkpoint has no image-processor config (a warning says so).
_DEFAULT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (HALF, HALF),
    "siglip_vision_model": (HALF, HALF),
    "siglip2": (HALF, HALF),
    "siglip2_vision_model": (HALF, HALF),
}

# Side of the dry-run image in units of the patch size (rows, cols); non-square on purpose.
_DRY_RUN_PATCHES = (2, 3)
# Stride assumed for the dry run of a model whose stride is not known yet (convolutional models).
_UNKNOWN_STRIDE_DRY_RUN = 32


class BackboneError(ValueError):
    """A backbone cannot be loaded or its output cannot be read as ``(B, h, w, D)`` patch features."""


def _load_image_processor(name_or_path: str, **kwargs: Any) -> Any | None:
    """``AutoImageProcessor.from_pretrained``, or ``None`` when the checkpoint has no processor config."""
    from transformers import AutoImageProcessor

    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:  # missing or unreadable config
        warnings.warn(
            f"Could not load an image processor for backbone {name_or_path!r} ({type(err).__name__}: {err}); "
            "using the default normalization for its model type. Pass image_mean= and image_std= to set it.",
            stacklevel=3,
        )
        return None


class VisionBackbone(torch.nn.Module):
    """A frozen vision backbone: images ``(B, 3, H, W)`` in [0, 1] → patch features ``(B, h, w, D)``.

    Example::

        backbone = VisionBackbone("facebook/dinov2-large")        # or a local path, or an nn.Module
        features = backbone(images)                               # (B, h, w, 1024), CLS/registers dropped
        maps, fallback = perceptual_map(features, grid_size=latents.shape[-2:])

    Readouts: ViT-style models (``last_hidden_state`` of shape ``(B, P + h·w, D)``) drop the ``P`` leading
    CLS/register/distillation tokens, ``P`` found in the dry run and checked against the config
    (``num_register_tokens`` for DINOv2 with registers); convolutional models (``last_hidden_state`` of
    shape ``(B, D, h, w)``) give their last feature map; a user module must return ``(B, h, w, D)`` itself.

    Args:
        model: Hub id or local path (loaded with ``AutoModel.from_pretrained``), a ``transformers``
            ``PreTrainedModel``, or any ``nn.Module`` returning ``(B, h, w, D)``.
        image_size: ``None`` (default) keeps each image's own size, rounded to the nearest multiple of the
            patch size (the paper's setting); an int resizes the shorter side to about that many pixels
            (keeping the aspect ratio); ``(H, W)`` resizes to that size (both rounded to the patch size).
        image_mean, image_std: normalization; default from the checkpoint's image processor. For a user
            module the default is no normalization.
        patch_size: the model's patch size / total stride. Read from the config (ViTs) or measured in the
            dry run (convolutional models); for a user module ``None`` means "no rounding".
        dtype: ``dtype`` for ``from_pretrained`` (e.g. ``torch.bfloat16``); outputs are float32 either way.
        **from_pretrained_kwargs: passed on to ``AutoModel.from_pretrained`` (``revision``,
            ``local_files_only``, ``attn_implementation``, …).

    Raises:
        BackboneError: the model cannot be loaded, or its output on a dummy image is not patch features.
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        *,
        image_size: int | tuple[int, int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        patch_size: int | None = None,
        dtype: torch.dtype | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        super().__init__()
        from transformers import PreTrainedModel

        processor = None
        loaded = isinstance(model, (str, os.PathLike))
        if loaded:
            self.name = str(model)
            model = self._load_model(self.name, dtype, from_pretrained_kwargs)
            if image_mean is None or image_std is None:
                processor = _load_image_processor(self.name, **from_pretrained_kwargs)
        elif isinstance(model, torch.nn.Module):
            self.name = getattr(model, "name_or_path", "") or type(model).__name__
        else:
            raise TypeError(
                f"backbone must be a Hub id, a local path or a torch.nn.Module, got {type(model).__name__}."
            )

        self.is_transformers = isinstance(model, PreTrainedModel)
        if self.is_transformers:
            model = self._vision_tower(model)
            if not loaded and (image_mean is None or image_std is None):
                processor = self._processor_for_instance(model)
            mean, std = self._resolve_normalization(model, processor, image_mean, image_std)
        else:
            mean, std = image_mean, image_std
        if (mean is None) != (std is None):
            raise ValueError("image_mean and image_std must be given together.")

        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.image_size = (
            image_size
            if image_size is None or isinstance(image_size, int)
            else as_pair(image_size, "image_size")
        )
        if isinstance(self.image_size, int) and self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if mean is not None:
            self.register_buffer(
                "image_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )
            self.register_buffer(
                "image_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )
        else:
            self.image_mean = self.image_std = None

        self.patch_size: int | None = patch_size or (
            self._config_patch_size(model) if self.is_transformers else None
        )
        self._accepts_interpolate = self.is_transformers and (
            "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        )
        self.readout = "custom"
        self.num_prefix_tokens = 0
        self.feature_dim = 0
        self._dry_run()

    # -------------------------------------------------------------------------------------- loading

    @staticmethod
    def _load_model(name: str, dtype: torch.dtype | None, kwargs: dict[str, Any]) -> torch.nn.Module:
        from transformers import AutoModel

        if dtype is not None:
            kwargs = {**kwargs, "dtype": dtype}
        try:
            return AutoModel.from_pretrained(name, **kwargs)
        except Exception as err:
            raise BackboneError(
                f"Could not load the vision backbone {name!r} with transformers.AutoModel "
                f"({type(err).__name__}: {err}). Pass a Hub id or a local folder holding a transformers "
                "vision model (e.g. 'facebook/dinov2-large'), or a torch.nn.Module returning (B, h, w, D) "
                "features."
            ) from err

    @staticmethod
    def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
        """The image tower of a dual encoder (CLIPModel, SiglipModel, …); the model itself otherwise."""
        config = model.config
        if getattr(config, "vision_config", None) is not None and isinstance(
            getattr(model, "vision_model", None), torch.nn.Module
        ):
            return model.vision_model
        return model

    def _processor_for_instance(self, model: torch.nn.Module) -> Any | None:
        name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if not name:
            return None
        return _load_image_processor(name)

    def _resolve_normalization(
        self,
        model: torch.nn.Module,
        processor: Any | None,
        image_mean: Sequence[float] | None,
        image_std: Sequence[float] | None,
    ) -> tuple[Sequence[float] | None, Sequence[float] | None]:
        """Explicit arguments, else the processor's ``image_mean``/``image_std`` (``None`` if the processor
        says ``do_normalize=False``), else the model type's usual values (ImageNet's by default)."""
        if image_mean is not None and image_std is not None:
            return image_mean, image_std
        if processor is not None:
            if not getattr(processor, "do_normalize", True):
                return None, None
            mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
            if mean is not None and std is not None:
                mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
                std = [std] * 3 if isinstance(std, (int, float)) else list(std)
                return mean, std
        model_type = getattr(model.config, "model_type", "")
        return _DEFAULT_NORMALIZATION.get(model_type, (IMAGENET_MEAN, IMAGENET_STD))

    @staticmethod
    def _config_patch_size(model: torch.nn.Module) -> int | None:
        patch = getattr(model.config, "patch_size", None)
        if patch is None:
            return None
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise BackboneError(f"non-square patches {patch} are not supported.")
            patch = patch[0]
        return int(patch)

    # ---------------------------------------------------------------------------------- preprocessing

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Backbone input size for an image of ``height × width``: the requested size (or the image's own),
        each side rounded (half up) to the nearest multiple of the patch size (at least one patch)."""
        if self.image_size is None:
            target = (float(height), float(width))
        elif isinstance(self.image_size, int):
            scale = self.image_size / min(height, width)
            target = (height * scale, width * scale)
        else:
            target = tuple(float(s) for s in self.image_size)
        p = self.patch_size or 1
        return tuple(max(p, p * math.floor(s / p + 0.5)) for s in target)  # type: ignore[return-value]

    def preprocess(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] → backbone input: resized (bilinear, antialiased) to ``size``
        (default :meth:`input_size`), then ``(x − mean) / std``, in the model's dtype and device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}.")
        param = next(iter(self.model.parameters()), None)
        device = param.device if param is not None else images.device
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
        x = images.to(device=device, dtype=torch.float32)
        size = size or self.input_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(
                x, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        if self.image_mean is not None:
            x = (x - self.image_mean.to(device)) / self.image_std.to(device)
        return x.to(dtype)

    # ---------------------------------------------------------------------------------------- forward

    def train(self, mode: bool = True) -> VisionBackbone:
        """The wrapped model stays in eval mode (frozen: no dropout, fixed normalization statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    def _raw_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.is_transformers:
            return self.model(pixel_values)
        kwargs = {"interpolate_pos_encoding": True} if self._accepts_interpolate else {}
        out = self.model(pixel_values=pixel_values, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None and isinstance(out, (tuple, list)) and out:
            hidden = out[0]
        return hidden

    def _read_features(self, out: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """Output of the model → ``(B, h, w, D)`` according to :attr:`readout`."""
        b = pixel_values.shape[0]
        if self.readout == "tokens":
            h, w = (s // self.patch_size for s in pixel_values.shape[-2:])
            if out.shape[1] != self.num_prefix_tokens + h * w:
                raise BackboneError(
                    f"backbone {self.name!r} returned {out.shape[1]} tokens for a {h}×{w} patch grid, "
                    f"expected {self.num_prefix_tokens} prefix tokens + {h * w} patch tokens."
                )
            return out[:, self.num_prefix_tokens :].reshape(b, h, w, -1)
        if self.readout == "feature_map":
            return out.permute(0, 2, 3, 1)
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] → patch features ``(B, h, w, D)`` (float32, no grad)."""
        pixel_values = self.preprocess(images)
        return self._read_features(self._raw_forward(pixel_values), pixel_values).float()

    # ---------------------------------------------------------------------------------------- dry run

    def _expected(self) -> str:
        return (
            "a ViT-style transformers model whose last_hidden_state is (B, prefix + h*w, D) tokens, a "
            "convolutional one whose last_hidden_state is a (B, D, h, w) feature map, or a "
            "torch.nn.Module that returns (B, h, w, D) patch features"
        )

    def _dry_run(self) -> None:
        """Run a dummy image (wider than tall) through the model, decide how to read its output, check it.

        transformers models get a small ``2×3``-patch input (ViTs interpolate their position embeddings);
        a user module gets the size :meth:`input_size` gives, so ``image_size`` applies to it.
        """
        base = self.patch_size or _UNKNOWN_STRIDE_DRY_RUN
        size = (_DRY_RUN_PATCHES[0] * base, _DRY_RUN_PATCHES[1] * base)
        images = torch.full((1, 3, *size), 0.5)
        images[..., : size[0] // 2, :] = 0.25  # not constant: some models normalize per image
        pixel_values = self.preprocess(images, size=size if self.is_transformers else None)
        with torch.no_grad():
            try:
                out = self._raw_forward(pixel_values)
            except Exception as err:
                raise BackboneError(
                    f"backbone {self.name!r} failed on a dummy image of shape {tuple(pixel_values.shape)} "
                    f"({type(err).__name__}: {err}). Expected {self._expected()}."
                ) from err
        self._configure_readout(out, pixel_values)
        features = self._read_features(out, pixel_values)
        if not torch.isfinite(features).all():
            raise BackboneError(f"backbone {self.name!r} returned non-finite features on a dummy image.")
        self.feature_dim = int(features.shape[-1])

    def _configure_readout(self, out: Any, pixel_values: torch.Tensor) -> None:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        what = f"a {type(out).__name__}" if shape is None else f"shape {shape}"
        bad = BackboneError(
            f"backbone {self.name!r} returned {what} for an input of shape {tuple(pixel_values.shape)}; "
            f"cannot read it as patch features. Expected {self._expected()}."
        )
        if shape is None or not out.is_floating_point() or shape[0] != 1 or min(shape) < 1:
            raise bad
        height, width = pixel_values.shape[-2:]
        if not self.is_transformers:
            # (1, h, w, D); a channels-first (1, D, h, w) output puts D where h should be, which shows up
            # as a grid taller than wide for the wider-than-tall dummy.
            if len(shape) != 4 or (height < width and shape[1] > shape[2]):
                raise bad
            self.readout = "custom"
            return
        if len(shape) == 4:  # convolutional: (1, D, h, w)
            self.readout = "feature_map"
            stride_h, stride_w = height / shape[2], width / shape[3]
            if not math.isclose(stride_h, stride_w, rel_tol=0.1):
                raise bad
            self.patch_size = self.patch_size or round(stride_h)
            return
        if len(shape) != 3:
            raise bad
        if not self.patch_size:
            raise BackboneError(
                f"backbone {self.name!r} returns tokens but its config has no patch_size; pass patch_size=."
            )
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        prefix = shape[1] - num_patches
        registers = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        if prefix < 0 or prefix > 8 + registers or (registers and prefix not in (registers, registers + 1)):
            raise BackboneError(
                f"backbone {self.name!r} returned {shape[1]} tokens for a "
                f"{height // self.patch_size}×{width // self.patch_size} patch grid (patch size "
                f"{self.patch_size}); cannot tell patch tokens from CLS/register tokens. "
                f"Expected {self._expected()}."
            )
        self.readout = "tokens"
        self.num_prefix_tokens = prefix

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, readout={self.readout!r}, patch_size={self.patch_size}, "
            f"prefix_tokens={self.num_prefix_tokens}, feature_dim={self.feature_dim}, "
            f"image_size={self.image_size}"
        )
