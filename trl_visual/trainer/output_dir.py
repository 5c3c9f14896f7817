"""The output folder: writable before anything runs, a full disk named as such, and what an unfinished checkpoint
write left behind removed (the lock that keeps a second run out is :mod:`~trl_visual.trainer.output_lock`'s)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def check_writable_dir(path: str, field: str = "output_dir") -> None:
    """Create ``path`` if needed and write (then delete) a probe file in it.

    Raises:
        PermissionError: naming ``field``, the folder and the fix, when either fails.
    """
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".trl-visual-write-test-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"`{field}` {os.path.abspath(path)!r} is not writable ({error.strerror or error}): checkpoints and the "
            f"trained weights could not be saved there, and the run would be lost at its first save. Choose "
            f"another `{field}`, or make that folder writable."
        ) from error


#: below this many free bytes, a failed write is put down to a full disk
FULL_DISK_BYTES = 64 * 2**20


def _free_bytes(path: str) -> int | None:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: str) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means its disk is full: ``ENOSPC``, or a write that
    failed half-way (torch's "unexpected pos …", an ``OSError``) with almost no space left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if not (isinstance(error, OSError) or "unexpected pos" in str(error)):
        return False
    free = _free_bytes(folder)
    return free is not None and free < FULL_DISK_BYTES


@contextlib.contextmanager
def naming_a_full_disk(folder: str, what: str) -> Iterator[None]:
    """Within, an error that means the disk is full (:func:`is_disk_full`) becomes an ``OSError(ENOSPC)`` that says
    so, with the folder, instead of torch's "unexpected pos 44736"."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, folder):
            raise
        free = _free_bytes(folder)
        raise OSError(
            errno.ENOSPC,
            f"The disk holding {os.path.abspath(folder)!r} is full ({(free or 0) / 2**20:.0f} MiB free): {what} could "
            "not be written. Free some space (delete old checkpoints, lower `save_total_limit`) or choose an "
            "`output_dir` on another disk, then resume from the last checkpoint.",
        ) from error


STAGING_DIR = ".staging"
"""The folder of a run directory where a checkpoint is written before it is renamed into place."""


def remove_leftover_staging(output_dir: str) -> None:
    """Delete ``output_dir/.staging``, what a checkpoint write that never finished (a full disk, a kill) left."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if os.path.isdir(staging):
        logger.warning(f"Removing {staging}, left by a checkpoint write that did not finish.")
        shutil.rmtree(staging, ignore_errors=True)
