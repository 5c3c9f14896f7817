"""The private upstream names we override or call (``trl_visual._upstream.PRIVATE_NAMES``) exist, with the
parameters we use, on the installed transformers / TRL / accelerate: the newest in the main CI job, the declared
floors in the floors job. A failure names the name and the installed version."""

import functools
import importlib
import inspect
from importlib.metadata import version

import pytest
import transformers

from trl_visual import _upstream
from trl_visual._upstream import PRIVATE_NAMES, PrivateName, _own_is_async_callable
from trl_visual.trainer.diffusion_grpo_trainer import DiffusionGRPOTrainer


def _distribution(module: str) -> str:
    return module.split(".")[0]


def _resolve(entry: PrivateName):
    """The named object, or ``None`` when its module or attribute is missing."""
    try:
        obj = importlib.import_module(entry.module)
    except ImportError:
        return None
    for part in entry.qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda e: f"{e.module}.{e.qualname}")
def test_private_upstream_name_exists_with_expected_parameters(entry):
    package = _distribution(entry.module)
    where = f"{entry.module}.{entry.qualname} ({package} {version(package)}; used for {entry.why})"
    obj = _resolve(entry)
    if obj is None:
        assert entry.fallback is not None, (
            f"{where} is missing and has no fallback in trl_visual/_upstream.py"
        )
        pytest.skip(f"{where} is missing; {entry.fallback} is used instead")
    if entry.parameters is None:
        return
    parameters = inspect.signature(obj).parameters
    missing = [name for name in entry.parameters if name not in parameters]
    assert not missing, f"{where} no longer takes {missing}: its signature is {inspect.signature(obj)}"


def _overridden_trainer_methods() -> list[str]:
    """The ``transformers.Trainer`` methods our trainer replaces."""
    return sorted(
        name
        for name, value in vars(transformers.Trainer).items()
        if callable(value) and name != "__init__" and getattr(DiffusionGRPOTrainer, name) is not value
    )


def test_every_private_trainer_override_is_listed_in_one_place():
    """A new private ``Trainer`` override must be added to ``PRIVATE_NAMES`` (and so get checked)."""
    listed = {e.qualname.removeprefix("Trainer.") for e in PRIVATE_NAMES if e.qualname.startswith("Trainer.")}
    private = {name for name in _overridden_trainer_methods() if name.startswith("_")}
    assert private - listed == set(), (
        f"private Trainer overrides missing from trl_visual/_upstream.py: {private - listed}"
    )


@pytest.mark.parametrize("name", _overridden_trainer_methods())
def test_trainer_override_accepts_every_parameter_of_the_installed_trainer(name):
    """``Trainer`` calls our overrides as it calls its own methods: ours must take every parameter its
    version passes (by name or through ``**kwargs``)."""
    theirs = inspect.signature(getattr(transformers.Trainer, name)).parameters
    ours = inspect.signature(getattr(DiffusionGRPOTrainer, name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values()):
        return
    missing = [p for p in theirs if p not in ours and theirs[p].kind is not inspect.Parameter.VAR_KEYWORD]
    missing = [p for p in missing if theirs[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    assert not missing, (
        f"transformers {version('transformers')}: Trainer.{name}{inspect.signature(getattr(transformers.Trainer, name))} "
        f"takes {missing}, which our override DiffusionGRPOTrainer.{name} does not accept"
    )


async def _async_reward(prompts):
    return [0.0] * len(prompts)


def _sync_reward(prompts):
    return [0.0] * len(prompts)


class _AsyncCallable:
    async def __call__(self, prompts):
        return [0.0] * len(prompts)


class _SyncCallable:
    def __call__(self, prompts):
        return [0.0] * len(prompts)


@pytest.mark.parametrize("check", [_own_is_async_callable, _upstream.is_async_callable], ids=["ours", "used"])
def test_is_async_callable_fallback_answers_like_trl(check):
    """The fallback for TRL < 1.14 tells async rewards in every form TRL's does, and sync ones apart."""
    assert check(_async_reward) and check(functools.partial(_async_reward)) and check(_AsyncCallable())
    assert (
        not check(_sync_reward) and not check(functools.partial(_sync_reward)) and not check(_SyncCallable())
    )
