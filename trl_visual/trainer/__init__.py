from .bpgo_config import BPGOConfig
from .bpgo_trainer import BPGOTrainer
from .bpgo_vipo import BPGOViPOConfig, BPGOViPOTrainer
from .diffusion_grpo_config import DiffusionGRPOConfig
from .diffusion_grpo_trainer import DiffusionGRPOTrainer, Rollouts
from .hooks import Advantages, AuxiliaryObjective, PolicyLoss
from .vipo_config import ViPOConfig
from .vipo_trainer import ViPOTrainer

__all__ = [
    "Advantages",
    "AuxiliaryObjective",
    "BPGOConfig",
    "BPGOTrainer",
    "BPGOViPOConfig",
    "BPGOViPOTrainer",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "PolicyLoss",
    "Rollouts",
    "ViPOConfig",
    "ViPOTrainer",
]
