"""The records database: every profiling measurement, tuning trial and search state, in SQLite.

One row per (kind, model fingerprint, device fingerprint, config): writing the same key again
replaces it, reading it back lets a killed collection resume where it stopped. Each record is
committed as soon as it is written (WAL journal), so nothing measured is lost with the process.
The schema is versioned; a database from another version, or a file that is not one, is refused
with a message instead of being misread.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from morphc.errors import MorphcError
from morphc.ir.printer import print_program
from morphc.ir.program import Program

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    device TEXT NOT NULL,
    config TEXT NOT NULL,
    stats TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (kind, model, device, config)
);
CREATE INDEX IF NOT EXISTS records_by_model ON records (kind, model, device);
"""


class RecordsError(MorphcError):
    """The records database is corrupt, from another schema version, or not a database."""


@dataclass(frozen=True)
class Record:
    kind: str
    model: str
    device: str
    config: dict[str, Any]
    stats: dict[str, Any]
    created: float


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"))


def program_fingerprint(program: Program) -> str:
    """Identifies what a latency depends on: operators, shapes, dtypes and structure (not weight values)."""
    text = print_program(program)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("@")]  # annotations do not run
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=12).hexdigest()


def _nvidia_driver() -> str:
    """The NVIDIA kernel driver's version (from /proc, else nvidia-smi), or "?" where neither answers."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
        version = next((w for w in words if w[:1].isdigit() and "." in w), None)
        if version:
            return version
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.split()
        return out[0] if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def device_fingerprint(device: str = "cpu") -> str:
    """The machine a measurement describes: CPU model, cores, torch build; on cuda also the GPU's name,
    the CUDA runtime torch was built with and the driver version (not its SM count: under MPS that
    follows the process's share, which is part of the config, not of the machine).

    On cuda this initialises CUDA in the calling process: call it in the process that measures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [device, cpu, f"cores={os.cpu_count()}", f"torch={torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(), f"cuda={torch.version.cuda}", f"driver={_nvidia_driver()}"]
    return "|".join(parts)


class RecordsDB:
    """SQLite store of measurements; `RecordsDB(":memory:")` for a throwaway one."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self._check_or_create_schema()
        except sqlite3.DatabaseError as exc:
            raise RecordsError(f"'{self.path}' is not a usable morphc records database: {exc}") from exc

    def _check_or_create_schema(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise RecordsError(f"'{self.path}' is an SQLite database but not a morphc records database "
                               f"(tables: {sorted(tables)})")
        self.conn.executescript(_SCHEMA)
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with self.conn:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise RecordsError(f"'{self.path}' uses records schema version {row[0]}; this morphc reads version "
                               f"{SCHEMA_VERSION} (use another file, or migrate it)")

    def put(self, kind: str, model: str, device: str, config: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        """Store (or replace) one record and commit it at once."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO records (kind, model, device, config, stats, created) VALUES (?,?,?,?,?,?)",
                (kind, model, device, _canonical(config), json.dumps(dict(stats)), time.time()))

    def get(self, kind: str, model: str, device: str, config: Mapping[str, Any]) -> Record | None:
        row = self.conn.execute(
            "SELECT kind, model, device, config, stats, created FROM records "
            "WHERE kind=? AND model=? AND device=? AND config=?", (kind, model, device, _canonical(config))).fetchone()
        return self._record(row) if row else None

    def query(self, kind: str | None = None, model: str | None = None, device: str | None = None) -> Iterator[Record]:
        """Records matching the given fields, oldest first."""
        where, args = [], []
        for column, value in (("kind", kind), ("model", model), ("device", device)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        sql = "SELECT kind, model, device, config, stats, created FROM records"
        sql += f" WHERE {' AND '.join(where)}" if where else ""
        for row in self.conn.execute(sql + " ORDER BY id", args):
            yield self._record(row)

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def _record(self, row: tuple) -> Record:
        kind, model, device, config, stats, created = row
        try:
            return Record(kind, model, device, json.loads(config), json.loads(stats), created)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"record ({kind}, {model}) in '{self.path}' is corrupt: {exc}") from exc

    def close(self) -> None:
        self.conn.close()
