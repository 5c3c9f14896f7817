# The imports are re-exports: `__all__` is built from the package's own list of the methods' names.
# ruff: noqa: F401
from .. import _TRAINER_EXPORTS
from .bpgo_config import BPGOConfig
from .bpgo_trainer import BPGOTrainer
from .bpgo_vipo import BPGOViPOConfig, BPGOViPOTrainer
from .diffusion_grpo_config import DiffusionGRPOConfig
from .diffusion_grpo_trainer import DiffusionGRPOTrainer, Rollouts
from .hooks import Advantages, AuxiliaryObjective, PolicyLoss
from .vipo_config import ViPOConfig
from .vipo_trainer import ViPOTrainer

#: each method's config and trainer (what :mod:`trl_visual` exports, one list for both), and the dataclasses
#: the hooks exchange
__all__ = sorted(_TRAINER_EXPORTS | {"Advantages", "AuxiliaryObjective", "PolicyLoss", "Rollouts"})
