"""Named map functions for ViPO's ``map_fn``: maps made by something other than the backbone's PCA.

A map function takes decoded images ``(N, 3, H, W)`` in [0, 1] and their prompts (``N`` strings) and returns
maps ``(N, h, w) ≥ 0`` at any resolution (:class:`~trl_visual.trainer.vipo_trainer.ViPOTrainer` resizes them to
the latent grid and normalizes them). For video it is called on the frames, each with its video's prompt.
A SAM-like segmenter, a saliency model or an oracle of an experiment fits this shape.

The config names one (``map_fn: tiny:scenes-objects``); Python passes any callable (``ViPOTrainer(...,
map_fn=fn)``) or registers it by name first (:func:`register_map_fn`). A config never imports code by path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

MapFunction = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""``(images (N, 3, H, W), prompts) → maps (N, h, w) ≥ 0``."""

MAP_FUNCTIONS: dict[str, MapFunction] = {}
"""Registered map functions by name."""
LAZY_MAP_FUNCTIONS: dict[str, str] = {
    "tiny:scenes-objects": "trl_visual.miniature.structure:object_region",
}
"""Built-in names → ``module:function``, imported on first use."""


def register_map_fn(name: str) -> Callable[[MapFunction], MapFunction]:
    """Decorator registering a map function under ``name`` (``ViPOConfig(map_fn=name)``)."""

    def decorator(function: MapFunction) -> MapFunction:
        MAP_FUNCTIONS[name] = function
        return function

    return decorator


def named_map_fn(name: str) -> MapFunction:
    """The map function registered (or built in) under ``name``; a clear error listing the names otherwise."""
    if name in MAP_FUNCTIONS:
        return MAP_FUNCTIONS[name]
    if name in LAZY_MAP_FUNCTIONS:
        module, attribute = LAZY_MAP_FUNCTIONS[name].split(":")
        return getattr(importlib.import_module(module), attribute)
    known = sorted({*MAP_FUNCTIONS, *LAZY_MAP_FUNCTIONS})
    raise ValueError(
        f"Unknown map_fn {name!r}; known names: {', '.join(known)}. Register a function with "
        "`trl_visual.trainer.map_functions.register_map_fn(name)`, or pass the callable as ViPOTrainer(map_fn=...)."
    )
