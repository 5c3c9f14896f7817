"""The interface between the trainer and a pipeline family.

The trainer never branches on the model type: it asks an adapter. An adapter knows how to

- encode prompts (:meth:`DiffusionAdapter.encode_prompts`, called once per *unique* prompt),
- shape and draw the initial noise (:meth:`latent_shape`, :meth:`sigmas`),
- predict the velocity with or without classifier-free guidance (:meth:`velocity`, which batches
  the conditional and unconditional passes into one forward through :meth:`forward_denoiser`), or
  one branch alone (:meth:`conditional_velocity`), which training combines with a detached
  unconditional velocity through :func:`guided`,
- decode latents to images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)`` in ``[0, 1]``,
- say where the latent positions are (:meth:`to_position_grid`): a latent of any layout (image
  ``(C, H, W)``, video ``(C, T, H, W)``, packed tokens ``(N, D)``) is viewed as
  ``(channels, *grid)`` so that per-position methods (ViPO) work on every family.

A new model family is one subclass of :class:`DiffusionAdapter` in its own file, registered with
:func:`trl_visual.models.register_adapter`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

PromptEmbeds = dict[str, torch.Tensor]


def select_embeds(embeds: PromptEmbeds, index: torch.Tensor) -> PromptEmbeds:
    """Rows ``index`` of every tensor in ``embeds`` (repeats a prompt's embedding for its samples)."""
    return {key: value.index_select(0, index.to(value.device)) for key, value in embeds.items()}


def concat_embeds(first: PromptEmbeds, second: PromptEmbeds) -> PromptEmbeds:
    """``first`` then ``second`` along the batch, key by key. A key missing from ``first`` (say a
    conditioning image that CFG's unconditional branch keeps) is taken from ``second``."""
    return {key: torch.cat([first.get(key, value), value]) for key, value in second.items()}


def unconditional_embeds(embeds: PromptEmbeds, negative_embeds: PromptEmbeds) -> PromptEmbeds:
    """CFG's unconditional branch: the negative prompt's tensors, and what it lacks (a conditioning image the
    unconditional branch keeps) from ``embeds``."""
    return {key: negative_embeds.get(key, value) for key, value in embeds.items()}


class DiffusionAdapter:
    """Base class of the per-family adapters. Subclasses set :attr:`denoiser_name` and implement the
    abstract methods; everything else is shared."""

    #: attribute of the pipeline holding the network that is trained
    denoiser_name: str = "transformer"
    #: keyword under which decoded samples reach reward functions: ``"images"`` or ``"videos"``
    output_kind: str = "images"
    #: ``pipeline_tag`` for model cards
    pipeline_tag: str = "text-to-image"
    #: latent pixels per side of one position of :meth:`to_position_grid` (FLUX packs 2×2 into a token)
    token_patch_size: int = 1

    def __init__(self, pipeline: DiffusionPipeline):
        self.pipeline = pipeline
        self._scheduler = copy.deepcopy(pipeline.scheduler)

    # -- components -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module of the pipeline except the denoiser (text encoders, VAE, …)."""
        return [
            module
            for name, module in self.pipeline.components.items()
            if isinstance(module, torch.nn.Module) and name != self.denoiser_name
        ]

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders (its ``text_encoder*`` components), by component name."""
        return {
            name: module
            for name, module in self.pipeline.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        }

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def text_encoder_device(self) -> torch.device:
        """Where prompts are encoded: the text encoders' device (the CPU when they are offloaded), which
        :meth:`encode_prompts` passes to the pipeline's encoding."""
        encoder = next(iter(self.text_encoders.values()), None)
        return next(encoder.parameters()).device if encoder is not None else self.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- to implement -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_sequence_length: int) -> PromptEmbeds:
        """Encode ``prompts`` (one row per prompt) into the tensors :meth:`forward_denoiser` needs, on
        :attr:`text_encoder_device` (the trainer moves them to the denoiser's device)."""
        raise NotImplementedError

    def encode_conditioning(self, rows: list[dict[str, Any]]) -> PromptEmbeds:
        """Per-sample conditioning beyond the prompt, from the dataset rows (one tensor row per row):
        the conditioning image of image-to-video, say. Merged into the prompt embeddings; CFG's
        unconditional branch keeps it. Text-only families return ``{}``."""
        return {}

    def required_columns(self, args: Any) -> list[str]:
        """Dataset columns this family needs besides the prompt (e.g. ``args.image_column``)."""
        return []

    def reward_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra keyword arguments for the reward functions (e.g. ``images_in`` for image-to-video)."""
        return {}

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Shape of one sample's latent, as the denoiser takes it."""
        raise NotImplementedError

    def default_resolution(self) -> tuple[int, int]:
        """``(height, width)`` the pipeline generates when none is given."""
        raise NotImplementedError

    def default_num_frames(self) -> int:
        """Frames per sample when ``num_frames`` is not set: 1 for image models."""
        return 1

    def pipeline_call_kwargs(
        self, guidance_scale: float, num_frames: int, row: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of the pipeline's own ``__call__`` for the trainer's guidance (and, for video and
        conditioned families, frames and conditioning from a dataset ``row``): how a user reproduces the
        trainer's samples, e.g. the model card's."""
        return {"guidance_scale": guidance_scale}

    def forward_denoiser(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds
    ) -> torch.Tensor:
        """One forward of ``denoiser`` (possibly wrapped for distributed training); returns the velocity.

        ``sigma`` is ``(B,)`` in ``[0, 1]``; the adapter converts it to the model's timestep scale.
        """
        raise NotImplementedError

    def trains_at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Whether the trained denoiser is the one that predicts at each ``σ`` (a bool tensor of the same shape).

        True everywhere for a single denoiser; a pipeline with a second, frozen expert (Wan2.2 A14B) returns
        False where that expert predicts, so the trainer never spends a backward pass there.
        """
        return torch.ones_like(sigmas, dtype=torch.bool)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in ``[0, 1]``: ``(B, 3, H, W)`` or ``(B, T, 3, H, W)``, float32."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        """Number of tokens the denoiser sees, for resolution-dependent time shifts."""
        return int(np.prod(latent_shape[1:]))

    def sigmas(
        self, num_inference_steps: int, latent_shape: tuple[int, ...], time_shift: float | None = None
    ) -> torch.Tensor:
        """The sampling schedule ``σ_0 = 1 > … > σ_T = 0`` (T + 1 values).

        ``time_shift=None``: the model's own time shift, exactly as the pipeline's scheduler computes it
        (:meth:`scheduler_sigmas`). A number ``s``: the papers' released samplers, the same for every family,
        ``linspace(1, 0, T + 1)`` warped by :func:`shift_sigmas`.
        """
        if time_shift is not None:
            return shift_sigmas(torch.linspace(1.0, 0.0, num_inference_steps + 1), time_shift)
        return self.scheduler_sigmas(num_inference_steps, latent_shape)

    def scheduler_sigmas(self, num_inference_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The T + 1 sampling σ the pipeline's own scheduler sets, with the model's time shift."""
        config = self._scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(self.image_seq_len(latent_shape), config)
        self._scheduler.set_timesteps(num_inference_steps, device="cpu", **kwargs)
        return self._scheduler.sigmas.float().clone()

    def prepare_noise(
        self, num_samples: int, latent_shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Standard normal initial latents ``(num_samples, *latent_shape)`` in float32."""
        return torch.randn(
            (num_samples, *latent_shape), generator=generator, device=self.device, dtype=torch.float32
        )

    @property
    def runs_cfg(self) -> bool:
        """Whether :meth:`velocity` runs classifier-free guidance when given negative embeddings. False for a
        guidance-distilled transformer, which takes the scale as an input instead of an unconditional pass."""
        return True

    def conditional_velocity(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The velocity under one condition (a prompt, or CFG's negative prompt), one forward on ``B`` inputs,
        in float32. ``guidance_scale`` only reaches families that take it as an input (:meth:`guidance_input`)."""
        embeds = self.guidance_input(embeds, guidance_scale, latents)
        return self.forward_denoiser(denoiser, latents.to(self.dtype), sigma, embeds).float()

    def guidance_input(
        self, embeds: PromptEmbeds, guidance_scale: float, latents: torch.Tensor
    ) -> PromptEmbeds:
        """Hook: ``embeds`` with the guidance scale added, for a family that takes it as an input (guidance-
        distilled FLUX.1-dev). Every other family ignores it: ``embeds`` unchanged."""
        return embeds

    def cfg_velocities(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        embeds: PromptEmbeds,
        negative_embeds: PromptEmbeds,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG's unconditional and conditional velocities ``(v_u, v_c)`` in float32, both passes batched in one
        forward on ``2B`` inputs."""
        latents = latents.to(self.dtype)
        both = self.forward_denoiser(
            denoiser,
            torch.cat([latents, latents]),
            torch.cat([sigma, sigma]),
            concat_embeds(negative_embeds, embeds),
        ).float()
        uncond, cond = both.chunk(2)
        return uncond, cond

    def velocity(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        embeds: PromptEmbeds,
        negative_embeds: PromptEmbeds | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The (guided) velocity in float32.

        With ``negative_embeds`` (and :attr:`runs_cfg`): ``v = v_u + w (v_c − v_u)`` (:func:`guided`), both passes
        batched in one forward (:meth:`cfg_velocities`); otherwise :meth:`conditional_velocity`.
        """
        if negative_embeds is None or not self.runs_cfg:
            return self.conditional_velocity(denoiser, latents, sigma, embeds, guidance_scale)
        uncond, cond = self.cfg_velocities(denoiser, latents, sigma, embeds, negative_embeds)
        return guided(uncond, cond, guidance_scale)

    def to_position_grid(self, latents: torch.Tensor) -> torch.Tensor:
        """View ``(B, *latent_shape)`` as ``(B, channels, *grid)``. Channels-first latents need nothing."""
        return latents


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v = v_u + w (v_c − v_u)``."""
    return uncond + guidance_scale * (cond - uncond)


def calculate_shift(image_seq_len: int, config: Any) -> float:
    """Resolution-dependent shift ``μ``, linear in the sequence length between the scheduler's
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 time shift ``σ' = s σ / (1 + (s − 1) σ)``: ``s > 1`` spends more steps at high noise.

    It keeps ``σ = 0`` and ``σ = 1`` in place; ``s = 1`` is the identity.
    """
    if not shift > 0:
        raise ValueError(f"The time shift must be positive; got {shift}.")
    return shift * sigmas / (1 + (shift - 1) * sigmas)
