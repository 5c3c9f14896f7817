"""Adapters between the trainer and each pipeline family; see :mod:`trl_visual.models.base`."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from .base import DiffusionAdapter, PromptEmbeds, guided, select_embeds
from .flux import FluxAdapter
from .loading import PIPELINE_LOADERS, load_pipeline, register_pipeline_loader
from .sd3 import SD3Adapter
from .wan import WanAdapter, WanImageToVideoAdapter

ADAPTERS: list[type[DiffusionAdapter]] = [SD3Adapter, FluxAdapter, WanAdapter, WanImageToVideoAdapter]


def register_adapter(adapter_class: type[DiffusionAdapter]) -> type[DiffusionAdapter]:
    """Make a new adapter known; ``adapter_class.pipeline_class`` says which pipelines it takes."""
    ADAPTERS.append(adapter_class)
    return adapter_class


def get_adapter(pipeline: DiffusionPipeline) -> DiffusionAdapter:
    """The adapter for ``pipeline``'s family, or a clear error listing the supported families."""
    for adapter_class in ADAPTERS:
        if isinstance(pipeline, adapter_class.pipeline_class):
            return adapter_class(pipeline)
    supported = ", ".join(a.pipeline_class.__name__ for a in ADAPTERS)
    raise ValueError(
        f"No trl_visual adapter for {type(pipeline).__name__}. Supported pipelines: {supported}. "
        "To add a family, subclass trl_visual.models.DiffusionAdapter and call register_adapter."
    )


__all__ = [
    "ADAPTERS",
    "DiffusionAdapter",
    "FluxAdapter",
    "PIPELINE_LOADERS",
    "PromptEmbeds",
    "SD3Adapter",
    "WanAdapter",
    "WanImageToVideoAdapter",
    "get_adapter",
    "guided",
    "load_pipeline",
    "register_adapter",
    "register_pipeline_loader",
    "select_embeds",
]
