"""Stopping a run without losing it: SIGTERM becomes an exception that the trainer's stop path handles.

A process killed by SIGTERM's default action (a scheduler's time limit, ``kill``, a container stopping) ends at
once, without a word and without saving. :func:`terminate_on_sigterm` turns the signal into
:class:`TrainingTerminated` raised in the training thread; the trainer then saves what the run trained to
``output_dir/stopped-at-step-N`` (as for any exception raised in training, see
:meth:`~trl_visual.trainer.DiffusionGRPOTrainer.train`), logs where, and the process exits with status
``128 + 15 = 143``, as a process killed by SIGTERM does.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint_io import CheckpointIO

logger = logging.getLogger(__name__)


class TrainingTerminated(BaseException):
    """The process received SIGTERM during training. A ``BaseException``, like ``KeyboardInterrupt``, so that
    neither ``except Exception`` nor a reward's ``except SystemExit`` takes it for an error of their own; once the
    run is saved, :meth:`~trl_visual.trainer.DiffusionGRPOTrainer.train` raises ``SystemExit(exit_status)``."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received")
        self.reason = f"{signal.Signals(signum).name} received"
        #: ``128 + signal``: the status of a process killed by the signal
        self.exit_status = 128 + signum


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`TrainingTerminated` in the main thread (at the next Python
    instruction: a running native operation finishes first). A second SIGTERM takes the default action (the
    process ends at once; checkpoints are staged, so none is left half-written).

    Nothing changes outside the main thread (where Python cannot install signal handlers) or when the program
    already handles SIGTERM itself: its handler is left alone.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise TrainingTerminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def report_stop(error: BaseException, global_step: int, saved: str | None, num_processes: int = 1) -> None:
    """Say that ``error`` stopped training at ``global_step``, in one log line and in a note on the error (which the
    caller re-raises). ``saved`` is the sentence saying where the run was saved (``""``: it could not be), or
    ``None`` when the run stopped before its first update, with nothing to save."""
    if saved is None:
        if isinstance(error, TrainingTerminated):
            logger.error(f"{error.reason} before the first update: there was nothing to save.")
        return
    if not saved:
        saved = (
            " Under several processes nothing more is saved when stopping; the checkpoints already written are kept."
            if num_processes > 1
            else " Saving what it trained failed (see the warning above)."
        )
    stopped = f"Training stopped at step {global_step}"
    cause = error.reason if isinstance(error, TrainingTerminated) else f"{type(error).__name__}: {error}"
    cause = cause.splitlines()[0] if cause.strip() else type(error).__name__
    logger.error(f"{stopped} ({cause[:200]}).{saved}")
    if hasattr(error, "add_note"):  # Python 3.11+: a line under the traceback, after the error's message
        error.add_note(f"{stopped}.{saved}")


def save_before_stopping(
    checkpoints: CheckpointIO, save_checkpoint: Callable[[], None], global_step: int, num_processes: int
) -> str:
    """Save what the run trained as a checkpoint ``output_dir/stopped-at-step-N`` before an error stops it, so that
    a run without checkpoints (``save_strategy="no"``) is not lost; returns a sentence for the error (empty when
    nothing could be saved). Saved once per run (:meth:`CheckpointIO.save_stop_checkpoint`).

    The checkpoint is a whole one, written like ``checkpoint-N`` by ``save_checkpoint()``: the weights of the last
    completed optimizer step, AdamW's state, the schedule, the step count, the method's state and, inside an
    iteration, its rollouts. Only finite weights are saved, and only in a single-process run: saving may need every
    process, and the others may be waiting elsewhere (they stop when this one exits)."""
    if num_processes > 1 or not checkpoints.args.should_save:
        return ""
    try:
        directory = checkpoints.save_stop_checkpoint(save_checkpoint, global_step)
    except Exception as error:  # the error that stops the run is the one to report
        logger.warning(f"Could not save the weights before stopping: {type(error).__name__}: {error}")
        return ""
    return (
        f" The weights trained so far were saved to {directory}, with the optimizer and the run's state: "
        f"resume with `resume_from_checkpoint={directory!r}` (`--resume_from_checkpoint {directory}`)."
    )


def stop_after(
    error: BaseException,
    start_step: int,
    global_step: int,
    checkpoints: CheckpointIO,
    save_before_stopping: Callable[[], str],
) -> None:
    """``error`` ends training: when this run made an update (``global_step > start_step``), save what it trained
    as a resumable checkpoint ``output_dir/stopped-at-step-N`` (``save_before_stopping()``, which the non-finite
    and reward-timeout stops have already called: then their error says where), and say so
    (:func:`report_stop`)."""
    if global_step <= start_step:
        report_stop(error, global_step, None)
        return
    already_saved = checkpoints.stopped_checkpoint is not None
    saved = save_before_stopping()
    if not already_saved:
        report_stop(error, global_step, saved, checkpoints.args.world_size)
