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
import signal
import threading
from collections.abc import Iterator
from types import FrameType


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
