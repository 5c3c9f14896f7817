"""FLUX.1 (``FluxPipeline``): packed 2×2 latent tokens, a guidance embedding, a resolution-dependent shift.

Conventions followed from ``diffusers.FluxPipeline``:

- **Packed latents.** The VAE latent ``(C, h, w)`` is cut into 2×2 patches and each patch becomes one token of
  ``4C`` values, so the transformer takes ``(B, N, 4C)`` with ``N = (h/2)(w/2)``. :meth:`FluxAdapter.latent_shape`
  is that packed shape ``(N, 4C)``; the trainer samples, stores log-probs and trains in it.
- **Position grid.** :meth:`FluxAdapter.to_position_grid` views the packed latent on its *token* grid,
  ``(B, 4C, h/2, w/2)`` (one position per token, its ``4C`` values as channels), which is where one ratio per
  position is meaningful for a token model. ``token_patch_size = 2`` tells per-position methods (ViPO) that a
  token covers 2×2 latent pixels, so a map built on the latent pixel grid is average-pooled onto the tokens.
- **Initial noise** is drawn as ``(C, h, w)`` and then packed, so a generator gives the same noise as the
  pipeline's ``prepare_latents``.
- **Schedule.** ``sigmas = linspace(1, 1/T, T)`` shifted by ``μ`` from the packed sequence length (the
  pipeline's ``calculate_shift``), through the pipeline's own scheduler (:meth:`FluxAdapter.scheduler_sigmas`);
  a fixed ``time_shift`` replaces it with the released samplers' schedule (:meth:`DiffusionAdapter.sigmas`).
- **Timestep** is σ itself (the pipeline passes ``timestep / 1000``; the transformer multiplies by 1000).
- **Guidance.** FLUX.1-dev is guidance-distilled: its transformer has ``guidance_embeds`` and the pipeline's
  ``guidance_scale`` (3.5 for dev) is fed to that embedding, while true classifier-free guidance is a separate
  ``true_cfg_scale``. The adapter follows the same split: for a guidance-distilled transformer the trainer's
  ``guidance_scale`` goes to the embedding (one forward per step, no unconditional pass; any negative
  embeddings the trainer passes are ignored), so ``guidance_scale=3.5`` trains FLUX.1-dev as the papers do.
  A transformer without the embedding (FLUX.1-schnell, de-distilled variants) takes the trainer's
  ``guidance_scale`` as true CFG with the negative prompt, like every other family (use 1.0 for schnell).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline

from .base import DiffusionAdapter, PromptEmbeds, calculate_shift


class FluxAdapter(DiffusionAdapter):
    """FLUX.1 [dev] / [schnell]: CLIP-L (pooled) + T5 text encoders, packed 2×2 latent tokens, σ as timestep."""

    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    #: latent pixels per token side (FLUX packs 2×2 latent patches into one token)
    token_patch_size = 2

    def __init__(self, pipeline: FluxPipeline):
        super().__init__(pipeline)
        self._token_grid: tuple[int, int] | None = None

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes the guidance scale as an embedding (FLUX.1-dev)."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def pipeline_call_kwargs(
        self, guidance_scale: float, num_frames: int, row: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The pipeline's ``guidance_scale`` for a guidance-distilled transformer, else its ``true_cfg_scale``."""
        return {"guidance_scale" if self.guidance_distilled else "true_cfg_scale": guidance_scale}

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    # -- prompts ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 512) -> PromptEmbeds:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.text_encoder_device,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # -- shapes and schedule ----------------------------------------------------------------------
    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """``(N, 4C)``: ``N = (h/2)(w/2)`` tokens of a ``(C, h, w)`` VAE latent."""
        multiple = self.pipeline.vae_scale_factor * self.token_patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} for FLUX (VAE factor "
                f"{self.pipeline.vae_scale_factor} × 2×2 token packing); got {height}×{width}."
            )
        self._token_grid = (height // multiple, width // multiple)
        rows, columns = self._token_grid
        return (rows * columns, self.latent_channels * self.token_patch_size**2)

    def default_resolution(self) -> tuple[int, int]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return size, size

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        return int(latent_shape[0])

    def scheduler_sigmas(self, num_inference_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``linspace(1, 1/T, T)`` with the dynamic shift, as ``FluxPipeline.__call__`` sets them."""
        config = self._scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(self.image_seq_len(latent_shape), config)
        sigmas = (
            None
            if config.get("use_flow_sigmas", False)
            else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        )
        self._scheduler.set_timesteps(num_inference_steps, device="cpu", sigmas=sigmas, **kwargs)
        return self._scheduler.sigmas.float().clone()

    def prepare_noise(
        self, num_samples: int, latent_shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise drawn on the VAE latent grid ``(C, h, w)``, then packed, like ``FluxPipeline.prepare_latents``."""
        rows, columns = self._grid_of(latent_shape)
        noise = torch.randn(
            (num_samples, self.latent_channels, 2 * rows, 2 * columns),
            generator=generator,
            device=self.device,
            dtype=torch.float32,
        )
        return self.pack(noise)

    # -- packing ----------------------------------------------------------------------------------
    def _grid_of(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        """The token grid ``(h/2, w/2)`` of a packed latent shape (set by :meth:`latent_shape`)."""
        if self._token_grid is None or self._token_grid[0] * self._token_grid[1] != latent_shape[0]:
            side = int(round(latent_shape[0] ** 0.5))
            if side * side != latent_shape[0]:
                raise ValueError(
                    "Call FluxAdapter.latent_shape(height, width) before using a non-square latent."
                )
            self._token_grid = (side, side)
        return self._token_grid

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` → ``(B, (h/2)(w/2), 4C)``, each token holding one 2×2 patch (channel-major)."""
        batch, channels, height, width = latents.shape
        patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``(B, N, 4C)`` → ``(B, C, h, w)``."""
        rows, columns = self._grid_of(tuple(latents.shape[1:]))
        batch, _, dim = latents.shape
        patches = latents.reshape(batch, rows, columns, dim // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(batch, dim // 4, rows * 2, columns * 2)

    def to_position_grid(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, N, 4C)`` → ``(B, 4C, h/2, w/2)``: one position per token."""
        rows, columns = self._grid_of(tuple(latents.shape[1:]))
        return latents.reshape(latents.shape[0], rows, columns, latents.shape[2]).permute(0, 3, 1, 2)

    def _image_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(N, 3)`` token positions ``(0, row, column)``, as ``FluxPipeline._prepare_latent_image_ids``."""
        rows, columns = self._token_grid or (0, 0)
        ids = torch.zeros(rows, columns, 3, device=device)  # built on the device: no copy at every forward
        ids[..., 1] = torch.arange(rows, device=device)[:, None]
        ids[..., 2] = torch.arange(columns, device=device)[None, :]
        return ids.reshape(rows * columns, 3).to(dtype)

    # -- denoiser ---------------------------------------------------------------------------------
    @property
    def runs_cfg(self) -> bool:
        """Guidance-distilled FLUX runs no unconditional pass: ``guidance_scale`` goes to its embedding."""
        return not self.guidance_distilled

    def guidance_input(
        self, embeds: PromptEmbeds, guidance_scale: float, latents: torch.Tensor
    ) -> PromptEmbeds:
        """Guidance-distilled FLUX: ``guidance_scale`` goes to the guidance embedding, one value per sample.
        Without guidance distillation, ``embeds`` unchanged."""
        if not self.guidance_distilled:
            return embeds
        guidance = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device)
        return {**embeds, "guidance": guidance}

    def forward_denoiser(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds
    ) -> torch.Tensor:
        prompt_embeds = embeds["prompt_embeds"]
        self._grid_of(tuple(latents.shape[1:]))
        guidance = embeds.get("guidance")
        if guidance is None and self.guidance_distilled:
            guidance = torch.ones(latents.shape[0], device=latents.device)
        return denoiser(
            hidden_states=latents,
            timestep=sigma.to(latents.dtype),
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=prompt_embeds.dtype),
            img_ids=self._image_ids(latents.device, prompt_embeds.dtype),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = self.unpack(latents).to(vae.dtype)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
