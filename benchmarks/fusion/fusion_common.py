"""Helpers shared by the fusion suites: deterministic training of originals with a cache, the timing
lock, latency of the N models vs the fused model side by side, and the search's latency function.

(Named fusion_common, not common: the suites put benchmarks/ on sys.path to import benchmarks/common.py,
and two modules named `common` would shadow each other.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphc.predictors.timing_lock import timing_lock as morphc_timing_lock

CACHE_DIR = Path(__file__).resolve().parent / "cache"  # gitignored; the suites retrain what is missing


def timing_lock(enabled: bool = True, log: Callable[[str], None] = print) -> contextlib.AbstractContextManager:
    """Hold the machine-wide timing lock (other timings and training wait meanwhile)."""
    return morphc_timing_lock(enabled=enabled, log=log)


def cache_key(config: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(dict(config), sort_keys=True).encode(), digest_size=8).hexdigest()


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: float, batch: int, lr: float,
                     seed: int, log: Callable[[str], None] = print, name: str = "") -> dict[str, float]:
    """Adam + cosine schedule + cross entropy, deterministic for a seed; returns training statistics."""
    g = torch.Generator().manual_seed(seed)
    steps = int(epochs * len(x) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    perm = torch.randperm(len(x), generator=g)
    pos = 0
    for step in range(steps):
        if pos + batch > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"    {name} step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start}


def cached_classifier(name: str, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                      config: Mapping[str, Any], log: Callable[[str], None] = print,
                      lock: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from the cache, or trained now (under the timing lock) and cached."""
    path = CACHE_DIR / f"{name}-{cache_key(config)}.pt"
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, {"cached": True}
    log(f"  training {name} ({config})")
    with timing_lock(lock, log):
        stats = train_classifier(model, x, y, name=name, log=log, **{k: config[k] for k in
                                                                     ("epochs", "batch", "lr", "seed")})
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, {"cached": False, **stats}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def profiler_latency(repeats: int = 20) -> Callable[[Any], float]:
    """The search's latency function: morphc's profiler (median of eager calls, 1 thread), in seconds."""
    from morphc.predictors.profiler import CpuConfig, profile_program

    return lambda program: profile_program(program, CpuConfig(threads=1), repeats=repeats).median_ms / 1e3


def latency_rows(models: Mapping[str, nn.Module], lower_at: Callable[[int], Any], fused_at: Callable[[Any], Any],
                 batches: tuple[int, ...], targets: tuple[str, ...], budget_s: float,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per (target, batch): the N models one after another (eager torch), the N-task Program and the fused
    Program compiled for the target, timed interleaved in one process (medians), with their errors."""
    import common  # benchmarks/common.py

    from morphc.runtime import compile_program

    rows = []
    for batch in batches:
        program = lower_at(batch)
        fused = fused_at(program)
        inputs = program.example_inputs
        for target in targets:
            exe, fexe = compile_program(program, target), compile_program(fused, target)
            variants = {"separate": lambda inputs=inputs: [m(*inputs) for m in models.values()],
                        "n-task program": lambda exe=exe, inputs=inputs: exe(*inputs),
                        "fused": lambda fexe=fexe, inputs=inputs: fexe(*inputs)}
            with torch.no_grad():
                t = common.side_by_side(variants, budget_s=budget_s)
            row = {"target": target, "batch": batch, "timings": t,
                   "speedup_vs_separate": t["separate"]["median_ms"] / t["fused"]["median_ms"],
                   "speedup_vs_program": t["n-task program"]["median_ms"] / t["fused"]["median_ms"],
                   "nodes": [len(program.graph.nodes), len(fused.graph.nodes)],
                   "params_mb": [program.param_bytes() / 1e6, fused.param_bytes() / 1e6],
                   "load_1min": common.load_average()}
            log(f"  {target} batch {batch}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in t.items())
                + f" -> {row['speedup_vs_separate']:.2f}x vs separate")
            rows.append(row)
    return rows


LATENCY_HEADER = ["target", "batch", "N models separate (ms)", "N-task Program (ms)", "fused (ms)",
                  "speed-up vs separate", "speed-up vs N-task Program", "nodes", "params MB", "load"]


def latency_md_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        t = r["timings"]
        out.append([r["target"], r["batch"], f"{t['separate']['median_ms']:.3f}",
                    f"{t['n-task program']['median_ms']:.3f}", f"{t['fused']['median_ms']:.3f}",
                    f"{r['speedup_vs_separate']:.2f}x", f"{r['speedup_vs_program']:.2f}x",
                    f"{r['nodes'][0]}→{r['nodes'][1]}", f"{r['params_mb'][0]:.2f}→{r['params_mb'][1]:.2f}",
                    f"{r['load_1min']:.1f}"])
    return out
