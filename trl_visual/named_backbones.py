"""The backbones reachable by a ``tiny:`` name, built offline rather than loaded from the Hub: a random-weight
DINOv2 for plumbing tests (:mod:`trl_visual.testing`) and the miniature world's own feature extractors.

This module sits above both :mod:`trl_visual.backbones` (what a backbone is) and the modules that build these
(:mod:`trl_visual.testing`, :mod:`trl_visual.miniature`), which it imports only when a name is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from .backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneError, VisionBackbone


def _tiny_dinov2_backbone() -> VisionBackbone:
    """``tiny:dinov2``: a random-weight DINOv2 built in code (:func:`trl_visual.testing.tiny_dinov2`), for plumbing
    tests of ViPO offline."""
    from .testing import tiny_dinov2

    return VisionBackbone(tiny_dinov2(), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def _shapes_features_backbone() -> VisionBackbone:
    """``tiny:shapes-features``: the miniature world's pretrained classifier features
    (:func:`trl_visual.miniature.classifier.shapes_backbone`)."""
    from .miniature.classifier import shapes_backbone

    return shapes_backbone()


def _scenes_features_backbone() -> VisionBackbone:
    """``tiny:scenes-features``: the ``tiny:scenes`` VAE encoder's features
    (:func:`trl_visual.miniature.structure.scenes_backbone`), which see backgrounds as well as shapes."""
    from .miniature.structure import scenes_backbone

    return scenes_backbone()


NAMED_BACKBONES: dict[str, Callable[[], VisionBackbone]] = {
    "tiny:dinov2": _tiny_dinov2_backbone,
    "tiny:shapes-features": _shapes_features_backbone,
    "tiny:scenes-features": _scenes_features_backbone,
}
"""Backbone names that are built offline rather than loaded from the Hub → their builders."""


def is_named_backbone(source: object) -> bool:
    """Whether ``source`` is a ``tiny:`` name (built in code, not a Hub id: no Hub id contains ``:``)."""
    return isinstance(source, str) and source.startswith("tiny:")


def named_backbone(name: str) -> VisionBackbone:
    """Build the offline backbone called ``name`` (:data:`NAMED_BACKBONES`).

    Raises:
        BackboneError: an unknown ``tiny:`` name; the message lists the known ones.
    """
    if name not in NAMED_BACKBONES:
        raise BackboneError(
            f"Unknown tiny backbone {name!r}; the built-in ones are {', '.join(NAMED_BACKBONES)}. Other "
            "backbones are a Hub id, a local folder or a torch.nn.Module."
        )
    return NAMED_BACKBONES[name]()
