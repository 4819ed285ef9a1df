"""Exhaustive ground-truth tables: every config of the space measured once per model, in the records DB.

Tuners are compared on identical data: a benchmark replays a tuner against the table instead of
measuring again. Collection is resumable (configs already in the database are skipped; each chunk
is committed as it finishes), runs its chunks (one model: a lowering and an ONNX export per batch,
done before the lock is taken) through an executor, holds the timing file lock across chunks for
at most `max_hold_s` so other timing work on the shared cores can interleave, and shows progress.
Each config is applied with `morphc.runtime.serving` (the same code that serves it) and timed with
`profiler.measure` (median after warm-up).

Records: kind `serving-latency` keyed by (model fingerprint of the batch-1 Program, device, config
key); kind `tuning-model` (one per model) holds the source text, name and static embedding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, track

from morphc.predictors.profiler import measure
from morphc.predictors.records import RecordsDB, device_fingerprint, program_fingerprint
from morphc.predictors.timing_lock import TimingLock
from morphc.predictors.tuner.embedding import static_embedding
from morphc.predictors.tuner.sources import ModelSource
from morphc.predictors.tuner.space import TuningConfig, TuningError, TuningSpace

SERVING_LATENCY = "serving-latency"
TUNING_MODEL = "tuning-model"


_TIMING_LOCKS: dict[str, TimingLock] = {}  # per lock path, kept across this process's chunks


def _timing_lock(path: str | None) -> TimingLock:
    return _TIMING_LOCKS.setdefault(path, TimingLock(path)) if path else TimingLock(None)
_ONNX: dict[tuple[str, int], bytes] = {}


def prepare(source: str, batch: int, onnx: bool) -> tuple[Any, bytes | None]:
    """The source lowered at `batch` and (if asked) exported to ONNX, cached per process: untimed work
    done before the timing lock is taken."""
    from morphc.runtime.onnx_runtime import export_onnx

    program = ModelSource(source).program(batch)
    if onnx and (source, batch) not in _ONNX:
        _ONNX[(source, batch)] = export_onnx(program)
    return program, _ONNX.get((source, batch))


@dataclass(frozen=True)
class ChunkJob:
    """Configs of one source (all batches), measured in one process under one hold of the timing lock
    (picklable, so any executor can run it)."""

    source: str
    configs: tuple[tuple[tuple[str, Any], ...], ...]  # config keys as sorted item tuples
    warmup: int = 2
    repeats: int = 9
    lock: str | None = None
    max_hold_s: float = 300.0  # release the timing lock after a chunk once held this long


def measure_config(program: Any, config: TuningConfig, *, onnx_model: bytes | None = None, warmup: int = 2,
                   repeats: int = 9) -> dict[str, Any]:
    """Latency statistics (ms) of one config of `program`, applied exactly as serving applies it."""
    from morphc.runtime.serving import Runner

    runner = Runner(program, config.to_serving(), onnx_model=onnx_model)
    inputs = program.example_inputs
    with runner.activate(), torch.no_grad():
        stats = measure(lambda: runner(*inputs), warmup=warmup, repeats=repeats)
    return asdict(stats)


def measure_chunk(job: ChunkJob) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Executor task: (config key, stats) for every config of the job."""
    configs = [TuningConfig.from_key(dict(items)) for items in job.configs]
    prepared = {b: prepare(job.source, b, any(c.backend == "onnxruntime" and c.batch == b for c in configs))
                for b in sorted({c.batch for c in configs})}
    out = []
    lock = _timing_lock(job.lock)
    lock.acquire()
    try:
        for items, config in zip(job.configs, configs):
            program, onnx_model = prepared[config.batch]
            start = time.perf_counter()
            stats = measure_config(program, config, onnx_model=onnx_model, warmup=job.warmup, repeats=job.repeats)
            stats["trial_s"] = time.perf_counter() - start
            out.append((dict(items), stats))
    finally:
        lock.release(older_than_s=job.max_hold_s)
    return out


def register_model(db: RecordsDB, source: str, name: str | None = None) -> str:
    """Store the model's identity and static embedding; returns its fingerprint (the records' model key)."""
    program = ModelSource(source).program(1)
    fp = program_fingerprint(program)
    device = device_fingerprint("cpu")
    if db.get(TUNING_MODEL, fp, device, {"source": source}) is None:
        db.put(TUNING_MODEL, fp, device, {"source": source},
               {"name": name or source, "source": source, "static": static_embedding(program).tolist(),
                "params_mb": program.param_bytes() / 1e6})
    return fp


def collect(db: RecordsDB, sources: Sequence[tuple[str, str]], space: TuningSpace, *, executor: str = "local",
            workers: int = 1, warmup: int = 2, repeats: int = 9, lock: str | None = None,
            show_progress: bool = True, max_hold_s: float = 300.0) -> int:
    """Measure every (source, config) missing from `db`; `sources` are (name, source text). Returns the count."""
    from morphc.runtime.executors import get_executor

    if not space.measurable_here:
        raise TuningError(f"space '{space.name}' cannot be measured on this machine: {'; '.join(space.notes)}")
    device = device_fingerprint("cpu")
    jobs: list[tuple[str, ChunkJob]] = []
    for name, source in sources:
        fp = register_model(db, source, name)
        todo = tuple(tuple(sorted(c.key().items())) for c in space.configs
                     if db.get(SERVING_LATENCY, fp, device, c.key()) is None)
        if todo:
            jobs.append((fp, ChunkJob(source, todo, warmup, repeats, lock, max_hold_s)))
    if workers == 1 and executor == "local":  # inline: prepare every chunk before taking the lock
        for _, job in track(jobs, description="lowering + ONNX export", disable=not show_progress):
            keys = [TuningConfig.from_key(dict(items)) for items in job.configs]
            for b in sorted({c.batch for c in keys}):
                prepare(job.source, b, any(c.backend == "onnxruntime" and c.batch == b for c in keys))
    total = sum(len(j.configs) for _, j in jobs)
    columns = (TextColumn("ground truth {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    measured = 0
    with Progress(*columns, disable=not show_progress) as progress, \
            get_executor(executor, max_workers=workers) as pool:
        task = progress.add_task(f"({len(jobs)} chunks)", total=total)
        for i, results in pool.map_unordered(measure_chunk, [j for _, j in jobs]):
            fp, job = jobs[i]
            for key, stats in results:
                db.put(SERVING_LATENCY, fp, device, key, stats)
            measured += len(results)
            progress.update(task, advance=len(results), description=job.source)
    for lock in _TIMING_LOCKS.values():
        lock.release()
    return measured


@dataclass(frozen=True)
class Table:
    """One model's complete ground truth: latency of every config of the space."""

    name: str
    source: str
    fingerprint: str
    embedding: np.ndarray
    latency_ms: np.ndarray  # aligned with space.configs
    space: TuningSpace


def load_tables(db: RecordsDB, space: TuningSpace, device: str | None = None) -> list[Table]:
    """Every model of the DB whose table covers the whole space (incomplete ones are skipped)."""
    device = device or device_fingerprint("cpu")
    tables = []
    for rec in db.query(TUNING_MODEL, device=device):
        by_key = {TuningConfig.from_key(r.config): r.stats["median_ms"]
                  for r in db.query(SERVING_LATENCY, rec.model, device)}
        if all(c in by_key for c in space.configs):
            tables.append(Table(rec.stats["name"], rec.stats["source"], rec.model,
                                np.asarray(rec.stats["static"], dtype=np.float32),
                                np.array([by_key[c] for c in space.configs]), space))
    return tables
