"""Rewards that need no model: useful for tests, quick starts and sanity checks."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .registry import register_reward


def _frames(images: torch.Tensor | None, videos: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Flatten videos ``(B, T, 3, H, W)`` into frames ``(B·T, 3, H, W)``; returns the frames and T."""
    if videos is not None:
        return videos.flatten(0, 1), videos.shape[1]
    if images is None:
        raise ValueError("A reward needs `images` (B, 3, H, W) or `videos` (B, T, 3, H, W).")
    return images, 1


def _per_sample(frame_scores: torch.Tensor, frames_per_sample: int) -> list[float]:
    return frame_scores.reshape(-1, frames_per_sample).float().mean(dim=1).tolist()


def _jpeg_kilobytes(frames: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each frame saved as JPEG at ``quality``."""
    pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    sizes = []
    for array in pixels.numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(prompts: list[str], images: torch.Tensor | None = None, **kwargs) -> list[float]:
    """Minus the JPEG size in kB (DDPO's compressibility reward): simpler images score higher."""
    frames, per_sample = _frames(images, kwargs.get("videos"))
    return _per_sample(-_jpeg_kilobytes(frames), per_sample)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(prompts: list[str], images: torch.Tensor | None = None, **kwargs) -> list[float]:
    """The JPEG size in kB (DDPO's incompressibility reward): more detailed images score higher."""
    frames, per_sample = _frames(images, kwargs.get("videos"))
    return _per_sample(_jpeg_kilobytes(frames), per_sample)


@register_reward("red_channel")
def red_channel(prompts: list[str], images: torch.Tensor | None = None, **kwargs) -> list[float]:
    """``mean(R) − ½ (mean(G) + mean(B))``: the ViPO paper's synthetic reward, in ``[−1, 1]``."""
    frames, per_sample = _frames(images, kwargs.get("videos"))
    channels = frames.float().mean(dim=(2, 3))
    return _per_sample(channels[:, 0] - 0.5 * (channels[:, 1] + channels[:, 2]), per_sample)
