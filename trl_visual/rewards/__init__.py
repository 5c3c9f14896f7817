"""Reward functions.

A reward is any callable ``f(prompts: list[str], images: Tensor, **columns) -> list[float | None]``
(images float in ``[0, 1]``, ``(B, 3, H, W)``; video models pass ``videos`` ``(B, T, 3, H, W)``
instead), with the other dataset columns passed by name, as TRL does. ``None`` or NaN marks a sample
the reward could not score; it is left out of the statistics. Built-ins are also reachable by name.

The rewards built on pretrained models (``PickScoreReward``, ``HPSv2Reward``, ``CLIPScoreReward``, …) are
imported on first use, so importing this package loads neither them nor ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import builtin
from .arguments import instantiate_reward, split_reward_call
from .builtin import jpeg_compressibility, jpeg_incompressibility, red_channel
from .registry import REWARD_REGISTRY, register_reward
from .spec import RewardFunc, resolve_reward, resolve_reward_spec

if TYPE_CHECKING:
    from .clip_rewards import AestheticReward, CLIPScoreReward, PickScoreReward
    from .hps import HPSv2Reward
    from .image_reward import ImageRewardReward
    from .remote import HTTPScoreReward, OpenAIJudgeReward
    from .video import CLIPVideoScoreReward, FrameAveraged
    from .vlm_judge import VLMJudgeReward

_LAZY_CLASSES = {
    "AestheticReward": ".clip_rewards",
    "CLIPScoreReward": ".clip_rewards",
    "PickScoreReward": ".clip_rewards",
    "HPSv2Reward": ".hps",
    "ImageRewardReward": ".image_reward",
    "CLIPVideoScoreReward": ".video",
    "FrameAveraged": ".video",
    "VLMJudgeReward": ".vlm_judge",
    "OpenAIJudgeReward": ".remote",
    "HTTPScoreReward": ".remote",
}
"""Public reward classes imported on first access (``from trl_visual.rewards import PickScoreReward``)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        return getattr(importlib.import_module(_LAZY_CLASSES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reward_name(reward: RewardFunc) -> str:
    """The name a reward's metrics are logged under: its ``name`` attribute, else ``__name__``, else
    its class name."""
    for attribute in ("name", "__name__"):
        value = getattr(reward, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(reward).__name__


__all__ = [
    "AestheticReward",
    "CLIPScoreReward",
    "CLIPVideoScoreReward",
    "FrameAveraged",
    "HPSv2Reward",
    "HTTPScoreReward",
    "ImageRewardReward",
    "OpenAIJudgeReward",
    "PickScoreReward",
    "REWARD_REGISTRY",
    "RewardFunc",
    "VLMJudgeReward",
    "builtin",
    "instantiate_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "red_channel",
    "register_reward",
    "resolve_reward",
    "resolve_reward_spec",
    "split_reward_call",
    "reward_name",
]
