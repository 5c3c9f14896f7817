"""Which sampling steps are stochastic, and which of those are trained."""

from __future__ import annotations

import math

import torch

TIMESTEP_SELECTIONS = ("ordered", "random")
#: how the SDE window's start is placed each generation round (``sde_window_schedule``)
SDE_WINDOW_SCHEDULES = ("random", "progressive")


def stochastic_step_indices(
    num_steps: int,
    sde_type: str,
    window_size: int = 0,
    window_start: int = 0,
) -> list[int]:
    """Indices of the steps sampled with the SDE; every other step is the Euler ODE step.

    Without a window (``window_size == 0``) every step is stochastic, except the last one for
    ``cps``, whose noise ``σ' sin(aπ/2)`` is 0 at ``σ' = 0``. With a window (Flow-GRPO-Fast,
    MixGRPO) only ``[window_start, window_start + window_size)`` is.
    """
    last = num_steps - 1 if sde_type == "cps" else num_steps
    if window_size <= 0:
        return list(range(last))
    return [i for i in range(window_start, window_start + window_size) if i < last]


def window_starts(window_size: int, window_range: tuple[int, int], num_steps: int, sde_type: str) -> range:
    """Where the SDE window may start: ``window_range`` (half-open), clipped so the whole window fits before
    the end of sampling (and always at least its first value)."""
    last = (num_steps - 1 if sde_type == "cps" else num_steps) - window_size
    low, high = window_range
    return range(low, max(min(high, last + 1), low + 1))


def sample_window_start(
    window_size: int, window_range: tuple[int, int], num_steps: int, sde_type: str, generator: torch.Generator
) -> int:
    """Draw the first SDE step of the window uniformly from :func:`window_starts`."""
    starts = window_starts(window_size, window_range, num_steps, sde_type)
    return int(torch.randint(starts.start, starts.stop, (1,), generator=generator).item())


def progressive_window_start(
    window_size: int,
    window_range: tuple[int, int],
    num_steps: int,
    sde_type: str,
    step: int,
    shift: int = 1,
    interval: int = 1,
) -> int:
    """MixGRPO's progressive window: with ``s_0 < … < s_{n−1}`` the :func:`window_starts`, the start at optimizer
    step ``t`` is ``s_m``, ``m = (⌊t / interval⌋ · shift) mod n``: the window opens at the high-noise end and moves
    ``shift`` steps toward the low-noise end every ``interval`` steps, wrapping back after the last start."""
    starts = window_starts(window_size, window_range, num_steps, sde_type)
    return starts[(step // interval) * shift % len(starts)]


def num_train_timesteps(num_stochastic: int, timestep_fraction: float) -> int:
    """``max(1, round(fraction · S))`` of the S stochastic steps are trained."""
    return max(1, min(num_stochastic, math.floor(timestep_fraction * num_stochastic + 0.5)))


def select_train_timesteps(
    stochastic_steps: list[int],
    num_samples: int,
    timestep_fraction: float,
    selection: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(num_samples, K)`` positions, into ``stochastic_steps``, of the transitions each sample trains on.

    ``"ordered"``: the first K stochastic steps, the same for every sample (Flow-GRPO).
    ``"random"``: K steps of an independent random permutation per sample (DanceGRPO).
    """
    if selection not in TIMESTEP_SELECTIONS:
        raise ValueError(f"Unknown timestep_selection {selection!r}; choose one of {TIMESTEP_SELECTIONS}.")
    count = num_train_timesteps(len(stochastic_steps), timestep_fraction)
    if selection == "ordered":
        return torch.arange(count).expand(num_samples, count).clone()
    keys = torch.rand(num_samples, len(stochastic_steps), generator=generator)
    return keys.argsort(dim=1)[:, :count]
