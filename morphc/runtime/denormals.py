"""Flushing subnormal floats to zero on every thread torch computes on.

x86 CPUs keep the flush-to-zero / denormals-are-zero modes (FTZ/DAZ) in each thread's MXCSR
register. `torch.set_flush_denormal` sets them on the calling thread only: torch's intra-op
OpenMP threads, which run most of a model's kernels (oneDNN's too), keep computing on subnormals,
so half a 2-thread tensor came out flushed and half not (measured on torch 2.13, whether the
flag was set before or after the thread pool started). `set_flush_denormal` here also runs the
setter on each thread of the OpenMP team, through libgomp's `GOMP_parallel` entry point (which
Intel's libiomp exports too), so a serving config, or a measurement, means the same on every core.

Why it matters: Intel CPUs compute on subnormal operands through slow microcode assists (one
1x1 convolution of a random-weight EfficientNet took 40 ms on an Intel Xeon VM against 0.28 ms
flushed; AMD EPYC computes them at full speed). Flushing changes only values below 1.2e-38.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator

import torch

from morphc.errors import MorphcError

_OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")
_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DenormalModeError(MorphcError, RuntimeError):
    """Flushing subnormals was asked for where it cannot be applied to every compute thread."""


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes subnormals now (torch has a setter and no getter: a subnormal times
    one is zero exactly when DAZ is on)."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0)


@functools.cache
def _openmp_parallel() -> Callable[..., None] | None:
    """`GOMP_parallel` of the OpenMP runtime torch loaded (the same instance, so the same thread pool);
    None where none is loaded or it has no such entry point (not Linux, a build without OpenMP)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(name in line for name in _OPENMP_LIBRARIES)}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        return parallel  # type: ignore[no-any-return]
    return None


def set_flush_denormal(on: bool) -> None:
    """Flush subnormals to zero (or stop) on this thread and on each of torch's `get_num_threads()`
    intra-op threads; a clear error where the CPU has no such mode or the threads cannot be reached."""
    if not torch.set_flush_denormal(on):
        if on:
            raise DenormalModeError("flush_denormal=true cannot be applied: this CPU has no FTZ/DAZ mode (x86 "
                                    "SSE3) that torch.set_flush_denormal can set; valid here: false")
        return
    threads = torch.get_num_threads()
    if threads == 1:
        return
    parallel = _openmp_parallel()
    if parallel is None and not on:
        return  # no OpenMP team to clear: only this function sets it there, and it refuses where it cannot
    if parallel is None:
        raise DenormalModeError(f"flush_denormal={str(on).lower()} with {threads} threads: the OpenMP runtime of "
                                "torch's intra-op threads (libgomp) is not loaded in this process, so the mode "
                                "could be set on this thread only; serve with threads=1, or without it")
    reached: set[int] = set()
    lock = threading.Lock()

    def body(_: object) -> None:
        torch.set_flush_denormal(on)
        with lock:
            reached.add(threading.get_ident())

    callback = _BODY(body)  # kept alive until the team has returned
    parallel(callback, None, threads, 0)
    if len(reached) != threads:
        raise DenormalModeError(f"flush_denormal={str(on).lower()}: the OpenMP team ran on {len(reached)} threads "
                                f"where torch computes on {threads}; the mode is not the same on every thread")


def set_threads_and_flush(threads: int, flush_denormal: bool) -> None:
    """torch's intra-op thread count, then the flush mode on that team: in this order, so the mode
    reaches the threads the count gives (what serving and the profiler both apply)."""
    torch.set_num_threads(threads)
    set_flush_denormal(flush_denormal)


@contextlib.contextmanager
def threads_and_flush(threads: int, flush_denormal: bool) -> Iterator[None]:
    """`set_threads_and_flush` for the block; the process's own count and mode come back on exit."""
    previous = (torch.get_num_threads(), flush_denormal_enabled())
    set_threads_and_flush(threads, flush_denormal)
    try:
        yield
    finally:
        set_threads_and_flush(*previous)
