"""Wan text-to-video (``WanPipeline``) and image-to-video (``WanImageToVideoPipeline``), Wan2.1 and Wan2.2.

Conventions followed from diffusers' Wan pipelines:

- **Latents** ``(C, T', H/8, W/8)`` with ``T' = (num_frames − 1) / 4 + 1`` (the VAE's causal temporal factor);
  ``num_frames − 1`` must be a multiple of 4 (the pipeline rounds it with a warning; here it is an error, so
  the trained length is the one asked for). Channels-first, so the position grid is ``(T', H/8, W/8)``.
- **Timestep** ``σ · 1000`` (the scheduler's ``timesteps``); Wan2.2 TI2V-5B (``expand_timesteps``) takes one
  timestep per token, all equal for text-to-video.
- **CFG** with the negative prompt, both passes batched (the pipeline runs them one after the other).
- **Decoding** un-normalizes with the VAE's per-channel ``latents_mean`` / ``latents_std`` and returns videos
  ``(B, T, 3, H, W)`` in ``[0, 1]``.
- **Two experts** (Wan2.2 A14B: ``transformer_2`` and ``boundary_ratio``): ``transformer`` (the trained one)
  predicts while ``σ ≥ boundary_ratio`` and the frozen ``transformer_2`` below, like the pipeline (one
  ``guidance_scale`` for both). :meth:`WanAdapter.trains_at` tells the trainer which steps are the trained
  expert's, so only those are trained; swap the two experts in the pipeline to train the low-noise one.

Image-to-video (Wan2.1 I2V, Wan2.2 A14B I2V) follows ``WanImageToVideoPipeline.prepare_latents``: the
conditioning image (from the dataset column ``image_column``) is resized to the generation size, followed by
``num_frames − 1`` black frames, VAE-encoded (the distribution's mode) and normalized; a 4-channel mask marks
the first latent frame as known; ``[latents, mask, condition]`` are concatenated on channels at every step.
Wan2.1's transformer also takes the CLIP image encoder's penultimate hidden states (``image_dim`` set).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.utils import is_ftfy_available
from PIL import Image

from .base import DiffusionAdapter, PromptEmbeds

#: The pipelines' own defaults (``__call__``): 480×832, 81 frames
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_NUM_FRAMES = 480, 832, 81


class WanAdapter(DiffusionAdapter):
    """Wan2.1 / Wan2.2 text-to-video: UMT5 text encoder, latents ``(C, T', H/8, W/8)``, timesteps ×1000.

    The default size is the pipeline's (480×832, 81 frames) unless the pipeline object carries
    ``default_height`` / ``default_width`` / ``default_num_frames`` attributes (the tiny test pipelines do).
    """

    pipeline_class = WanPipeline
    denoiser_name = "transformer"
    output_kind = "videos"
    pipeline_tag = "text-to-video"

    # -- prompts ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 226) -> PromptEmbeds:
        """UMT5 states, zeroed past each prompt's length, as ``WanPipeline._get_t5_prompt_embeds``.

        Called as ``WanPipeline``'s method on any Wan pipeline: the image-to-video pipeline's copy calls
        ``ftfy`` without checking that it is installed, the text-to-video one checks.
        """
        embeds = WanPipeline._get_t5_prompt_embeds(
            self.pipeline,
            prompt=prompts,
            max_sequence_length=max_sequence_length,
            device=self.text_encoder_device,
        )
        return {"prompt_embeds": embeds.to(self.dtype)}

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        return self.pipeline.vae_scale_factor_temporal

    @property
    def spatial_factor(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        patch = self.denoiser.config.patch_size
        multiple_h, multiple_w = self.spatial_factor * patch[1], self.spatial_factor * patch[2]
        if height % multiple_h or width % multiple_w:
            raise ValueError(
                f"height and width must be multiples of {multiple_h}×{multiple_w} for Wan (VAE factor "
                f"{self.spatial_factor} × patch {tuple(patch[1:])}); got {height}×{width}."
            )
        if (num_frames - 1) % self.temporal_factor:
            lower = (num_frames - 1) // self.temporal_factor * self.temporal_factor + 1
            raise ValueError(
                f"Wan needs num_frames − 1 to be a multiple of {self.temporal_factor}; got {num_frames}. "
                f"Use {lower} or {lower + self.temporal_factor}."
            )
        self._size = (height, width, num_frames)
        latent_frames = (num_frames - 1) // self.temporal_factor + 1
        return (
            self.pipeline.vae.config.z_dim,
            latent_frames,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def default_resolution(self) -> tuple[int, int]:
        return (
            getattr(self.pipeline, "default_height", DEFAULT_HEIGHT),
            getattr(self.pipeline, "default_width", DEFAULT_WIDTH),
        )

    def default_num_frames(self) -> int:
        return getattr(self.pipeline, "default_num_frames", DEFAULT_NUM_FRAMES)

    def pipeline_call_kwargs(
        self, guidance_scale: float, num_frames: int, row: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"guidance_scale": guidance_scale, "num_frames": num_frames}

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        patch = self.denoiser.config.patch_size
        return (latent_shape[1] // patch[0]) * (latent_shape[2] // patch[1]) * (latent_shape[3] // patch[2])

    # -- denoiser ---------------------------------------------------------------------------------
    def _boundary(self) -> float | None:
        """Wan2.2 A14B's ``boundary_ratio``, where ``transformer`` hands over to ``transformer_2``; None with
        one expert."""
        if getattr(self.pipeline, "transformer_2", None) is None:
            return None
        return self.pipeline.config.get("boundary_ratio")

    def trains_at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Wan2.2 A14B: the trained ``transformer`` predicts while ``σ ≥ boundary_ratio`` (the pipeline's
        ``t ≥ boundary_ratio · 1000``), the frozen ``transformer_2`` below. One expert: everywhere."""
        boundary = self._boundary()
        return super().trains_at(sigmas) if boundary is None else sigmas >= boundary

    def _expert(self, denoiser: torch.nn.Module, sigma: torch.Tensor) -> torch.nn.Module:
        """``denoiser`` (the trained expert) where :meth:`trains_at`, else the frozen ``transformer_2``. With
        one expert no σ is read back from the device."""
        if self._boundary() is None or bool(self.trains_at(sigma.reshape(-1)[:1])):
            return denoiser
        return self.pipeline.transformer_2

    def _timestep(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``σ · 1000`` per sample, or per token for Wan2.2 TI2V-5B (``expand_timesteps``)."""
        timestep = sigma * self._scheduler.config.num_train_timesteps
        if not self.pipeline.config.get("expand_timesteps", False):
            return timestep
        return timestep[:, None].expand(-1, self.image_seq_len(tuple(latents.shape[1:])))

    def denoiser_inputs(self, latents: torch.Tensor, embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
        """``hidden_states`` and extra keyword arguments of the transformer (text-to-video: the latents)."""
        return {"hidden_states": latents}

    def forward_denoiser(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds
    ) -> torch.Tensor:
        return self._expert(denoiser, sigma)(
            **self.denoiser_inputs(latents, embeds),
            timestep=self._timestep(latents, sigma),
            encoder_hidden_states=embeds["prompt_embeds"],
            return_dict=False,
        )[0]

    # -- decoding ---------------------------------------------------------------------------------
    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipeline.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(view).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``x · std + mean`` per channel, VAE decode, ``(B, 3, T, H, W)`` in [−1, 1] → ``(B, T, 3, H, W)`` in [0, 1]."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        mean, std = self._latent_statistics(latents)
        video = vae.decode(latents * std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


class WanImageToVideoAdapter(WanAdapter):
    """Wan image-to-video: the first frame is given by the dataset column ``args.image_column``.

    ``required_columns(args)`` reads ``args.image_column`` (default ``"image"``) and remembers it; each value
    may be a PIL image (a ``datasets.Image`` feature), a path, or a ``{"bytes", "path"}`` dict (an undecoded
    ``datasets.Image``). Reward functions get the conditioning images as ``images_in`` (float ``(B, 3, H, W)``
    in [0, 1], at the generation size, exactly what the model was conditioned on) and under the column's own
    name as the dataset gives them.
    """

    pipeline_class = WanImageToVideoPipeline
    pipeline_tag = "image-to-video"

    def __init__(self, pipeline: WanImageToVideoPipeline):
        super().__init__(pipeline)
        if pipeline.config.get("expand_timesteps", False):
            raise NotImplementedError(
                "Wan2.2 TI2V-5B image-to-video (expand_timesteps=True, the first latent frame replaced by the "
                "image at every step) is not supported yet; load it as a WanPipeline for text-to-video training."
            )
        self.image_column = "image"

    def required_columns(self, args: Any) -> list[str]:
        self.image_column = getattr(args, "image_column", None) or "image"
        return [self.image_column]

    def pipeline_call_kwargs(
        self, guidance_scale: float, num_frames: int, row: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Adds the row's conditioning ``image``. ``WanImageToVideoPipeline.__call__`` cleans prompts with
        ``ftfy`` without checking that it is installed: without it, this says so."""
        if not is_ftfy_available():
            raise ImportError(
                "WanImageToVideoPipeline's own __call__ (which makes the model card's samples, and which anyone "
                "loading this LoRA calls) needs `ftfy`: `pip install ftfy`. The trained weights are saved."
            )
        kwargs = super().pipeline_call_kwargs(guidance_scale, num_frames, row)
        return {**kwargs, "image": self._row_images([row])[0]} if row is not None else kwargs

    # -- conditioning -----------------------------------------------------------------------------
    def _load_image(self, value: Any) -> Image.Image:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, (str, os.PathLike)):
            return Image.open(value).convert("RGB")
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            import io

            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            return Image.open(source).convert("RGB")
        if isinstance(value, np.ndarray):
            return Image.fromarray(value).convert("RGB")
        raise ValueError(
            f"The {self.image_column!r} column must hold images (a datasets.Image feature, a PIL image or a "
            f"path); got {type(value).__name__}."
        )

    def conditioning_images(self, rows: list[dict[str, Any]]) -> list[Image.Image]:
        """The rows' conditioning images as RGB PIL images (as given, before resizing), or a clear error."""
        return self._row_images(rows)

    def _row_images(self, rows: list[dict[str, Any]]) -> list[Image.Image]:
        """The rows' conditioning images as RGB PIL images, or a clear error."""
        missing = [i for i, row in enumerate(rows) if row.get(self.image_column) is None]
        if missing:
            raise ValueError(
                f"Rows {missing[:5]} have no image in the {self.image_column!r} column (columns: {list(rows[0])}); "
                "image-to-video needs one conditioning image per row."
            )
        return [self._load_image(row[self.image_column]) for row in rows]

    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Resized to the generation size, ``(B, 3, H, W)`` in [−1, 1], float32 (the pipeline's
        ``video_processor.preprocess``)."""
        height, width, _ = self._generation_size()
        return self.pipeline.video_processor.preprocess(images, height=height, width=width).to(
            self.device, torch.float32
        )

    def _generation_size(self) -> tuple[int, int, int]:
        if getattr(self, "_size", None) is None:
            height, width = self.default_resolution()
            self.latent_shape(height, width, self.default_num_frames())
        return self._size

    @torch.no_grad()
    def _encode_images(self, images: list[Image.Image]) -> PromptEmbeds:
        """Condition (mask + normalized VAE latents) and, for Wan2.1, CLIP image states, one row per image."""
        vae = self.pipeline.vae
        _, _, num_frames = self._generation_size()
        first = self._preprocess(images).unsqueeze(2)
        video = torch.cat([first, first.new_zeros(*first.shape[:2], num_frames - 1, *first.shape[3:])], dim=2)
        latents = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
        mean, std = self._latent_statistics(latents)
        condition = torch.cat([self._first_frame_mask(latents), (latents - mean) / std], dim=1)
        out = {"condition": condition.to(self.dtype)}
        if getattr(self.denoiser.config, "image_dim", None) is not None:
            out["image_embeds"] = self._clip_image_states(images).to(self.dtype)
        return out

    def _first_frame_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 4, T', h, w)``: ones on the first latent frame, zeros after (the pipeline's ``mask_lat_size``:
        the first pixel frame repeated ``temporal_factor`` times, then folded onto channels)."""
        batch, _, frames, height, width = latents.shape
        mask = latents.new_zeros(batch, self.temporal_factor, frames, height, width)
        mask[:, :, 0] = 1
        return mask

    def _clip_image_states(self, images: list[Image.Image]) -> torch.Tensor:
        """Penultimate hidden states of the CLIP image encoder on the original images, as
        ``WanImageToVideoPipeline.encode_image`` computes them."""
        encoder = self.pipeline.image_encoder
        pixels = self.pipeline.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True)
        return hidden.hidden_states[-2].to(self.device)

    def encode_conditioning(self, rows: list[dict[str, Any]]) -> PromptEmbeds:
        """One condition per row; each distinct image is encoded once (a group shares its image)."""
        images = self._row_images(rows)
        keys = [hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest() for image in images]
        unique = list(dict.fromkeys(keys))
        encoded = self._encode_images([images[keys.index(key)] for key in unique])
        index = torch.tensor([unique.index(key) for key in keys], device=self.device)
        return {key: value.index_select(0, index) for key, value in encoded.items()}

    def reward_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``images_in``: the conditioning images as the model saw them, ``(B, 3, H, W)`` in [0, 1]."""
        return {"images_in": ((self._preprocess(self._row_images(rows)) + 1) / 2).clamp(0, 1)}

    # -- denoiser ---------------------------------------------------------------------------------
    def denoiser_inputs(self, latents: torch.Tensor, embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
        inputs = {"hidden_states": torch.cat([latents, embeds["condition"].to(latents.dtype)], dim=1)}
        if "image_embeds" in embeds:
            inputs["encoder_hidden_states_image"] = embeds["image_embeds"]
        return inputs
