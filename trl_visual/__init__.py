"""trl_visual: reinforcement-learning post-training of image and video diffusion models.

The trainers and configs are imported on first access (``from trl_visual import DiffusionGRPOTrainer``),
so ``import trl_visual`` and ``trl-visual --help`` load neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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
_TRAINER_EXPORTS = frozenset(__all__) - {"__version__"}
"""Names imported from :mod:`trl_visual.trainer` on first access."""


def __getattr__(name: str) -> Any:
    if name in _TRAINER_EXPORTS:
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TRAINER_EXPORTS))


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" notice.

    diffusers' pipeline modules (FLUX, Wan, the IP-adapter loader) import CLIP/SigLIP image processors at
    import time, and so does the tiny DINOv2 builder, although no run here uses their torchvision backend:
    images reach the rewards and backbones as tensors. The notice fires on every run without torchvision
    and the user cannot act on it (torchvision built for another torch breaks transformers' model imports),
    so this one message, and nothing else from transformers, is filtered out.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
