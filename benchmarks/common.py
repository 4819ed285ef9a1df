"""Shared helpers for the benchmarks: thread setup, side-by-side timing, machine info, result files.

Timing follows what the project measured about its machines (shared/FACTS.md): 2 shared cores are
noisy, so the thread count is set deliberately, each variant is warmed up, the variants are timed
*interleaved* (one call of each per round, so drift hits all of them alike) and the median of many
rounds is reported; ratios always come from one such side-by-side run in one process.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op thread count (default: every core this process may use)."""
    n = n or available_cores()
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average: other processes on these shared cores skew timings, so it is recorded."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min": load_average(),
        **({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}),
    }


def command_line() -> str:
    """The exact command that produced the results (relative to the repository root)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(variants: Mapping[str, Callable[[], Any]], *, warmup: int = 5, min_rounds: int = 10,
                 max_rounds: int = 300, budget_s: float = 4.0) -> dict[str, dict[str, float]]:
    """Time the variants interleaved; per variant: median/p10/p90 in ms and the rounds run.

    The number of rounds fits `budget_s` (after warm-up), clamped to [min_rounds, max_rounds].
    """
    per_round = 0.0
    for fn in variants.values():
        for _ in range(warmup):
            fn()
        per_round += time_once(fn)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(time_once(fn))
    out = {}
    for name, xs in samples.items():
        xs_ms = sorted(x * 1e3 for x in xs)
        out[name] = {
            "median_ms": statistics.median(xs_ms),
            "p10_ms": xs_ms[int(0.1 * (len(xs_ms) - 1))],
            "p90_ms": xs_ms[int(0.9 * (len(xs_ms) - 1))],
            "rounds": len(xs_ms),
        }
    return out


def max_abs_error(a: Any, b: Any) -> float:
    """Largest |a - b| over matching tensors of two (nested) outputs."""
    fa, _ = torch.utils._pytree.tree_flatten(a)
    fb, _ = torch.utils._pytree.tree_flatten(b)
    if len(fa) != len(fb):
        return float("inf")
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(fa, fb) if x.numel()), default=0.0)


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, *, title: str, results: Any, body_md: str, settings: Mapping[str, Any],
                  load_at_start: float | None = None) -> Path:
    """Write results/<name>.json (raw numbers) and results/<name>.md (tables), with how they were made."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["load_average_1min_at_start"] = load_at_start
    command = command_line()
    payload = {"name": name, "command": command, "machine": info, "settings": dict(settings), "results": results}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    machine = (f"{info['cpu']}, {info['cores_available']} cores available, torch {info['torch']}, "
               f"{info['torch_threads']} torch threads, Python {info['python']}"
               + (f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""))
    settings_md = ", ".join(f"{k}={v}" for k, v in settings.items())
    md = (f"# {title}\n\n"
          f"- command: `{command}`\n- machine: {machine}\n- date: {info['date']}\n- settings: {settings_md}\n"
          f"- 1-minute load average at start / end: {load_at_start} / {info['load_average_1min']} "
          "(other processes on the cores skew timings)\n\n"
          f"{body_md.rstrip()}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(md)
    return path
