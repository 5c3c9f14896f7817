"""The trained weights as files: the LoRA in diffusers' format, a fully trained denoiser, the pipeline around it.

- :func:`save_lora` writes diffusers' LoRA format *with* the adapter's ``LoraConfig`` in the safetensors
  metadata, so ``pipe.load_lora_weights`` rebuilds the adapter at its trained scale ``lora_alpha / r`` (without
  it diffusers assumes ``lora_alpha = r``). :func:`load_lora_checkpoint` reads it back for resuming.
- :func:`save_full_denoiser` and :func:`save_pipeline_around`: training without LoRA, the denoiser from the
  state dict an engine gathered, and the frozen components around it, so ``DiffusionPipeline.from_pretrained``
  loads the result.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers.utils import logging as transformers_logging

from .checkpointing import LORA_WEIGHTS_NAME

#: the adapter settings that decide the LoRA's effect: a checkpoint must match the model on all of them
LORA_SCALE_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def lora_adapter_metadata(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The adapter's ``LoraConfig`` as a dict: what diffusers stores as ``lora_adapter_metadata``."""
    return denoiser.peft_config[adapter_name].to_dict()


def save_lora(
    pipeline_class: type,
    output_dir: str,
    denoiser: torch.nn.Module,
    denoiser_name: str,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` with the pipeline class's own ``save_lora_weights``.

    Keys are prefixed with ``denoiser_name`` and the adapter's config goes into the file's metadata, so
    ``pipe.load_lora_weights(output_dir)`` rebuilds the adapter at its trained scale ``lora_alpha / r``
    (``rank_pattern``, ``alpha_pattern``, rsLoRA and DoRA included) instead of assuming ``lora_alpha = r``.
    The weights are written in ``dtype`` (``None``: as trained). They are taken from ``state_dict`` when given
    (the full state dict an engine gathered from its shards; peft picks the adapter's keys out of it), else from
    ``denoiser`` itself.
    """
    layers = get_peft_model_state_dict(denoiser, state_dict=state_dict)
    if dtype is not None:
        layers = {name: tensor.to(dtype) for name, tensor in layers.items()}
    pipeline_class.save_lora_weights(
        output_dir,
        **{
            f"{denoiser_name}_lora_layers": layers,
            f"{denoiser_name}_lora_adapter_metadata": lora_adapter_metadata(denoiser),
        },
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )


DENOISER_FILES = "diffusion_pytorch_model{suffix}.safetensors"
"""diffusers' names of a model's safetensors shards (``{suffix}``: ``-00001-of-00002``, or nothing)."""


def save_full_denoiser(denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: str) -> None:
    """Write a fully trained denoiser from ``state_dict`` (gathered by an engine from its shards) as
    ``save_pretrained`` would: the config, and the weights in safetensors shards with their index, loadable with
    ``from_pretrained(folder)``."""
    denoiser.save_config(folder)
    save_torch_state_dict(state_dict, folder, filename_pattern=DENOISER_FILES)


def save_pipeline_around(pipeline: Any, output_dir: str, denoiser_name: str) -> None:
    """Make ``output_dir`` a whole diffusers pipeline folder around the trained denoiser in ``output_dir/<denoiser_name>``:
    every other component written with its own ``save_pretrained`` (what ``DiffusionPipeline.save_pretrained``
    calls) and ``model_index.json`` with the pipeline's ``save_config``, so that
    ``DiffusionPipeline.from_pretrained(output_dir)`` loads the fine-tuned pipeline. The denoiser itself is not
    written here: it may be sharded across processes, and is saved from its gathered state dict. transformers'
    "Writing model shards" progress bars stay off meanwhile (the run's own output stays readable)."""
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        for name, component in pipeline.components.items():
            if name != denoiser_name and hasattr(component, "save_pretrained"):
                component.save_pretrained(os.path.join(output_dir, name))
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    pipeline.save_config(output_dir)


def _unprefixed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}


def _check_same_adapter(model: dict[str, Any], saved: dict[str, Any], folder: str) -> None:
    """A checkpoint's adapter settings (from its file metadata) must be the model's: another rank or alpha
    would load at the wrong scale or not at all."""
    different = [name for name in LORA_SCALE_FIELDS if name in saved and saved[name] != model.get(name)]
    if different:
        raise ValueError(
            f"The LoRA in {folder} was trained with "
            f"{', '.join(f'{name}={saved[name]!r}' for name in different)}, but the model's adapter has "
            f"{', '.join(f'{name}={model.get(name)!r}' for name in different)}. Build the trainer with the "
            "checkpoint's LoraConfig to resume it."
        )


def load_lora_checkpoint(
    pipeline_class: type, folder: str, denoiser: torch.nn.Module, denoiser_name: str
) -> None:
    """Load the LoRA that :func:`save_lora` wrote in ``folder`` into ``denoiser``'s adapter, in place (the
    optimizer keeps its parameters, so a resumed run continues exactly).

    The file is read with the pipeline class's ``lora_state_dict`` and loaded with peft's
    ``set_peft_model_state_dict``. (diffusers' ``load_lora_adapter(..., hotswap=True)`` does this for a plain
    LoRA but, with peft 0.21, fails on DoRA's magnitude vectors and then drops the adapter.) Settings that differ
    from the model's adapter, or keys that do not match it, are an error.
    """
    state, metadata = pipeline_class.lora_state_dict(
        folder, weight_name=LORA_WEIGHTS_NAME, return_lora_metadata=True
    )
    prefix = f"{denoiser_name}."
    _check_same_adapter(lora_adapter_metadata(denoiser), _unprefixed(metadata or {}, prefix), folder)
    result = set_peft_model_state_dict(denoiser, _unprefixed(state, prefix))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"The LoRA in {folder} does not fit the model's adapter: unexpected keys {result.unexpected_keys[:5]}, "
            f"missing keys {missing[:5]}. Build the trainer with the checkpoint's model and LoraConfig."
        )
