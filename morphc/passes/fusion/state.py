"""Search state in SQLite: every evaluated candidate (and every latency measured), committed at once,
so a killed search resumes without re-training or re-measuring anything it finished.

Rows are keyed by a search key (the original program, the data and the options that change results)
and the candidate's structure digest. The table lives in its own file (`state=` option), or beside
the records database the caller put in `PassContext.records` (same SQLite file, own tables); with
neither it is in memory. Trained weights are stored as a safetensors blob.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from morphc.errors import MorphcError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fusion_candidates (
    search TEXT NOT NULL, key TEXT NOT NULL, history TEXT NOT NULL, status TEXT NOT NULL,
    latency REAL, stats TEXT NOT NULL, weights BLOB, created REAL NOT NULL,
    PRIMARY KEY (search, key)
);
CREATE TABLE IF NOT EXISTS fusion_latency (
    search TEXT NOT NULL, key TEXT NOT NULL, latency REAL NOT NULL, PRIMARY KEY (search, key)
);
"""


class SearchStateError(MorphcError):
    """The search-state database cannot be opened or holds rows it cannot read."""


@dataclass
class StoredCandidate:
    key: str
    history: tuple[str, ...]
    status: str  # "trained" (the stats say whether it met the bound)
    latency: float | None
    stats: dict[str, Any]
    weights: dict[str, torch.Tensor]


class SearchState:
    """Candidates and latencies of fusion searches; `SearchState(None)` keeps them in memory."""

    def __init__(self, where: str | Path | sqlite3.Connection | None) -> None:
        try:
            if isinstance(where, sqlite3.Connection):
                self.conn, self.path = where, "<connection>"
            else:
                self.path = ":memory:" if where is None else str(where)
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path)
                self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise SearchStateError(f"cannot use '{where}' as fusion search state: {exc}") from exc

    @classmethod
    def from_context(cls, state: str, records: Any) -> SearchState:
        """The `state=` path if given, else the records database's file (or connection), else memory."""
        if state:
            return cls(state)
        if isinstance(records, (str, Path)):
            return cls(records)
        path = getattr(records, "path", None)
        if path and path != ":memory:":
            return cls(path)
        conn = getattr(records, "conn", None)
        if isinstance(conn, sqlite3.Connection):
            return cls(conn)
        return cls(None)

    def put(self, search: str, key: str, history: tuple[str, ...], status: str, latency: float | None,
            stats: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        blob = st_save({k: v.contiguous() for k, v in weights.items()}) if weights else None
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO fusion_candidates VALUES (?,?,?,?,?,?,?,?)",
                (search, key, json.dumps(list(history)), status, latency, json.dumps(stats), blob, time.time()))

    def get(self, search: str, key: str) -> StoredCandidate | None:
        row = self.conn.execute("SELECT key, history, status, latency, stats, weights FROM fusion_candidates "
                                "WHERE search=? AND key=?", (search, key)).fetchone()
        if row is None:
            return None
        try:
            return StoredCandidate(row[0], tuple(json.loads(row[1])), row[2], row[3], json.loads(row[4]),
                                   st_load(row[5]) if row[5] else {})
        except (json.JSONDecodeError, ValueError) as exc:
            raise SearchStateError(f"candidate {key} of search {search} in '{self.path}' is corrupt: {exc}") from exc

    def count(self, search: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM fusion_candidates WHERE search=?", (search,)).fetchone()[0])

    def put_latency(self, search: str, key: str, latency: float) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO fusion_latency VALUES (?,?,?)", (search, key, latency))

    def get_latency(self, search: str, key: str) -> float | None:
        row = self.conn.execute("SELECT latency FROM fusion_latency WHERE search=? AND key=?", (search, key)).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        if self.path != "<connection>":
            self.conn.close()
