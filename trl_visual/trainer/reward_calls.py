"""Calling the reward functions: timing, timeouts, async rewards, and checking what they return.

A reward is any callable ``f(prompts, images | videos, **columns) -> list[float | None]`` (see
:mod:`trl_visual.rewards`). :class:`RewardCaller` calls every reward of a run on one batch and returns a
``(B, F)`` float32 tensor, NaN where a reward gave ``None``; :func:`drop_infinite_rewards` then leaves ±inf out
like ``None``. A reward that raises, returns the wrong length or type, only invalid values, or does not return
within ``reward_timeout`` seconds is an error naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._upstream import is_async_callable
from ..core.advantages import nan_std
from ..core.interpretations import AMBIGUOUS_SHARE, ambiguity_share, interpretation_mean_var
from ..rewards import RewardFunc, resolve_reward, reward_name
from ..rewards.spec import resolve_reward_spec
from .hooks import record_metrics

logger = logging.getLogger(__name__)

#: where a reward's wall time is logged, per reward name
TIMING_METRIC = "timing/reward/{name}"
#: seconds past ``reward_timeout`` after which the thread running the async rewards' event loop is given up on
ASYNC_GRACE = 1.0


def _is_scalar_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataset_columns(rows: list[dict[str, Any]], prompt_column: str) -> dict[str, list[Any]]:
    """The batch's dataset columns other than the prompt, by name: what TRL passes to rewards as keywords."""
    return {key: [row[key] for row in rows] for key in rows[0] if key != prompt_column}


def _check_tensor_values(tensor: torch.Tensor, name: str, where: str = "") -> None:
    """A reward tensor must hold real numbers that exist: a complex one would lose its imaginary part in the cast
    to float, a meta one has no values at all."""
    if tensor.is_complex():
        raise TypeError(
            f"The reward function {name!r} returned a complex tensor{where} ({tensor.dtype}); casting it to float "
            "would drop the imaginary part. Return real numbers (e.g. `scores.abs()` or `scores.real`)."
        )
    if tensor.device.type == "meta":
        raise ValueError(
            f"The reward function {name!r} returned a tensor on the 'meta' device{where}, which holds no values: its "
            "model was probably never loaded with weights (check `from_pretrained(..., device_map=...)` / "
            "`to_empty`). Return real values."
        )


def reward_inputs_copy(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every tensor cloned and every list copied, so that a reward that edits its inputs in place
    (``images.mul_(…)``, ``prompts.pop()``) changes neither what the next reward sees nor the logged samples."""
    return {
        key: value.clone()
        if isinstance(value, torch.Tensor)
        else list(value)
        if isinstance(value, list)
        else value
        for key, value in kwargs.items()
    }


def _as_rows(output: Any, name: str) -> list[Any]:
    """A reward's output as one entry per sample: a tensor or array ``(B,)`` / ``(B, M)`` becomes nested lists."""
    if isinstance(output, torch.Tensor) or hasattr(output, "tolist"):  # a tensor or a NumPy array
        tensor = torch.as_tensor(output)
        _check_tensor_values(tensor, name)
        tensor = tensor.detach().float().cpu()
        if tensor.dim() == 2 and tensor.shape[1] == 1:
            tensor = tensor.reshape(-1)
        if tensor.dim() > 2:
            raise ValueError(
                f"The reward function {name!r} returned a tensor of shape {tuple(tensor.shape)}; it must be (B,) "
                "with one value per sample or (B, M) with M interpretations per sample."
            )
        if tensor.dim() == 2:  # a row of NaN skips its sample, like None
            return [None if bool(torch.isnan(row).all()) else row.tolist() for row in tensor]
        return tensor.tolist() if tensor.dim() else [tensor.item()]
    if not isinstance(output, (list, tuple)):
        raise TypeError(
            f"The reward function {name!r} must return a list of floats (or None), one per sample, or a list of "
            f"M floats per sample (its interpretations); got {type(output).__name__} {_short_repr(output)}."
        )
    return list(output)


def _is_value(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, numbers.Real) and not isinstance(value, bool))
        or _is_scalar_tensor(value)
    )


def _interpretations(entry: Any, name: str, index: int) -> list[float] | None:
    """One sample's interpretations as floats (``None``: the sample is skipped). Refuses a NaN, ±inf or None
    among them: one value cannot be missing while the others stand for the sample."""
    if entry is None:
        return None
    values = entry.detach().float().reshape(-1).tolist() if isinstance(entry, torch.Tensor) else list(entry)
    if not values or not all(v is not None and _is_value(v) for v in values):
        raise TypeError(
            f"The reward function {name!r} returned {_short_repr(entry)} for sample {index}: a sample's "
            "interpretations must be a non-empty list of floats, e.g. [0.3, 0.5, 0.4] (or None to skip the sample)."
        )
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(
            f"The reward function {name!r} returned the interpretations {_short_repr(floats)} for sample {index}, "
            "with NaN or ±inf among them. Return finite numbers for every interpretation, or None for the whole "
            "sample to skip it."
        )
    return floats


def check_reward_interpretations(output: Any, name: str, expected: int) -> torch.Tensor:
    """``output`` of the reward ``name`` as ``(expected, M)`` float32: one column (``M = 1``) for a plain reward
    (``None`` → NaN, ±inf kept for :func:`drop_infinite_rewards`), ``M`` columns for a reward that returns ``M``
    interpretations per sample (a list of ``M`` floats per sample, or a ``(B, M)`` tensor; ``None`` or a row of
    NaN skips a sample).

    Raises:
        TypeError: not a list/tensor/array of floats, lists of floats or ``None``.
        ValueError: the wrong number of samples, a number of interpretations that varies across samples, NaN
            or ±inf among a sample's interpretations, or no finite value at all.
    """
    rows = _as_rows(output, name)
    if len(rows) != expected:
        raise ValueError(
            f"The reward function {name!r} returned {len(rows)} values for {expected} samples; it must "
            "return exactly one value (a float, a list of M floats, or None to skip) per sample."
        )
    for i, v in enumerate(rows):
        if _is_scalar_tensor(v):
            _check_tensor_values(v, name, f" for sample {i}")
        if not (_is_value(v) or isinstance(v, (list, tuple, torch.Tensor))):
            raise TypeError(
                f"The reward function {name!r} returned {type(v).__name__} {_short_repr(v)} for sample {i}; it must "
                "return one float (or None to skip the sample) per sample, e.g. [0.3, None, 0.8], or a list of M "
                "floats per sample (its interpretations)."
            )
    if all(_is_value(v) for v in rows):
        tensor = torch.tensor([math.nan if v is None else float(v) for v in rows], dtype=torch.float32)
        values = tensor.unsqueeze(1)
    else:
        if any(v is not None and _is_value(v) for v in rows):
            i = next(i for i, v in enumerate(rows) if v is not None and _is_value(v))
            raise ValueError(
                f"The reward function {name!r} returned one float for sample {i} but a list for others: return "
                "either one float per sample or the same number M of interpretations for every sample."
            )
        lists = [_interpretations(v, name, i) for i, v in enumerate(rows)]
        counts = sorted({len(v) for v in lists if v is not None})
        if len(counts) > 1:
            raise ValueError(
                f"The reward function {name!r} returned {counts[0]} interpretations for some samples and "
                f"{counts[-1]} for others; every sample needs the same number M (use None to skip a sample)."
            )
        width = counts[0] if counts else 1
        values = torch.tensor(
            [v if v is not None else [math.nan] * width for v in lists], dtype=torch.float32
        ).reshape(expected, width)
    if values.shape[1] > 1:
        partial = torch.isnan(values).any(1) & ~torch.isnan(values).all(1)
        if partial.any():
            i = int(partial.nonzero()[0])
            raise ValueError(
                f"The reward function {name!r} returned NaN for some interpretations of sample {i} but not all. "
                "Return finite numbers for every interpretation, or NaN (None) for the whole sample to skip it."
            )
    if not torch.isfinite(values).any():
        raise ValueError(f"The reward function {name!r} returned only None/NaN/inf for the whole batch.")
    return values


def check_reward_output(output: Any, name: str, expected: int) -> torch.Tensor:
    """``output`` of the reward ``name`` as ``(expected,)`` float32, ``None`` → NaN: the mean of a sample's
    interpretations when it returns several (:func:`check_reward_interpretations`)."""
    return interpretation_mean_var(check_reward_interpretations(output, name, expected))[0]


def drop_infinite_rewards(
    scores: torch.Tensor, names: list[str], metrics: dict[str, list[float]]
) -> torch.Tensor:
    """±inf is no reward value (it would make its group's mean infinite and every group-mate's advantage
    ±adv_clip_max): such a sample is left out like ``None`` (NaN), and counted in ``rewards/<name>/num_inf``
    of ``metrics``."""
    infinite = torch.isinf(scores)
    for f, name in enumerate(names):
        metrics[f"rewards/{name}/num_inf"].append(float(infinite[:, f].sum()))
    if infinite.any():
        logger.warning(
            f"Reward(s) {[n for f, n in enumerate(names) if infinite[:, f].any()]} returned ±inf for "
            f"{int(infinite.sum())} sample(s); they are left out of the advantages like None."
        )
    return scores.masked_fill(infinite, float("nan"))


def record_reward_metrics(
    metrics: dict[str, list[float]],
    rewards_per_func: torch.Tensor,
    reward: torch.Tensor,
    names: list[str],
    num_generations: int,
) -> None:
    """TRL's reward metrics of one global batch: ``rewards/<name>/mean|std`` per reward, then ``reward``,
    ``reward_std`` (the mean within-group std of the combined reward) and ``frac_reward_zero_std``."""
    figures = {}
    for f, name in enumerate(names):
        figures[f"rewards/{name}/mean"] = rewards_per_func[:, f].nanmean()
        figures[f"rewards/{name}/std"] = nan_std(rewards_per_func[:, f])
    group_std = nan_std(reward.reshape(-1, num_generations), dim=1)
    figures["reward"] = reward.nanmean()
    figures["reward_std"] = group_std.mean()
    figures["frac_reward_zero_std"] = (group_std < 1e-6).float().mean()
    record_metrics(metrics, figures)  # one host sync for all of them


def interpretation_metrics(
    reward: torch.Tensor, interpretation_var: torch.Tensor | None, num_generations: int
) -> dict[str, torch.Tensor]:
    """The figures of a batch whose reward has interpretations (none without): ``interpretation_var_mean`` (the
    mean per-sample interpretation variance), ``ambiguity_share_mean|max`` (the groups' ``ρ_i``,
    :func:`~trl_visual.core.interpretations.ambiguity_share`) and ``frac_ambiguous_groups`` (``ρ_i > 0.5``)."""
    if interpretation_var is None:
        return {}
    share = ambiguity_share(
        reward.reshape(-1, num_generations), interpretation_var.reshape(-1, num_generations)
    )
    return {
        "interpretation_var_mean": torch.nan_to_num(interpretation_var, nan=0.0).mean(),
        "ambiguity_share_mean": share.mean(),
        "ambiguity_share_max": share.max(),
        "frac_ambiguous_groups": (share > AMBIGUOUS_SHARE).float().mean(),
    }


class RewardCaller:
    """Calls every reward of a run on one batch. Plain functions run one after the other; ``async`` ones (as in
    TRL) run concurrently with each other, each within ``timeout`` seconds (``None``: no limit).

    ``stop_note()`` is called when a reward times out, before the error is raised: it says what happens to the
    run (``"training stops at step N …"``) and may save the weights trained so far.
    """

    def __init__(
        self,
        reward_funcs: list[RewardFunc],
        names: list[str],
        timeout: float | None,
        stop_note: Callable[[], str],
    ):
        self.reward_funcs, self.names, self.timeout, self.stop_note = reward_funcs, names, timeout, stop_note

    def __call__(
        self, kwargs: dict[str, Any], batch_size: int, metrics: dict[str, list[float]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch_size, F)`` float32 scores (±inf kept) of ``f(**kwargs)`` for every reward ``f``, the mean of
        its interpretations where it returns several, and ``(batch_size, F)`` their interpretation variance
        (:func:`~trl_visual.core.interpretations.interpretation_mean_var`; NaN for one value per sample). Wall
        times go to ``metrics[timing/reward/<name>]``."""
        outputs: dict[int, Any] = {}
        pending = []
        for index, func in enumerate(self.reward_funcs):
            if is_async_callable(func):
                pending.append(index)
            else:
                outputs[index] = self._call_sync(index, reward_inputs_copy(kwargs), metrics)
        if pending:
            outputs.update(self._run_async(pending, kwargs, metrics))
        scores = [
            interpretation_mean_var(check_reward_interpretations(outputs[i], name, batch_size))
            for i, name in enumerate(self.names)
        ]
        return torch.stack([m for m, _ in scores], dim=1), torch.stack([v for _, v in scores], dim=1)

    @contextlib.contextmanager
    def _timed(self, index: int, metrics: dict[str, list[float]]) -> Iterator[None]:
        """Around one reward call: its time goes to ``metrics``, and an exception it raises is re-raised naming
        the reward."""
        name, start = self.names[index], time.perf_counter()
        try:
            yield
        except SystemExit as error:  # would end the whole run with its status, nothing said
            raise RuntimeError(
                f"The reward function {name!r} called sys.exit({error.code!r}); a reward must return its scores "
                "(or raise an exception), not end the process."
            ) from error
        except Exception as error:
            raise RuntimeError(
                f"The reward function {name!r} raised {type(error).__name__}: {error}"
            ) from error
        finally:
            metrics[TIMING_METRIC.format(name=name)].append(time.perf_counter() - start)

    def _call_sync(self, index: int, kwargs: dict[str, Any], metrics: dict[str, list[float]]) -> Any:
        with self._timed(index, metrics):
            finished, result = call_with_timeout(self.reward_funcs[index], kwargs, self.timeout)
        if not finished:
            raise self._timeout_error(index, still_running=True)
        return result

    def _run_async(
        self, indices: list[int], kwargs: dict[str, Any], metrics: dict[str, list[float]]
    ) -> dict[int, Any]:
        """The ``async`` rewards, concurrently on one event loop. The loop runs in a thread that is given up on
        :data:`ASYNC_GRACE` seconds after ``timeout``: an ``async`` reward that blocks its loop (``time.sleep``,
        blocking I/O) keeps ``asyncio.wait_for`` from ever firing, and would otherwise hang the run."""
        done: set[int] = set()

        def run_loop() -> dict[int, Any]:
            return asyncio.run(self._call_async(indices, kwargs, metrics, done))

        if self.timeout is None:
            return run_loop()
        finished, results = call_with_timeout(run_loop, {}, self.timeout + ASYNC_GRACE)
        if not finished:
            blocked = next(index for index in indices if index not in done)
            raise self._timeout_error(blocked, still_running=True, blocked_loop=True)
        return results

    async def _call_async(
        self,
        indices: list[int],
        kwargs: dict[str, Any],
        metrics: dict[str, list[float]],
        done: set[int],
    ) -> dict[int, Any]:
        timed_out = object()

        async def call(index: int) -> Any:
            with self._timed(index, metrics):
                try:
                    return await asyncio.wait_for(
                        self.reward_funcs[index](**reward_inputs_copy(kwargs)), self.timeout
                    )
                except asyncio.TimeoutError:
                    return timed_out
                finally:
                    done.add(index)

        results = dict(zip(indices, await asyncio.gather(*(call(i) for i in indices))))
        for index, result in results.items():
            if result is timed_out:
                raise self._timeout_error(index, still_running=False)
        return results

    def _timeout_error(
        self, index: int, still_running: bool, blocked_loop: bool = False
    ) -> RewardTimeoutError:
        left = (
            " Python cannot stop a running thread: the call goes on in the background until this process exits."
            if still_running
            else " It was cancelled."
        )
        if blocked_loop:
            left += (
                " This async reward blocked its event loop (time.sleep or blocking I/O inside `async def`), so it "
                "could not be cancelled: use `await asyncio.sleep(...)` / `await asyncio.to_thread(...)` in it."
            )
        return RewardTimeoutError(
            f"The reward function {self.names[index]!r} did not return within reward_timeout="
            f"{self.timeout:g} s, so {self.stop_note()}{left} Check the reward (a server that no longer "
            "answers?), or raise `reward_timeout` (None waits forever)."
        )


def _resolve(spec: RewardFunc | str) -> RewardFunc:
    """A callable as it is; a string as ``--reward_funcs`` takes it (a registered name, ``name(key=value)``,
    ``module.path:function`` or ``path/to/file.py:function``: :func:`~trl_visual.rewards.spec.resolve_reward_spec`),
    the same for training and evaluation rewards."""
    return resolve_reward_spec(spec) if isinstance(spec, str) else resolve_reward(spec)


def resolve_rewards(reward_funcs: RewardFunc | str | list[RewardFunc | str]) -> list[RewardFunc]:
    """The training rewards, from callables or specs (:func:`_resolve`); an empty list is an error."""
    specs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    if not specs:
        raise ValueError(
            "`reward_funcs` is empty: give at least one reward function (a registered name such as "
            "'red_channel', or a callable `f(prompts, images, **columns) -> list[float | None]`)."
        )
    return [_resolve(spec) for spec in specs]


def resolve_eval_rewards(
    specs: RewardFunc | str | list[RewardFunc | str] | None, training_names: list[str]
) -> list[RewardFunc]:
    """The rewards only ``evaluate()`` scores, from callables or specs (registered names or
    ``module.path:function``, as ``--reward_funcs`` takes). A name that is also a training reward's, or given
    twice, is an error: their ``eval_rewards/<name>/mean`` would collide."""
    specs = list(specs) if isinstance(specs, list | tuple) else [] if specs is None else [specs]
    funcs = [_resolve(spec) for spec in specs]
    names = [reward_name(func) for func in funcs]
    clashes = sorted({n for n in names if n in training_names or names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"`eval_reward_funcs` {clashes} share a name with a training reward or with each other, so their "
            "`eval_rewards/<name>/mean` would collide. A training reward is already scored by evaluate(): "
            "drop it from `eval_reward_funcs`, or give the callable a distinct `__name__`."
        )
    return funcs


class RewardTimeoutError(TimeoutError):
    """A reward function did not return within ``reward_timeout`` seconds."""


def call_with_timeout(
    func: Callable[..., Any], kwargs: dict[str, Any], timeout: float | None
) -> tuple[bool, Any]:
    """Call ``func(**kwargs)``; return ``(True, result)``, or ``(False, None)`` when it has not returned after
    ``timeout`` seconds (``None``: wait forever, in the calling thread). An exception it raises is re-raised.

    With a timeout the call runs in a daemon thread. Python cannot stop a thread, so a call that timed out
    keeps running in the background until the process exits (a daemon thread never holds the exit up).
    """
    if timeout is None:
        return True, func(**kwargs)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = func(**kwargs)
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"reward-{getattr(func, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in outcome:
        raise outcome["error"]
    return True, outcome["result"]


def reward_kwargs(
    adapter: Any, prompts: list[str], samples: torch.Tensor, rows: list[dict[str, Any]], prompt_column: str
) -> dict[str, Any]:
    """What a reward is called with: the prompts, the samples under the adapter's ``output_kind`` (``images`` or
    ``videos``), what the adapter adds from the rows (an image-to-video run's conditioning image), and every other
    dataset column by name, as TRL does."""
    return {
        "prompts": prompts,
        adapter.output_kind: samples,
        **adapter.reward_inputs(rows),
        **dataset_columns(rows, prompt_column),
    }
