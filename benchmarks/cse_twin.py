"""Cross-model CSE: N task models sharing an identical frozen prefix, run separately vs as one
morphc Program after `cse,dce`.

Two scenarios, each with N = 2, 3, 4 tasks at batch 1 and 8:

- `twin`: the zoo's `twin_tasks` prefix (3 conv-BN-ReLU/residual blocks, 32x32 inputs) with the
  two zoo heads, plus small classifier heads for N > 2.
- `mobilenet`: a real pretrained prefix, the ImageNet MobileNetV2 `features` (224x224), with the
  pretrained ImageNet classifier as task 0 and small seeded heads (10, 2, 128 outputs) after it.

Every task holds its own deep copy of the prefix (equal values, different tensors), as separately
trained-then-frozen deployments would: CSE must find the sharing by content. Variants, timed side
by side: `separate` (each model in eager torch, one after the other), `program` (the N models
lowered into one morphc Program, no passes, eager target: the IR's own overhead), `cse,dce` (the
same after `cse,dce`), and `hand-shared` (eager torch running the prefix once and then the heads:
what one would write by hand). Ratio = separate / cse,dce.

    python benchmarks/cse_twin.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import morphc
from morphc import zoo
from morphc.runtime import compile_program
from morphc.zoo.cnn import TwinTaskModel

PIPELINE = "cse,dce"


def _pooled_head(channels: int, outputs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, outputs))


def twin_scenario(n: int, batch: int) -> tuple[nn.Module, list[nn.Module], tuple[torch.Tensor, ...]]:
    models, inputs = zoo.twin_tasks(batch_size=batch, seed=0)
    prefix = models["classify"].prefix
    heads = [models["classify"].head, models["regress"].head]
    heads += [_pooled_head(32, k, seed=100 + i) for i, k in enumerate((6, 3))]
    return prefix, heads[:n], inputs


def mobilenet_scenario(n: int, batch: int) -> tuple[nn.Module, list[nn.Module], tuple[torch.Tensor, ...]]:
    net = zoo.load_mobilenet_v2_imagenet()
    heads = [net.classifier] + [_pooled_head(1280, k, seed=200 + i) for i, k in enumerate((10, 2, 128))]
    heads[0] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier)  # torchvision's forward
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return net.features, heads[:n], (x,)


SCENARIOS = {"twin": twin_scenario, "mobilenet": mobilenet_scenario}


def bench(scenario: str, n: int, batch: int, budget_s: float) -> dict[str, Any]:
    prefix, heads, inputs = SCENARIOS[scenario](n, batch)
    prefix.eval().requires_grad_(False)
    tasks = {f"task{i}": TwinTaskModel(copy.deepcopy(prefix), head).eval() for i, head in enumerate(heads)}

    start = time.perf_counter()
    program = morphc.lower(tasks, inputs)
    lower_s = time.perf_counter() - start
    plain = compile_program(program, "eager")
    start = time.perf_counter()
    optimized = morphc.Pipeline.parse(PIPELINE).run(program)
    passes_s = time.perf_counter() - start
    shared = compile_program(optimized, "eager")

    def separate() -> list[torch.Tensor]:
        return [m(*inputs) for m in tasks.values()]

    def hand_shared() -> list[torch.Tensor]:
        features = prefix(*inputs)
        return [h(features) for h in heads]

    with torch.no_grad():
        expected = separate()
        got = shared(*inputs)
        error = max(common.max_abs_error(got[f"task{i}"], e) for i, e in enumerate(expected))
        timings = common.side_by_side({
            "separate": separate,
            "program": lambda: plain(*inputs),
            PIPELINE: lambda: shared(*inputs),
            "hand-shared": hand_shared,
        }, budget_s=budget_s)
    return {
        "scenario": scenario, "tasks": n, "batch": batch, "timings": timings,
        "speedup": timings["separate"]["median_ms"] / timings[PIPELINE]["median_ms"],
        "vs_hand_shared": timings["hand-shared"]["median_ms"] / timings[PIPELINE]["median_ms"],
        "nodes_before": len(program.graph.nodes), "nodes_after": len(optimized.graph.nodes),
        "param_mb_before": program.param_bytes() / 1e6, "param_mb_after": optimized.param_bytes() / 1e6,
        "lower_s": lower_s, "passes_s": passes_s, "max_abs_error": error, "load_1min": common.load_average(),
    }


def report(rows: list[dict[str, Any]]) -> str:
    header = ["scenario", "tasks", "batch", "separate ms", "program ms", f"{PIPELINE} ms", "hand-shared ms",
              "speedup (separate / cse)", "nodes", "params MB", "lower s", "passes s", "max err", "load"]
    table = []
    for r in rows:
        t = r["timings"]
        table.append([r["scenario"], r["tasks"], r["batch"], common.fmt(t["separate"]["median_ms"], 3),
                      common.fmt(t["program"]["median_ms"], 3), common.fmt(t[PIPELINE]["median_ms"], 3),
                      common.fmt(t["hand-shared"]["median_ms"], 3), f"{r['speedup']:.2f}x",
                      f"{r['nodes_before']}→{r['nodes_after']}",
                      f"{r['param_mb_before']:.2f}→{r['param_mb_after']:.2f}", common.fmt(r["lower_s"], 1),
                      common.fmt(r["passes_s"], 2), f"{r['max_abs_error']:.1e}",
                      common.fmt(r["load_1min"], 1)])
    return common.markdown_table(header, table) + (
        "\n\nLatency: median per call over interleaved rounds (p10/p90 and round counts in the .json). "
        "`separate`: the N task models one after another in eager torch; `program`: the N models lowered into "
        "one morphc Program without passes (eager target); `cse,dce`: that Program after cross-model CSE; "
        "`hand-shared`: eager torch running the prefix once, then every head (the hand-written optimum). "
        "max err: largest |cse,dce - separate| over all task outputs. load: 1-minute load average right after "
        "the row was timed (above the thread count means other processes competed for the cores).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=["twin", "mobilenet"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: see benchmarks/README.md on shared cores)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per configuration")
    parser.add_argument("--out", default="cse_twin")
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    load_at_start = common.load_average()
    rows = []
    for scenario in args.scenarios:
        for n in args.tasks:
            for batch in args.batch:
                row = bench(scenario, n, batch, args.budget)
                rows.append(row)
                t = row["timings"]
                print(f"{scenario:9s} N={n} b={batch}: separate {t['separate']['median_ms']:.3f} ms, "
                      f"{PIPELINE} {t[PIPELINE]['median_ms']:.3f} ms ({row['speedup']:.2f}x), "
                      f"nodes {row['nodes_before']}->{row['nodes_after']}", flush=True)
    settings = {"threads": threads, "pipeline": PIPELINE, "target": "eager", "budget_s": args.budget,
                "grad": "no_grad"}
    path = common.write_results(args.out, title="Cross-model CSE: N task models with a shared frozen prefix",
                                results=rows, body_md=report(rows), settings=settings, load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
