"""The cost-model dataset: profile corpus variants into a records database, and read it back.

Per (variant, batch) the database gets, keyed by the Program's fingerprint:
  - `corpus`: variant name -> fingerprint and family (so a resumed collection need not lower again),
  - `opgraph`: the raw OpGraph (features.extract), so training never needs the models,
  - `latency` per threads: end-to-end stats (interleaved measurement, load average),
  - `op-latency` per threads: per-operator medians in OpGraph node order (runtime features).
Everything is committed as it is measured; a killed collection resumes where it stopped. With
`lock` set, the timing lock file is held (flock) for chunks of at most `lock_chunk_s` seconds of
measuring, so other users of shared cores can interleave their own timings between chunks.

A GPU profile (collected by `gpu_collect` on the machine with the GPU) has the same `corpus` and
`opgraph` records; its `latency` and `op-latency` records are keyed by `GpuConfig.as_record()`
(batch, sm_share, time_quota) under the GPU's device fingerprint, per-op latencies at the SM shares
`spaces.GPU_RUNTIME_SHARES`. `load_samples(db, device="cuda")` reads them back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from morphc.ir.program import Program
from morphc.predictors.corpus import Variant
from morphc.predictors.features import OpGraph, extract
from morphc.predictors.profiler import LATENCY, OP_LATENCY, LatencyStats, profile_interleaved, profile_ops
from morphc.predictors.records import RecordsDB, RecordsError, device_fingerprint, program_fingerprint
from morphc.predictors.spaces import GPU_RUNTIME_SHARES, CpuConfig, GpuConfig
from morphc.predictors.timing_lock import TimingLock

CORPUS = "corpus"
OPGRAPH = "opgraph"
STATIC = "static"  # device field of device-independent records


_built: dict[str, object] = {}  # the last variant built (its name and builder): its models and batch-1 inputs


def _cache_path(v: Variant, batch: int, cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"{hashlib.blake2b(v.name.encode(), digest_size=8).hexdigest()}-b{batch}.safetensors"


def lowered(v: Variant, batch: int, cache_dir: str | Path | None = None) -> Program:
    """`v` lowered at `batch`, from `cache_dir` when it was lowered before."""
    import morphc

    path = _cache_path(v, batch, cache_dir)
    if path is not None and path.is_file():
        return morphc.load(path)
    key = (v.name, v.builder)  # the builder too: two definitions may share a name (tests, edited families)
    if _built.get("key") != key:  # build each variant once; other batches repeat its batch-1 inputs
        _built.clear()
        _built.update(key=key, built=v.build(1))
    models, inputs = _built["built"]
    program = morphc.lower(models, tuple(t.repeat(batch, *[1] * (t.dim() - 1)) for t in inputs))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        morphc.save(program, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return program


def pass_key(key: dict[str, Any], repeat: int = 0) -> dict[str, Any]:
    """A latency record's config in measurement pass `repeat`: the first pass (0) is the config itself,
    repeat passes (1, 2, ...) add their number, so each pass is a record of its own."""
    return {**key, **({"pass": repeat} if repeat else {})}


def _latency_key(batch: int, threads: int, repeat: int = 0, flush_denormal: bool = False) -> dict[str, Any]:
    """The records-database config of a CPU latency measurement in pass `repeat` (see `pass_key`)."""
    return pass_key(CpuConfig(threads=threads, batch=batch, flush_denormal=flush_denormal).as_record(), repeat)


def _done(db: RecordsDB, name: str, batch: int, threads: Sequence[int], device: str, ops: bool,
          repeat: int = 0, flush_denormal: bool = False) -> bool:
    rec = db.get(CORPUS, name, STATIC, {"batch": batch})
    if rec is None:
        return False
    fp = rec.stats["fingerprint"]
    kinds = (LATENCY, OP_LATENCY) if ops else (LATENCY,)  # repeat passes measure no per-op profile (ops=False)
    return all(db.get(k, fp, device, _latency_key(batch, t, repeat, flush_denormal)) is not None
               for k in kinds for t in threads)


MAX_SPREAD = 2.0  # p90/p10 above this: the measurement was disturbed (other processes), measure again
UNUSABLE_SPREAD = 10.0  # p90/p10 above this even after retries: left out of training and evaluation


# More threads than 1 this much slower than 1 thread, measured interleaved: the second thread could not get a
# core (other processes), so every OpenMP barrier waited on the scheduler. A fact about the load, not the program.
CONTENDED_RATIO = 3.0


def _spread(s: LatencyStats) -> float:
    return s.p90_ms / max(s.p10_ms, 1e-9)


def _quality(stats: Sequence[LatencyStats], configs: Sequence[CpuConfig]) -> float:
    """Worst of the spreads and of the contention ratios (multi-thread median / single-thread median)."""
    single = [s.median_ms for s, c in zip(stats, configs) if c.threads == 1]
    ratios = [s.median_ms / single[0] / CONTENDED_RATIO * MAX_SPREAD for s, c in zip(stats, configs)
              if single and c.threads > 1]
    return max([*map(_spread, stats), *ratios])


def _stable_measurement(program: object, configs: Sequence[CpuConfig], target_s: float,
                        retries: int) -> tuple[list[LatencyStats], int]:
    """Interleaved measurement, repeated (up to `retries` more times) while a config's spread is too wide or
    the multi-thread configs are contended; keeps the best attempt."""
    best: list[LatencyStats] | None = None
    attempts = 0
    for attempts in range(1, retries + 2):  # noqa: B007
        stats = profile_interleaved(program, configs, target_s=target_s)  # type: ignore[arg-type]
        if best is None or _quality(stats, configs) < _quality(best, configs):
            best = stats
        if _quality(best, configs) <= MAX_SPREAD:
            break
    assert best is not None
    return best, attempts


def collect_corpus(db: RecordsDB, variants: Sequence[Variant], *, batches: Sequence[int] = (1, 4, 8),
                   threads: Sequence[int] = (1, 2), ops: bool = True, lock: str | None = None,
                   show_progress: bool = True, target_s: float = 0.1, retries: int = 1,
                   cache_dir: str | Path | None = None, prepare_only: bool = False,
                   lock_chunk_s: float = 120.0, repeat: int = 0, flush_denormal: bool = False) -> int:
    """Profile every (variant, batch) not yet complete in `db`; returns how many were measured now.

    With `cache_dir`, lowered programs are saved there and reused (`prepare_only` just fills the
    cache: lowering needs no quiet machine, so it can run while another job holds the timing lock).
    `repeat` > 0 measures the end-to-end latencies again as pass number `repeat` (kept beside the
    first pass; no per-op profile): on shared machines a program's latency drifts between sessions
    by more than within one, and `load_samples` learns the median over the passes. `flush_denormal`
    measures the flushed protocol (subnormals flushed on every thread), kept under its own keys.
    """
    device = device_fingerprint("cpu")
    ops = ops and not repeat
    todo = [(v, b) for v in variants for b in batches
            if not _done(db, v.name, b, threads, device, ops, repeat, flush_denormal)]
    measured = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    chunk = TimingLock(lock, max_hold_s=lock_chunk_s)
    with Progress(*columns, disable=not show_progress) as progress, chunk:
        task = progress.add_task("profiling corpus", total=len(todo))
        for v, batch in todo:
            progress.update(task, description=f"{v.name} b={batch}"[:60])
            if _cache_path(v, batch, cache_dir) is None or not _cache_path(v, batch, cache_dir).is_file():
                chunk.release()  # lowering takes seconds and needs no quiet machine
            program = lowered(v, batch, cache_dir)
            if prepare_only:
                progress.advance(task)
                continue
            fp = program_fingerprint(program)
            graph = extract(program)
            db.put(OPGRAPH, fp, STATIC, {}, graph.to_json())
            configs = [CpuConfig(threads=t, batch=batch, flush_denormal=flush_denormal) for t in threads]
            with chunk.chunk():
                stats, attempts = _stable_measurement(program, configs, target_s, retries)
                per_op = {c.threads: profile_ops(program, c, repeats=3) for c in configs} if ops else {}
            for config, s in zip(configs, stats):
                db.put(LATENCY, fp, device, _latency_key(batch, config.threads, repeat, flush_denormal),
                       {**asdict(s), "attempts": attempts, "unstable": _spread(s) > MAX_SPREAD})
            for t, times in per_op.items():
                ms = [round(times.get(n, 0.0), 5) for n in graph.names]
                db.put(OP_LATENCY, fp, device, _latency_key(batch, t, 0, flush_denormal), {"ms": ms})
            if not repeat:
                db.put(CORPUS, v.name, STATIC, {"batch": batch},
                       {"fingerprint": fp, "family": v.family, "spec": v.spec})
            measured += 1
            progress.advance(task)
    return measured


def refresh_op_graphs(db: RecordsDB, variants: Sequence[Variant], *, cache_dir: str | Path | None = None,
                      show_progress: bool = True) -> int:
    """Extract and store again the op graph of every (variant, batch) already in `db`; returns how many.

    For a new `features.OPGRAPH_VERSION`: the measurements stay valid (the Program and its node
    order are the same: its fingerprint is checked), only what is extracted from it changed.
    """
    todo = [(v, rec) for v in variants for rec in db.query(kind=CORPUS, model=v.name)]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("re-extracting op graphs", total=len(todo))
        for v, rec in todo:
            batch = int(rec.config["batch"])
            program = lowered(v, batch, cache_dir)
            fp = program_fingerprint(program)
            if fp != rec.stats["fingerprint"]:
                raise RecordsError(f"{v.name} at batch {batch} now lowers to program {fp}, but '{db.path}' measured "
                                   f"{rec.stats['fingerprint']}: its records describe another program; profile it "
                                   f"again into a new database")
            db.put(OPGRAPH, fp, STATIC, {}, extract(program).to_json())
            progress.advance(task)
    return len(todo)


@dataclass(frozen=True)
class Sample:
    """One measured (program, config) with what training needs."""

    variant: str
    family: str
    fingerprint: str
    graph: OpGraph
    config: CpuConfig | GpuConfig
    latency_ms: float
    runtime: np.ndarray | None  # [N, 2] per-op ms at 1 and 2 threads (GPU: at GPU_RUNTIME_SHARES), when profiled
    load: float | None
    unstable: bool = False  # p90/p10 spread above UNUSABLE_SPREAD, or contended (see CONTENDED_RATIO), after retries
    passes: tuple[float, ...] = ()  # the latency of every measurement pass (first pass first); latency_ms: median


STATISTIC = "p10_ms"  # the latency the cost model learns; see load_samples


def _latency_devices(db: RecordsDB) -> list[str]:
    """The device fingerprints `db` holds latency records of."""
    return sorted({r[0] for r in db.conn.execute("SELECT DISTINCT device FROM records WHERE kind=?", (LATENCY,))})


def cpu_device(db: RecordsDB) -> str:
    """The CPU whose corpus latencies to read from `db`: this machine if `db` holds its measurements,
    otherwise the one CPU it holds (a collection made on another machine is still evaluated, and trained
    on, as that machine's); this machine's fingerprint when it holds none (no samples)."""
    here = device_fingerprint("cpu")
    found = [d for d in _latency_devices(db) if d.startswith("cpu")]
    if here in found or not found:
        return here
    if len(found) > 1:
        raise RecordsError(f"'{db.path}' holds CPU latencies of {len(found)} other machines and none of this one "
                           f"('{here}'); pass one of them as device=: " + "; ".join(found))
    return found[0]


def gpu_device(db: RecordsDB) -> str:
    """The one GPU device fingerprint of `db`'s latency records (a GPU profile comes from one machine)."""
    found = [d for d in _latency_devices(db) if d.startswith("cuda")]
    if not found:
        devices = _latency_devices(db)
        raise RecordsError(f"'{db.path}' holds no GPU latency records (devices with latencies: {devices or 'none'}); "
                           f"collect a GPU profile with scripts/collect_gpu_profile.py on a GPU machine")
    if len(found) > 1:
        raise RecordsError(f"'{db.path}' holds GPU latencies of {len(found)} devices; pass one of them as device=: "
                           + "; ".join(found))
    return found[0]


def _flushed(config: dict[str, Any]) -> bool:
    """Whether a latency record's config was measured flushed (records from before the knob have no key)."""
    return bool(config.get("flush_denormal", False))


def flush_protocol(db: RecordsDB, device: str) -> bool:
    """Whether `db`'s CPU latencies of `device` were measured with subnormals flushed (the one protocol
    they have; a database holding both must be read with `flush_denormal=` named)."""
    found = {_flushed(r.config) for r in db.query(kind=LATENCY, device=device)}
    if len(found) > 1:
        raise RecordsError(f"'{db.path}' holds latencies measured both with and without subnormals flushed; "
                           f"read one protocol: load_samples(..., flush_denormal=True or False)")
    return found.pop() if found else False


def load_samples(db: RecordsDB | str | Path, device: str | None = None, statistic: str = STATISTIC,
                 flush_denormal: bool | None = None) -> list[Sample]:
    """Every complete latency sample of the corpus in `db` for `device` (default: this machine, or the one CPU
    `db` describes, see `cpu_device`; "cuda": the GPU profile in `db`, see `gpu_device`); a config measured in
    several passes (`collect_corpus(repeat=...)`) gives one sample, their median.

    `statistic` is the latency learned: by default the 10th percentile of the interleaved runs, the
    latency of a program that has its cores (on cores shared with other jobs, the median also
    measures how busy the machine was: the recorded load averages were 4-5 on 2 cores). "median_ms"
    is the alternative. `flush_denormal`: which measurement protocol to read (default: the one `db` has).
    """
    if statistic not in ("p10_ms", "median_ms", "mean_ms", "p90_ms"):
        raise ValueError(f"statistic must be one of p10_ms, median_ms, mean_ms, p90_ms; got {statistic!r}")
    if not isinstance(db, RecordsDB):
        if not Path(db).is_file():
            raise RecordsError(f"records database '{db}' does not exist (collect one with `morphc profile --corpus`)")
        db = RecordsDB(db)
    if device == "cuda":
        device = gpu_device(db)
    device = device or cpu_device(db)
    gpu = device.startswith("cuda")
    flush = False if gpu else flush_protocol(db, device) if flush_denormal is None else flush_denormal
    graphs: dict[str, OpGraph] = {}
    samples: list[Sample] = []
    for rec in db.query(kind=CORPUS):
        fp, batch = rec.stats["fingerprint"], rec.config["batch"]
        if fp not in graphs:
            g = db.get(OPGRAPH, fp, STATIC, {})
            if g is None:
                continue
            try:
                graphs[fp] = OpGraph.from_json(g.stats)
            except ValueError as exc:
                raise RecordsError(f"op graph of {rec.model} in '{db.path}': {exc} (re-extract the stored graphs: "
                                   f"scripts/collect_cost_model_data.py --refresh-op-graphs)") from exc
        graph = graphs[fp]
        if gpu:
            samples += _gpu_samples(db, rec, graph, device, statistic)
            continue
        ops = {t: db.get(OP_LATENCY, fp, device, _latency_key(batch, t, 0, flush)) for t in (1, 2)}
        runtime = None
        if all(o is not None for o in ops.values()):
            runtime = np.stack([np.asarray(ops[t].stats["ms"], dtype=np.float64) for t in (1, 2)], axis=1)
            if runtime.shape[0] != graph.num_nodes:
                raise RecordsError(f"op latencies of {rec.model} do not match its op graph in '{db.path}'")
        passes: dict[tuple[int, int], list[Any]] = {}  # (batch, threads) -> records, first pass first
        for lat in _in_pass_order(db.query(kind=LATENCY, model=fp, device=device)):
            if _flushed(lat.config) != flush:
                continue
            passes.setdefault((int(lat.config["batch"]), int(lat.config["threads"])), []).append(lat)
        single = [float(r.stats[statistic]) for (_, t), rs in passes.items() if t == 1 for r in rs[:1]]
        for (batch_, threads), lats in passes.items():
            config = CpuConfig(threads=threads, batch=batch_, flush_denormal=flush)
            values, spread = _pass_values(lats, statistic, rec.model, db)
            contended = bool(single) and threads > 1 and values[0] > CONTENDED_RATIO * single[0]
            samples.append(Sample(rec.model, rec.stats["family"], fp, graph, config, float(np.median(values)), runtime,
                                  lats[0].stats.get("load_before"), spread > UNUSABLE_SPREAD or contended, values))
    return samples


def _in_pass_order(records: Iterable[Any]) -> list[Any]:
    """Latency records with the first measurement pass first (see `pass_key`)."""
    return sorted(records, key=lambda r: r.config.get("pass", 0))


def _pass_values(lats: Sequence[Any], statistic: str, model: str, db: RecordsDB) -> tuple[tuple[float, ...], float]:
    """One config's `statistic` in each of its passes (`lats`, first pass first) and the first pass's p90/p10
    spread; a value that is not a positive number is refused."""
    values = tuple(float(r.stats[statistic]) for r in lats)
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise RecordsError(f"latency record of {model} in '{db.path}' is not a positive number: {list(values)}")
    return values, float(lats[0].stats["p90_ms"]) / max(float(lats[0].stats["p10_ms"]), 1e-9)


def _gpu_samples(db: RecordsDB, rec: Any, graph: OpGraph, device: str, statistic: str) -> list[Sample]:
    """The GPU samples of one corpus (variant, batch) record: one per measured GpuConfig at its batch, the
    median of its measurement passes (`collect_gpu_profile.py --repeat`) as on the CPU.

    Runtime features: per-op ms at GPU_RUNTIME_SHARES (both needed; a profile without MPS has only
    100%, so its samples have none). Unstable: the measurement's own p90/p10 above UNUSABLE_SPREAD
    (no thread contention on a GPU; its SM share is the process's alone)."""
    fp, batch = rec.stats["fingerprint"], int(rec.config["batch"])
    ops = [db.get(OP_LATENCY, fp, device, GpuConfig(batch=batch, sm_share=s).as_record()) for s in GPU_RUNTIME_SHARES]
    runtime = None
    if all(o is not None for o in ops):
        runtime = np.stack([np.asarray(o.stats["ms"], dtype=np.float64) for o in ops], axis=1)  # type: ignore[union-attr]
        if runtime.shape[0] != graph.num_nodes:
            raise RecordsError(f"op latencies of {rec.model} do not match its op graph in '{db.path}'")
    passes: dict[GpuConfig, list[Any]] = {}  # config -> its records, first pass first
    for lat in _in_pass_order(db.query(kind=LATENCY, model=fp, device=device)):
        if int(lat.config.get("batch", -1)) != batch or "sm_share" not in lat.config:
            continue
        try:
            config = GpuConfig(batch=batch, sm_share=int(lat.config["sm_share"]),
                               time_quota=float(lat.config.get("time_quota", 1.0)))
        except ValueError as exc:
            raise RecordsError(f"GPU latency record of {rec.model} in '{db.path}' has an invalid config "
                               f"{lat.config}: {exc}") from exc
        passes.setdefault(config, []).append(lat)
    out = []
    for config, lats in passes.items():
        values, spread = _pass_values(lats, statistic, rec.model, db)
        out.append(Sample(rec.model, rec.stats["family"], fp, graph, config, float(np.median(values)), runtime,
                          lats[0].stats.get("load_before"), spread > UNUSABLE_SPREAD, values))
    return out
