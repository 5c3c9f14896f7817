"""Stochastic sampling steps with log-probabilities for flow-matching models.

Convention (diffusers' flow matching): ``x_σ = (1 − σ) x_0 + σ ε``, the network predicts the velocity
``v = ε − x_0``, so ``x̂_0 = x − σ v`` and ``x̂_1 = x + (1 − σ) v``. One step goes from ``σ`` to ``σ'``
(``dt = σ' − σ < 0``) through the Gaussian ``x' ~ N(μ, s²)``, elementwise. The deterministic Euler
step is ``x' = x + v · dt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_TYPES = ("flow_grpo", "dance_grpo", "cps")


@dataclass
class SDEStep:
    """One transition: the next latent, the Gaussian it was drawn from, and its per-element log-prob."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def _expand_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(B,)`` tensor so it broadcasts against ``like`` ``(B, ...)``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(sample; mean, std²) = −(x − μ)² / (2 s²) − log s − ½ log 2π``."""
    std = std.to(sample.dtype)
    return -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The deterministic ODE step ``x' = x + v · (σ' − σ)``."""
    dt = _expand_like(sigma_next, latents) - _expand_like(sigma, latents)
    return latents + velocity * dt


def flow_grpo_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float, sigma_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE (``a`` = ``noise_level``).

    ``σ_t = a · sqrt(σ / (1 − σ))`` (at σ = 1 the denominator uses ``1 − sigma_max``, the schedule's
    second sigma), ``μ = x (1 + σ_t² dt / (2σ)) + v (1 + σ_t² (1 − σ) / (2σ)) dt`` and
    ``s = σ_t sqrt(−dt)``.
    """
    s = _expand_like(sigma, latents)
    s_next = _expand_like(sigma_next, latents)
    dt = s_next - s
    denominator = 1 - torch.where(s >= 1, torch.full_like(s, sigma_max), s)
    std_t = noise_level * torch.sqrt(s / denominator)
    mean = latents * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def dance_grpo_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DanceGRPO's SDE (``η`` = ``noise_level``).

    Score of the noised marginal ``∇log p = −(x − (1 − σ) x̂_0) / σ²``,
    ``μ = x + v dt − ½ η² ∇log p dt`` and ``s = η sqrt(−dt)``.
    """
    s = _expand_like(sigma, latents)
    dt = _expand_like(sigma_next, latents) - s
    pred_x0 = latents - s * velocity
    score = -(latents - (1 - s) * pred_x0) / s**2
    mean = latents + velocity * dt - 0.5 * noise_level**2 * score * dt
    return mean, noise_level * torch.sqrt(-dt) * torch.ones_like(s)


def cps_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients-Preserving Sampling (``a`` = ``noise_level``).

    ``s = σ' sin(a π / 2)``, ``μ = x̂_0 (1 − σ') + x̂_1 sqrt(σ'² − s²)``.
    """
    s = _expand_like(sigma, latents)
    s_next = _expand_like(sigma_next, latents)
    std = s_next * math.sin(noise_level * math.pi / 2)
    pred_x0 = latents - s * velocity
    pred_x1 = latents + (1 - s) * velocity
    mean = pred_x0 * (1 - s_next) + pred_x1 * torch.sqrt((s_next**2 - std**2).clamp_min(0))
    return mean, std


def sde_mean_std(
    sde_type: str,
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_max: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the Gaussian transition of the chosen SDE type."""
    if sde_type == "flow_grpo":
        return flow_grpo_mean_std(latents, velocity, sigma, sigma_next, noise_level, sigma_max)
    if sde_type == "dance_grpo":
        return dance_grpo_mean_std(latents, velocity, sigma, sigma_next, noise_level)
    if sde_type == "cps":
        return cps_mean_std(latents, velocity, sigma, sigma_next, noise_level)
    raise ValueError(f"Unknown sde_type {sde_type!r}; choose one of {SDE_TYPES}.")


def sde_step_with_logprob(
    sde_type: str,
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    *,
    sigma_max: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStep:
    """One stochastic step and the per-element log-probability of its result.

    Draws ``x' = μ + s ε`` (or scores the given ``prev_sample``), in float32 whatever the model's dtype,
    so that a transition recomputed with unchanged weights gives exactly the stored log-prob. ``ε`` is drawn
    from ``generator``, unless ``noise`` gives it (drawn elsewhere, as chunked sampling does).
    """
    latents32, velocity32 = latents.float(), velocity.float()
    mean, std = sde_mean_std(sde_type, latents32, velocity32, sigma, sigma_next, noise_level, sigma_max)
    std = std.expand_as(mean)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    return SDEStep(prev_sample, mean, std, gaussian_log_prob(prev_sample, mean, std))
