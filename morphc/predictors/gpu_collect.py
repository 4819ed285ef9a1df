"""GPU profile collection: an MPS daemon, one measuring worker process per SM share, one records DB.

Why processes: CUDA reads `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` when a process creates its context,
under an MPS control daemon; a process therefore measures one SM share. The collection
  1. lowers the chosen corpus variants at each batch on the CPU, in a pool of processes (torch.export
     costs CPU seconds; the lowered programs are cached as files), storing their `corpus` and
     `opgraph` records (`dataset`'s layout),
  2. checks CUDA in a probe process without MPS, then whether MPS works: it starts its own control
     daemon (pipe and log directories of its own), runs a probe client at 100% and one at a low
     share, and accepts MPS only on a client-visible effect: fewer SMs reported, or a compute-bound
     matmul at least `MIN_SLOWDOWN` times slower. (CUDA falls back to running without MPS, silently,
     when a client cannot reach a daemon.) Where MPS does not work, the reason (the error text, the
     daemon's log) is recorded and only share 100 is measured, without MPS,
  3. runs one worker process per share, one after the other (never two at once: they would measure
     each other), each started with its share in its environment and given an equal slice of the
     budget left; a worker measures every (variant, batch) in the same order (families interleaved,
     so a cut budget leaves every family some programs), commits each record at once, skips what
     the database already has (resumable), and stops at its slice's end. Per-op latencies are
     measured at the shares of `spaces.GPU_RUNTIME_SHARES`. A program that fails is recorded as
     `gpu-failure` with its error; an error that leaves the CUDA context unusable ends the worker,
     which is started again for the rest of its slice.
The daemon is quit and the database checkpointed (no -wal file left) however the run ends.

`python -m morphc.predictors.gpu_collect probe|worker ...` are the subprocess entry points;
scripts/collect_gpu_profile.py is the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from morphc.errors import MorphcError
from morphc.predictors.corpus import Variant
from morphc.predictors.gpu_profiler import MPS_SHARE_ENV
from morphc.predictors.records import RecordsDB
from morphc.predictors.spaces import GPU_RUNTIME_SHARES, MPS_CONTROL, GpuConfig

GPU_FAILURE = "gpu-failure"  # record kind: a (program, GpuConfig) that could not be measured, with its error
MIN_SLOWDOWN = 1.5  # matmul at the low share vs 100%: less than this (and no fewer SMs) means MPS did not apply
RESTART_RC = 75  # a worker's exit code after an error that leaves its CUDA context unusable: start it again
GRACE_S = 20.0  # how long past its slice a worker may take to finish its program before it is killed
MIN_SLICE_S = 15.0  # a share with less time left than this is not started

Log = Callable[[str], None]


class MpsError(MorphcError):
    """The MPS control daemon could not be started or did not answer."""


class ProbeError(MorphcError):
    """A probe process failed (no CUDA, an MPS client that could not connect, a timeout)."""


@dataclass(frozen=True)
class Job:
    """One lowered program to measure: its variant, batch, fingerprint and cached file."""

    variant: str
    family: str
    batch: int
    fingerprint: str
    path: str


# --- MPS ----------------------------------------------------------------------------------------


class MpsControl:
    """An MPS control daemon this collection starts and quits, with its own pipe and log directories.

    `runner` and `which` stand in for subprocess.run and shutil.which in tests."""

    def __init__(self, root: str | Path, *, runner: Callable[..., subprocess.CompletedProcess] | None = None,
                 which: Callable[[str], str | None] | None = None, timeout_s: float = 30.0) -> None:
        self.root = Path(root)
        self.runner = runner or subprocess.run
        self.executable = (which or shutil.which)(MPS_CONTROL)
        self.timeout_s = timeout_s
        self.started = False

    def env(self) -> dict[str, str]:
        """What a client needs in its environment to reach this daemon."""
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log")}

    def _run(self, args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        if self.executable is None:
            raise MpsError(f"{MPS_CONTROL} is not on PATH")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}, **self.env()}
        try:
            return self.runner([self.executable, *args], input=stdin, env=env, capture_output=True, text=True,
                               timeout=self.timeout_s, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise MpsError(f"{MPS_CONTROL} {' '.join(args) or repr(stdin)} failed: {exc}") from exc

    def start(self) -> None:
        pipe = self.root / "pipe"
        if pipe.is_dir() and any(pipe.iterdir()):  # a daemon left by an earlier, killed run on these directories
            with contextlib.suppress(MpsError):
                self._run([], stdin="quit\n")
            time.sleep(1.0)
        for sub in ("pipe", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        proc = self._run(["-d"])
        if proc.returncode != 0:
            raise MpsError(f"`{MPS_CONTROL} -d` exited with {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip() or 'no output'}")
        self.started = True

    def command(self, text: str) -> str:
        """One control command (e.g. get_server_list), its answer."""
        proc = self._run([], stdin=text + "\n")
        if proc.returncode != 0:
            raise MpsError(f"MPS control command {text!r} exited with {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout.strip()

    def server_list(self) -> list[str]:
        try:
            return self.command("get_server_list").split()
        except MpsError:
            return []

    def quit(self, wait_s: float = 10.0) -> None:
        """Quit the daemon and wait (up to `wait_s`) until its process is gone, so that processes started
        next without MPS do not meet its server on the GPU."""
        if not self.started:
            return
        pid_file = self.root / "pipe" / "nvidia-cuda-mps-control.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.is_file() and pid_file.read_text().strip().isdigit() \
            else None
        with contextlib.suppress(MpsError):
            self.command("quit")
        self.started = False
        if pid is None:  # no pid file to watch: give the daemon and its server a moment to go
            time.sleep(min(wait_s, 1.0))
        end = time.monotonic() + wait_s
        while pid is not None and time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.2)

    def log_tail(self, lines: int = 12) -> str:
        out = []
        for name in ("control.log", "server.log"):
            path = self.root / "log" / name
            if path.is_file():
                out.append(f"{name}: " + " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]))
        return "; ".join(out) or "no MPS log written"


@dataclass
class MpsStatus:
    """Whether MPS applies SM shares here, why (not), and what showed it."""

    works: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def client_env(base: Mapping[str, str], share: int, mps: MpsControl | None) -> dict[str, str]:
    """The environment of a measuring process at `share` percent: through `mps`, or (None) without MPS at 100."""
    env = {k: v for k, v in base.items() if not k.startswith("CUDA_MPS_")}
    if mps is None:
        if share != 100:
            raise ValueError(f"SM share {share}% needs an MPS daemon; without MPS only 100 can be measured")
        return env
    return {**env, **mps.env(), MPS_SHARE_ENV: str(share)}


def run_probe(env: Mapping[str, str], *, timeout_s: float = 120.0, backend: str = "cuda") -> dict[str, Any]:
    """Run `probe` in a fresh process with `env`; its JSON answer, or ProbeError with the process's error."""
    cmd = [sys.executable, "-m", "morphc.predictors.gpu_collect", "probe", "--backend", backend]
    try:
        proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"the probe process did not finish in {timeout_s:.0f} s (share "
                         f"{env.get(MPS_SHARE_ENV, 'unset')}, MPS pipe {env.get('CUDA_MPS_PIPE_DIRECTORY')})") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ProbeError(f"the probe process exited with {proc.returncode}: {tail or 'no output'}")
    return json.loads(lines[-1])


def check_mps(mps: MpsControl, probe: Callable[[dict[str, str]], dict[str, Any]], base_env: Mapping[str, str],
              low_share: int, log: Log = print) -> MpsStatus:
    """Start the daemon and decide from two probe clients (100% and `low_share`) whether MPS applies shares."""
    if mps.executable is None:
        return MpsStatus(False, f"{MPS_CONTROL} is not on PATH (no MPS on this machine)")
    try:
        mps.start()
    except MpsError as exc:
        return MpsStatus(False, f"could not start the MPS control daemon: {exc}")
    log(f"MPS control daemon started (pipe {mps.env()['CUDA_MPS_PIPE_DIRECTORY']}); probing clients at 100% and "
        f"{low_share}%")
    try:
        full = probe(client_env(base_env, 100, mps))
        low = probe(client_env(base_env, low_share, mps))
    except ProbeError as exc:
        return MpsStatus(False, f"an MPS client failed: {exc}; {mps.log_tail()}")
    servers = mps.server_list()
    slowdown = float(low["matmul_ms"]) / max(float(full["matmul_ms"]), 1e-9)
    evidence = {"servers": servers, "sm_count_100": full["sm_count"], f"sm_count_{low_share}": low["sm_count"],
                "matmul_ms_100": full["matmul_ms"], f"matmul_ms_{low_share}": low["matmul_ms"],
                "slowdown": slowdown, "low_share": low_share}
    fewer = int(low["sm_count"]) < int(full["sm_count"])
    if fewer or slowdown >= MIN_SLOWDOWN:
        return MpsStatus(True, f"MPS applies SM shares: at {low_share}% the client sees {low['sm_count']} of "
                               f"{full['sm_count']} SMs and its {full['matmul_n']}^2 fp16 matmul takes {slowdown:.2f}x "
                               f"as long (MPS servers: {servers or 'none listed'})", evidence)
    return MpsStatus(False, f"MPS clients ran but the share had no visible effect ({low['sm_count']} of "
                            f"{full['sm_count']} SMs at {low_share}%, matmul {slowdown:.2f}x; MPS servers: "
                            f"{servers or 'none listed'}): CUDA may have run them without MPS; {mps.log_tail()}",
                     evidence)


# --- what to measure ----------------------------------------------------------------------------


def select_variants(variants: Sequence[Variant], per_family: int,
                    families: Sequence[str] | None = None) -> list[Variant]:
    """The first `per_family` variants of each family, families interleaved (one of each in turn), so
    that any prefix of the list (a budget cut short) covers every family alike."""
    by_family: dict[str, list[Variant]] = {}
    for v in variants:
        if families is None or v.family in families:
            by_family.setdefault(v.family, []).append(v)
    unknown = set(families or ()) - set(by_family)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; valid: {sorted({v.family for v in variants})}")
    groups = [vs[:per_family] for vs in by_family.values()]
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def _init_lowering() -> None:
    import torch

    torch.set_num_threads(1)  # many lowering processes side by side


def _lower_task(task: tuple[Variant | str, tuple[int, ...], str]) -> list[dict[str, Any]]:
    """Lower one variant (a corpus variant's name, in a pool process: builders do not pickle) at each batch
    into the cache; per batch its fingerprint and op graph, or the error."""
    from morphc.predictors.corpus import variant
    from morphc.predictors.dataset import _cache_path, lowered
    from morphc.predictors.features import extract
    from morphc.predictors.records import program_fingerprint

    v = variant(task[0]) if isinstance(task[0], str) else task[0]
    batches, cache_dir = task[1], task[2]
    out = []
    for batch in batches:
        try:
            program = lowered(v, batch, cache_dir)
            out.append({"variant": v.name, "family": v.family, "spec": v.spec, "batch": batch,
                        "fingerprint": program_fingerprint(program), "graph": extract(program).to_json(),
                        "path": str(_cache_path(v, batch, cache_dir))})
        except Exception as exc:  # one variant that does not lower here must not end the collection
            out.append({"variant": v.name, "family": v.family, "batch": batch, "error": _first_line(exc)})
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class Lowering:
    """Lowers variants in a pool of processes in the background (started at construction), so probing
    the GPU overlaps it; `results` stores each finished program's records and returns the jobs."""

    def __init__(self, variants: Sequence[Variant], batches: Sequence[int], cache_dir: str | Path,
                 processes: int) -> None:
        self.order = {v.name: i for i, v in enumerate(variants)}
        self.batches = tuple(batches)
        tasks: list[tuple[Variant | str, tuple[int, ...], str]] = [(v, self.batches, str(cache_dir)) for v in variants]
        self.pool = None
        if processes > 1 and len(tasks) > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
            self.pool = ctx.Pool(min(processes, len(tasks)), initializer=_init_lowering)
            self.results_iter: Iterator[list[dict[str, Any]]] = self.pool.imap_unordered(
                _lower_task, [(v.name, b, c) for v, b, c in tasks])  # type: ignore[union-attr]
        else:
            self.results_iter = map(_lower_task, tasks)
        self.total = len(tasks)

    def results(self, db: RecordsDB, deadline: float, log: Log = print) -> tuple[list[Job], list[dict[str, Any]]]:
        """Wait for the lowered programs until `deadline`; store their corpus and op-graph records."""
        from morphc.predictors.dataset import CORPUS, OPGRAPH, STATIC

        jobs, failures = [], []
        for done in range(self.total):
            try:
                if self.pool is not None:
                    batch = self.results_iter.next(timeout=max(deadline - time.time(), 0.01))  # type: ignore[attr-defined]
                else:
                    if time.time() > deadline:
                        raise multiprocessing.TimeoutError
                    batch = next(self.results_iter)
            except multiprocessing.TimeoutError:
                log(f"lowering: time is up after {done} of {self.total} variants; measuring those")
                break
            for r in batch:
                if "error" in r:
                    failures.append(r)
                    log(f"lowering failed: {r['variant']} b={r['batch']}: {r['error']}")
                    continue
                db.put(OPGRAPH, r["fingerprint"], STATIC, {}, r["graph"])
                db.put(CORPUS, r["variant"], STATIC, {"batch": r["batch"]},
                       {"fingerprint": r["fingerprint"], "family": r["family"], "spec": r["spec"]})
                jobs.append(Job(r["variant"], r["family"], r["batch"], r["fingerprint"], r["path"]))
        self.close()
        jobs.sort(key=lambda j: (self.order.get(j.variant, 0), self.batches.index(j.batch)))
        return jobs, failures

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --- workers --------------------------------------------------------------------------------------


def worker_command(*, db: str | Path, jobs: str | Path, share: int, deadline: float, ops: bool = True,
                   target_s: float = 0.1, backend: str = "cuda", device: str | None = None,
                   repeat: int = 0) -> list[str]:
    """The command line of the worker that measures every job at `share` percent until `deadline` (epoch s);
    `device`: the fingerprint its records get (the CUDA probe's: one fingerprint for the whole collection)."""
    return [sys.executable, "-m", "morphc.predictors.gpu_collect", "worker", "--db", str(db), "--jobs", str(jobs),
            "--share", str(share), "--deadline", f"{deadline:.3f}", "--ops", "1" if ops else "0",
            "--target-s", str(target_s), "--backend", backend, *(["--device", device] if device else []),
            *(["--repeat", str(repeat)] if repeat else [])]


def _wait(proc: Any, timeout: float) -> int | str:
    try:
        return int(proc.wait(timeout=max(timeout, 0.1)))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return "killed at the end of its slice"


def run_workers(shares: Sequence[int], command: Callable[[int, float], list[str]],
                env_for: Callable[[int], dict[str, str]], *, deadline: float,
                launcher: Callable[..., Any] = subprocess.Popen, clock: Callable[[], float] = time.time,
                log: Log = print, restarts: int = 2, min_slice_s: float = MIN_SLICE_S) -> dict[int, dict[str, Any]]:
    """One worker per share, one after the other, each with an equal slice of the time left before
    `deadline`; a worker that exits with RESTART_RC is started again (at most `restarts` times) for
    the rest of its slice. Returns per share how its worker(s) ended."""
    results: dict[int, dict[str, Any]] = {}
    for i, share in enumerate(shares):
        start = clock()
        slice_s = (deadline - start) / (len(shares) - i)
        if slice_s < min_slice_s:
            results[share] = {"status": f"not started: {slice_s:.0f} s left for it (budget spent)"}
            log(f"share {share}%: not started, {slice_s:.0f} s of budget left for it")
            continue
        end = start + slice_s
        log(f"share {share}%: worker started with {slice_s:.0f} s")
        attempts, rc = 0, None
        while True:
            attempts += 1
            proc = launcher(command(share, end), env=env_for(share))
            try:
                rc = _wait(proc, end - clock() + GRACE_S)
            except BaseException:  # SIGTERM (`timeout`) or Ctrl-C in the parent: no orphan left measuring
                _wait(proc, 0.1)
                raise
            if rc == RESTART_RC and attempts <= restarts and end - clock() > min_slice_s / 2:
                log(f"share {share}%: the worker's CUDA context broke; starting it again for the rest of its slice")
                continue
            break
        results[share] = {"rc": rc, "attempts": attempts, "seconds": round(clock() - start, 1)}
    return results


def _poisoned(exc: BaseException) -> bool:
    """Whether an error leaves this process's CUDA context unusable (all later work would fail too)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = str(exc)
    return "CUDA error" in text or type(exc).__name__ == "AcceleratorError" or "CUBLAS_STATUS" in text


def measure_share(db: RecordsDB, jobs: Sequence[Job], share: int, deadline: float, *, backend: Any,
                  device: str, ops: bool = True, target_s: float = 0.1, retries: int = 1,
                  environ: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                  log: Log = print, advance: Callable[[], None] | None = None, repeat: int = 0) -> tuple[int, int]:
    """Measure every job at this process's share (skipping what `db` has) as measurement pass `repeat` (repeat
    passes time the programs again, without per-op profiles: the noise floor); (measured, exit code).
    `advance` is called once per job done, skipped or failed (a progress bar).

    Exit code RESTART_RC when an error left the CUDA context unusable (the caller starts a new process)."""
    from morphc.predictors.gpu_profiler import process_sm_share

    own = process_sm_share(environ)
    if own != share:
        raise ValueError(f"this worker was asked for share {share}% but its {MPS_SHARE_ENV} gives {own}%")
    measured = 0
    for i, job in enumerate(jobs):
        if time.time() > deadline:
            log(f"share {share}%: slice over after {i} of {len(jobs)} programs")
            break
        outcome = _measure_one(db, job, GpuConfig(batch=job.batch, sm_share=share), backend, device,
                               ops=ops and share in GPU_RUNTIME_SHARES and not repeat, target_s=target_s,
                               retries=retries, environ=environ, extra=extra or {}, log=log,
                               where=f"[{i + 1}/{len(jobs)}]", repeat=repeat)
        if advance is not None:
            advance()
        measured += outcome == "measured"
        if outcome == "broken":
            return measured, RESTART_RC
    return measured, 0


def _measure_one(db: RecordsDB, job: Job, config: GpuConfig, backend: Any, device: str, *, ops: bool,
                 target_s: float, retries: int, environ: Mapping[str, str] | None, extra: Mapping[str, Any],
                 log: Log, where: str, repeat: int = 0) -> str:
    """One job at one config into `db` as measurement pass `repeat`: "measured", "skipped" (already there, or
    failed before in any pass), "failed" or "broken" (the error left the CUDA context unusable)."""
    from morphc.predictors.dataset import MAX_SPREAD, OPGRAPH, STATIC, _spread, pass_key
    from morphc.predictors.features import OpGraph
    from morphc.predictors.profiler import LATENCY, OP_LATENCY

    key, share = config.as_record(), config.sm_share
    have = db.get(LATENCY, job.fingerprint, device, pass_key(key, repeat)) is not None and (
        not ops or db.get(OP_LATENCY, job.fingerprint, device, key) is not None)
    if have or db.get(GPU_FAILURE, job.fingerprint, device, key) is not None:
        return "skipped"
    try:
        best, attempts, reshaped, per_op = _measure_job(job, config, backend, target_s=target_s, retries=retries,
                                                        ops=ops, environ=environ)
    except Exception as exc:
        db.put(GPU_FAILURE, job.fingerprint, device, key, {"error": _first_line(exc), "variant": job.variant})
        log(f"share {share}% FAILED {job.variant} b={job.batch}: {_first_line(exc)}")
        return "broken" if _poisoned(exc) else "failed"
    db.put(LATENCY, job.fingerprint, device, pass_key(key, repeat),
           {**asdict(best), "attempts": attempts, "unstable": _spread(best) > MAX_SPREAD, "views_reshaped": reshaped,
            **extra})
    if per_op is not None:
        graph = db.get(OPGRAPH, job.fingerprint, STATIC, {})
        names = OpGraph.from_json(graph.stats).names if graph is not None else ()
        db.put(OP_LATENCY, job.fingerprint, device, key, {"ms": [round(per_op.get(n, 0.0), 5) for n in names]})
    log(f"share {share}% {where} {job.variant} b={job.batch}{f' pass {repeat}' if repeat else ''}: p10 "
        f"{best.p10_ms:.3f} ms, median "
        f"{best.median_ms:.3f} ms ({best.runs} runs{', per-op' if per_op is not None else ''}"
        f"{f', {reshaped} views as reshape' if reshaped else ''})")
    return "measured"


def _measure_job(job: Job, config: GpuConfig, backend: Any, *, target_s: float, retries: int, ops: bool,
                 environ: Mapping[str, str] | None) -> tuple[Any, int, int, dict[str, float] | None]:
    """(best end-to-end stats, attempts, views made reshapes, per-op ms or None) of one cached program:
    measured again (up to `retries` times) while its p90/p10 spread is too wide, the narrowest kept."""
    import torch

    from morphc.ir.serialization import load
    from morphc.predictors.dataset import MAX_SPREAD, _spread
    from morphc.predictors.gpu_profiler import measure_gpu, profile_ops_gpu, to_device

    program, reshaped = to_device(load(job.path, metadata=False), backend)
    best, attempts = None, 0
    with torch.no_grad():
        for attempts in range(1, retries + 2):  # noqa: B007
            stats = measure_gpu(lambda: program(*program.example_inputs), backend, target_s=target_s)
            if best is None or _spread(stats) < _spread(best):
                best = stats
            if _spread(best) <= MAX_SPREAD:
                break
    per_op = profile_ops_gpu(program, config, backend, environ=environ) if ops else None
    return best, attempts, reshaped, per_op


# --- the whole collection ------------------------------------------------------------------------


@dataclass
class CollectionSettings:
    """What `collect_gpu_profile` measures and within which budget."""

    db: Path
    variants: Sequence[Variant]
    batches: Sequence[int] = (1, 8, 32)
    shares: Sequence[int] = (100, 50, 20)
    budget_s: float = 360.0
    cache_dir: Path = Path("/tmp/morphc-gpu-cache")
    work_dir: Path = Path("/tmp/morphc-gpu-work")
    processes: int = 8
    lowering_share: float = 0.35  # lowering may take at most this share of the budget
    target_s: float = 0.1
    ops: bool = True
    repeat: int = 0  # measurement pass: 1, 2, ... time programs measured before again (the noise floor)
    backend: str = "cuda"  # "host": dry run of every step on the CPU (no GPU, no MPS)
    summary: Path | None = None  # JSON of what happened (default: next to the db)


def _counts(db: RecordsDB, device: str | None) -> dict[str, Any]:
    from morphc.predictors.profiler import LATENCY, OP_LATENCY

    out: dict[str, Any] = {}
    for kind in (LATENCY, OP_LATENCY, GPU_FAILURE):
        rows = db.conn.execute("SELECT config FROM records WHERE kind=? AND device=?", (kind, device)).fetchall()
        per: dict[str, int] = {}
        for (config,) in rows:
            share = str(json.loads(config).get("sm_share"))
            per[share] = per.get(share, 0) + 1
        out[kind] = dict(sorted(per.items(), key=lambda kv: -int(kv[0]) if kv[0].isdigit() else 0))
    return out


def collect_gpu_profile(settings: CollectionSettings, log: Log = print, *,
                        probe: Callable[..., dict[str, Any]] | None = None, launcher: Callable[..., Any] | None = None,
                        mps_control: MpsControl | None = None) -> dict[str, Any]:
    """Lower, probe CUDA and MPS, measure one worker per share; the summary (also written as JSON).

    Stops starting work at `budget_s` after its start; what was measured stays in the database.
    `probe` (run_probe), `launcher` (subprocess.Popen) and `mps_control` stand in for the processes in tests."""
    probe = probe or run_probe
    launcher = launcher or subprocess.Popen
    t0 = time.time()
    deadline = t0 + settings.budget_s
    s = settings
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "db": str(s.db), "backend": s.backend,
                               "batches": list(s.batches), "shares_asked": list(s.shares), "pass": s.repeat,
                               "variants": len(s.variants), "budget_s": s.budget_s, "time_quota": 1.0,
                               "time_quota_note": "FaST-GShare's time quota is not applied (no such scheduler): every "
                                                  "record is at time_quota=1.0"}
    summary_path = s.summary or s.db.with_suffix(".json")
    s.work_dir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: clean up
    db = RecordsDB(s.db)
    mps: MpsControl | None = None
    lowering: Lowering | None = None
    phases: dict[str, float] = {}
    summary["phases_s"] = phases
    try:
        lowering = Lowering(s.variants, s.batches, s.cache_dir, s.processes)
        log(f"lowering {len(s.variants)} variants x batches {list(s.batches)} in {s.processes} processes "
            f"(cache {s.cache_dir})")
        try:
            cuda = probe(client_env(os.environ, 100, None), backend=s.backend)
        except ProbeError as exc:
            summary["error"] = f"CUDA does not work here: {exc}"
            log(summary["error"])
            return summary
        summary["device"], summary["probe_no_mps"] = cuda["device"], cuda
        log(f"CUDA: {cuda['name']}, {cuda['sm_count']} SMs; device {cuda['device']}")
        phases["cuda_probe"] = round(time.time() - t0, 1)
        shares = sorted(set(s.shares), reverse=True)
        if any(x != 100 for x in shares):
            mps = mps_control or MpsControl(s.work_dir / "mps")
            # a client that cannot reach a broken MPS server may hang: a shorter limit than the first CUDA probe's
            status = check_mps(mps, lambda env: probe(env, backend=s.backend, timeout_s=60.0), os.environ,
                               min(shares), log)
            if not status.works:
                mps.quit()
                mps = None
                shares = [100]
        else:
            status = MpsStatus(False, "only share 100 was asked for: MPS not started")
        summary["mps"] = asdict(status)
        summary["shares_measured"] = shares
        log(("MPS WORKS: " if status.works else "MPS NOT USED: ") + status.reason)
        if not status.works:
            log("=> measuring SM share 100 only, without MPS")
        phases["mps_probe"] = round(time.time() - t0, 1)
        jobs, failures = lowering.results(db, min(t0 + s.lowering_share * s.budget_s, deadline), log)
        summary["lowered"], summary["lowering_failures"] = len(jobs), failures
        phases["lowering"] = round(time.time() - t0, 1)
        log(f"{len(jobs)} programs lowered ({len(failures)} failed) after {time.time() - t0:.0f} s")
        jobs_file = s.work_dir / "jobs.json"
        jobs_file.write_text(json.dumps([asdict(j) for j in jobs]))
        summary["workers"] = run_workers(
            shares, lambda share, end: worker_command(db=s.db, jobs=jobs_file, share=share, deadline=end, ops=s.ops,
                                                      target_s=s.target_s, backend=s.backend, repeat=s.repeat,
                                                      device=summary["device"]),
            lambda share: client_env(os.environ, share, mps), deadline=deadline, launcher=launcher, log=log)
        phases["measuring"] = round(time.time() - t0, 1)
    finally:
        if lowering is not None:
            lowering.close()
        if mps is not None:
            mps.quit()
        summary["records"] = _counts(db, summary.get("device"))
        summary["wall_s"] = round(time.time() - t0, 1)
        with contextlib.suppress(Exception):  # fold the WAL into the file: one file to carry away
            db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.conn.execute("PRAGMA journal_mode=DELETE")
        db.close()
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
        signal.signal(signal.SIGTERM, previous)
    log(f"records per share: {summary['records']}; summary in {summary_path}")
    return summary


# --- subprocess entry points --------------------------------------------------------------------


def _backend(name: str) -> Any:
    from morphc.predictors.gpu_profiler import CudaBackend, HostBackend

    if name == "cuda":
        return CudaBackend()
    if name == "host":
        return HostBackend()
    raise ValueError(f"unknown backend {name!r}; valid: 'cuda', 'host' (dry runs on the CPU)")


def _device(name: str) -> str:
    from morphc.predictors.gpu_profiler import DRY_RUN_DEVICE
    from morphc.predictors.records import device_fingerprint

    return device_fingerprint("cuda") if name == "cuda" else f"{DRY_RUN_DEVICE}|{device_fingerprint('cpu')}"


def _probe_host() -> dict[str, Any]:
    """The probe's answer on the host backend: no GPU, so no share can show (MPS is never taken as working)."""
    from morphc.predictors.gpu_profiler import process_sm_share

    return {"device": _device("host"), "name": "host (dry run)", "sm_count": 0, "matmul_ms": 1.0, "matmul_n": 0,
            "share_env": os.environ.get(MPS_SHARE_ENV), "share": process_sm_share()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m morphc.predictors.gpu_collect",
                                     description="subprocess entry points of the GPU profile collection")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="print what this process sees of the GPU (JSON)")
    p.add_argument("--backend", default="cuda", choices=("cuda", "host"))
    w = sub.add_parser("worker", help="measure the jobs at this process's SM share")
    w.add_argument("--db", required=True)
    w.add_argument("--jobs", required=True, help="JSON list of jobs")
    w.add_argument("--share", type=int, required=True)
    w.add_argument("--deadline", type=float, required=True, help="stop starting programs after this epoch time")
    w.add_argument("--ops", type=int, default=1)
    w.add_argument("--repeat", type=int, default=0, help="measurement pass (0: the first)")
    w.add_argument("--target-s", type=float, default=0.1)
    w.add_argument("--backend", default="cuda", choices=("cuda", "host"))
    w.add_argument("--device", default=None, help="device fingerprint for the records (default: this process's)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed at the end of a slice: close the DB cleanly
    if args.cmd == "probe":
        if args.backend == "host":
            info = _probe_host()
        else:
            from morphc.predictors.gpu_profiler import probe

            info = probe()
        print(json.dumps(info), flush=True)
        return 0
    import torch

    torch.set_grad_enabled(False)
    backend = _backend(args.backend)
    device = args.device or _device(args.backend)
    extra: dict[str, Any] = {"mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    if args.backend == "cuda":
        extra["visible_sms"] = torch.cuda.get_device_properties(0).multi_processor_count
        if torch.cuda.get_device_name() not in device:
            raise SystemExit(f"this worker's GPU ({torch.cuda.get_device_name()}) is not the probed one ({device})")
    jobs = [Job(**j) for j in json.loads(Path(args.jobs).read_text())]
    db = RecordsDB(args.db)
    print(f"share {args.share}% worker: {len(jobs)} programs, device {device}, {extra}", flush=True)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()  # a live bar on a terminal; one plain line per program in a log (tee)
    columns = (TextColumn(f"share {args.share}%"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as progress:
            task = progress.add_task("measuring", total=len(jobs))
            log = (lambda m: progress.console.print(m, markup=False, highlight=False, soft_wrap=True)) \
                if console.is_terminal else (lambda m: print(m, flush=True))
            measured, rc = measure_share(db, jobs, args.share, args.deadline, backend=backend, device=device,
                                         ops=bool(args.ops), target_s=args.target_s, extra=extra, log=log,
                                         advance=lambda: progress.advance(task), repeat=args.repeat)
    finally:
        db.close()
    print(f"share {args.share}% worker: measured {measured} programs now", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
