"""Executors: where long searches run their independent trials (fusion candidates, tuning, profiling).

One small interface, two back ends. `local` is a process pool started with the spawn/forkserver
method (forking a process that has imported torch can deadlock on its thread pools), or, with
`max_workers=1`, plain in-process calls in order: deterministic and easy to debug. `ray` runs
the same tasks as Ray tasks on a local Ray (`num_cpus=max_workers`) or on a cluster (`address`).
Results come back as `(index, result)` in completion order, so callers never depend on timing;
a task that raises re-raises in the caller as `TaskError` naming the task's index.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from types import TracebackType
from typing import Any, TypeVar

from morphc.errors import MorphcError, did_you_mean

T = TypeVar("T")
R = TypeVar("R")


class ExecutorError(MorphcError, ValueError):
    """An unknown executor name, a bad option, or a back end that is not installed."""


class TaskError(MorphcError):
    """A task raised; `index` is its position in the items, `cause` the original exception."""

    def __init__(self, index: int, cause: BaseException, executor: str) -> None:
        self.index = index
        self.cause = cause
        super().__init__(f"task {index} failed on executor '{executor}': {type(cause).__name__}: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (e.g. when a search forwards it)
        return (TaskError, (self.index, self.cause, "?"))


class Executor(ABC):
    """Runs `fn` over items; `fn` must be a picklable top-level function (it may run in another process)."""

    name: str = "?"

    @abstractmethod
    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        """Yields `(index into items, fn(items[index]))` as each task finishes."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """All results in the order of `items` (waits for every task)."""
        out: list[Any] = [None] * len(items)
        for i, result in self.map_unordered(fn, items):
            out[i] = result
        return out

    @abstractmethod
    def shutdown(self) -> None:
        """Releases workers; the executor may not be used afterwards."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def _check_picklable(fn: Callable[..., Any], executor: str) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ExecutorError(
            f"executor '{executor}' runs tasks in other processes, so the task function must be picklable "
            f"(a top-level function of an importable module); {fn!r} is not: {exc}") from exc


class InlineExecutor(Executor):
    """`local` with one worker: tasks run here, in order (deterministic, no process start-up)."""

    name = "local"

    def __init__(self) -> None:
        self._closed = False

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        if self._closed:
            raise ExecutorError("this executor was shut down; create a new one with get_executor()")
        for i, item in enumerate(items):
            try:
                result = fn(item)
            except Exception as exc:
                raise TaskError(i, exc, self.name) from exc
            yield i, result

    def shutdown(self) -> None:
        self._closed = True


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it (cheap starts, no fork of a torch process), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods and sys.platform != "darwin"
                                       else "spawn")


class LocalPoolExecutor(Executor):
    """`local` with several workers: a process pool, started on first use and reused until shutdown."""

    name = "local"

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise ExecutorError("this executor was shut down; create a new one with get_executor()")
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.max_workers, mp_context=_mp_context())
        return self._pool

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        _check_picklable(fn, self.name)
        pool = self._get_pool()
        futures: dict[Future[R], int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=futures.__getitem__):
                    exc = fut.exception()
                    if exc is not None:
                        raise TaskError(futures[fut], exc, self.name) from exc
                    yield futures[fut], fut.result()
        finally:  # a failure, or a caller that stopped iterating: drop what has not started
            for fut in pending:
                fut.cancel()

    def shutdown(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ray_call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor(Executor):
    """`ray`: tasks as Ray remote functions on a local Ray (num_cpus) or a cluster (address)."""

    name = "ray"

    def __init__(self, max_workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ExecutorError("executor 'ray' needs the ray package: pip install 'morphc[ray]' "
                                "(with -c requirements/constraints.txt), or use executor 'local'") from exc
        self._ray = ray
        self.max_workers = max_workers
        self.address = address
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                      "configure_logging": True, "logging_level": "warning"}
            if address is not None:
                ray.init(address=address, **kwargs)
            else:
                # Workers must import the caller's modules (task functions are pickled by reference).
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
                ray.init(num_cpus=max_workers, **kwargs)
        self._remote = ray.remote(_ray_call)
        self._closed = False

    def map_unordered(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        if self._closed:
            raise ExecutorError("this executor was shut down; create a new one with get_executor()")
        ray = self._ray
        fn_ref = ray.put(fn)
        refs = {self._remote.remote(fn_ref, item): i for i, item in enumerate(items)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        raise TaskError(refs[ref], cause, self.name) from exc
                    yield refs[ref], result
        finally:
            for ref in pending:
                ray.cancel(ref)

    def shutdown(self) -> None:
        if not self._closed and self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._closed = True


EXECUTORS = ("local", "ray")


def get_executor(name: str = "local", *, max_workers: int | None = None, address: str | None = None) -> Executor:
    """An executor by name: "local" (process pool; inline when max_workers=1) or "ray".

    max_workers: worker processes (default: CPU count for local, all of the cluster for Ray).
    address: a Ray cluster address ("auto", "ray://host:10001"); only for "ray".
    """
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor '{name}'; valid executors: {', '.join(EXECUTORS)}"
                            f"{did_you_mean(name, EXECUTORS)}")
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                    or max_workers < 1):
        raise ExecutorError(f"max_workers must be a positive integer or None, got {max_workers!r}")
    if name == "local":
        if address is not None:
            raise ExecutorError(f"address={address!r} only applies to executor 'ray'; "
                                "the 'local' executor runs on this machine")
        workers = max_workers if max_workers is not None else (os.cpu_count() or 1)
        return InlineExecutor() if workers == 1 else LocalPoolExecutor(workers)
    if address is not None and max_workers is not None:
        raise ExecutorError("give either address (join a running Ray cluster, which has its own CPU count) or "
                            "max_workers (start a local Ray with that many CPUs), not both")
    return RayExecutor(max_workers=max_workers, address=address)
