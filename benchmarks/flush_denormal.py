"""Serving with subnormals flushed to zero (`ServingConfig.flush_denormal`) against serving without, side by side.

    python benchmarks/flush_denormal.py [--threads 1 2] [--rounds 15]

Each model is served through `morphc.runtime.serving` (eager and ONNX Runtime) under both settings of
the knob, in interleaved rounds (the knob applied, one untimed call, then `--per-round` timed calls).
Reported: the median latency of each, their ratio, the largest output difference, and the share of
subnormal values among the activations the unflushed run computed (what flushing can change at all).
Intel CPUs compute on subnormals through microcode assists (docs/cost_model.md: a random-weight
EfficientNet up to 7.1x slower on an Intel Xeon VM); AMD's do not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import morphc
from morphc import zoo
from morphc.ir.annotations import ServingConfig
from morphc.predictors.corpus import VARIANTS
from morphc.predictors.dataset import lowered
from morphc.runtime import serving

CORPUS = ("hf-efficientnet[width=1.0,depth=0.5,image_size=64]", "hf-efficientnet[width=0.5,depth=0.5,image_size=64]")
ZOO = (("mobilenet_v2-imagenet", 1), ("resnet-small", 8), ("bert-small", 8))


def programs(names: list[str]) -> dict[str, morphc.Program]:
    """The benchmark's models, lowered: corpus variants (random weights) at batch 8, zoo models at theirs."""
    out = {}
    for name in CORPUS:
        if not names or name in names:
            out[f"{name} b8 (random weights)"] = lowered(next(v for v in VARIANTS if v.name == name), 8)
    for name, batch in ZOO:
        if not names or name in names:
            m = zoo.build(name, batch_size=batch)
            out[f"{name} b{batch}"] = morphc.lower(m.model, m.example_inputs)
    return out


def subnormal_share(program: morphc.Program) -> float:
    """Share of float32 activation values that are subnormal, over every node's output (unflushed run)."""
    counts = [0, 0]

    class Counter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and n.op != "placeholder":
                tiny = torch.finfo(torch.float32).tiny
                counts[0] += int(((out != 0) & (out.abs() < tiny)).sum())
                counts[1] += out.numel()
            return out

    with torch.no_grad():
        Counter(program.graph_module).run(*program.example_inputs)
    return counts[0] / max(counts[1], 1)


def bench(program: morphc.Program, backend: str, threads: int, rounds: int, per_round: int) -> dict[str, Any]:
    batch = int(program.inputs[0].shape[0])
    runners = {flush: serving.build_runner(program, ServingConfig(batch=batch, threads=threads, backend=backend,
                                                                  flush_denormal=flush)) for flush in (False, True)}
    inputs = program.example_inputs
    samples: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    with torch.no_grad():
        for _ in range(rounds):
            for flush, runner in runners.items():
                with runner.activate():
                    outputs[flush] = runner(*inputs)  # untimed: the first call after the knob changed
                    for _ in range(per_round):
                        start = time.perf_counter()
                        runner(*inputs)
                        samples[flush].append((time.perf_counter() - start) * 1e3)
    off, on = statistics.median(samples[False]), statistics.median(samples[True])
    return {"backend": backend, "threads": threads, "unflushed_ms": off, "flushed_ms": on, "speedup": off / on,
            "max_abs_diff": common.max_abs_error(outputs[False], outputs[True])}


def report(rows: list[dict[str, Any]]) -> str:
    table = [[r["model"], r["backend"], r["threads"], f"{r['subnormal_share']:.2e}", common.fmt(r["unflushed_ms"]),
              common.fmt(r["flushed_ms"]), f"**{r['speedup']:.2f}x**", f"{r['max_abs_diff']:.1e}"] for r in rows]
    return common.markdown_table(["model", "backend", "threads", "subnormal share of activations",
                                  "unflushed ms", "flushed ms", "unflushed / flushed", "max output diff"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="only these (corpus variant or zoo names)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"], choices=["eager", "onnxruntime"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--out", default="flush_denormal")
    args = parser.parse_args()
    load_at_start = common.load_average()
    rows = []
    for name, program in programs(args.models).items():
        share = subnormal_share(program)
        for backend in args.backends:
            for threads in args.threads:
                row = {"model": name, "subnormal_share": share,
                       **bench(program, backend, threads, args.rounds, args.per_round)}
                rows.append(row)
                print(f"{name:60s} {backend:11s} t{threads}: {row['unflushed_ms']:.2f} ms unflushed, "
                      f"{row['flushed_ms']:.2f} ms flushed ({row['speedup']:.2f}x), subnormals {share:.1e}",
                      flush=True)
    settings = {"rounds": args.rounds, "per_round": args.per_round, "grad": "no_grad"}
    path = common.write_results(args.out, title="Serving with subnormals flushed to zero, against without",
                                results=rows, body_md=report(rows), settings=settings, load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
