"""`insert-load-schedule`: plan how a cold model's weights reach the device and write the plan into the IR.

DeepPlan's dynamic plan (EuroSys'23) on morphc's layers (`morphc.ir.load_plan.group_layers`):
start from PipeSwitch's layer-by-layer pipeline (every layer loaded, loads issued in first-use
order on a FIFO channel, each layer's compute waiting for its own load), simulate the timeline,
and switch a layer to direct access (compute on the weights where they lie: mmap'd file pages on
CPU, mapped pinned host memory on GPU) whenever that shortens the simulated first inference —
typically where compute would stall on a load, and for embedding tables, of which a lookup
touches only its rows. With several channels (GPUs for parallel transmission, each with its own
PCIe link) loads are spread over them and forwarded over the device link.

Costs come from a per-layer profile: `ctx.options["layer-profile"]` (a `LayerCosts`, or a callable
`program -> LayerCosts | None`), else the newest matching "layer-profile" record in `ctx.records`
measured in the executor's I/O mode (`ctx.options["load-io"]`, default O_DIRECT; another mode's if none)
(written by `morphc.predictors.layer_profile`), else an analytic estimate from the metadata
(bytes / bandwidth, FLOPs / throughput), so the pass always has a plan to write.

The plan is written as a `load-plan` program annotation (modes, issue points, channels, and the
predicted timeline) plus `morphc::prefetch`/`morphc::wait` nodes (identities on the weights), so
the scheduled Program still computes exactly what the unscheduled one does. Run it last, right
before `compile`: passes that look for weights as plain `get_attr` inputs (e.g. fold-batchnorm)
no longer see them behind a `wait`. `export_plan` writes the plan as JSON or a Markdown timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch.fx as fx

from morphc.errors import PassOptionError
from morphc.ir.load_plan import (
    PREFETCH,
    STRATEGIES,
    WAIT,
    LayerCost,
    LayerCosts,
    Layers,
    LoadPlan,
    group_layers,
    group_members,
    io_ms,
    is_schedule_node,
    layer_profile_key,
    plan_to_json,
    read_ms,
    reads_sparsely,
)
from morphc.ir.metadata import META_KEY, MODULE_PATH_KEY
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.manager import PassContext

PROFILE_KIND = "layer-profile"  # records-database kind written by morphc.predictors.layer_profile
MAX_CHANNELS = 16
GROUP_AMORTIZE = 10.0  # group loads until the per-read overhead is a tenth of the read
MIN_GAIN = 0.002  # switch a layer's mode only for a gain above 0.2% of the simulated total

# analytic defaults per tier (used when no measured profile is available)
DEFAULT_BANDWIDTH_GBS = {"disk": 1.8, "host": 12.0}  # FACTS: cold file reads 1.5-2.0 GB/s; PCIe 3 x16 pinned
DEFAULT_COMPUTE_GFLOPS = {"disk": 30.0, "host": 10_000.0}
DEFAULT_MEMORY_GBS = {"disk": 10.0, "host": 1_000.0}
DEFAULT_LINK_GBS = 50.0  # NVLink-class device-to-device link for parallel transmission
NODE_OVERHEAD_MS = {"disk": 0.01, "host": 0.01}
READ_OVERHEAD_MS = {"disk": 0.05, "host": 0.01}  # one read syscall + thread hand-off; one cudaMemcpyAsync
DIRECT_EFFICIENCY = {"disk": 1.0, "host": 0.8}  # direct reads vs bulk copies


# --- simulation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A plan and its simulated timeline: per layer (load_start, load_end, compute_start,
    compute_end) in ms, -1 for the load of a direct-access layer."""

    strategy: str
    modes: tuple[str, ...]
    issue_after: tuple[int, ...]
    channel: tuple[int, ...]
    channels: int
    timeline: tuple[tuple[float, float, float, float], ...]
    total_ms: float
    groups: tuple[int, ...] = ()  # per layer, the first layer of its load group (-1: direct); () = each alone


def simulate(costs: LayerCosts, modes: Sequence[str], issue_after: Sequence[int], channel: Sequence[int],
             channels: int, *, barrier: bool = False) -> tuple[tuple[tuple[float, float, float, float], ...], float]:
    """The first-inference timeline of a plan (see the module docstring for the model).

    Each channel serves its loads first-in first-out in issue order (issue_after, layer index);
    a load issued after segment k starts once segment k has computed. Compute runs the segments
    in order; a loaded layer's segment waits for its load. A direct-access layer computes at once
    in direct_ms, and its reads (touched bytes) occupy channel 0's medium meanwhile (one disk, one
    PCIe link), delaying the loads there. On the disk tier the channels share one disk, so each
    of `channels` concurrent reads gets 1/channels of the bandwidth. `barrier`: compute starts
    only after every load (on-demand). Where the device computes asynchronously (GPU: `dispatch_ms`
    > 0), the CPU queues segment after segment without waiting for loads, and the device runs a
    segment no sooner than its kernels are being queued nor ends it before its last one is: eager
    execution at batch 1 is mostly the CPU queueing kernels, and a cold start's copies hide under it.
    """
    n = len(costs.layers)
    shared = costs.tier == "disk"
    compute_end: list[float] = [0.0] * n

    def issue_time(k: int) -> float:
        return 0.0 if k < 0 else compute_end[k]

    def load_ms(i: int) -> float:
        c = costs.layers[i]
        # pipelined loads share the machine with compute (memory traffic, the GIL, the cores): slower
        base = c.load_ms * (channels if shared and channels > 1 else 1) * (1.0 if barrier else costs.read_slowdown)
        return base + (io_ms(c.nbytes, costs.link_gbs) if channel[i] > 0 and not shared else 0.0)

    queues = {c: sorted((i for i in range(n) if modes[i] == "load" and channel[i] == c),
                        key=lambda i: (issue_after[i], i)) for c in range(channels)}
    cursor = dict.fromkeys(range(channels), 0)
    free = [0.0] * channels
    injections: list[list[float]] = []  # [time, io_ms, applied] of direct reads on channel 0
    load_start: dict[int, float] = {}
    load_end: dict[int, float] = {}

    def serve(c: int, upto: int | None, until: float | None = None) -> None:
        """Serve channel c's queue up to layer `upto` (None: all), or only the loads starting by `until`."""
        queue = queues[c]
        while cursor[c] < len(queue):
            j = queue[cursor[c]]
            if until is not None and ((issue_after[j] >= 0 and compute_end[issue_after[j]] == 0.0)
                                      or max(free[c], issue_time(issue_after[j])) > until):
                return
            start = max(free[c], issue_time(issue_after[j]))
            end = start + load_ms(j)
            if c == 0:
                for inj in injections:
                    if inj[2]:
                        continue
                    if inj[0] <= start:
                        start = max(start, inj[0] + inj[1])
                        end = start + load_ms(j)
                        inj[2] = 1.0
                    elif inj[0] < end:
                        end += inj[1]
                        inj[2] = 1.0
            load_start[j], load_end[j] = start, end
            free[c] = end
            cursor[c] += 1
            if j == upto:
                return

    t = 0.0
    if barrier:
        for c in range(channels):
            serve(c, None)
        t = max(load_end.values(), default=0.0)
    t += costs.prologue_ms
    timeline = []
    last_load = max((i for i in range(n) if modes[i] == "load"), default=-1)
    cpu = 0.0  # asynchronous devices: when the CPU has queued the segments so far (it never waits for loads)
    for i, c in enumerate(costs.layers):
        # compute that shares the machine with loads still streaming in runs slower (memory traffic, the
        # I/O thread's share of the GIL and of the cores)
        slow = costs.overlap_slowdown if i < last_load and not barrier else 1.0
        queued, cpu = cpu, cpu + c.dispatch_ms  # the device starts a segment once its kernels are being queued
        if modes[i] == "load":
            if i not in load_end:
                serve(channel[i], i)
            start = max(t, load_end[i], queued)
            end = max(start + c.compute_ms * slow, cpu)  # and ends it no sooner than its last kernel is queued
            timeline.append((load_start[i], load_end[i], start, end))
        else:
            start = max(t, queued)
            if shared and c.touched_bytes > 0:
                # one disk: the direct read queues behind the loads in flight, and the kernel reads a
                # sequential reader's file ahead by up to `readahead_bytes`: those are in flight too
                serve(0, None, until=t + io_ms(costs.readahead_bytes, costs.bandwidth_gbs))
                start = max(t, free[0])
            end = max(start + c.direct_ms + c.compute_ms * (slow - 1.0), cpu)
            io = io_ms(c.touched_bytes, costs.bandwidth_gbs)
            if io > 0:
                injections.append([start, io, 0.0])
            timeline.append((-1.0, -1.0, start, end))
        compute_end[i] = t = end
    for c in range(channels):  # loads nobody waited for (none in a valid plan) still end somewhere
        serve(c, None)
    total = max([t, *(le for _, le, _, _ in timeline)])
    return tuple(timeline), total


def grouped_costs(costs: LayerCosts, groups: Sequence[int]) -> LayerCosts:
    """Costs of reading each load group with one read: the group's first layer carries the whole read
    (its layers' load times less the read overhead they no longer pay each), the others none, so that
    in the FIFO simulation they arrive together."""
    layers = list(costs.layers)
    for g, idx in group_members(groups).items():
        if len(idx) == 1:
            continue
        total = sum(costs.layers[i].load_ms for i in idx) - (len(idx) - 1) * costs.read_overhead_ms
        layers[g] = replace(layers[g], load_ms=max(total, 0.0))
        for i in idx[1:]:
            layers[i] = replace(layers[i], load_ms=0.0)
    return replace(costs, layers=tuple(layers))


def _simulate_grouped(costs: LayerCosts, modes: Sequence[str], issue: Sequence[int], chan: Sequence[int],
                      channels: int, groups: Sequence[int], barrier: bool = False
                      ) -> tuple[tuple[tuple[float, float, float, float], ...], float]:
    issue = [issue[g] if g >= 0 else a for a, g in zip(issue, groups)]
    return simulate(grouped_costs(costs, groups), modes, issue, chan, channels, barrier=barrier)


def predict_plan(plan: LoadPlan, costs: LayerCosts) -> float:
    """The first-inference time (ms) a chosen plan would take under other costs (the same machine
    at another speed, another disk): its modes, issue points, channels and read groups simulated as
    the planner does."""
    if [c.name for c in costs.layers] != [e[0] for e in plan.layers]:
        raise PassOptionError("predict_plan: the costs describe other layers than the plan's")
    _, total = _simulate_grouped(costs, plan.modes(), [e[2] for e in plan.layers], [e[3] for e in plan.layers],
                                 max(1, plan.channels), plan.groups(), barrier=plan.strategy == "on-demand")
    return total


def _merge_loads(costs: LayerCosts, modes: Sequence[str], issue: Sequence[int], chan: Sequence[int],
                 channels: int, barrier: bool) -> tuple[list[int], tuple[tuple[float, ...], ...], float]:
    """Group consecutive loads into single reads (PipeSwitch's grouped transmission), greedily from the
    first layer: a layer joins the previous one's group unless that lengthens the simulated first
    inference. Fewer, larger reads save the per-read overhead and the hand-offs between threads."""
    groups = [i if m == "load" else -1 for i, m in enumerate(modes)]
    timeline, total = _simulate_grouped(costs, modes, issue, chan, channels, groups, barrier)
    # beyond this size a read already amortizes its overhead (to 1/GROUP_AMORTIZE of it), and a bigger one
    # only makes its first layer wait longer (the simulation, computing on a mean rate, would not see it)
    cap = GROUP_AMORTIZE * costs.read_overhead_ms * costs.bandwidth_gbs * 1e6
    size = {i: costs.layers[i].nbytes for i in range(len(modes))}
    for i in range(1, len(modes)):
        if groups[i] < 0 or groups[i - 1] < 0 or chan[i] != chan[i - 1] or issue[i] != issue[i - 1]:
            continue
        if not barrier and size[groups[i - 1]] + costs.layers[i].nbytes > cap:
            continue
        trial = list(groups)
        trial[i] = groups[i - 1]
        t_line, t_total = _simulate_grouped(costs, modes, issue, chan, channels, trial, barrier)
        if t_total <= total + 1e-9:
            groups, timeline, total = trial, t_line, t_total
            size[groups[i]] += costs.layers[i].nbytes
    return groups, timeline, total


_Timeline = tuple[tuple[float, ...], ...]  # simulated (load start, load end, compute start, compute end) per layer
_Grouped = tuple[list[int], _Timeline, float]  # read groups, simulated timeline, total ms


def _load_again_where_grouping_pays(costs: LayerCosts, modes: list[str], issue: Sequence[int], chan: Sequence[int],
                                    channels: int, grouped: _Grouped
                                    ) -> tuple[list[str], Sequence[int], list[int], _Timeline, float]:
    """The direct-access sweep judges layers read one by one, each read paying its overhead; once reads
    are grouped, a small layer rides along in a neighbour's read almost free, and computing it in place
    no longer pays. Give direct layers back to loading, one at a time, while the grouped first inference
    gets shorter. (BERT-base with O_DIRECT reads, 0.52 ms each: the sweep made 14 layers direct, the
    grouped result lost to the plain pipeline, and the word embeddings' 29 ms saving was lost with it.)"""
    groups, timeline, total = grouped
    improved = True
    while improved:
        improved = False
        for i in [k for k, m in enumerate(modes) if m == "direct"]:
            trial = list(modes)
            trial[i] = "load"
            t_chan = _assign_channels(costs, trial, channels)
            t_groups, t_line, t_total = _merge_loads(costs, trial, issue, t_chan, channels, False)
            if t_total < total - max(1e-9, MIN_GAIN * total):
                modes, chan, groups, timeline, total, improved = trial, t_chan, t_groups, t_line, t_total, True
    return modes, chan, groups, timeline, total


def _assign_channels(costs: LayerCosts, modes: Sequence[str], channels: int) -> tuple[int, ...]:
    """Spread loads over channels so each channel's queue finishes about when its layers are needed:
    each load goes to the channel where it would end first (counting the link hop)."""
    if channels == 1:
        return (0,) * len(modes)
    busy = [0.0] * channels
    out = []
    for c, mode in zip(costs.layers, modes):
        if mode != "load":
            out.append(0)
            continue
        ends = [busy[k] + c.load_ms + (io_ms(c.nbytes, costs.link_gbs) if k > 0 else 0.0) for k in range(channels)]
        k = min(range(channels), key=ends.__getitem__)
        busy[k] = ends[k]
        out.append(k)
    return tuple(out)


def make_schedule(costs: LayerCosts, strategy: str = "plan", *, channels: int = 1, lookahead: int = 0,
                  max_sweeps: int = 4, group: bool = True) -> Schedule:
    """Plan with one of the strategies: `plan` (DeepPlan: pipeline + direct access where it pays),
    `pipeline` (PipeSwitch: every layer loaded, pipelined), `on-demand` (load all, then compute),
    `direct` (every layer computed in place). `group`: read consecutive loads together where that
    does not lengthen the first inference (on-demand: everything in one read)."""
    if strategy not in STRATEGIES:
        raise PassOptionError(f"unknown load strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise PassOptionError(f"channels must be between 1 and {MAX_CHANNELS}, got {channels}")
    n = len(costs.layers)
    disk = costs.tier == "disk"
    effective = 1 if disk or strategy in ("on-demand", "direct") else channels  # one disk: parallel reads add nothing
    issue = tuple(max(-1, i - 1 - lookahead) if lookahead > 0 else -1 for i in range(n))
    if strategy == "on-demand":
        issue = (-1,) * n
    modes = ["direct" if strategy == "direct" else "load"] * n
    chan = _assign_channels(costs, modes, effective)
    barrier = strategy == "on-demand"
    timeline, total = simulate(costs, modes, issue, chan, effective, barrier=barrier)
    if strategy == "plan":
        for _ in range(max_sweeps):
            changed = False
            for i in range(n):
                if disk and modes[i] == "load" and not reads_sparsely(costs.layers[i]):
                    continue  # one disk: only sparse layers gain from direct access (see reads_sparsely)
                trial = list(modes)
                trial[i] = "direct" if modes[i] == "load" else "load"
                trial_chan = _assign_channels(costs, trial, effective)
                t_line, t_total = simulate(costs, trial, issue, trial_chan, effective)
                if t_total < total - max(1e-9, MIN_GAIN * total):  # a real gain, not a rounding or noise one
                    modes, chan, timeline, total, changed = trial, trial_chan, t_line, t_total, True
            if not changed:
                break
    groups = [i if m == "load" else -1 for i, m in enumerate(modes)]
    if group and effective == 1:
        groups, timeline, total = _merge_loads(costs, modes, issue, chan, effective, barrier)
        if strategy == "plan":
            modes, chan, groups, timeline, total = _load_again_where_grouping_pays(
                costs, modes, issue, chan, effective, (groups, timeline, total))
    chan = tuple(c if m == "load" else 0 for c, m in zip(chan, modes))
    issue = tuple(issue[g] if g >= 0 else a for a, g in zip(issue, groups))
    chosen = Schedule(strategy, tuple(modes), issue, chan, effective, timeline, total, tuple(groups))
    if strategy == "plan" and "direct" in modes:
        # the direct-access sweep judges layers read one by one; grouping the reads afterwards can make
        # the plain pipeline faster than the plan (MobileNetV2: 105 reads of 0.27 ms overhead each made
        # direct access look worth it for its first layers). The plan is never worse than the pipeline.
        pipeline = make_schedule(costs, "pipeline", channels=channels, lookahead=lookahead, group=group)
        if pipeline.total_ms <= chosen.total_ms:
            return replace(pipeline, strategy="plan")
    return chosen


# --- costs ------------------------------------------------------------------------------------------


def tier_of(device: str) -> str:
    return "host" if device.startswith("cuda") else "disk"


def analytic_costs(program: Program, layers: Layers, *, tier: str, bandwidth_gbs: float = 0.0,
                   compute_gflops: float = 0.0, link_gbs: float = 0.0) -> LayerCosts:
    """Costs from metadata alone: bytes / bandwidth, FLOPs / throughput + bytes moved / memory bandwidth."""
    bw = bandwidth_gbs or DEFAULT_BANDWIDTH_GBS[tier]
    gflops = compute_gflops or DEFAULT_COMPUTE_GFLOPS[tier]
    mem = DEFAULT_MEMORY_GBS[tier]
    overhead = NODE_OVERHEAD_MS[tier]

    asynchronous = tier == "host"  # the CPU queues GPU kernels (node overhead) while the device runs them

    def compute(flops: int, moved: int, nodes: int) -> float:
        return flops / (gflops * 1e6) + io_ms(moved, mem) + (0.0 if asynchronous else overhead * nodes)

    out = []
    for layer in layers:
        resident = compute(layer.flops, layer.bytes_moved, len(layer.nodes))
        direct = resident + io_ms(layer.touched_bytes, bw * DIRECT_EFFICIENCY[tier])
        load = read_ms(layer.nbytes, bw, READ_OVERHEAD_MS[tier])
        out.append(LayerCost(layer.name, layer.nbytes, layer.touched_bytes, load, resident, direct,
                             overhead * len(layer.nodes) if asynchronous else 0.0))
    prologue = compute(layers.prologue_flops, layers.prologue_bytes_moved, len(layers.prologue))
    return LayerCosts(tuple(out), prologue, "analytic", tier, bw, link_gbs or DEFAULT_LINK_GBS,
                      read_overhead_ms=READ_OVERHEAD_MS[tier])


def _profile_from_context(program: Program, layers: Layers, ctx: PassContext) -> LayerCosts | None:
    given: Any = ctx.options.get("layer-profile")
    if callable(given):
        given = given(program)
    if isinstance(given, LayerCosts):
        problems = given.check_matches(layers)
        if problems:
            raise PassOptionError(f"ctx.options['layer-profile'] does not fit this program: {'; '.join(problems)}")
        return given
    if given is not None:
        raise PassOptionError(f"ctx.options['layer-profile'] must be a LayerCosts or a callable returning one, "
                              f"got {type(given).__name__}")
    records = ctx.records
    if records is None or not hasattr(records, "query"):
        return None
    key = layer_profile_key(program)
    # device fingerprints start with the device kind ("cpu|<cpu model>|...", see predictors.records)
    found = [r for r in records.query(kind=PROFILE_KIND, model=key) if r.device.split("|", 1)[0] == ctx.device]
    # a profile measured as the program will run (eager, or replayed as a CUDA graph: ctx.options["execution"])
    # is preferred to one measured the other way, and within that one measured in the I/O mode the executor
    # loads in (O_DIRECT on disk by default; ctx.options["load-io"] names another) to a newer one in another
    # mode (a --page-cache benchmark's)
    mode = ctx.options.get("load-io", "copy-stream" if ctx.device.startswith("cuda") else "o-direct")
    execution = ctx.options.get("execution", "eager")
    found.sort(key=lambda r: (r.config.get("execution", "eager") == execution,
                              r.config.get("io", mode) == mode))  # stable: newest last within each kind
    for record in reversed(found):  # preferred mode first, newest first
        costs = LayerCosts.from_json(record.stats)
        if not costs.check_matches(layers):
            return costs
    return None


# --- rewriting ------------------------------------------------------------------------------------


def strip_schedule(program: Program) -> int:
    """Remove prefetch/wait nodes (weights flow from their get_attr again); returns nodes removed."""
    removed = 0
    for node in reversed(list(program.graph.nodes)):
        if is_schedule_node(node):
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
            removed += 1
    program.annotations.pop(LoadPlan.kind, None)
    return removed


def _depends_on_input(program: Program) -> set[fx.Node]:
    dep: set[fx.Node] = set(program.placeholders())
    for node in program.graph.nodes:
        if node.op == "call_function" and any(i in dep for i in node.all_input_nodes):
            dep.add(node)
    return dep


def _tokens(program: Program, layers: Layers) -> dict[int, fx.Node | None]:
    """For each segment k (-1: before any compute), the last input-dependent single-tensor value
    computed by the end of it: a load issued after segment k takes it as its `after` argument."""
    dep = _depends_on_input(program)
    by_name = {n.name: n for n in program.graph.nodes}
    placeholders = program.placeholders()
    token: fx.Node | None = placeholders[-1] if placeholders else None
    out: dict[int, fx.Node | None] = {-1: token}
    for layer in layers:
        for name in layer.nodes:
            node = by_name[name]
            meta = node.meta.get(META_KEY)
            if node in dep and meta is not None and len(meta.outputs) == 1 and meta.shape is not None:
                token = node
        out[layer.index] = token
    return out


def insert_schedule(program: Program, layers: Layers, schedule: Schedule) -> int:
    """Insert prefetch/wait nodes for the loaded layers; returns the number of nodes inserted."""
    graph = program.graph
    tokens = _tokens(program, layers)
    by_name = {n.name: n for n in graph.nodes}
    first_compute = next((n for n in graph.nodes if n.op == "call_function"), None)
    cursor: dict[fx.Node | None, fx.Node] = {}  # last prefetch inserted after each token: keeps FIFO order
    inserted = 0
    barrier = schedule.strategy == "on-demand"
    loads = [i for i, m in enumerate(schedule.modes) if m == "load"]
    ordered = sorted(loads, key=lambda i: (schedule.issue_after[i], i))
    for i in ordered:
        layer = layers.layers[i]
        token = tokens[schedule.issue_after[i]]
        use = first_compute if barrier else by_name[layer.first_use]
        for g in [n for n in graph.nodes if n.op == "get_attr" and str(n.target) in layer.attrs]:
            anchor = cursor.get(token, token)
            prefetch = graph.call_function(PREFETCH, (g, token, i))
            if anchor is not None:  # a get_attr has no inputs: it can move up to the issue point
                anchor.append(g)
            g.append(prefetch)
            cursor[token] = prefetch
            with graph.inserting_before(use):
                wait = graph.call_function(WAIT, (prefetch, i))
            g.replace_all_uses_with(wait, delete_user_cb=lambda u, p=prefetch: u is not p)
            for n in (prefetch, wait):
                n.meta[MODULE_PATH_KEY] = g.meta.get(MODULE_PATH_KEY, "")
            inserted += 2
    return inserted


def plan_annotation(schedule: Schedule, layers: Layers, costs: LayerCosts) -> LoadPlan:
    groups = schedule.groups or tuple(i if m == "load" else -1 for i, m in enumerate(schedule.modes))
    entries = tuple((layer.name, m, a if m == "load" else -1, c, layer.nbytes, g) for layer, m, a, c, g in
                    zip(layers, schedule.modes, schedule.issue_after, schedule.channel, groups))
    predicted = tuple(tuple(round(x, 6) for x in row) for row in schedule.timeline)
    return LoadPlan(schedule.strategy, costs.tier, schedule.channels, costs.source, entries, predicted,
                    round(schedule.total_ms, 6), round(costs.prologue_ms, 6))


@register_pass
@dataclass(frozen=True)
class InsertLoadSchedule(Pass):
    """Plan the weight loads of a cold first inference (load vs direct access per layer, issue
    points, channels) and write it as a load-plan annotation plus prefetch/wait nodes."""

    name: ClassVar[str] = "insert-load-schedule"
    strategy: Literal["plan", "pipeline", "on-demand", "direct"] = option(
        "plan", "plan (DeepPlan), pipeline (PipeSwitch), on-demand (load all, then run), direct (all in place)")
    channels: int = option(1, "parallel transmission: load channels (GPUs with their own link); 1 on one disk")
    lookahead: int = option(0, "issue a load at most this many segments before its use (0: all at the start)")
    group_loads: bool = option(True, "read consecutive loaded layers with one read where that is not slower")
    bandwidth_gbs: float = option(0.0, "analytic profile: load bandwidth in GB/s (0: the tier's default)")
    compute_gflops: float = option(0.0, "analytic profile: compute throughput in GFLOP/s (0: the tier's default)")

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise PassOptionError(f"option 'channels' of pass '{self.name}' must be between 1 and {MAX_CHANNELS}, "
                                  f"got {self.channels}")
        if self.lookahead < 0:
            raise PassOptionError(f"option 'lookahead' of pass '{self.name}' must be >= 0 (0: issue every load "
                                  f"at the start), got {self.lookahead}")
        for key, value in (("bandwidth-gbs", self.bandwidth_gbs), ("compute-gflops", self.compute_gflops)):
            if not 0.0 <= value < float("inf"):
                raise PassOptionError(f"option '{key}' of pass '{self.name}' must be a finite number >= 0 "
                                      f"(0: default), got {value}")

    def costs(self, program: Program, layers: Layers, ctx: PassContext) -> LayerCosts:
        measured = _profile_from_context(program, layers, ctx)
        if measured is not None:
            return measured
        return analytic_costs(program, layers, tier=tier_of(ctx.device), bandwidth_gbs=self.bandwidth_gbs,
                              compute_gflops=self.compute_gflops)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        removed = strip_schedule(program)
        layers = group_layers(program)
        costs = self.costs(program, layers, ctx)
        schedule = make_schedule(costs, self.strategy, channels=self.channels, lookahead=self.lookahead,
                                 group=self.group_loads)
        inserted = insert_schedule(program, layers, schedule)
        program.annotate(plan_annotation(schedule, layers, costs))
        loaded = schedule.modes.count("load")
        return PassResult(program, modified=bool(inserted or removed), statistics={
            "layers": len(layers), "loaded": loaded, "direct": len(layers) - loaded,
            "reads": len({g for g in schedule.groups if g >= 0}),
            "predicted-ms": round(schedule.total_ms, 3)})


# --- export -----------------------------------------------------------------------------------------


def plan_markdown(plan: LoadPlan, measured: Sequence[Sequence[float]] | None = None) -> str:
    """A readable Markdown timeline of a plan (and of a measured run beside it, when given)."""
    lines = [f"# load plan: {plan.strategy}", "",
             f"- tier: {plan.tier}, channels: {plan.channels}, costs: {plan.profile}",
             f"- predicted first inference: {plan.predicted_total_ms:.2f} ms (prologue {plan.prologue_ms:.2f} ms)",
             f"- layers: {len(plan.layers)} ({plan.modes().count('load')} loaded in "
             f"{len({g for g in plan.groups() if g >= 0})} reads, {plan.modes().count('direct')} direct access)", ""]
    header = "| # | layer | mode | read with | issued after | ch | KB | load (ms) | compute (ms) |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if measured is not None:
        header += " measured load | measured compute |"
        sep += "---|---|"
    lines += [header, sep]
    for i, (entry, group, (ls, le, cs, ce)) in enumerate(zip(plan.layers, plan.groups(), plan.predicted)):
        name, mode, after, channel, nbytes = entry[:5]
        load = f"{ls:.2f} to {le:.2f}" if mode == "load" else "—"
        issued = ("start" if after < 0 else f"#{after}") if mode == "load" else "—"
        read = "—" if group < 0 else f"#{group}"
        row = (f"| {i} | `{name}` | {mode} | {read} | {issued} | {channel} | {nbytes / 1e3:.1f} | {load} | "
               f"{cs:.2f} to {ce:.2f} |")
        if measured is not None:
            mls, mle, mcs, mce = measured[i]
            mload = f"{mls:.2f} to {mle:.2f}" if mls >= 0 else "—"
            row += f" {mload} | {mcs:.2f} to {mce:.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def export_plan(program: Program, path: str | Path,
                measured: Sequence[Sequence[float]] | None = None) -> Path:
    """Write the program's load plan to `path`: `.json` (machine-readable) or `.md` (timeline table)."""
    plan = program.annotation(LoadPlan)
    if plan is None:
        raise PassOptionError("the program has no load plan: run the 'insert-load-schedule' pass first")
    path = Path(path)
    writers: dict[str, Callable[[], str]] = {".json": lambda: plan_to_json(plan),
                                             ".md": lambda: plan_markdown(plan, measured)}
    if path.suffix not in writers:
        raise PassOptionError(f"cannot export a load plan to '{path.name}': use a .json or .md file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(writers[path.suffix]())
    return path
