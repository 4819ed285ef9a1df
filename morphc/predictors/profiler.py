"""Latency measurement of Programs under a serving configuration, stored in the records database.

A measurement is a median over repeated runs after warm-up (timing on shared cores is noisy;
FACTS.md), with p10/p90 and the runs beyond 3 median absolute deviations counted as outliers.
`collect` measures many (program, config) pairs resumably: pairs already in the database are
skipped, each new one is committed as soon as it is measured, and a rich progress bar shows where
it is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from morphc.ir.program import Program
from morphc.predictors.records import RecordsDB, device_fingerprint, program_fingerprint

LATENCY = "latency"  # record kind of end-to-end measurements


@dataclass(frozen=True)
class CpuConfig:
    """The CPU serving knobs a measurement is taken under (threads set with torch.set_num_threads)."""

    threads: int = 1

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"CpuConfig.threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    outliers: int


def measure(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20) -> LatencyStats:
    """Time `fn` `repeats` times after `warmup` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(samples)
    median = statistics.median(ordered)
    mad = statistics.median(abs(s - median) for s in ordered) or 1e-9
    return LatencyStats(
        median_ms=median, p10_ms=ordered[int(0.1 * (len(ordered) - 1))], p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        mean_ms=statistics.fmean(ordered), runs=len(ordered), outliers=sum(abs(s - median) > 3 * mad for s in ordered))


def profile_program(program: Program, config: CpuConfig, *, warmup: int = 3, repeats: int = 20) -> LatencyStats:
    """End-to-end latency of running `program` eagerly on its example inputs under `config`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.no_grad():
            return measure(lambda: program(*program.example_inputs), warmup=warmup, repeats=repeats)
    finally:
        torch.set_num_threads(previous)


def collect(programs: Sequence[Program], configs: Iterable[CpuConfig], db: RecordsDB, *, warmup: int = 3,
            repeats: int = 20, show_progress: bool = True,
            on_record: Callable[[Program, CpuConfig, LatencyStats], None] | None = None) -> int:
    """Measure every (program, config) not yet in `db`; returns how many were measured now."""
    device = device_fingerprint("cpu")
    configs = list(configs)
    todo = [(p, program_fingerprint(p), c) for p in programs for c in configs]
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
