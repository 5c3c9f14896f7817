"""The scene classifier: a small CNN that reads colour, shape, size and position off a 32×32 image.

It is trained on the scenes of :mod:`trl_visual.miniature.scenes` (with noise, blur and brightness jitter, so it
judges generated images too) by :mod:`trl_visual.miniature.train`, and ships with the package. It serves twice:

* as a reward (:class:`trl_visual.miniature.reward.ShapesAdherence`): one softmax head per attribute;
* as a pretrained vision backbone for ViPO (:func:`shapes_backbone`, ``backbone="tiny:shapes-features"``):
  its 8×8 grid of 64-channel features (stride 4) after the third convolution.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..backbones import VisionBackbone
from .scenes import ATTRIBUTES

WEIGHTS_DIR = Path(__file__).parent / "weights"
CLASSIFIER_FILE = "classifier.safetensors"


class ShapesClassifier(nn.Module):
    """Images ``(B, 3, 32, 32)`` in [0, 1] → logits per attribute (``{"colour": (B, 4), "shape": (B, 3), …}``).

    Layers: three 3×3 convolutions (32, 64, 64 channels; the second and third with stride 2) give the 8×8
    feature grid (:meth:`features`); one more stride-2 convolution, a linear layer of 128 units and one linear
    head per attribute give the logits. Inputs are centred as ``2x − 1``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.neck = nn.Sequential(
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, 64, H/4, W/4)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.trunk(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.neck(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely value of each attribute, per image."""
        logits = self(images)
        return {name: [ATTRIBUTES[name][i] for i in logits[name].argmax(-1).tolist()] for name in logits}


def load_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """The shipped classifier (or the one saved at ``path``), frozen, in eval mode."""
    path = Path(path) if path is not None else WEIGHTS_DIR / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No classifier weights at {path}. Reinstall trl_visual (the weights ship as package data), or "
            "train them with `python -m trl_visual.miniature.train --part classifier`."
        )
    model = ShapesClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


class ShapesFeatures(nn.Module):
    """The classifier's feature grid as ViPO wants it: images ``(B, 3, H, W)`` in [0, 1] → ``(B, H/4, W/4, 64)``."""

    def __init__(self, classifier: ShapesClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).permute(0, 2, 3, 1)


def shapes_backbone(path: str | Path | None = None):
    """``tiny:shapes-features``: the shipped classifier's 8×8 feature grid on 32×32 images, wrapped in a
    :class:`~trl_visual.backbones.VisionBackbone` (no extra normalization, patch size 4)."""
    return VisionBackbone(ShapesFeatures(load_classifier(path)), patch_size=4)
