"""Per-layer load profiles, measured with the cold-start executor and kept in the records database.

For each layer (`morphc.ir.load_plan.group_layers`): the time to load it (read from a cold file
on one I/O thread, in load order, as a pipeline would), the time to compute its segment with the
weights resident, and the time to compute it on the weights where they lie from the cold state
(direct access). Measured from real cold runs of two baselines of the same executor: on-demand
(every layer loaded back to back, then the whole model computed on resident weights) gives load
and resident compute times; direct-access-only gives the direct times. Per-layer medians over
`runs`, rescaled so each kind of time sums to the median whole run (preemption on shared cores
hits random layers, so summed per-layer medians would underestimate a run).

Stored as kind "layer-profile" keyed by `layer_profile_key(program)` (the same before and after
scheduling) and the device fingerprint, so `insert-load-schedule` finds it through
`PassContext.records`; a killed profiling run loses nothing already stored.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from morphc.ir.load_plan import LayerCost, LayerCosts, group_layers, io_ms, layer_profile_key, read_ms
from morphc.ir.program import Program
from morphc.passes.load_schedule import PROFILE_KIND, InsertLoadSchedule
from morphc.passes.manager import PassContext
from morphc.predictors.records import RecordsDB, device_fingerprint
from morphc.runtime.cold_start import ColdStartExecutor, Timeline
from morphc.runtime.memory_tiers import DiskTier, HostTier
from morphc.runtime.weights_file import WeightsFile

KIND = PROFILE_KIND


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n strategies for the rounds of a cold-start measurement (a Williams design): each goes
    first equally often and follows every other equally often. What ran just before a cold run changes
    it: with one fixed order the plan always ran right after direct access had faulted the whole file into
    the page cache, and its reads were slower there (BERT-base, per-round ratio to the bound: 1.12 after
    direct, 1.07 first)."""
    first = [0]
    for k in range(1, n):
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def _schedule(program: Program, strategy: str, device: str = "cpu") -> Program:
    p = program.clone()
    result = InsertLoadSchedule(strategy=strategy, group_loads=False).run(p, PassContext(device=device))  # per layer
    if result.modified:
        result.program.mark_modified()
    return result.program


def measure_layer_costs(program: Program, weights: WeightsFile | str | Path, *, runs: int = 3,
                        inputs: tuple[torch.Tensor, ...] | None = None, direct_io: bool = True,
                        device: str = "cpu", cuda_graph: bool = False) -> LayerCosts:
    """Measure the per-layer profile of an unscheduled program from the cold state: on "cpu" the disk
    tier, its loads read as the executor will read them (`direct_io`: O_DIRECT where the file system
    allows); on "cuda" the host tier (copies over PCIe, direct host access), run eagerly or, with
    `cuda_graph`, replayed as CUDA graphs (timed by the graph's own marks; no CPU queueing time)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    inputs = inputs if inputs is not None else program.example_inputs
    layers = group_layers(program)
    on_demand, direct, pipeline = (ColdStartExecutor(_schedule(program, s, device), weights, direct_io=direct_io,
                                                     device=device) for s in ("on-demand", "direct", "pipeline"))
    on_demand.run(*inputs, cold=False)  # warm the process (kernels, allocator); the weights go cold below
    if cuda_graph:
        if not device.startswith("cuda"):
            raise ValueError(f"cuda_graph profiles need device='cuda', got {device!r}")
        for exe in (on_demand, direct, pipeline):
            exe.capture(*inputs)

    def cold_run(exe: ColdStartExecutor) -> Timeline:
        return exe.replay(*inputs, cold=True, timed=True)[1] if cuda_graph else exe.run(*inputs, cold=True)[1]

    od_runs: list[Timeline] = []
    dr_runs: list[Timeline] = []
    pl_runs: list[Timeline] = []
    # balanced orders: with a fixed one the pipelined runs always followed direct access's page faulting
    # and read slower there, which the profile took for compute slowing the reads (1.20x in one run)
    baselines = ((on_demand, od_runs), (direct, dr_runs), (pipeline, pl_runs))
    orders = balanced_orders(len(baselines))
    for r in range(runs):
        for exe, timelines in (baselines[i] for i in orders[r % len(orders)]):
            timelines.append(cold_run(exe))

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    prologue = med([max(0.0, t.prologue_end_ms - t.prologue_start_ms) if t.prologue_start_ms >= 0 else 0.0
                    for t in od_runs])
    spans = [max(r.layers[i].load_end_ms for i in range(len(layers))) -
             min(r.layers[i].load_start_ms for i in range(len(layers))) for r in od_runs] if len(layers) else [0.0]
    span = med(spans)
    bandwidth = layers.nbytes / (span * 1e6) if span > 0 else 0.0
    # the storage's streaming bandwidth (one large sequential read, in the loader's own I/O mode: on a
    # virtual disk O_DIRECT and the page cache stream at different rates) is what a read of many bytes
    # gets; per-layer reads also pay a fixed overhead each, which the planner saves by grouping them
    tier = on_demand.tier
    gpu = isinstance(tier, HostTier)
    bulk = (tier.copy_gbs() if isinstance(tier, HostTier)
            else statistics.median(on_demand.weights.cold_read_gbs(direct=direct_io) for _ in range(3)))
    streaming = max(bulk, bandwidth)
    overhead = _read_overhead_ms(span, layers.nbytes, len(layers), streaming)
    # disk: never below what each read measurably costs besides its bytes, the difference above being small
    # and noisy (0 on a slow disk day, so BERT's plan read layer by layer): one cold read's own latency plus
    # the I/O thread's gap between one read and the next, both measured directly
    latency = 0.0 if gpu else statistics.median(
        on_demand.weights.read_latency_ms(direct=direct_io) for _ in range(3)) + _read_gap_ms(od_runs)
    overhead = max(overhead, latency)
    resident = med([t.after_reads_ms for t in od_runs])
    direct_total = med([t.total_ms - max(0.0, t.prologue_end_ms - t.prologue_start_ms) for t in dr_runs])
    # A layer's own measured read time is distorted by the kernel's read-ahead (a layer the previous read
    # already pulled in reads from the cache, the one after pays for both): a layer's load is overhead +
    # bytes / streaming rate instead, which sums to the measured layer-by-layer reading by construction.
    costs = []
    for i, layer in enumerate(layers):
        compute = med([t.layers[i].compute_end_ms - t.layers[i].compute_start_ms for t in od_runs])
        # computing on weights that are not resident cannot beat computing on resident ones: a direct
        # time below the resident one is noise (preemption on shared cores), and the planner would chase it
        direct_ms = max(compute, med([t.layers[i].compute_end_ms - t.layers[i].compute_start_ms for t in dr_runs]))
        load = read_ms(layer.nbytes, streaming, overhead) if streaming > 0 else 0.0
        # GPU: the CPU time to queue the segment's kernels, which the device's times above do not show
        # (on-demand's CPU queues everything while the copy runs); on the disk tier compute is synchronous
        dispatch = med([t.layers[i].dispatch_ms for t in od_runs]) if gpu and not cuda_graph else 0.0
        costs.append(LayerCost(layer.name, layer.nbytes, layer.touched_bytes, load, compute, direct_ms, dispatch))
    # Per-layer medians give each layer's share; whole-run medians give the level. On shared cores a
    # preemption lands on a random layer, so a sum of per-layer medians underestimates a typical run:
    # rescale compute and direct times so that their sums match the median run (recorded in `extra`).
    scales = {"compute": _scale(resident - prologue, [c.compute_ms for c in costs]),
              "direct": _scale(direct_total, [c.direct_ms for c in costs])}
    costs = [replace(c, compute_ms=c.compute_ms * scales["compute"],
                     direct_ms=max(c.compute_ms * scales["compute"], c.direct_ms * scales["direct"])) for c in costs]
    # GPU: copies do not slow kernels measurably; a pipelined run's segments look slower because the device
    # waits for the CPU to queue them, which dispatch_ms models
    slowdown = 1.0 if gpu else _overlap_slowdown(pl_runs, costs)
    read_slowdown = 1.0 if gpu else _read_slowdown(pl_runs, od_runs, costs)
    o_direct = isinstance(tier, DiskTier) and tier.direct_reads > 0  # the last cold run's loads bypassed the cache
    extra = {"runs": runs, "threads": torch.get_num_threads(), "layer_by_layer_read_gbs": bandwidth,
             "bulk_read_gbs": bulk, "read_overhead_ms": overhead, "read_latency_ms": latency,
             "overlap_slowdown": slowdown, "read_slowdown": read_slowdown,
             "resident_compute_ms": resident, "on_demand_ms": med([t.total_ms for t in od_runs]),
             "direct_ms": med([t.total_ms for t in dr_runs]),
             "direct_read_bytes": med([float(t.read_bytes or 0) for t in dr_runs]), "scales": scales,
             "o_direct": o_direct, "cuda_graph": cuda_graph}
    return LayerCosts(tuple(costs), prologue, "measured", tier.name, streaming, 0.0, extra, read_overhead_ms=overhead,
                      overlap_slowdown=slowdown, read_slowdown=read_slowdown,
                      # O_DIRECT reads (and copies) get no read-ahead from the kernel
                      readahead_bytes=on_demand.weights.readahead_bytes() if tier.name == "disk" and not o_direct
                      else 0)


def _read_gap_ms(runs: list[Timeline]) -> float:
    """The median over runs of the mean idle time between one read's end and the next one's start."""
    gaps = []
    for run in runs:
        spans = sorted((t.load_start_ms, t.load_end_ms) for t in run.layers if t.load_start_ms >= 0)
        if len(spans) > 1:
            gaps.append(sum(max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(spans)) / (len(spans) - 1))
    return float(statistics.median(gaps)) if gaps else 0.0


def _read_overhead_ms(span_ms: float, nbytes: int, reads: int, bandwidth_gbs: float) -> float:
    """The fixed cost of one read (syscall, storage latency, thread hand-off): what reading layer by
    layer (`reads` reads of `nbytes` in all, taking `span_ms`) took beyond streaming the bytes at
    `bandwidth_gbs`, per read."""
    if reads == 0 or bandwidth_gbs <= 0:
        return 0.0
    return max(0.0, (span_ms - io_ms(nbytes, bandwidth_gbs)) / reads)


def _overlap_slowdown(runs: list[Timeline], costs: list[LayerCost]) -> float:
    """How much slower layers compute while loads are still streaming in (pipelined cold runs) than
    with the weights resident: the median over runs of measured / resident compute of those layers."""
    ratios = []
    for run in runs:
        last = run.reads_end_ms
        idx = [i for i, t in enumerate(run.layers) if t.compute_end_ms <= last]
        resident = sum(costs[i].compute_ms for i in idx)
        if resident > 0:
            ratios.append(sum(run.layers[i].compute_end_ms - run.layers[i].compute_start_ms for i in idx) / resident)
    return min(3.0, max(1.0, float(statistics.median(ratios)))) if ratios else 1.0


def _read_span_ms(run: Timeline) -> float | None:
    """From the first load's start to the last load's end (None when the run loaded nothing)."""
    starts = [t.load_start_ms for t in run.layers if t.load_start_ms >= 0]
    return run.reads_end_ms - min(starts) if starts else None


def _read_slowdown(pipelined: list[Timeline], on_demand: list[Timeline], costs: list[LayerCost]) -> float:
    """How much slower the loads stream while compute runs beside them (pipelined cold runs, every load
    issued at the start, one read per layer) than the profile's load times say (measured without
    compute). Each pipelined run is paired with the on-demand run of its round, which makes the same
    reads with nothing computing: this disk's rate moves by 1.5x between rounds, and a ratio of medians
    over rounds took that drift for slowdown. The median paired ratio is then put on the scale of the
    load times (their sum over the median on-demand span, 1 unless the read-latency floor raised them)."""
    expected = sum(c.load_ms for c in costs)
    pairs = [(p, o) for p, o in zip(map(_read_span_ms, pipelined), map(_read_span_ms, on_demand))
             if p is not None and o]
    if not pairs or expected <= 0:
        return 1.0
    ratio = statistics.median(p / o for p, o in pairs)
    level = statistics.median(o for _, o in pairs) / expected
    return min(2.0, max(1.0, float(ratio * level)))


def _scale(total: float, parts: list[float]) -> float:
    """The factor making `parts` sum to `total` (1 when either is not positive)."""
    s = sum(parts)
    return total / s if s > 0 and total > 0 else 1.0


def profile_layers(program: Program, db: RecordsDB, weights: WeightsFile | str | Path, *, runs: int = 3,
                   refresh: bool = False, direct_io: bool = True, device: str = "cpu",
                   cuda_graph: bool = False) -> LayerCosts:
    """The program's layer profile from `db`, measuring and storing it first when missing (or `refresh`)."""
    gpu = device.startswith("cuda")
    config = {"tier": "host" if gpu else "disk", "threads": torch.get_num_threads(), "runs": runs,
              "io": "copy-stream" if gpu else "o-direct" if direct_io else "page-cache",
              **({"execution": "cuda-graph"} if cuda_graph else {})}
    key, fingerprint = layer_profile_key(program), device_fingerprint("cuda" if gpu else "cpu")
    if not refresh:
        record = db.get(KIND, key, fingerprint, config)
        if record is not None:
            return LayerCosts.from_json(record.stats)
    costs = measure_layer_costs(program, weights, runs=runs, direct_io=direct_io, device=device,
                                cuda_graph=cuda_graph)
    db.put(KIND, key, fingerprint, config, costs.to_json())
    return costs


def stored_profile(db: RecordsDB, program: Program, device: str = "cpu") -> LayerCosts | None:
    """The newest stored layer profile of this program on this machine, or None."""
    found = list(db.query(kind=KIND, model=layer_profile_key(program), device=device_fingerprint(device)))
    return LayerCosts.from_json(found[-1].stats) if found else None
