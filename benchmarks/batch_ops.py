"""Operator batching (batch-ops): N same-architecture CNNs with different weights, run separately vs
as one morphc Program in which every layer runs once as a grouped convolution / batched matmul.

Two scenarios, each with N = 2, 4, 8 models at batch 1 and 8 (32x32 images, 1 torch thread):

- `same-input`: the N models read the same images (N tasks fine-tuned from one architecture):
  the first convolutions merge into one wider convolution, every later layer into a grouped one.
- `separate-inputs`: model i reads its own images (N streams, NetFuse's setting): the inputs are
  concatenated along channels once, then every layer is grouped.

The architecture: conv3x3(3->16)-BN-ReLU, conv3x3(16->32, stride 2)-BN-ReLU, conv3x3(32->64, stride 2)-BN-ReLU,
global average pooling, linear(64->10); each model seeded differently (different weights and BN statistics).

Variants, timed side by side (interleaved rounds, medians): `eager` (the N models one after another in eager
torch), `morphc` (the N models as one Program after `fold-batchnorm,cse,dce`: no batching) and `batched`
(after `fold-batchnorm,batch-ops,cse,dce`), each on the eager target and the onnxruntime target.

    python benchmarks/batch_ops.py                         # both scenarios, about 5 min
    python benchmarks/batch_ops.py --batch 8 --malloc-keep --out batch_ops_malloc_keep

--malloc-keep sets glibc's mmap/trim thresholds to 1 GB (mallopt) so freed activations stay in the heap.
With glibc's defaults every multi-MB activation is a fresh mmap whose pages fault in on first write on
every call; a batched tower has N-times-larger activations, so at batch 8 it pays that where the N small
models do not (measured: N=8 batched 21 ms -> 11.6 ms with the thresholds raised, separate models unchanged).
Serving stacks typically run with jemalloc/tcmalloc, which keep memory the same way.
    python benchmarks/batch_ops.py --scenarios same-input --tasks 2 --batch 1 --budget 1   # quick look
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import morphc
from morphc import zoo
from morphc.runtime import compile_program

BASE = "fold-batchnorm,cse,dce"
BATCHED = "fold-batchnorm,batch-ops,cse,dce"
VARIANTS = ["eager", "morphc-eager", "batched-eager", "morphc-ort", "batched-ort"]


class SmallCNN(nn.Module):
    """The per-task architecture (see the module docstring)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_models(n: int) -> list[nn.Module]:
    models = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        m = SmallCNN()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.2)
                    mod.running_var.uniform_(0.5, 1.5)
        models.append(m.eval())
    return models


def keep_freed_memory() -> None:
    """glibc mallopt: no mmap for allocations below 1 GB and no trimming, so activations reuse heap pages."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt failed: --malloc-keep needs glibc")


def count(program: morphc.Program, name: str) -> int:
    from morphc.ir.metadata import op_name

    return sum(1 for n in program.graph.nodes if n.op == "call_function" and op_name(n.target) == name)


def bench(scenario: str, n: int, batch: int, budget_s: float, threads: int) -> dict[str, Any]:
    models = make_models(n)
    g = torch.Generator().manual_seed(batch)
    if scenario == "same-input":
        inputs: tuple[torch.Tensor, ...] = (torch.randn(batch, 3, 32, 32, generator=g),)
        program = morphc.lower({f"task{i}": m for i, m in enumerate(models)}, inputs)

        def eager() -> list[torch.Tensor]:
            return [m(inputs[0]) for m in models]
    else:
        inputs = tuple(torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n))
        program = morphc.lower({"models": zoo.SeparateInputs(models).eval()}, inputs)

        def eager() -> list[torch.Tensor]:
            return [m(x) for m, x in zip(models, inputs)]

    start = time.perf_counter()
    base = morphc.Pipeline.parse(BASE).run(program)
    batched = morphc.Pipeline.parse(BATCHED).run(program)
    passes_s = time.perf_counter() - start
    ort_options = {"threads": threads}
    exes: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    for name, prog, target in (("morphc-eager", base, "eager"), ("batched-eager", batched, "eager"),
                               ("morphc-ort", base, "onnxruntime"), ("batched-ort", batched, "onnxruntime")):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exes[name] = compile_program(prog, target, options=ort_options if target == "onnxruntime" else None)
        compile_s[name] = time.perf_counter() - start

    with torch.no_grad():
        expected = eager()
        errors = {}
        for name, exe in exes.items():
            got = list(exe(*inputs).values())
            errors[name] = common.max_abs_error(got, expected)
        calls = {"eager": eager, **{name: (lambda exe=exe: exe(*inputs)) for name, exe in exes.items()}}
        timings = common.side_by_side(calls, budget_s=budget_s)
    med = {k: v["median_ms"] for k, v in timings.items()}
    return {
        "scenario": scenario, "tasks": n, "batch": batch, "timings": timings,
        "speedup_batched_eager": med["eager"] / med["batched-eager"],
        "speedup_batched_ort": med["eager"] / med["batched-ort"],
        "batch_ops_gain_eager": med["morphc-eager"] / med["batched-eager"],
        "batch_ops_gain_ort": med["morphc-ort"] / med["batched-ort"],
        "convs_before": count(base, "conv2d"), "convs_after": count(batched, "conv2d"),
        "nodes_before": len(base.graph.nodes), "nodes_after": len(batched.graph.nodes),
        "passes_s": passes_s, "compile_s": compile_s, "max_abs_error": errors, "load_1min": common.load_average(),
    }


def report(rows: list[dict[str, Any]]) -> str:
    header = ["scenario", "N", "batch", *[f"{v} ms" for v in VARIANTS], "eager / batched-eager",
              "eager / batched-ort", "batch-ops gain (eager)", "batch-ops gain (ort)", "convs", "max err", "load"]
    table = []
    for r in rows:
        t = r["timings"]
        table.append([r["scenario"], r["tasks"], r["batch"], *[common.fmt(t[v]["median_ms"], 3) for v in VARIANTS],
                      f"{r['speedup_batched_eager']:.2f}x", f"{r['speedup_batched_ort']:.2f}x",
                      f"{r['batch_ops_gain_eager']:.2f}x", f"{r['batch_ops_gain_ort']:.2f}x",
                      f"{r['convs_before']}→{r['convs_after']}", f"{max(r['max_abs_error'].values()):.1e}",
                      common.fmt(r["load_1min"], 1)])
    return common.markdown_table(header, table) + (
        "\n\nLatency: median per call over interleaved rounds (p10/p90 and round counts in the .json). "
        f"`eager`: the N models one after another in eager torch; `morphc-*`: the N models as one Program after "
        f"`{BASE}` (no batching); `batched-*`: after `{BATCHED}`; `-eager` / `-ort`: eager and onnxruntime targets. "
        "batch-ops gain: morphc / batched on the same target (what batching alone buys). convs: conv2d nodes "
        "without / with batch-ops. max err: largest |variant - eager| over all outputs and variants. load: "
        "1-minute load average after the row (above the thread count: other processes competed for the cores).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=["same-input", "separate-inputs"],
                        default=["same-input", "separate-inputs"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime threads (default 1: see benchmarks/README.md on shared cores)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per configuration")
    parser.add_argument("--out", default="batch_ops")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="keep freed memory in the heap (glibc mallopt; see the module docstring)")
    args = parser.parse_args()
    if args.malloc_keep:
        keep_freed_memory()
    threads = common.set_threads(args.threads)
    load_at_start = common.load_average()
    rows = []
    for scenario in args.scenarios:
        for n in args.tasks:
            for batch in args.batch:
                row = bench(scenario, n, batch, args.budget, threads)
                rows.append(row)
                t = row["timings"]
                print(f"{scenario:15s} N={n} b={batch}: eager {t['eager']['median_ms']:.3f} ms, "
                      f"batched-eager {t['batched-eager']['median_ms']:.3f} ms ({row['speedup_batched_eager']:.2f}x), "
                      f"batched-ort {t['batched-ort']['median_ms']:.3f} ms ({row['speedup_batched_ort']:.2f}x), "
                      f"gain eager {row['batch_ops_gain_eager']:.2f}x ort {row['batch_ops_gain_ort']:.2f}x",
                      flush=True)
    settings = {"threads": threads, "base_pipeline": BASE, "batched_pipeline": BATCHED, "image": "3x32x32",
                "budget_s": args.budget, "grad": "no_grad",
                "malloc": "glibc, mmap/trim thresholds 1 GB" if args.malloc_keep else "glibc defaults"}
    path = common.write_results(args.out, title="Operator batching: N same-architecture CNNs, separate vs batch-ops",
                                results=rows, body_md=report(rows), settings=settings, load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
