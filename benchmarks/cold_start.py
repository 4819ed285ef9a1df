"""Cold-start first inference on the CPU disk tier: on-demand, pipelined, direct-only and morphc's plan.

For each model: write its weights in first-use order (`write_weights`), measure the per-layer profile
from the cold state (stored in a records database; `--reuse-profile` plans from a stored one), schedule
the program with each strategy of `insert-load-schedule` (the plan from the measured profile), write
the plan's own file when its layout differs (direct-access layers after the loaded ones), then run
interleaved cold first inferences (the file's pages evicted with posix_fadvise DONTNEED before each;
the strategies in balanced orders, `balanced_orders`, so give a multiple of 4 runs) with the cold-start
executor and report medians, the planner's predicted totals, and the physical lower bound
max(bytes that must be read / measured cold read bandwidth, compute time with weights resident).
"Bytes that must be read" counts only the rows an embedding lookup touches; the bandwidth is the
storage's streaming rate (the whole file read cold in 64 MB chunks, once per round of runs, median;
or the rate measured when profiling if that was higher), so no schedule can beat
the bound by reading smarter. Where the plan reads its own file, that file is read whole in every round
too, and the plan is held to the bound at the bound's rate scaled by the median ratio of the two files'
rates in the same rounds: on this virtual disk two files of the same size can stream at different rates
(BERT-base's plan file at 1.8-1.9 GB/s against 2.3 for its first-use-order file, in the same minutes).
The disk is virtual and shared: its rate varies between rounds, and within a round (between about 1.4
and 2.4 GB/s, within seconds). So each run's own file is also read whole just before the run, and each
run is held to the bound and to the plan's prediction at that rate (`per_run`: the medians over runs of
run / its bound and measured / predicted). The resident compute time is the on-demand runs' compute
after their single read, in the same rounds.

The process is warm (kernels, allocator) and the weights are cold, as in DeepPlan/PipeSwitch.
Compute runs on one torch thread and the I/O on one thread: the machine has 2 cores, so compute
and I/O each get one (more compute threads would compete with the reads).

    python benchmarks/cold_start.py                 # all three models
    python benchmarks/cold_start.py --models mobilenet_v2-imagenet --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import morphc
from morphc import zoo
from morphc.ir.load_plan import LoadPlan, group_layers
from morphc.passes import PassContext
from morphc.passes.load_schedule import plan_markdown, predict_plan
from morphc.predictors.layer_profile import balanced_orders, profile_layers
from morphc.predictors.records import RecordsDB
from morphc.predictors.timing_lock import DEFAULT_TIMING_LOCK, timing_lock
from morphc.runtime.cold_start import ColdStartExecutor, Timeline
from morphc.runtime.memory_tiers import HostTier
from morphc.runtime.weights_file import WeightsFile, file_order, write_weights

STRATEGIES = ("on-demand", "pipeline", "direct", "plan")
MODELS: dict[str, dict[str, Any]] = {
    "mobilenet_v2-imagenet": {},
    "resnet50": {},
    "bert-base": {"seq_len": 32},
}
LOCK = DEFAULT_TIMING_LOCK
ROOT = Path(__file__).resolve().parents[1]



def rate_ratio(rates: list[float], reference: list[float]) -> float:
    """The median over rounds of a file's bulk rate over the reference file's in the same round."""
    return statistics.median(a / b for a, b in zip(rates, reference))


def plot_timelines(name: str, timelines: dict[str, Timeline], predicted: LoadPlan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*timelines.items(), ("plan (predicted)", predicted)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.3 * len(rows) + 0.6), sharex=True)
    for ax, (label, tl) in zip(axes, rows):
        if isinstance(tl, Timeline):
            spans = tl.rows()
            modes = [t.mode for t in tl.layers]
            total = tl.total_ms
        else:
            spans = list(tl.predicted)
            modes = list(tl.modes())
            total = tl.predicted_total_ms
        loads = [(ls, le - ls) for (ls, le, _, _), m in zip(spans, modes) if m == "load"]
        comp = [(cs, ce - cs) for (_, _, cs, ce), m in zip(spans, modes) if m == "load"]
        direct = [(cs, ce - cs) for (_, _, cs, ce), m in zip(spans, modes) if m == "direct"]
        ax.broken_barh(loads, (10, 8), facecolors=["tab:orange", "navajowhite"] * (len(loads) // 2 + 1))
        ax.broken_barh(comp, (0, 8), facecolors=["tab:blue", "lightsteelblue"] * (len(comp) // 2 + 1))
        ax.broken_barh(direct, (0, 8), facecolors="tab:green")
        ax.set_yticks([4, 14], ["compute", "I/O"])
        ax.set_title(f"{label}: {total:.1f} ms", fontsize=9, loc="left")
    axes[-1].set_xlabel("ms since the first inference started (cold weights)")
    fig.suptitle(f"{name}: cold first inference (orange: loads, blue: compute on loaded, green: direct access)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def prepare(name: str, kwargs: dict[str, Any], workdir: Path) -> tuple[morphc.Program, WeightsFile]:
    """Lower the model and write its weights file (outside the timing lock)."""
    t0 = time.perf_counter()
    z = zoo.build(name, batch_size=1, **kwargs)
    program = morphc.lower(z.model, z.example_inputs)
    del z
    layers = group_layers(program)
    weights = write_weights(program, workdir / f"{name}.safetensors", layers)
    print(f"[{name}] lowered, {len(layers)} layers, {layers.nbytes / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return program, weights


def bench_model(name: str, kwargs: dict[str, Any], program: morphc.Program, weights: WeightsFile, db: RecordsDB,
                runs: int, profile_runs: int, reuse_profile: bool = False, page_cache: bool = False,
                device: str = "cpu", prefix: str = "cold_start") -> dict[str, Any]:
    layers = group_layers(program)
    gpu = device.startswith("cuda")
    # the caller holds the timing lock
    print(f"[{name}] measuring (holding {LOCK})", flush=True)
    load_start = common.load_average()
    costs = profile_layers(program, db, weights, runs=profile_runs, refresh=not reuse_profile, direct_io=not page_cache,
                           device=device)
    ctx = PassContext(records=db, reproducer_dir=None, device="cuda" if gpu else "cpu",
                      options={"load-io": "page-cache"} if page_cache else {})
    scheduled = {s: morphc.Pipeline.parse(f"insert-load-schedule{{strategy={s}}}").run(program, ctx)
                 for s in STRATEGIES}
    # each schedule runs on the file written for it, as it would be deployed: the loaded layers first
    # (only the plan, with direct-access layers, differs from first-use order)
    files = {s: weights if [x.name for x in file_order(p)] == [x.name for x in layers]
             else write_weights(p, weights.path.with_name(f"{weights.path.stem}-{s}.safetensors"))
             for s, p in scheduled.items()}
    # each strategy reads as the executor does by default (O_DIRECT into the huge-page arena), or all
    # through the page cache (--page-cache)
    executors = {s: ColdStartExecutor(p, files[s], direct_io=not page_cache, device=device)
                 for s, p in scheduled.items()}
    inputs = program.example_inputs  # in host memory, as a request's are: the GPU executor copies them over
    # GPU: the same program computed warm on the GPU (its kernels need not match the CPU's bit for bit)
    reference = program.to(device)(*(t.to(device) for t in inputs)) if gpu else program(*inputs)
    for exe in executors.values():  # warm the process once per variant (kernels); weights go cold below
        exe.run(*inputs, cold=False)
    for exe in executors.values():  # one discarded cold round: the disk may still be flushing a file just written
        exe.run(*inputs, cold=True)
    samples: dict[str, list[Timeline]] = {s: [] for s in STRATEGIES}
    bulk: list[float] = []  # the disk's streaming rate in each round: it is shared and varies (see the report)
    # ... and it differs between files: the plan's own file is held to the rate of that file, measured beside
    plan_file = files["plan"] if files["plan"] is not weights and not gpu else None
    plan_bulk: list[float] = []
    run_gbs: dict[str, list[float]] = {s: [] for s in STRATEGIES}  # its file's bulk rate just before each run
    max_diff = dict.fromkeys(STRATEGIES, 0.0)
    host = executors["on-demand"].tier
    warm: list[float] = []  # GPU: first inferences with the weights already on the device, in the same rounds
    named = list(executors.items())
    orders = balanced_orders(len(named))
    for r in range(runs):
        bulk.append(host.copy_gbs() if isinstance(host, HostTier) else weights.cold_read_gbs())
        if plan_file is not None:
            plan_bulk.append(plan_file.cold_read_gbs())
        if gpu:
            warm.append(executors["pipeline"].run(*inputs, cold=False)[1].total_ms)
        for s, exe in (named[i] for i in orders[r % len(orders)]):
            if not gpu:  # the disk's rate moves by up to 1.8x within seconds: measure it next to each run too
                run_gbs[s].append(files[s].cold_read_gbs())
            out, tl = exe.run(*inputs, cold=True)
            check_outputs(s, out, reference, exact=not gpu, mismatch=max_diff)
            samples[s].append(tl)
    must_read = sum(layer.touched_bytes for layer in layers)
    graphs = (bench_graphs(name, prefix, program, db, scheduled, files, inputs, reference, runs, profile_runs,
                           max_diff, bulk, must_read) if gpu else None)
    load_end = common.load_average()
    med = {s: statistics.median(t.total_ms for t in tls) for s, tls in samples.items()}
    median_runs = {s: sorted(tls, key=lambda t: t.total_ms)[len(tls) // 2] for s, tls in samples.items()}
    plans = {s: p.annotation(LoadPlan) for s, p in scheduled.items()}
    bw = max(statistics.median(bulk), costs.bandwidth_gbs)
    # compute with the weights resident, in the same rounds: the on-demand runs compute after their one read
    # (the profile's figure was taken minutes earlier, and this VM's CPU speed drifts between sessions).
    # GPU: not so, on-demand's CPU queued the kernels while its copy ran and its device then only ran them;
    # compute with the weights resident is the whole warm inference (the CPU queueing kernels, mostly)
    tail = statistics.median(t.after_reads_ms for t in samples["on-demand"])
    resident = statistics.median(warm) if gpu else tail
    bound = max(must_read / (bw * 1e6), resident)
    # the plan's file against the first-use-order file, read in the same rounds, scales the bound's rate
    plan_bw = bw * rate_ratio(plan_bulk, bulk) if plan_bulk else bw
    plan_bound = max(must_read / (plan_bw * 1e6), resident)
    # the same plans re-simulated at the speed the machine had during these rounds (its compute and disk
    # drift between minutes): separates the planner's model error from the machine's drift
    profiled = costs.extra.get("resident_compute_ms") or 0.0
    compute_scale = tail / profiled if profiled > 0 else 1.0
    same_round = costs.at_speed(compute_scale, bw)
    resimulated = {s: predict_plan(plans[s], same_round) for s in STRATEGIES}
    # each run against the bound and the prediction at the rate measured just before it (its own file's)
    per_run = {s: {"bound_ratio": statistics.median(
                       t.total_ms / max(must_read / (g * 1e6), resident) for t, g in zip(samples[s], run_gbs[s])),
                   "measured_over_predicted": statistics.median(
                       t.total_ms / predict_plan(plans[s], costs.at_speed(compute_scale, g))
                       for t, g in zip(samples[s], run_gbs[s]))}
               for s in STRATEGIES if run_gbs[s]}
    plot = common.RESULTS / f"{prefix}_{name}.png"
    plot_timelines(name, {s: median_runs[s] for s in ("pipeline", "plan")}, plans["plan"], plot)
    (common.RESULTS / f"{prefix}_{name}_plan.md").write_text(
        plan_markdown(plans["plan"], median_runs["plan"].rows()))
    return {
        "model": name, "settings": kwargs, "layers": len(layers), "param_mb": layers.nbytes / 1e6,
        "must_read_mb": must_read / 1e6, "cold_read_gbs": bw, "resident_compute_ms": resident,
        "layer_by_layer_read_gbs": costs.extra.get("layer_by_layer_read_gbs"), "bulk_gbs_per_round": bulk,
        "profile_read_gbs": costs.bandwidth_gbs,
        "read_overhead_ms": costs.read_overhead_ms, "overlap_slowdown": costs.overlap_slowdown,
        "read_slowdown": costs.read_slowdown,
        "reads": {s: len({g for g in plans[s].groups() if g >= 0}) for s in STRATEGIES},
        "bound_ms": bound, "plan_bound_ms": plan_bound, "plan_file_gbs_per_round": plan_bulk,
        "median_ms": med, "runs": runs, "warm_ms": warm, "on_demand_tail_ms": tail,
        "all_ms": {s: [t.total_ms for t in tls] for s, tls in samples.items()},
        "predicted_ms": {s: plans[s].predicted_total_ms for s in STRATEGIES},
        "predicted_at_run_speed_ms": resimulated, "profile_resident_compute_ms": profiled,
        "run_gbs": run_gbs, "per_run": per_run,
        "read_mb": {s: statistics.median((t.read_bytes or 0) / 1e6 for t in tls) for s, tls in samples.items()},
        "plan_direct_layers": [e[0] for e in plans["plan"].layers if e[1] == "direct"],
        "breakdown": {s: breakdown(t) for s, t in median_runs.items()},
        "plan_is_pipeline": plans["plan"].layers == plans["pipeline"].layers,
        "load_average": [load_start, load_end], "plot": plot.name, "device": device,
        "plan_file": f"{prefix}_{name}_plan.md", "max_abs_diff_vs_warm": max_diff, "cuda_graphs": graphs,
    }


def bench_graphs(name: str, prefix: str, program: morphc.Program, db: RecordsDB, scheduled: dict[str, morphc.Program],
                 files: dict[str, WeightsFile], inputs: tuple[torch.Tensor, ...], reference: dict[str, torch.Tensor],
                 runs: int, profile_runs: int, max_diff: dict[str, float], bulk: list[float],
                 must_read: int) -> dict[str, Any]:
    """GPU: the same strategies replayed as CUDA graphs (captured once, warm; no kernel queued by the CPU
    in the first inference), with a plan made from a profile replayed as graphs, interleaved cold
    replays, and the bound with a resident replay as its compute."""
    # the profile replayed as graphs: each layer's device time alone, direct access's included
    graph_costs = profile_layers(program, db, files["on-demand"], runs=profile_runs, refresh=True, device="cuda",
                                 cuda_graph=True)
    ctx = PassContext(reproducer_dir=None, device="cuda", options={"layer-profile": graph_costs})
    plans = {**{s: scheduled[s] for s in ("on-demand", "pipeline", "direct")},
             "plan": morphc.Pipeline.parse("insert-load-schedule").run(program, ctx)}
    executors = {}
    for s, p in plans.items():
        same = [x.name for x in file_order(p)] == [x.name for x in file_order(scheduled[s])]
        weights = files[s] if same else write_weights(
            p, files["on-demand"].path.with_name(f"{files['on-demand'].path.stem}-graph-plan.safetensors"))
        executors[s] = ColdStartExecutor(p, weights, device="cuda")
        executors[s].capture(*inputs)
    times: dict[str, list[float]] = {s: [] for s in plans}
    resident: list[float] = []
    for _ in range(runs):
        resident.append(executors["pipeline"].replay(*inputs, cold=False)[1].total_ms)
        for s, exe in executors.items():
            out, tl = exe.replay(*inputs, cold=True)
            check_outputs(s, out, reference, exact=False, mismatch=max_diff)
            times[s].append(tl.total_ms)
    med = {s: statistics.median(v) for s, v in times.items()}
    timed = {s: exe.replay(*inputs, cold=True, timed=True)[1] for s, exe in executors.items()}  # graphs' own marks
    (common.RESULTS / f"{prefix}_{name}_graph_plan.md").write_text(
        plan_markdown(plans["plan"].annotation(LoadPlan), timed["plan"].rows()))
    warm = statistics.median(resident)
    bound = max(must_read / (statistics.median(bulk) * 1e6), warm)
    predicted = {s: predict_plan(p.annotation(LoadPlan), graph_costs) for s, p in plans.items()}
    return {"median_ms": med, "all_ms": times, "resident_ms": warm, "bound_ms": bound, "predicted_ms": predicted,
            "breakdown": {s: breakdown(t) for s, t in timed.items()}, "plan_file": f"{prefix}_{name}_graph_plan.md",
            "profile": {"resident_compute_ms": graph_costs.extra.get("resident_compute_ms"),
                        "direct_ms": graph_costs.extra.get("direct_ms"), "copy_gbs": graph_costs.bandwidth_gbs},
            "plan_direct_layers": [e[0] for e in plans["plan"].annotation(LoadPlan).layers if e[1] == "direct"]}


def check_outputs(strategy: str, out: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, exact: bool,
                  mismatch: dict[str, float]) -> None:
    """A cold run must compute what the warm program does: bit for bit on CPU; on GPU within float32
    rounding (another memory layout may pick another kernel), the largest difference kept."""
    for k, ref in reference.items():
        got = out[k]
        if exact:
            assert torch.equal(got, ref), f"{strategy} changed output {k}"
            continue
        diff = float((got.float() - ref.float()).abs().max()) if ref.numel() else 0.0
        mismatch[strategy] = max(mismatch[strategy], diff)
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), f"{strategy} changed output {k} (max |diff| {diff:g})"


def breakdown(t: Timeline) -> dict[str, float]:
    """Where a run's time went: when compute began, how long it computed and stalled, when reads ended."""
    return {"first_compute_ms": min((x.compute_start_ms for x in t.layers), default=0.0),
            "compute_ms": sum(x.compute_end_ms - x.compute_start_ms for x in t.layers),
            "stalled_ms": sum(x.wait_ms for x in t.layers),
            "reads_end_ms": t.reads_end_ms, "total_ms": t.total_ms}


def report(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        m, p = r["median_ms"], r["predicted_ms"]
        plan_bound = r.get("plan_bound_ms", r["bound_ms"])
        rows.append([
            r["model"], f"{r['param_mb']:.1f} / {r['must_read_mb']:.1f}",
            f"{r['cold_read_gbs']:.2f} ({r['layer_by_layer_read_gbs'] or 0:.2f})",
            f"{r['resident_compute_ms']:.1f}",
            f"{r['bound_ms']:.1f}" + (f" (plan's file: {plan_bound:.1f})" if plan_bound != r["bound_ms"] else ""),
            *(f"{m[s]:.1f}" for s in STRATEGIES),
            f"{m['plan'] / plan_bound:.2f}",
            f"{m['pipeline'] / m['plan']:.2f}" + (" (same schedule)" if r["plan_is_pipeline"] else ""),
            f"{m['on-demand'] / m['plan']:.2f} (bound {m['on-demand'] / r['bound_ms']:.2f})",
            f"{p['plan']:.1f} ({(p['plan'] - m['plan']) / m['plan'] * 100:+.0f}%)",
        ])
    header = ["model", "MB weights / must read", "cold GB/s bulk (layer by layer)", "resident compute ms", "bound ms",
              *(f"{s} ms" for s in STRATEGIES), "plan / bound", "pipeline / plan", "on-demand / plan",
              "plan predicted ms (err)"]
    md = [common.markdown_table(header, rows), ""]
    if own := [r for r in results if r.get("plan_bound_ms", r["bound_ms"]) != r["bound_ms"]]:
        md += ["The plan reads its own file (its direct-access layers after the loaded ones), and on this virtual "
               "disk files stream at different rates: " + "; ".join(
                   f"{r['model']}'s plan file {statistics.median(r['plan_file_gbs_per_round']):.2f} GB/s against "
                   f"{statistics.median(r['bulk_gbs_per_round']):.2f} (medians of the rounds; the median ratio in "
                   f"a round {rate_ratio(r['plan_file_gbs_per_round'], r['bulk_gbs_per_round']):.2f})" for r in own)
               + ". Plan / bound is the plan against the bound at the bound's rate times that ratio.", ""]
    if paired := [r for r in results if r.get("per_run")]:
        md += ["Each run against the bound and the planner's prediction at the rate its own file streamed at just "
               "before it (a cold whole-file read before every run; this virtual disk's rate moves between about "
               "1.4 and 2.4 GB/s within seconds, so a bound at one rate for all rounds mixes its states). Median "
               "over the runs of run / its bound, and of measured / predicted (compute scaled as below):", "",
               common.markdown_table(
                   ["model", *(f"{s}: / bound, / predicted" for s in STRATEGIES)],
                   [[r["model"], *(f"{r['per_run'][s]['bound_ratio']:.2f}, "
                                   f"{r['per_run'][s]['measured_over_predicted']:.2f}" for s in STRATEGIES)]
                    for r in paired]), ""]
    pred_rows = [[r["model"], *(f"{r['predicted_ms'][s]:.1f} ({r['predicted_at_run_speed_ms'][s]:.1f}) / "
                                f"{r['median_ms'][s]:.1f}" for s in STRATEGIES),
                  f"{r['profile_resident_compute_ms']:.1f} / {r['on_demand_tail_ms']:.1f}"] for r in results]
    md += ["Predicted (re-simulated at the speed of the runs' rounds) / measured first inference (ms) for every "
           "strategy. The profile is measured just before the runs, but this VM's CPU speed drifts within minutes; "
           "the second figure simulates the same plan with the profile's compute times scaled to the resident "
           "compute measured in the runs' rounds and loads at the bound's streaming rate:", "",
           common.markdown_table(["model", *STRATEGIES, "on-demand's compute after its read, ms: profile / rounds"],
                                 pred_rows), ""]
    read_rows = [[r["model"], *(f"{r['read_mb'][s]:.1f} in {r['reads'][s]}" for s in STRATEGIES)] for r in results]
    md += ["MB read from storage during a cold run (/proc/self/io, median), in how many reads the plan groups them:",
           "", common.markdown_table(["model", *STRATEGIES], read_rows), "",
           "Measured profile facts the planner used: " + "; ".join(
               f"{r['model']}: {r['read_overhead_ms']:.3f} ms per read, compute {r['overlap_slowdown']:.2f}x slower "
               f"while loads stream in, loads {r['read_slowdown']:.2f}x slower while compute runs"
               for r in results), ""]
    graphed = [r for r in results if r.get("cuda_graphs")]
    if graphed:
        rows = []
        for r in graphed:
            g = r["cuda_graphs"]
            m, p = g["median_ms"], g["predicted_ms"]
            rows.append([r["model"], f"{g['resident_ms']:.2f}", f"{g['bound_ms']:.2f}",
                         *(f"{m[s]:.2f}" for s in STRATEGIES),
                         f"{m['plan'] / g['bound_ms']:.2f}", f"{m['pipeline'] / m['plan']:.2f}",
                         f"{m['on-demand'] / m['plan']:.2f} (bound {m['on-demand'] / g['bound_ms']:.2f})",
                         f"{p['plan']:.2f} ({(p['plan'] - m['plan']) / m['plan'] * 100:+.0f}%)",
                         ", ".join(g["plan_direct_layers"]) or "none"])
        md += ["The same first inferences replayed as CUDA graphs (captured once, warm: the CPU queues no kernel; "
               "the plan made from a layer profile replayed as graphs; bound = max(bytes / copy rate, "
               "a resident replay)):", "",
               common.markdown_table(["model", "resident replay ms", "bound ms", *(f"{s} ms" for s in STRATEGIES),
                                      "plan / bound", "pipeline / plan", "on-demand / plan", "plan predicted ms (err)",
                                      "plan's direct-access layers"], rows), ""]
    md += ["Where the median run's time went (ms): compute began / computed / stalled on reads / reads ended:", "",
           common.markdown_table(["model", *STRATEGIES], [[r["model"], *(
               "{first_compute_ms:.1f} / {compute_ms:.1f} / {stalled_ms:.1f} / {reads_end_ms:.1f}".format(
                   **r["breakdown"][s]) for s in STRATEGIES)] for r in results]), ""]
    for r in results:
        md += [f"## {r['model']}", "", f"- settings: {r['settings'] or 'zoo defaults'}, batch 1, {r['runs']} cold runs "
               f"per strategy, interleaved; all runs (ms): {r['all_ms']}",
               f"- direct-access layers in morphc's plan: {r['plan_direct_layers'] or 'none'}",
               f"- load average during the runs (start, end): {r['load_average']}",
               f"- per-layer plan vs measured: [{r['plan_file']}]({r['plan_file']})", "",
               f"![timeline]({r['plot']})", ""]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=5, help="cold runs per strategy (median reported)")
    parser.add_argument("--profile-runs", type=int, default=3)
    parser.add_argument("--reuse-profile", action="store_true",
                        help="plan from the layer profile stored in --records instead of measuring it afresh (the "
                             "CPU's speed drifts between sessions here, and a stale profile mispredicts)")
    parser.add_argument("--page-cache", action="store_true",
                        help="every cold load through the page cache (by default every load uses O_DIRECT)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for compute")
    parser.add_argument("--workdir", default="/tmp/morphc-cold-start", help="where weights files go (a real disk)")
    parser.add_argument("--records", default=str(ROOT / "out" / "cold_start" / "records.sqlite"))
    parser.add_argument("--device", default="cpu",
                        help="cpu: the disk tier (file -> RAM); cuda: the host tier (host RAM -> GPU over PCIe)")
    parser.add_argument("--name", default=None, help="results name (default cold_start, cold_start_gpu on cuda)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.name = args.name or ("cold_start_gpu" if gpu else "cold_start")
    torch.set_grad_enabled(False)
    common.set_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db = RecordsDB(args.records)
    load_at_start = common.load_average()
    prepared = {name: prepare(name, MODELS[name], workdir) for name in args.models}
    results: list[dict[str, Any]] = []
    with timing_lock():  # one chunk for all models (a few minutes): measuring waits for the lock only once
        for name in args.models:
            r = bench_model(name, MODELS[name], *prepared[name], db, args.runs, args.profile_runs, args.reuse_profile,
                            page_cache=args.page_cache, device=args.device, prefix=args.name)
            results.append(r)
            print(r["model"], {s: round(v, 1) for s, v in r["median_ms"].items()}, "bound",
                  round(r["bound_ms"], 1), "predicted plan", round(r["predicted_ms"]["plan"], 1), flush=True)
            path = common.write_results(  # after every model: a killed run keeps what it measured
                args.name, title="Cold-start first inference, " + (
                    "GPU host tier (host RAM -> GPU over PCIe)" if gpu else "CPU disk tier (file -> RAM)"),
                results=results,
                body_md=report(results), load_at_start=load_at_start,
                settings={"torch_threads": args.threads, "io_threads": 1, "runs": args.runs,
                          "profile_runs": args.profile_runs, "read_ahead_kb": _read_ahead(),
                          "workdir": args.workdir,
                          "loads": "copy stream from registered host memory" if gpu else
                          "page cache" if args.page_cache else "O_DIRECT"})
    print(f"wrote {path}")


def _read_ahead() -> str:
    try:
        return Path("/sys/block/vda/queue/read_ahead_kb").read_text().strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
