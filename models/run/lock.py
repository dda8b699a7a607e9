"""One writer per run directory.

A command that writes into a run directory (``finetune``, ``export``, ``verify``) holds an
exclusive ``fcntl`` lock on ``RUN_DIR/.lock`` from its first write to its end. The kernel releases
the lock when the process dies, however it dies (SIGKILL included), so a lock is never left stale;
the file itself stays and records the pid of the last holder, which the error of a second writer
names. Read-only commands take no lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from wnconvert.convert.errors import UserInputError

from ..files import LOCK as LOCK_NAME


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode("ascii", "replace").strip()
    return f"process {pid}" if pid.isdigit() else "another process"


def _busy(run_dir: Path, holder: str) -> UserInputError:
    return UserInputError(f"{run_dir} is being written by {holder}; wait for it to finish "
                          "or use another --out")


def acquire(run_dir: Path) -> int:
    """Lock ``run_dir`` (which must exist) for writing; returns the lock's file descriptor.

    Raises UserInputError naming the holder's pid when another process holds it."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _busy(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """``with locked(run_dir): ...`` holds the write lock for the block."""
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s write lock now (a running run)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def check_unlocked(run_dir: Path) -> None:
    """Raise the second writer's error (naming the holder) when another process holds
    ``run_dir``'s lock; writes nothing."""
    if is_locked(run_dir):
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
        try:
            raise _busy(run_dir, _holder(fd))
        finally:
            os.close(fd)
