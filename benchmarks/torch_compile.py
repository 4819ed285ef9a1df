"""Eager vs torch.compile(backend="inductor") vs torch.compile(backend="morphc") on zoo models.

For each model and batch size: compile time (wall time of the first call: Dynamo tracing plus the
backend, plus that first run) and per-call latency of the three, timed side by side in this
process, with speedups over eager. morphc runs its default pipeline
(canonicalize,fold-batchnorm,fold-constants,cse,dce) and the eager target, so its latency shows
the cost or gain of running the optimized ATen graph.

    python benchmarks/torch_compile.py                  # the zoo's small models
    python benchmarks/torch_compile.py --base           # resnet50, bert-base, mobilenet_v2-imagenet, minilm

Inductor's cache goes to a fresh temporary directory (no compiled code from earlier runs), and one
untimed warm-up compile per backend takes one-time costs (e.g. C++ header precompilation) out of
the first model's number. A backend that fails on a model is recorded, not fatal.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

_CACHE = tempfile.mkdtemp(prefix="morphc-bench-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE  # before torch reads it

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from morphc import zoo  # noqa: E402
from morphc.passes import PassTiming  # noqa: E402
from morphc.runtime.dynamo import DEFAULT_PIPELINE, MorphcBackendWarning  # noqa: E402

BASE_MODELS = ["resnet50", "bert-base", "mobilenet_v2-imagenet", "minilm"]
BACKENDS = ("inductor", "morphc")


def warm_up_backends() -> None:
    """Compile a trivial function once per backend, untimed, so one-time setup is not charged to a model."""
    for backend in BACKENDS:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.relu(x @ x) + 1, backend=backend, dynamic=False)
        with torch.no_grad():
            fn(torch.randn(8, 8))
    torch._dynamo.reset()


def compile_backend(backend: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                    expected: Any) -> dict[str, Any]:
    """Compile and run once; returns the callable, compile seconds, error vs eager, notes."""
    timing = PassTiming()
    options = {"instruments": [timing]} if backend == "morphc" else None
    compiled = torch.compile(model, backend=backend, dynamic=False, options=options)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", MorphcBackendWarning)
            start = time.perf_counter()
            out = compiled(*inputs)
            seconds = time.perf_counter() - start
    except Exception as exc:  # record the failure, keep benchmarking the rest
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"ok": False, "error": f"{type(exc).__name__}: {first}"[:300]}
    result: dict[str, Any] = {"ok": True, "fn": compiled, "compile_s": seconds,
                              "max_abs_error": common.max_abs_error(out, expected)}
    fallbacks = [str(w.message)[:300] for w in caught if issubclass(w.category, MorphcBackendWarning)]
    if backend == "morphc":
        compiles = [r for r in timing.records if r.pass_text.startswith("compile")]
        firsts = [r for r in timing.records if r.pass_text == timing.records[0].pass_text]
        result.update(graphs=len(compiles), fallbacks=fallbacks,
                      nodes_before=sum(r.nodes_before for r in firsts),
                      nodes_after=sum(r.nodes_after for r in compiles),
                      pass_ms=1e3 * timing.total_seconds())
    return result


def bench_model(name: str, batch: int, budget_s: float) -> dict[str, Any]:
    torch._dynamo.reset()
    m = zoo.build(name, batch_size=batch)
    model, inputs = m.model, m.example_inputs
    with torch.no_grad():
        expected = model(*inputs)
    row: dict[str, Any] = {"model": name, "batch": batch}
    variants = {"eager": lambda: model(*inputs)}
    for backend in BACKENDS:
        res = compile_backend(backend, model, inputs, expected)
        fn = res.pop("fn", None)
        row[backend] = res
        if fn is not None:
            variants[backend] = lambda fn=fn: fn(*inputs)
    with torch.no_grad():
        timings = common.side_by_side(variants, budget_s=budget_s)
    row["eager"] = timings["eager"]
    for backend in BACKENDS:
        if backend in timings:
            row[backend].update(timings[backend])
            row[backend]["speedup"] = timings["eager"]["median_ms"] / timings[backend]["median_ms"]
    row["load_1min"] = common.load_average()
    return row


def report(rows: list[dict[str, Any]]) -> str:
    header = ["model", "batch", "eager ms", "inductor ms", "morphc ms", "inductor speedup", "morphc speedup",
              "inductor compile s", "morphc compile s", "morphc graphs", "morphc nodes", "max err (ind / morphc)",
              "load"]
    table = []
    notes = []
    for r in rows:
        ind, mc = r["inductor"], r["morphc"]

        def get(res: dict[str, Any], key: str, digits: int = 2) -> str:
            return common.fmt(res.get(key), digits) if res.get("ok") else "failed"

        nodes = f"{mc['nodes_before']}→{mc['nodes_after']}" if mc.get("ok") else "—"
        errs = " / ".join(f"{res['max_abs_error']:.1e}" if res.get("ok") else "—" for res in (ind, mc))
        table.append([r["model"], r["batch"], common.fmt(r["eager"]["median_ms"], 3), get(ind, "median_ms", 3),
                      get(mc, "median_ms", 3), get(ind, "speedup"), get(mc, "speedup"), get(ind, "compile_s", 1),
                      get(mc, "compile_s", 1), mc.get("graphs", "—"), nodes, errs, common.fmt(r["load_1min"], 1)])
        for backend, res in (("inductor", ind), ("morphc", mc)):
            if not res.get("ok"):
                notes.append(f"- {r['model']} batch {r['batch']}: {backend} failed: {res['error']}")
            for fb in res.get("fallbacks", []):
                notes.append(f"- {r['model']} batch {r['batch']}: morphc fell back: {fb}")
    body = common.markdown_table(header, table)
    body += ("\n\nLatency: median per call over interleaved rounds (p10/p90 and round counts in the .json); "
             "speedup = eager median / backend median (>1 is faster than eager). Compile s: wall time of the "
             "first call. morphc nodes: ATen nodes of the lowered graphs before the pipeline → after it. "
             "load: 1-minute load average right after the row was timed (above the thread count means other "
             "processes competed for the cores).")
    if notes:
        body += "\n\nFailures and fallbacks:\n\n" + "\n".join(notes)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", action="store_true", help=f"benchmark {', '.join(BASE_MODELS)} instead")
    parser.add_argument("--models", nargs="+", help="explicit zoo names (overrides the default set)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: see benchmarks/README.md on shared cores)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed rounds per model and batch (default 3 small, 8 base)")
    parser.add_argument("--out", default=None, help="results name (default torch_compile or torch_compile_base)")
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    load_at_start = common.load_average()
    names = args.models or (BASE_MODELS if args.base else zoo.names(size="small"))
    budget = args.budget or (8.0 if args.base else 3.0)
    out = args.out or ("torch_compile_base" if args.base else "torch_compile")
    warm_up_backends()
    rows = []
    for name in names:
        for batch in args.batch:
            row = bench_model(name, batch, budget)
            rows.append(row)
            mc, ind = row["morphc"], row["inductor"]
            nan = float("nan")
            print(f"{name:24s} b={batch}: eager {row['eager']['median_ms']:.3f} ms | "
                  f"inductor {ind.get('median_ms', nan):.3f} ms ({ind.get('compile_s', nan):.1f} s) | "
                  f"morphc {mc.get('median_ms', nan):.3f} ms ({mc.get('compile_s', nan):.1f} s)", flush=True)
    settings = {"threads": threads, "batches": args.batch, "budget_s": budget, "morphc_pipeline": DEFAULT_PIPELINE,
                "morphc_target": "eager", "inductor_cache": "fresh temporary directory", "grad": "no_grad"}
    path = common.write_results(out, title="torch.compile backends: eager vs inductor vs morphc", results=rows,
                                body_md=report(rows), settings=settings, load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    shutil.rmtree(_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
