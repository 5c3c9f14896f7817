from .diffusion_grpo_config import DiffusionGRPOConfig
from .diffusion_grpo_trainer import DiffusionGRPOTrainer, Rollouts

__all__ = ["DiffusionGRPOConfig", "DiffusionGRPOTrainer", "Rollouts"]
