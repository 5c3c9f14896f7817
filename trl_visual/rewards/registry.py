"""Named reward functions, so configs and the CLI can say ``reward_funcs="red_channel"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REWARD_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward under ``name``.

    A registered function is used as it is; a registered class is instantiated with no arguments
    when the reward is asked for by name.
    """

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARD_REGISTRY:
            raise ValueError(f"A reward named {name!r} is already registered.")
        REWARD_REGISTRY[name] = obj
        return obj

    return decorator
