"""Latency measurement of Programs under a serving configuration, stored in the records database.

A measurement is a median over repeated runs after warm-up (timing on shared cores is noisy;
FACTS.md), with p10/p90, the runs beyond 3 median absolute deviations counted as outliers, and the
1-minute load average before and after (other processes share the cores), and the minor page faults per
timed call: with glibc's default heap some programs hand their large activations back to the system after
every call and fault them in again, about 2 us per fault here (docs/cost_model.md, session 19). `profile_ops` measures
per-operator latency (RaPP's runtime features) by timing each node of the graph in an fx
interpreter. `collect` measures many (program, config) pairs resumably: pairs already in the
database are skipped, each new one is committed as soon as it is measured, and a rich progress bar
shows where it is.

How each knob is applied is declared in `morphc.predictors.spaces`: `threads` with
`torch.set_num_threads` around the timed calls, `flush_denormal` on every intra-op thread
(`morphc.runtime.denormals`, as serving applies it); `batch` is a property of the Program (static
shapes), so a config whose batch differs from the Program's is refused, not silently ignored.
A GpuConfig is measured by `gpu_profiler` (the program moved to the GPU, CUDA-event per-op times)
where this process can: a CUDA device, and the SM share its MPS context was started with;
otherwise it is refused with `DeviceUnavailableError` saying why.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from morphc.ir.program import Program
from morphc.predictors.records import RecordsDB, device_fingerprint, program_fingerprint
from morphc.predictors.spaces import CpuConfig, DeviceUnavailableError, GpuConfig
from morphc.runtime.denormals import set_threads_and_flush, threads_and_flush

try:  # page-fault counts (getrusage); not on every platform
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = ["LATENCY", "OP_LATENCY", "CpuConfig", "LatencyStats", "collect", "measure", "profile_ops",
           "profile_interleaved", "profile_program", "program_batch", "resolve_config"]

LATENCY = "latency"  # record kind of end-to-end measurements
OP_LATENCY = "op-latency"  # record kind of per-operator measurements


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    outliers: int
    load_before: float | None = None  # 1-minute load average when the measurement started
    load_after: float | None = None
    page_faults: float | None = None  # minor page faults per timed call, the whole process (None: not counted)


def _minor_faults() -> int | None:
    """The process's minor page faults so far (getrusage); None where the platform has no `resource` module."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_since(before: int | None) -> int | None:
    """Minor page faults since `before`, a `_minor_faults()` reading; None where they are not counted."""
    now = _minor_faults()
    return None if before is None or now is None else now - before


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _summarize(samples: Sequence[float], load_before: float | None = None,
               faults: int | None = None) -> LatencyStats:
    """The statistics of `samples` (ms); `faults`: the minor page faults counted over all of them."""
    ordered = sorted(samples)
    median = statistics.median(ordered)
    mad = statistics.median(abs(s - median) for s in ordered) or 1e-9
    return LatencyStats(
        median_ms=median, p10_ms=ordered[int(0.1 * (len(ordered) - 1))], p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        mean_ms=statistics.fmean(ordered), runs=len(ordered), outliers=sum(abs(s - median) > 3 * mad for s in ordered),
        load_before=load_before, load_after=_load(),
        page_faults=None if faults is None else faults / len(ordered))


def measure(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20) -> LatencyStats:
    """Time `fn` `repeats` times after `warmup` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    load_before = _load()
    for _ in range(warmup):
        fn()
    samples = []
    faults_before = _minor_faults()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summarize(samples, load_before, _faults_since(faults_before))


def program_batch(program: Program) -> int:
    """The batch a Program was lowered for: the leading dimension of its first input."""
    shape = program.inputs[0].shape if program.inputs else ()
    return int(shape[0]) if shape else 1


def resolve_config(program: Program, config: CpuConfig | GpuConfig) -> CpuConfig | GpuConfig:
    """`config` with its batch filled in from the Program; a different batch is refused (static shapes)."""
    batch = program_batch(program)
    if config.batch is None:
        return config.with_batch(batch)
    if config.batch != batch:
        raise ValueError(f"config batch {config.batch} differs from the program's batch {batch}; lower the model "
                         f"again with example inputs of batch {config.batch} to measure it")
    return config


def _check_measurable(config: CpuConfig | GpuConfig) -> CpuConfig:
    """`config` if it is a CpuConfig; a GpuConfig is refused clearly where there is no GPU."""
    if isinstance(config, GpuConfig):
        from morphc.predictors.gpu_profiler import check_cuda

        check_cuda()
        raise DeviceUnavailableError("GPU configs are measured by profile_program/profile_ops (which move the "
                                     "program to the GPU) or gpu_profiler; this function measures CPU threads")
    return config


def profile_program(program: Program, config: CpuConfig | GpuConfig, *, warmup: int = 3,
                    repeats: int = 20) -> LatencyStats:
    """End-to-end latency of running `program` eagerly on its example inputs under `config`.

    A GpuConfig is measured on the GPU (`gpu_profiler`; at least `repeats` runs) where this process
    can: a CUDA device, time_quota 1.0 and the SM share its context was started with."""
    if isinstance(config, GpuConfig):
        from morphc.predictors import gpu_profiler

        backend = gpu_profiler.CudaBackend()
        config = gpu_profiler.check_gpu_config(resolve_config(program, config))  # type: ignore[arg-type]
        moved, _ = gpu_profiler.to_device(program, backend)
        return gpu_profiler.profile_program_gpu(moved, config, backend, warmup=warmup, min_runs=repeats,
                                                max_runs=max(repeats, 200))
    config = _check_measurable(resolve_config(program, config))
    with threads_and_flush(config.threads, config.flush_denormal), torch.no_grad():
        return measure(lambda: program(*program.example_inputs), warmup=warmup, repeats=repeats)


def profile_interleaved(program: Program, configs: Sequence[CpuConfig], *, warmup: int = 3, per_round: int = 5,
                        target_s: float = 0.15, min_runs: int = 20, max_runs: int = 200) -> list[LatencyStats]:
    """End-to-end latency under several configs, measured in interleaved rounds of `per_round` calls.

    Interleaving makes load from other processes hit every config alike; the number of runs adapts
    so each config gets about `target_s` of measurement (between `min_runs` and `max_runs`). CPU only:
    a GPU's SM share is fixed per process, so GPU configs cannot be interleaved in one.
    """
    resolved = [_check_measurable(resolve_config(program, c)) for c in configs]
    load_before = _load()
    samples: list[list[float]] = [[] for _ in resolved]
    faults: list[list[int | None]] = [[] for _ in resolved]  # per config: each round's count
    with threads_and_flush(resolved[0].threads, resolved[0].flush_denormal), torch.no_grad():
        call = lambda: program(*program.example_inputs)  # noqa: E731
        one = []
        for config in resolved:
            set_threads_and_flush(config.threads, config.flush_denormal)
            for _ in range(warmup):
                call()
            calib = []
            for _ in range(3):
                start = time.perf_counter()
                call()
                calib.append(time.perf_counter() - start)
            one.append(statistics.median(calib))
        runs = int(min(max(target_s / max(max(one), 1e-6), min_runs), max_runs))
        for _ in range(max(1, -(-runs // per_round))):
            for i, config in enumerate(resolved):
                set_threads_and_flush(config.threads, config.flush_denormal)
                call()  # first call after a thread change pays the pool wake-up: not timed
                faults_before = _minor_faults()
                for _ in range(per_round):
                    start = time.perf_counter()
                    call()
                    samples[i].append((time.perf_counter() - start) * 1e3)
                faults[i].append(_faults_since(faults_before))
    return [_summarize(s, load_before, None if None in f else sum(f))  # type: ignore[arg-type]
            for s, f in zip(samples, faults)]


class WallEvent:
    """A timing mark on the wall clock, with the interface of a CUDA timing event (`record`,
    `elapsed_time` in ms): what the operator timer uses on the CPU, where compute is synchronous."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: WallEvent) -> float:
        return (end.t - self.t) * 1e3


class OpTimer(fx.Interpreter):
    """Runs the graph with a pair of timing marks around every call_function node (wall-clock marks on
    the CPU, CUDA events on a GPU: `event`), read by `collect` once the device has caught up
    (`synchronize`); each node's times (ms) accumulate in `times`."""

    def __init__(self, gm: fx.GraphModule, event: Callable[[], Any] = WallEvent,
                 synchronize: Callable[[], None] = lambda: None) -> None:
        super().__init__(gm)
        self.event = event
        self.synchronize = synchronize
        self.pending: list[tuple[str, Any, Any]] = []
        self.times: dict[str, list[float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        start, end = self.event(), self.event()
        start.record()
        out = super().run_node(n)
        end.record()
        self.pending.append((n.name, start, end))
        return out

    def collect(self) -> None:
        self.synchronize()
        for name, start, end in self.pending:
            self.times.setdefault(name, []).append(float(start.elapsed_time(end)))
        self.pending.clear()

    def medians(self, inputs: Sequence[Any], *, warmup: int, repeats: int) -> dict[str, float]:
        """Run `warmup` untimed and `repeats` timed passes; each node's median time (ms) by node name."""
        with torch.no_grad():
            for _ in range(warmup):
                self.run(*inputs)
                self.collect()
            self.times.clear()
            for _ in range(repeats):
                self.run(*inputs)
                self.collect()
        return {name: statistics.median(ts) for name, ts in self.times.items()}


def profile_ops(program: Program, config: CpuConfig | GpuConfig, *, warmup: int = 1,
                repeats: int = 5) -> dict[str, float]:
    """Median latency (ms) of every operator node of `program` under `config`, by node name.

    Timed one node at a time in an interpreter, so the numbers include a few microseconds of
    Python dispatch per node; they are features (RaPP's runtime features), not a latency sum.
    A GpuConfig is timed on the GPU with CUDA events per node (`gpu_profiler.profile_ops_gpu`).
    """
    if isinstance(config, GpuConfig):
        from morphc.predictors import gpu_profiler

        backend = gpu_profiler.CudaBackend()
        config = gpu_profiler.check_gpu_config(resolve_config(program, config))  # type: ignore[arg-type]
        moved, _ = gpu_profiler.to_device(program, backend)
        return gpu_profiler.profile_ops_gpu(moved, config, backend, warmup=warmup, repeats=repeats)
    config = _check_measurable(resolve_config(program, config))
    with threads_and_flush(config.threads, config.flush_denormal):
        return OpTimer(program.graph_module).medians(program.example_inputs, warmup=warmup, repeats=repeats)


def collect(programs: Sequence[Program], configs: Iterable[CpuConfig | GpuConfig], db: RecordsDB, *,
            warmup: int = 3, repeats: int = 20, show_progress: bool = True,
            on_record: Callable[[Program, CpuConfig | GpuConfig, LatencyStats], None] | None = None) -> int:
    """Measure every (program, config) not yet in `db`; returns how many were measured now.

    Configs are stored with the batch filled in from each program (see `resolve_config`); all
    configs must be of one device kind (its fingerprint keys the records).
    """
    configs = list(configs)
    kinds = {c.device for c in configs}
    if len(kinds) > 1:
        raise ValueError(f"collect() measures one device kind at a time; got configs for {sorted(kinds)}")
    device = device_fingerprint(kinds.pop() if kinds else "cpu")
    todo = [(p, program_fingerprint(p), resolve_config(p, c)) for p in programs for c in configs]
    todo = [(p, fp, c) for p, fp, c in todo if db.get(LATENCY, fp, device, asdict(c)) is None]
    columns = (TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    measured = 0
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("profiling", total=len(todo))
        for program, fp, config in todo:
            stats = profile_program(program, config, warmup=warmup, repeats=repeats)
            db.put(LATENCY, fp, device, asdict(config), asdict(stats))
            measured += 1
            progress.advance(task)
            if on_record is not None:
                on_record(program, config, stats)
    return measured
