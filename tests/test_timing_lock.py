"""The machine-wide timing lock: exclusive while held, kept across chunks only up to max_hold_s."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from morphc.predictors.timing_lock import TimingLock, timing_lock


def _free(path: Path) -> bool:
    """Whether another holder could take the lock right now (flock is per open file description)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_exclusive_while_held(tmp_path: Path) -> None:
    path = tmp_path / "timing.lock"
    with timing_lock(path):
        assert not _free(path)
    assert _free(path)


def test_disabled_lock_takes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "timing.lock"
    with timing_lock(path, enabled=False):
        assert _free(path)
    with TimingLock(None) as lock:
        assert not lock.held


def test_chunks_keep_the_lock_until_max_hold(tmp_path: Path) -> None:
    path = tmp_path / "timing.lock"
    lock = TimingLock(path, max_hold_s=0.2)
    with lock.chunk():
        pass
    assert lock.held and not _free(path)  # a short chunk keeps it for the next one
    time.sleep(0.25)
    with lock.chunk():
        pass
    assert not lock.held and _free(path)  # held long enough: let go at the chunk boundary


def test_released_on_error(tmp_path: Path) -> None:
    path = tmp_path / "timing.lock"
    lock = TimingLock(path)
    try:
        with lock.chunk():
            raise RuntimeError("measurement failed")
    except RuntimeError:
        pass
    assert not lock.held and _free(path)
