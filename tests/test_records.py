"""Records database and profiler: round trips, resumable collection, clear errors on bad files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import morphc
from morphc.predictors.profiler import LATENCY, CpuConfig, collect, measure, profile_program
from morphc.predictors.records import (
    SCHEMA_VERSION,
    RecordsDB,
    RecordsError,
    device_fingerprint,
    program_fingerprint,
)


def _program(width: int = 8, seed: int = 0) -> morphc.Program:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)).eval()
    return morphc.lower(model, torch.randn(2, 4))


def test_put_get_query_round_trip(tmp_path: Path) -> None:
    db = RecordsDB(tmp_path / "r.sqlite")
    db.put(LATENCY, "m1", "cpu|x", {"threads": 1, "batch": 8}, {"median_ms": 1.5})
    db.put(LATENCY, "m1", "cpu|x", {"batch": 8, "threads": 2}, {"median_ms": 0.9})
    db.put(LATENCY, "m1", "cpu|x", {"threads": 1, "batch": 8}, {"median_ms": 1.4})  # replaces the first
    assert len(db) == 2
    assert db.get(LATENCY, "m1", "cpu|x", {"batch": 8, "threads": 1}).stats == {"median_ms": 1.4}
    assert db.get(LATENCY, "m2", "cpu|x", {"threads": 1, "batch": 8}) is None
    assert [r.config["threads"] for r in db.query(kind=LATENCY, model="m1")] == [2, 1]
    db.close()
    again = RecordsDB(tmp_path / "r.sqlite")  # persisted
    assert len(again) == 2


def test_fingerprints_follow_structure_not_weights() -> None:
    assert program_fingerprint(_program(seed=0)) == program_fingerprint(_program(seed=1))
    assert program_fingerprint(_program(width=8)) != program_fingerprint(_program(width=16))
    assert device_fingerprint().startswith("cpu|")


def test_measure_reports_median_and_outliers() -> None:
    calls = iter([0.0] * 3 + [0.001] * 9 + [0.05])
    stats = measure(lambda: __import__("time").sleep(next(calls)), warmup=3, repeats=10)
    assert stats.runs == 10 and stats.outliers >= 1
    assert 0.5 < stats.median_ms < 20 and stats.p90_ms >= stats.median_ms >= stats.p10_ms


class _FreshMemory(nn.Module):
    """Allocates 64 MB twice per call: above glibc's largest mmap threshold, so it is mapped, faulted in and
    handed back every call, whatever the heap did before (huge pages would only make the faults fewer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.zeros(16 * 1024 * 1024) + x).sum()


def test_measurements_count_the_page_faults_of_each_call() -> None:
    """A program that maps fresh memory every call is seen to fault (the cause of some small CNNs' slowdown at
    large batch, docs/cost_model.md session 19); one that allocates little is not."""
    from morphc.predictors.profiler import profile_interleaved

    configs = [CpuConfig(threads=1), CpuConfig(threads=2)]
    fresh = morphc.lower(_FreshMemory().eval(), torch.randn(1))
    faulting = profile_interleaved(fresh, configs, warmup=1, per_round=1, min_runs=2, max_runs=2)
    quiet = profile_interleaved(_program(), configs, warmup=2, min_runs=20, max_runs=20)
    assert all(s.page_faults is not None and s.page_faults >= 16 for s in faulting)
    assert all(s.page_faults is not None and s.page_faults < 16 for s in quiet)
    stats = measure(lambda: fresh(*fresh.example_inputs), warmup=1, repeats=2)
    assert stats.page_faults is not None and stats.page_faults >= 16
    assert measure(lambda: None, warmup=1, repeats=20).page_faults < 16


def test_profile_applies_threads_and_restores_them() -> None:
    program = _program()
    seen: list[int] = []
    original = program.graph_module.forward

    def spy(*args: torch.Tensor) -> object:
        seen.append(torch.get_num_threads())
        return original(*args)

    program.graph_module.forward = spy  # type: ignore[method-assign]
    before = torch.get_num_threads()
    stats = profile_program(program, CpuConfig(threads=1), warmup=1, repeats=3)
    assert set(seen) == {1} and len(seen) == 4 and stats.runs == 3
    assert torch.get_num_threads() == before


def test_collection_resumes_without_remeasuring(tmp_path: Path) -> None:
    db = RecordsDB(tmp_path / "r.sqlite")
    programs = [_program(width=w) for w in (4, 8, 16)]
    configs = [CpuConfig(threads=1), CpuConfig(threads=2)]
    seen: list[tuple[int, int]] = []

    def stop_after_two(program: morphc.Program, config: CpuConfig, stats: object) -> None:
        seen.append((id(program), config.threads))
        if len(seen) == 2:
            raise KeyboardInterrupt  # the user kills the collection

    with pytest.raises(KeyboardInterrupt):
        collect(programs, configs, db, warmup=0, repeats=2, show_progress=False, on_record=stop_after_two)
    assert len(db) == 2  # both finished measurements were committed
    measured = collect(programs, configs, db, warmup=0, repeats=2, show_progress=False)
    assert measured == 4 and len(db) == 6
    assert collect(programs, configs, db, warmup=0, repeats=2, show_progress=False) == 0


def test_records_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    script = (
        "import os, morphc\n"
        "from morphc.predictors.records import RecordsDB\n"
        f"db = RecordsDB({str(path)!r})\n"
        "for i in range(3):\n"
        "    db.put('latency', f'm{i}', 'cpu', {'threads': 1}, {'median_ms': i})\n"
        "os._exit(9)  # no close, no clean shutdown\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    assert len(RecordsDB(path)) == 3


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    RecordsDB(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(RecordsError, match=f"schema version 999; this morphc reads version {SCHEMA_VERSION}"):
        RecordsDB(path)


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(RecordsError, match=r"not a morphc records database \(tables: \['users'\]\)"):
        RecordsDB(path)


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RecordsError, match="is not a usable morphc records database"):
        RecordsDB(path)


def test_corrupt_record_is_refused(tmp_path: Path) -> None:
    db = RecordsDB(tmp_path / "r.sqlite")
    db.put(LATENCY, "m", "cpu", {"threads": 1}, {"median_ms": 1.0})
    with db.conn:
        db.conn.execute("UPDATE records SET stats='{not json'")
    with pytest.raises(RecordsError, match=r"record \(latency, m\) .* is corrupt"):
        db.get(LATENCY, "m", "cpu", {"threads": 1})


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        CpuConfig(threads=0)
