"""Tensor images as PIL images, with diffusers' own ``VaeImageProcessor`` conversions."""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` float image in ``[0, 1]`` (or the first frame of a ``(T, 3, H, W)`` video) as an 8-bit PIL
    image: clamped to ``[0, 1]``, then diffusers' ``VaeImageProcessor.pt_to_numpy`` and ``numpy_to_pil``
    (``round(255 x)``)."""
    if image.ndim == 4:
        image = image[0]
    array = VaeImageProcessor.pt_to_numpy(image[None].detach().float().clamp(0, 1))
    return VaeImageProcessor.numpy_to_pil(array)[0]
