# ruff: noqa: F401 (the TYPE_CHECKING imports are for type checkers and the API docs)
"""Each method's config and trainer, and the dataclasses the hooks exchange.

The names are imported from their modules on first access, so that importing one config (the command line's
help renders :class:`DiffusionGRPOConfig` alone) does not import every trainer, diffusers and peft."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API docs (griffe) only
    from .bpgo_config import BPGOConfig
    from .bpgo_trainer import BPGOTrainer
    from .bpgo_vipo import BPGOViPOConfig, BPGOViPOTrainer
    from .diffusion_grpo_config import DiffusionGRPOConfig
    from .diffusion_grpo_trainer import DiffusionGRPOTrainer, Rollouts
    from .hooks import Advantages, AuxiliaryObjective, PolicyLoss
    from .vipo_config import ViPOConfig
    from .vipo_trainer import ViPOTrainer

#: exported name → the module (in this package) that defines it
_MODULES = {
    "BPGOConfig": ".bpgo_config",
    "BPGOTrainer": ".bpgo_trainer",
    "BPGOViPOConfig": ".bpgo_vipo",
    "BPGOViPOTrainer": ".bpgo_vipo",
    "DiffusionGRPOConfig": ".diffusion_grpo_config",
    "DiffusionGRPOTrainer": ".diffusion_grpo_trainer",
    "Rollouts": ".diffusion_grpo_trainer",
    "Advantages": ".hooks",
    "AuxiliaryObjective": ".hooks",
    "PolicyLoss": ".hooks",
    "ViPOConfig": ".vipo_config",
    "ViPOTrainer": ".vipo_trainer",
}

#: each method's config and trainer (what :mod:`trl_visual` also exports), and the dataclasses the hooks exchange
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
