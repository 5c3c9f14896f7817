"""One writer per ``output_dir``: a lock file that refuses a second run on the same folder.

Two runs writing one ``output_dir`` at once interleave their checkpoints and overwrite each other's weights, and
both end without a word. While a run trains (``train()``, from its first check of the checkpoint to its last
save), its main process holds ``output_dir/_trl_visual.lock``: JSON with the holder's ``pid``, ``host`` and
``started`` time. Another run that finds it is refused with a message naming the holder, unless the lock is
stale: written on this host by a process that no longer exists (killed with ``kill -9``, the machine's power
cut), which is taken over with a warning. A lock written on another host cannot be checked from here: it is
refused, and the message says how to remove it. The name starts with ``_``, which ``Trainer``'s pushes to the
Hub leave out.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+), so of two runs that
start at once exactly one gets it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

logger = logging.getLogger(__name__)

#: the lock file, in ``output_dir``
LOCK_NAME = "_trl_visual.lock"


class OutputDirLockedError(RuntimeError):
    """Another run is writing the same ``output_dir``."""


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (``kill(pid, 0)`` sends nothing). On Windows, where
    ``os.kill`` would signal the process, every holder counts as alive: a stale lock is removed by hand there."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock"
    return f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock whose holder is known to be gone: written on this host by a process id that does not exist."""
    return (
        holder is not None
        and holder.get("host") == socket.gethostname()
        and isinstance(holder.get("pid"), int)
        and not _pid_alive(holder["pid"])
    )


def _refusal(output_dir: str, path: str, holder: dict[str, Any] | None) -> OutputDirLockedError:
    return OutputDirLockedError(
        f"`output_dir` {os.path.abspath(output_dir)!r} is being written by another run ({_describe(holder)}; "
        f"lock file {path}). Two runs on one output_dir overwrite each other's checkpoints and weights. Choose "
        "another `output_dir`, or wait for that run to end; if you are sure no run is using the folder (say it ran "
        "on another machine that has since stopped), delete the lock file."
    )


def check_output_dir_free(output_dir: str) -> None:
    """Refuse early (when the trainer is built, before the model is loaded) when a live run holds the lock."""
    path = os.path.join(output_dir, LOCK_NAME)
    if os.path.exists(path):
        holder = _read(path)
        if not is_stale(holder):
            raise _refusal(output_dir, path, holder)


class OutputDirLock:
    """``with OutputDirLock(output_dir):`` holds the lock for the block (released on exceptions too).
    ``enabled=False`` (the other processes of a multi-process run) does nothing."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.enabled = enabled
        self.holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._held = False

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one (with a warning); refuse a live one."""
        if not self.enabled:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if attempt == 0 and is_stale(holder):
                    logger.warning(
                        f"Taking over the stale lock {self.path} of {_describe(holder)}: that process no longer "
                        "exists (the run was killed). Its last complete checkpoint is in output_dir."
                    )
                    os.remove(self.path)
                    continue
                raise _refusal(self.output_dir, self.path, holder) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.holder, f)
                f.flush()
                os.fsync(f.fileno())
            self._held = True
            return

    def release(self) -> None:
        """Remove the lock file, if it is still this run's."""
        if not self._held:
            return
        self._held = False
        try:
            if _read(self.path) == self.holder:
                os.remove(self.path)
        except OSError as error:  # never hide the error that ended training behind this one
            logger.warning(f"Could not remove the lock {self.path} ({error}); delete it by hand.")

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
