"""Compile targets side by side: eager torch, inductor, plain ONNX Runtime, and morphc's targets.

For each model and batch size: per-call latency (interleaved medians, one process) and compile
time of
    eager          the torch model as written
    inductor       torch.compile(model, backend="inductor")
    ort-plain      torch.onnx.export of the model straight into ONNX Runtime (what a user would do)
    morphc-eager   morphc's default pipeline, eager target
    morphc-ort     morphc's default pipeline, onnxruntime target
    tvm-untuned    morphc's default pipeline, tvm target (llvm, host CPU), TVM's default schedules
                   (timed apart with few rounds: it is 10-40x slower than eager)
    tvm-tuned      the same with MetaSchedule tuning, `--tvm-trials` trials (records kept in
                   `--tvm-records`, so a second run replays them instead of tuning)
with speed-ups over eager, and morphc-best (the fastest morphc target).

    python benchmarks/compile_targets.py                 # default model set, batch 1 and 8
    python benchmarks/compile_targets.py --models minilm mobilenet_v2-imagenet --batches 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import morphc
from morphc import zoo
from morphc.runtime import compile_program
from morphc.runtime.dynamo import DEFAULT_PIPELINE
from morphc.runtime.onnx_runtime import OnnxRuntimeExecutable, export_onnx

MODELS = ["resnet_block_cnn", "branchy_cnn", "mobilenet_v2-imagenet", "bert-small", "minilm"]
VARIANTS = ["eager", "inductor", "ort-plain", "morphc-eager", "morphc-ort", "tvm-untuned", "tvm-tuned"]
MORPHC = ["morphc-eager", "morphc-ort", "tvm-untuned", "tvm-tuned"]
SLOW = ["tvm-untuned"]  # timed apart with few rounds


def _timed(build: Callable[[], Callable[[], Any]]) -> tuple[Callable[[], Any] | None, float, str | None]:
    """Build a variant, return (call, seconds to build and run once, error)."""
    start = time.perf_counter()
    try:
        fn = build()
        fn()
    except Exception as exc:  # a failing backend is a result, not a crash
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return fn, time.perf_counter() - start, None


def bench(name: str, batch: int, threads: int, budget_s: float, tvm_trials: int, tvm_records: str,
          skip: list[str]) -> dict[str, Any]:
    z = zoo.build(name, batch_size=batch)
    model, inputs = z.model, z.example_inputs
    with torch.no_grad():
        reference = model(*inputs)

    def eager() -> Callable[[], Any]:
        return lambda: model(*inputs)

    def inductor() -> Callable[[], Any]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="inductor", dynamic=False)
        return lambda: compiled(*inputs)

    def ort_plain() -> Callable[[], Any]:
        program = morphc.lower(model, inputs)  # no passes: exactly the model, exported as it is
        exe = OnnxRuntimeExecutable(program, morphc.runtime.CompileReport("onnxruntime"), export_onnx(program),
                                    {"threads": threads, "optimization": "all", "providers": ["CPUExecutionProvider"]})
        return lambda: exe(*inputs)

    def morphc_target(target: str, options: dict[str, Any] | None = None) -> Callable[[], Callable[[], Any]]:
        def build() -> Callable[[], Any]:
            program = morphc.Pipeline.parse(DEFAULT_PIPELINE).run(morphc.lower(model, inputs))
            exe = compile_program(program, target, options=options or {})
            notes[target if not options or "trials" not in options else f"tvm-{options['trials']}"] = \
                exe.report.notes
            return lambda: exe(*inputs)
        return build

    notes: dict[str, Any] = {}
    builders = {"eager": eager, "inductor": inductor, "ort-plain": ort_plain,
                "morphc-eager": morphc_target("eager"),
                "morphc-ort": morphc_target("onnxruntime", {"threads": threads}),
                "tvm-untuned": morphc_target("tvm", {"threads": threads}),
                "tvm-tuned": morphc_target("tvm", {"threads": threads, "trials": tvm_trials, "records": tvm_records})}
    builders = {k: v for k, v in builders.items() if k not in skip}
    fns: dict[str, Callable[[], Any]] = {}
    row: dict[str, Any] = {"model": name, "batch": batch, "compile_s": {}, "error": {}, "max_abs_error": {},
                           "notes": notes}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant, build in builders.items():
            fn, seconds, error = _timed(build)
            row["compile_s"][variant] = seconds
            if error:
                row["error"][variant] = error
                continue
            fns[variant] = fn
            out = fn()
            out = next(iter(out.values())) if isinstance(out, dict) else out
            row["max_abs_error"][variant] = common.max_abs_error(out, reference)
        row["timing"] = common.side_by_side({k: f for k, f in fns.items() if k not in SLOW}, budget_s=budget_s)
        slow = {k: f for k, f in fns.items() if k in SLOW}
        if slow:  # with eager again, so its ratio is measured side by side too
            apart = common.side_by_side({"eager": fns["eager"], **slow}, warmup=1, min_rounds=3, max_rounds=3)
            for k in slow:
                row["timing"][k] = {**apart[k], "median_ms": apart[k]["median_ms"] * row["timing"]["eager"]["median_ms"]
                                    / apart["eager"]["median_ms"], "measured_ms": apart[k]["median_ms"]}
    row["load"] = common.load_average()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per model and batch")
    parser.add_argument("--out", default="compile_targets", help="results/<out>.md and .json")
    parser.add_argument("--tvm-trials", type=int, default=64, help="MetaSchedule trial budget of tvm-tuned")
    parser.add_argument("--tvm-records", default=str(Path(__file__).parent / "results" / "tvm_tuning.sqlite"),
                        help="records database of TVM tuning logs (reused across runs)")
    parser.add_argument("--skip", nargs="*", default=[], choices=VARIANTS[1:], help="variants to leave out")
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    load_at_start = common.load_average()
    rows = []
    for name in args.models:
        for batch in args.batches:
            row = bench(name, batch, threads, args.budget, args.tvm_trials, args.tvm_records, args.skip)
            rows.append(row)
            med = {k: v["median_ms"] for k, v in row["timing"].items()}
            print(f"{name:24s} b={batch}: " + " | ".join(f"{k} {v:.3f} ms" for k, v in med.items()), flush=True)
    table = []
    for row in rows:
        med = {k: v["median_ms"] for k, v in row["timing"].items()}
        eager_ms = med.get("eager")
        cells = [row["model"], row["batch"]]
        for variant in VARIANTS:
            if variant in med and eager_ms:
                cells.append(f"{med[variant]:.3f} ({eager_ms / med[variant]:.2f}x)")
            elif variant in args.skip:
                cells.append("not run")
            else:
                cells.append(f"failed: {row['error'].get(variant, '?')}")
        best = min((v for v in MORPHC if v in med), key=med.__getitem__, default=None)
        cells.append(f"{best} ({eager_ms / med[best]:.2f}x)" if best and eager_ms else "—")
        cells.append(" / ".join(f"{row['compile_s'][v]:.1f}" if v in row["compile_s"] else "—" for v in VARIANTS))
        cells.append(f"{max(row['max_abs_error'].values()):.1e}")
        cells.append(common.fmt(row["load"], 1))
        table.append(cells)
    header = ["model", "batch", *[f"{v} ms (speed-up)" for v in VARIANTS], "morphc best", "compile s (same order)",
              "max err vs eager", "load"]
    body = (common.markdown_table(header, table) + "\n\nLatency: median per call over interleaved rounds; "
            "speed-up = eager median / variant median. Compile s: building the variant plus its first call. "
            f"morphc pipeline: `{DEFAULT_PIPELINE}`. ort-plain: the model exported as it is into ONNX Runtime "
            "with the same session settings (all graph optimizations, same threads). tvm-untuned is timed apart "
            "(1 warm-up, 3 rounds, interleaved with eager; its ms are scaled to this table's eager median). "
            f"tvm-tuned: MetaSchedule with {args.tvm_trials} trials per model and batch (XGBoost cost model; "
            "evolutionary search when a task gets 64 trials or more, else sampling; "
            "in-process builder; compile s includes tuning, or replaying stored records when they exist in "
            f"`{Path(args.tvm_records).name}`). morphc best: fastest of {', '.join(MORPHC)}.\n")
    path = common.write_results(args.out, title="Compile targets: eager, inductor, ONNX Runtime, morphc",
                                results=rows, body_md=body, load_at_start=load_at_start,
                                settings={"threads": threads, "batches": args.batches, "budget_s": args.budget,
                                          "grad": "no_grad", "tvm_trials": args.tvm_trials, "skip": args.skip})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
