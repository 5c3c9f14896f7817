"""Structure in the miniature world: how much of a base sample's structure a trained sample keeps, the object's
region as an oracle map, and a ViPO backbone that sees the whole scene.

* :func:`edge_correlation`: the Pearson correlation between the edge maps (:func:`edge_map`, Sobel) of a sample
  and of the base model's sample from the same noise. It needs no learned model: 1 when the edges are where
  they were with proportional strengths (a global tint or contrast change keeps it at 1), near 0 when the
  structure is gone.
* :func:`object_region` (``map_fn="tiny:scenes-objects"``): the disc where the prompt's shape can be, from its
  position and size words: the oracle of "the object matters, the background does not".
* :func:`scenes_backbone` (``backbone="tiny:scenes-features"``): the ``tiny:scenes`` VAE encoder's 8×8 grid of
  features: trained to reconstruct every pixel, it sees backgrounds as well as shapes (the classifier features of
  ``tiny:shapes-features`` were trained to ignore all but the shape).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbones import VisionBackbone
from .scenes import IMAGE_SIZE, JITTER, POSITIONS, SIZES, parse_prompt

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
"""The horizontal Sobel kernel (cross-correlation); its transpose is the vertical one."""


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """Colour edge strength ``(B, H, W)`` of images ``(B, C, H, W)``: ``E = sqrt(Σ_c (G_x,c² + G_y,c²))`` with
    ``G_x = S ⋆ x``, ``G_y = Sᵀ ⋆ x`` the Sobel responses of each channel, edges replicated one pixel out."""
    x = images.float()
    c = x.shape[1]
    kernels = torch.stack([SOBEL_X, SOBEL_X.T]).to(x.device)  # (2, 3, 3)
    weight = kernels.repeat(c, 1, 1).unsqueeze(1)  # (2C, 1, 3, 3): x and y for each channel
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    gradients = torch.nn.functional.conv2d(padded, weight, groups=c)
    return gradients.pow(2).sum(dim=1).sqrt()


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation of ``a`` and ``b`` ``(B, ...)``: ``Σ(a − ā)(b − b̄) / sqrt(Σ(a − ā)² Σ(b −
    b̄)²)``; 0 where either is constant (no structure to agree on)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    norm = (a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)).sqrt()
    return torch.where(
        norm > 1e-12, (a * b).sum(dim=1) / norm.clamp_min(1e-12), torch.zeros_like(norm)
    ).float()


def edge_correlation(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structure kept ``(B,)``: ``corr(E(x), E(x_ref))`` (:func:`edge_map`, :func:`pearson`) for each image and
    its reference (the base model's sample from the same noise)."""
    return pearson(edge_map(images), edge_map(reference))


def object_region(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Where each prompt's shape can be ``(N, H, W)``: 1 inside the disc of radius ``extent + jitter + 1`` around
    the named position (:data:`~trl_visual.miniature.scenes.POSITIONS`, scaled to the image), 0 outside; a prompt
    without a position gets the whole image, one without a size the big shape's extent. The oracle map of the
    structured world (``map_fn="tiny:scenes-objects"``)."""
    n, _, height, width = images.shape
    scale_r, scale_c = height / IMAGE_SIZE, width / IMAGE_SIZE
    rows = (torch.arange(height, device=images.device) + 0.5)[:, None]
    cols = (torch.arange(width, device=images.device) + 0.5)[None, :]
    regions = torch.ones(n, height, width, device=images.device)
    for i, prompt in enumerate(prompts):
        named = parse_prompt(prompt)
        if "position" not in named:
            continue
        row, col = POSITIONS[named["position"]]
        radius = SIZES[named.get("size", "big")] + JITTER + 1
        distance = ((rows / scale_r - row) ** 2 + (cols / scale_c - col) ** 2).sqrt()
        regions[i] = (distance <= radius).float()
    return regions


class ScenesFeatures(nn.Module):
    """A VAE encoder's features as ViPO wants them: images ``(B, 3, H, W)`` in [0, 1] → ``(B, H/4, W/4, D)``,
    the encoder's output of its middle block (before the layers that make the latent's moments)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        hidden = encoder.conv_in(images * 2 - 1)
        for block in encoder.down_blocks:
            hidden = block(hidden)
        return encoder.mid_block(hidden).permute(0, 2, 3, 1)


def scenes_backbone(weights_dir: str | Path | None = None):
    """``tiny:scenes-features``: the ``tiny:scenes`` VAE encoder's 8×8 feature grid on 32×32 images, in a
    :class:`~trl_visual.backbones.VisionBackbone` (no extra normalization, patch size 4)."""
    from .pipeline import SCENES, load_vae

    return VisionBackbone(ScenesFeatures(load_vae(weights_dir, SCENES)), patch_size=4)
