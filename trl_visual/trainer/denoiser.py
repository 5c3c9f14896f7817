"""Preparing the pipeline for training, once its inputs are checked (:mod:`~trl_visual.trainer.setup_checks`): the
denoiser's trainable part (its LoRA, or all of it) in float32, everything else frozen, gradient checkpointing
handed to diffusers, and the VAE's memory options."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from ..models import DiffusionAdapter
from .diffusion_grpo_config import DiffusionGRPOConfig
from .logging_utils import make_config_readable_by_trackers

logger = logging.getLogger(__name__)


def prepare_denoiser(
    adapter: DiffusionAdapter, peft_config: LoraConfig | None, args: DiffusionGRPOConfig
) -> torch.nn.Module:
    """Freeze everything but the denoiser's trainable part: its LoRA adapter, or all of it.

    The trainable parameters (and so AdamW's state) are float32 whatever dtype the pipeline was loaded in,
    as diffusers' training scripts do (``cast_training_params``): in bf16, an update smaller than ~0.4 % of
    a weight rounds away. Frozen weights keep the loading dtype; ``bf16=True`` (autocast) sets the compute
    dtype. The denoiser's config is made readable by every ``report_to`` tracker."""
    for module in adapter.frozen_modules:
        module.requires_grad_(False).eval()
    denoiser = adapter.denoiser
    if peft_config is not None:
        denoiser.requires_grad_(False)
        denoiser.add_adapter(peft_config)
    else:
        denoiser.requires_grad_(True)
    cast_training_params(denoiser, dtype=torch.float32)
    make_config_readable_by_trackers(denoiser)
    if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
        denoiser.enable_gradient_checkpointing()
        # diffusers models do it themselves: keep Trainer (which would call the transformers API) out of it.
        # transformers 5 renamed the flag `activation_checkpointing` and keeps the old name as an alias.
        args.gradient_checkpointing = False
        if hasattr(args, "activation_checkpointing"):
            args.activation_checkpointing = False
    return denoiser


def enable_vae_memory_options(pipeline: Any, args: DiffusionGRPOConfig) -> None:
    """``vae_tiling``/``vae_slicing`` call the pipeline VAE's own ``enable_tiling``/``enable_slicing``; a VAE
    without the method is reported and decodes as before."""
    vae = getattr(pipeline, "vae", None)
    for wanted, option, method in (
        (args.vae_tiling, "vae_tiling", "enable_tiling"),
        (args.vae_slicing, "vae_slicing", "enable_slicing"),
    ):
        if not wanted:
            continue
        if hasattr(vae, method):
            getattr(vae, method)()
        else:
            logger.warning(
                f"{option}=True has no effect: the pipeline's VAE ({type(vae).__name__}) has no {method}(); "
                "decoding runs without it."
            )
