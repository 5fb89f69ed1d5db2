"""One ``hybrid train`` per run directory: an exclusive lock held for the whole run.

The lock is ``filelock``'s (an ``flock`` on ``RUN/.lock``): the kernel releases it when the
holding process exits in any way, kill -9 included, so a lock left by a dead process is never
stale. Its holder writes its PID and host to ``RUN/.lock.owner`` so that a refused second run
can name it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from hybrid.atomic import atomic_write_text

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


class RunLockedError(ValueError):
    """Another process holds the run directory."""


def holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, as its owner file says (``"PID 123 on host"``)."""
    try:
        return (run_dir / OWNER_FILE).read_text().strip() or "another process"
    except OSError:
        return "another process"


def check_not_running(run_dir: Path) -> None:
    """Fail at once if a live process holds ``run_dir`` (creates nothing).

    Raises:
        RunLockedError: as :func:`run_lock`.
    """
    if (run_dir / LOCK_FILE).is_file():
        with run_lock(run_dir, write_owner=False):
            pass


@contextlib.contextmanager
def run_lock(run_dir: Path, *, write_owner: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock for the ``with`` body (creating the directory), its
    holder written to the owner file unless not ``write_owner``.

    Raises:
        RunLockedError: one line naming the directory and the holder's PID, at once (no
            waiting); nothing in the directory is changed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{run_dir}: another hybrid train is running in it ({holder(run_dir)}); wait for it "
            "to end, or set name=... or output_dir=... for a new run"
        ) from None
    try:
        if write_owner:
            owner = f"PID {os.getpid()} on {socket.gethostname()}\n"
            atomic_write_text(run_dir / OWNER_FILE, owner)
        yield
    finally:
        if write_owner:
            with contextlib.suppress(OSError):
                (run_dir / OWNER_FILE).unlink()
        lock.release()
