"""A machine-wide lock that timing runs hold so that they never overlap.

Latency measured while another benchmark, profile collection or training runs on the same cores
measures the other job, not the model (FACTS.md: 2 shared cores). Every morphc measurement loop —
profile collection, tuner ground truth, cold-start and fusion benchmarks — takes this `flock`
around its timed section. A long collection can keep it across consecutive chunks and let go at a
chunk boundary once it held it `max_hold_s`, so it interleaves with other timing work instead of
queueing for the lock once per chunk.
"""

from __future__ import annotations

import fcntl
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

DEFAULT_TIMING_LOCK = Path(tempfile.gettempdir()) / "morphc-timing.lock"


class TimingLock:
    """An exclusive flock on `path` (None: no locking), held across chunks for up to `max_hold_s`."""

    def __init__(self, path: str | Path | None = DEFAULT_TIMING_LOCK, *, max_hold_s: float = 0.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.max_hold_s = max_hold_s
        self.log = log
        self._file: IO[str] | None = None
        self._since = 0.0

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Block until the lock is ours (no-op when already held or disabled)."""
        if self.path is None or self._file is not None:
            return
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open while held, across chunks)
        start = time.monotonic()
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._since = time.monotonic()
        if self.log is not None and self._since - start > 1:
            self.log(f"  (waited {self._since - start:.0f} s for the timing lock {self.path})")

    def release(self, *, older_than_s: float = 0.0) -> None:
        """Let go, but only once held at least `older_than_s` (0: always)."""
        if self._file is not None and time.monotonic() - self._since >= older_than_s:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @contextmanager
    def chunk(self) -> Iterator[None]:
        """Hold the lock for one chunk of measurements; keep it afterwards if held less than `max_hold_s`."""
        self.acquire()
        try:
            yield
        finally:
            self.release(older_than_s=self.max_hold_s)

    def __enter__(self) -> TimingLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def timing_lock(path: str | Path | None = DEFAULT_TIMING_LOCK, *, enabled: bool = True,
                log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the timing lock for the block (`enabled=False` or `path=None`: don't lock)."""
    with TimingLock(path if enabled else None, log=log):
        yield
