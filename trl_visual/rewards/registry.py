"""Named reward functions, so configs and the CLI can say ``reward_funcs="red_channel"``.

The rewards built on a pretrained model (PickScore, HPSv2, CLIP, …) live in modules that are imported only
when one of them is asked for: their names are known up front (:data:`LAZY_REWARDS`), their code is loaded
on the first lookup, so ``import trl_visual.rewards`` and ``trl-visual --help`` stay fast and quiet.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

LAZY_REWARDS: dict[str, str] = {
    "clipscore": "trl_visual.rewards.clip_rewards",
    "pickscore": "trl_visual.rewards.clip_rewards",
    "aesthetic": "trl_visual.rewards.clip_rewards",
    "hpsv2": "trl_visual.rewards.hps",
    "imagereward": "trl_visual.rewards.image_reward",
    "clipscore_video": "trl_visual.rewards.video",
    "vlm_judge": "trl_visual.rewards.vlm_judge",
    "openai_judge": "trl_visual.rewards.remote",
    "http_reward": "trl_visual.rewards.remote",
    "shapes_adherence": "trl_visual.miniature.reward",
    "shapes_purity": "trl_visual.miniature.reward",
    "shapes_judge": "trl_visual.miniature.reward",
    "scenes_adherence": "trl_visual.miniature.reward",
}
"""Built-in reward name → the module that registers it when imported."""


class RewardRegistry(MutableMapping):
    """``name → reward`` for the registered rewards; a built-in model reward's module is imported on lookup."""

    def __init__(self, lazy: dict[str, str]) -> None:
        self._entries: dict[str, Callable[..., Any]] = {}
        self._lazy = dict(lazy)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])  # registers `name` through @register_reward
        return self._entries[name]

    def __setitem__(self, name: str, reward: Callable[..., Any]) -> None:
        self._entries[name] = reward

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._lazy.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._entries) | set(self._lazy)))

    def __len__(self) -> int:
        return len(set(self._entries) | set(self._lazy))

    def is_loaded(self, name: str) -> bool:
        """Whether ``name``'s reward is registered already (no import needed to look it up)."""
        return name in self._entries


REWARD_REGISTRY = RewardRegistry(LAZY_REWARDS)


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward under ``name``.

    A registered function is used as it is; a registered class is instantiated with no arguments
    when the reward is asked for by name.
    """

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        if REWARD_REGISTRY.is_loaded(name):
            raise ValueError(f"A reward named {name!r} is already registered.")
        REWARD_REGISTRY[name] = obj
        return obj

    return decorator
