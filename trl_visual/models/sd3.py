"""Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import DiffusionAdapter, PromptEmbeds


class SD3Adapter(DiffusionAdapter):
    """SD3 / SD3.5: latents ``(C, H/8, W/8)``, CLIP-L + CLIG-G + T5 text encoders, timesteps in
    ``[0, 1000]``. The transformer patchifies internally, so the latent grid is the pixel-latent grid."""

    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 256) -> PromptEmbeds:
        """T5 tokens are padded to ``max_sequence_length``, capped at the T5 tokenizer's ``model_max_length``
        (512 for SD3; 8 for the miniature ``tiny:shapes``, whose denoiser never saw more)."""
        tokenizer_3 = self.pipeline.tokenizer_3
        if tokenizer_3 is not None:
            max_sequence_length = min(max_sequence_length, tokenizer_3.model_max_length)
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_encoder_device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        factor = self.pipeline.vae_scale_factor
        patch = self.denoiser.config.patch_size
        if height % (factor * patch) or width % (factor * patch):
            raise ValueError(
                f"height and width must be multiples of {factor * patch} for this model "
                f"(VAE factor {factor} × patch size {patch}); got {height}×{width}."
            )
        return (self.denoiser.config.in_channels, height // factor, width // factor)

    def default_resolution(self) -> tuple[int, int]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return size, size

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        patch = self.denoiser.config.patch_size
        return (latent_shape[1] // patch) * (latent_shape[2] // patch)

    def forward_denoiser(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds
    ) -> torch.Tensor:
        return denoiser(
            hidden_states=latents,
            timestep=(sigma * 1000).to(latents.dtype),
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
