"""The clipped GRPO policy objective and the exact KL between Gaussian transitions."""

from __future__ import annotations

import torch


def clipped_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε_high))`` with ``ρ = exp(log_ratio)``, elementwise; ``ε_high = ε`` when
    ``epsilon_high`` is ``None`` (TRL's ``epsilon_high``: DAPO's asymmetric "clip-higher").

    ``log_ratio`` and ``advantages`` broadcast together: one ratio per sample for the scalar
    objective, one per latent position for ViPO's dense one. Returns the loss and a boolean mask of
    where the clipped term is the active one (the ratio left the trust region in the direction the
    advantage pushes), which is what ``clip_ratio`` reports.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + high)
    is_clipped = ((ratio > 1 + high) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))
    return torch.maximum(unclipped, clipped), is_clipped


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of equal std, elementwise: ``(μ_θ − μ_ref)² / (2 s²)``."""
    return (mean - ref_mean) ** 2 / (2 * std**2)
