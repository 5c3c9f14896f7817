"""Turn what a user passes as ``model`` into a pipeline: a Hub id, a local folder, a pipeline object, or a
name a loader was registered for (``tiny:sd3``).

Named models come from a registry of prefix → loader, so production code never imports the modules that
build them: the built-in ``tiny:`` loader imports :mod:`trl_visual.testing` only when such a name is asked
for. Another family of named models is one :func:`register_pipeline_loader` call away.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..preflight import check_hub_id

#: a loader takes the whole name (``"tiny:sd3"``) and returns the pipeline it names
PipelineLoader = Callable[[str], DiffusionPipeline]

PIPELINE_LOADERS: dict[str, PipelineLoader] = {}


def register_pipeline_loader(prefix: str, loader: PipelineLoader) -> PipelineLoader:
    """Make ``loader`` answer every model name that starts with ``prefix`` (which must end with ``:``, a
    character no Hub id contains, so that named models never shadow real ones)."""
    if not prefix.endswith(":"):
        raise ValueError(f"A pipeline loader prefix must end with ':' (e.g. 'tiny:'), got {prefix!r}.")
    PIPELINE_LOADERS[prefix] = loader
    return loader


def registered_loader(name: object) -> PipelineLoader | None:
    """The loader registered for ``name``'s prefix, or ``None`` (not a string, or no such prefix)."""
    if not isinstance(name, str):
        return None
    return next((loader for prefix, loader in PIPELINE_LOADERS.items() if name.startswith(prefix)), None)


def _load_tiny(name: str) -> DiffusionPipeline:
    """The random-weight test pipelines of :mod:`trl_visual.testing`, imported only when one is asked for."""
    from ..testing import load_tiny_pipeline

    return load_tiny_pipeline(name)


register_pipeline_loader("tiny:", _load_tiny)


def _resolve_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``torch_dtype="bfloat16"`` (as a YAML file gives it) → ``torch.bfloat16``; ``"auto"`` stays."""
    dtype = kwargs.get("torch_dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["torch_dtype"] = getattr(torch, dtype)
    return kwargs


def _resolve_quantization(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``quantization_config`` as a dict (as a YAML file gives it: ``quant_backend``, ``quant_kwargs``,
    ``components_to_quantize``) → diffusers' ``PipelineQuantizationConfig``, which quantises the named frozen
    components as they load (QLoRA-style: a 4-bit base under a LoRA trained in float32)."""
    config = kwargs.get("quantization_config")
    if isinstance(config, dict):
        from diffusers import PipelineQuantizationConfig

        kwargs["quantization_config"] = PipelineQuantizationConfig(**config)
    return kwargs


def load_pipeline(
    model: str | DiffusionPipeline, model_init_kwargs: dict[str, Any] | None = None
) -> DiffusionPipeline:
    """A pipeline from a registered name (``tiny:sd3``), a Hub id or local path, or the pipeline object itself.

    ``model_init_kwargs`` go to ``DiffusionPipeline.from_pretrained`` and only apply to a Hub id or path;
    ``torch_dtype`` and ``quantization_config`` may be given in their YAML forms (a string, a dict).
    """
    if isinstance(model, DiffusionPipeline):
        if model_init_kwargs:
            raise ValueError(
                "`model_init_kwargs` only applies when `model` is a string, not a pipeline object."
            )
        return model
    loader = registered_loader(model)
    if loader is not None:
        return loader(model)
    if isinstance(model, str):
        kwargs = _resolve_quantization(_resolve_dtype(dict(model_init_kwargs or {})))
        if not os.path.exists(os.path.expanduser(model)):  # a Hub id: cached or reachable, else one line now
            check_hub_id(model, "model", "`model`")
        return DiffusionPipeline.from_pretrained(model, **kwargs)
    raise TypeError(
        f"`model` must be a model id, a local path or a DiffusionPipeline, not {type(model).__name__}."
    )
