"""trl_visual: reinforcement-learning post-training of image and video diffusion models."""

__version__ = "0.1.0.dev0"

from .trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer

__all__ = ["DiffusionGRPOConfig", "DiffusionGRPOTrainer", "__version__"]
