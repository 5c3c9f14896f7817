"""What names a reward: a registered name, a callable, or (from a config or the command line) a spec
``module.path:function`` / ``path/to/file.py:function``, each with arguments as ``name(key=value, ...)``
(:mod:`~trl_visual.rewards.arguments`). The one parser of reward specs, used by the trainer's
``eval_reward_funcs`` and by ``trl-visual --reward_funcs``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from .arguments import instantiate_reward, split_reward_call
from .registry import REWARD_REGISTRY

RewardFunc = Callable[..., Any]


def resolve_reward(reward: str | RewardFunc) -> RewardFunc:
    """A reward given by registry name becomes the reward object; a callable is returned as it is.

    A registered class is instantiated with no arguments, or with those of a call-like spec,
    ``"vlm_judge(model_name_or_path=org/model, batch_size=8)"`` (:mod:`trl_visual.rewards.arguments`)."""
    if callable(reward):
        return reward
    if isinstance(reward, str):
        name, kwargs = split_reward_call(reward)
        if name not in REWARD_REGISTRY:
            known = ", ".join(sorted(REWARD_REGISTRY))
            raise ValueError(f"Unknown reward {name!r}. Registered rewards: {known}; or pass any callable.")
        entry = REWARD_REGISTRY[name]
        if inspect.isclass(entry):
            return instantiate_reward(entry, kwargs, reward)
        if kwargs:
            raise ValueError(
                f"Reward spec {reward!r}: {name!r} is a function, it takes no arguments; drop them."
            )
        return entry
    raise TypeError(f"A reward must be a callable or a registered name, not {type(reward).__name__}.")


def _module_from_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"Reward {spec!r}: no file {path!r}.")
    name = "trl_visual_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _import_reward_module(location: str, spec: str) -> Any:
    """Import ``location``, looking in the working directory too (last, so it shadows no installed module),
    as ``python -m trl_visual.cli`` does; the ``trl-visual`` script alone would not.

    Only a module that is not found is a usage error; an error raised by the module's own code propagates
    with its traceback."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        if error.name is None or not (location + ".").startswith(error.name + "."):
            raise
        raise ValueError(
            f"Reward {spec!r}: cannot import module {location!r} ({error}). Put {location.split('.')[0]}.py in "
            "the working directory or on PYTHONPATH, or pass 'path/to/file.py:function'."
        ) from error


def resolve_reward_spec(spec: str) -> Callable[..., Any]:
    """A reward from the command line: a registered name, or ``module.path:function`` (also
    ``path/to/file.py:function``). A class found this way is instantiated with no arguments, or with those of a
    call-like spec, ``name(key=value, ...)`` (:mod:`trl_visual.rewards.arguments`).

    Raises:
        ValueError: an unknown name, or a module or attribute that cannot be found (the message says
            which, and lists the registered names).
    """
    base, kwargs = split_reward_call(spec)  # "name(key=value, ...)": a class's arguments
    if base in REWARD_REGISTRY:
        return resolve_reward(spec)
    known = ", ".join(sorted(REWARD_REGISTRY))
    if ":" not in base:
        raise ValueError(
            f"Unknown reward {spec!r}. Registered rewards: {known}. For your own function pass "
            "'module.path:function' (importable) or 'path/to/file.py:function'."
        )
    location, _, attribute = base.rpartition(":")
    module = (
        _module_from_file(location, spec)
        if location.endswith(".py")
        else _import_reward_module(location, spec)
    )
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"Reward {spec!r}: {location!r} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if inspect.isclass(target):
        target = instantiate_reward(target, kwargs, spec)
    elif kwargs:
        raise ValueError(
            f"Reward {spec!r}: {attribute!r} is not a class, so it takes no arguments; drop them."
        )
    if not callable(target):
        raise ValueError(f"Reward {spec!r} is a {type(target).__name__}, not a callable.")
    return target
