"""trl_visual: reinforcement-learning post-training of image and video diffusion models."""

__version__ = "0.1.0.dev0"

from .trainer import (
    BPGOConfig,
    BPGOTrainer,
    BPGOViPOConfig,
    BPGOViPOTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    ViPOConfig,
    ViPOTrainer,
)

__all__ = [
    "BPGOConfig",
    "BPGOTrainer",
    "BPGOViPOConfig",
    "BPGOViPOTrainer",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "ViPOConfig",
    "ViPOTrainer",
    "__version__",
]
