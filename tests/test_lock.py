"""The run-directory write lock, held by real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wnconvert.convert.errors import UserInputError
from wnconvert.models.run.lock import is_locked, locked

HOLD = """
import sys, time
from pathlib import Path
from wnconvert.models.run.lock import locked
with locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    proc = hold_lock(tmp_path)
    try:
        assert is_locked(tmp_path)
        with pytest.raises(UserInputError, match=f"being written by process {proc.pid}") as info:
            with locked(tmp_path):
                pass
        assert "\n" not in str(info.value)
    finally:
        proc.kill()
        proc.wait()


def test_lock_dies_with_its_process(tmp_path: Path) -> None:
    proc = hold_lock(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup code runs
    proc.wait()
    assert not is_locked(tmp_path)
    with locked(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert not is_locked(tmp_path)


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with locked(tmp_path):
        with pytest.raises(UserInputError, match="being written by process"):
            with locked(tmp_path):
                pass
    started = time.monotonic()
    with locked(tmp_path):
        pass
    assert time.monotonic() - started < 1
