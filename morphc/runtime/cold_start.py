"""The cold-start executor: run a scheduled Program's first inference with its weights off the device.

Where the weights start and how they are read: `morphc.runtime.memory_tiers` (`DiskTier` on CPU,
`HostTier` on GPU) over the file of `morphc.runtime.weights_file`.

The executor walks the scheduled graph in order: a `morphc::prefetch` issues its layer's load on
its channel's I/O thread (FIFO, as the planner assumed; on disk the loads stream as chunk reads in
issue order with `read_depth` of them in flight: by default two 8 MB chunks, see READ_DEPTH), a
`morphc::wait` blocks until that load is done and yields the loaded tensor; plain `get_attr`s of
direct-access layers yield views of the tier. Eager on GPU, the compute stream waits for loads with
events and the CPU queues kernels ahead; `capture`/`replay` run the whole scheduled first inference as a
CUDA graph. It records the real timeline: per layer load start/end (I/O thread) and compute
start/end (compute thread), plus the bytes the process read from storage (/proc/self/io).
Baselines are the same executor on programs scheduled with the other strategies of
`insert-load-schedule` (on-demand, pipeline, direct).
"""

from __future__ import annotations

import collections
import contextlib
import keyword
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from morphc.ir.load_plan import (
    PREFETCH,
    WAIT,
    Layers,
    LoadPlan,
    group_layers,
    group_members,
    is_schedule_node,
    reads_sparsely,
    weight_source,
)
from morphc.ir.metadata import op_name
from morphc.ir.program import Program
from morphc.runtime.memory_tiers import DiskTier, HostTier, PendingLoad
from morphc.runtime.weights_file import LAYER_ALIGN, ColdStartError, LayerRange, WeightsFile

SWITCH_INTERVAL_S = 2e-4
# disk tier: loads stream as chunk reads in issue order, READ_DEPTH of them in flight once compute has its
# first load, so the disk does not idle while the thread whose read just ended waits for the GIL behind
# the compute thread (1: one whole read per group, one at a time, PipeSwitch's loader). BERT-base's plan,
# interleaved A/Bs of 21-31 cold rounds: 0-2.7% faster than one group at a time (mean 1.3%; 1 MB chunks
# were 10% slower); ResNet-50's first compute 1.4 ms with the stream opened after it, 2.1-2.3 without
READ_DEPTH = 2
READ_CHUNK = 8 << 20


def read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io), None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- the timeline -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTiming:
    name: str
    mode: str
    channel: int
    load_start_ms: float  # -1 for direct access
    load_end_ms: float
    compute_start_ms: float
    compute_end_ms: float
    wait_ms: float  # time compute stalled waiting for this layer's load (GPU: the device's stall)
    dispatch_ms: float = 0.0  # CPU time the compute thread spent on the segment (GPU: queueing its kernels)


@dataclass(frozen=True)
class Timeline:
    """What one cold run did, as measured: per layer, and in total."""

    strategy: str
    tier: str
    total_ms: float
    prologue_start_ms: float  # compute that reads no weight, before the first layer
    prologue_end_ms: float
    layers: tuple[LayerTiming, ...]
    read_bytes: int | None  # bytes read from storage during the run (None where /proc/self/io is missing)
    cold: bool

    def rows(self) -> list[tuple[float, float, float, float]]:
        return [(t.load_start_ms, t.load_end_ms, t.compute_start_ms, t.compute_end_ms) for t in self.layers]

    @property
    def reads_end_ms(self) -> float:
        """When the last load finished (0 when nothing was loaded)."""
        return max((t.load_end_ms for t in self.layers), default=0.0)

    @property
    def after_reads_ms(self) -> float:
        """The run's time after its last load: for on-demand, the compute on resident weights."""
        return self.total_ms - self.reads_end_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(t) for t in self.layers]
        return d


# --- the executor ----------------------------------------------------------------------------------


class ColdStartExecutor:
    """Runs a Program scheduled by `insert-load-schedule` from the cold state; see the module docstring."""

    def __init__(self, program: Program, weights: WeightsFile | str | Path, *, device: str = "cpu",
                 pin_threads: bool = True, direct_io: bool = True, read_depth: int = READ_DEPTH,
                 read_chunk: int = READ_CHUNK) -> None:
        plan = program.annotation(LoadPlan)
        if read_depth < 1 or read_chunk < LAYER_ALIGN:
            raise ColdStartError(f"read_depth must be >= 1 and read_chunk >= {LAYER_ALIGN} B; got {read_depth}, "
                                 f"{read_chunk}")
        self.read_depth, self.read_chunk = read_depth, read_chunk
        # compute on the first CPUs, I/O threads on the others, when there are CPUs for both
        self.pin_threads = pin_threads
        if plan is None:
            raise ColdStartError("the program has no load plan: run the 'insert-load-schedule' pass on it first")
        self.program = program
        self.plan = plan
        self.weights = weights if isinstance(weights, WeightsFile) else WeightsFile(weights)
        self.layers = group_layers(program)
        self.weights.check_program(program, self.layers)
        if [layer.name for layer in self.layers] != [e[0] for e in plan.layers]:
            raise ColdStartError("the program's layers no longer match its load plan (was it changed after "
                                 "insert-load-schedule?); schedule it again")
        self._groups = plan.groups()  # per layer: its read group (-1: direct access)
        self._members = group_members(self._groups)
        missing = [layer.name for layer in self.layers if layer.name not in self.weights.by_name]
        if missing:
            raise ColdStartError(f"weights file '{self.weights.path}' has no layer(s) {missing[:3]}: write it from "
                                 "this program with write_weights")
        if device.startswith("cuda"):
            self.tier: DiskTier | HostTier = HostTier(self.weights, device, plan.channels)
            # everything but the weights, which this tier streams in itself, goes to the GPU
            self.program = program = program.to(self.tier.device, skip=self.weights.tensors)
        elif device == "cpu":
            sparse = [layer.name for layer, mode in zip(self.layers, plan.modes())
                      if mode == "direct" and reads_sparsely(layer)]
            # cold loads with O_DIRECT by default, for every strategy. Measured here (same code, minutes
            # apart): pipelined loads start sooner without the kernel's read-ahead (ResNet-50's first layer
            # computed 1.0 ms in, against 11.4 ms behind an 8 MB read-ahead window); and into the huge-page
            # arena one bulk read streams faster too (on-demand reads of ResNet-50 43.5 against 48.8 ms
            # through the page cache, BERT-base 134 against 152 ms). Into 4 KB pages it streamed slower
            # than the page cache, which is why on-demand once kept the page cache
            self.tier = DiskTier(self.weights, sparse, direct_io=direct_io)
            # each read group's chunk reads for the disk stream, cut once: the plan fixes them
            self._spans = {g: self.tier.spans(self._group_ranges(g), read_chunk) for g in self._members if g >= 0}
        else:
            raise ColdStartError(f"unknown device {device!r}; valid: 'cpu' (disk tier) or 'cuda[:N]' (host tier)")
        self.device = device
        # embedding lookups computed in place on the disk tier: node -> the table's attribute, so the rows
        # a lookup touches are asked for together before it runs (see DiskTier.will_need_rows)
        sparse = self.tier.sparse if isinstance(self.tier, DiskTier) else ()
        sparse_attrs = {a for layer in self.layers if layer.name in sparse for a in layer.attrs}
        self._lookups: dict[fx.Node, str] = {}
        for n in program.graph.nodes:
            if n.op == "call_function" and op_name(n.target) == "embedding" and isinstance(n.args[0], fx.Node):
                source = weight_source(n.args[0])
                if source is not None and str(source.target) in sparse_attrs:
                    self._lookups[n] = str(source.target)
        # attributes computed on where they lie: only these need a view of the tier (a loaded weight's
        # get_attr only feeds its prefetch, and its wait yields the loaded tensor); making views for all
        # of MobileNetV2's 314 tensors took the compute thread 1.5 ms before its first operator
        self._direct_attrs = {a for layer, mode in zip(self.layers, plan.modes()) if mode == "direct"
                              for a in layer.attrs}
        segment = self.layers.segment_of()
        # (node, its segment) in order; `run` walks them with straight runs of operators compiled (see
        # `_compile_runs`), a CUDA graph capture one by one (captured once, its walk's speed does not matter)
        self._node_steps = [(n, segment.get(n.name) if n.op == "call_function" and not is_schedule_node(n) else None)
                            for n in program.graph.nodes]
        # the walk a run times: get_attr values do not depend on the request, so a run binds them before its
        # clock starts (MobileNetV2's 314 took the compute thread ~0.3 ms before its first wait, the reader
        # meanwhile waiting for the GIL to start the first read)
        self._attrs = [n for n, _ in self._node_steps if n.op == "get_attr"]
        self._steps = [s for s in _compile_runs(self._node_steps, set(self._lookups)) if s[0].op != "get_attr"]

    def _group_ranges(self, group: int) -> list[LayerRange]:
        """The file ranges of read group `group`'s layers."""
        return [self.weights.by_name[self.layers.layers[i].name] for i in self._members[group]]

    def _attr_value(self, attr: str) -> torch.Tensor | None:
        """What a get_attr yields in the walk: a direct-access weight where it lies, None for a loaded one (its
        wait yields it), a tensor outside the weights file from the program (e.g. num_batches_tracked)."""
        if attr in self._direct_attrs:
            return self.tier.view(attr)
        return None if attr in self.weights.tensors else self.program.tensor(attr)

    def _groups_issued_at_start(self, groups: Sequence[int]) -> list[int]:
        """The read groups the plan issues before any compute (in plan order)."""
        return [groups[i] for i, entry in enumerate(self.plan.layers) if entry[1] == "load" and entry[2] < 0]

    def _cpus(self) -> tuple[set[int], set[int]]:
        """(compute CPUs, I/O CPUs) when the threads are pinned apart, else two empty sets."""
        if not self.pin_threads or not hasattr(os, "sched_setaffinity"):
            return set(), set()
        cpus = sorted(os.sched_getaffinity(0))
        threads = max(1, torch.get_num_threads())
        if len(cpus) <= threads:
            return set(), set()
        return set(cpus[:threads]), set(cpus[threads:])

    def run(self, *inputs: torch.Tensor, cold: bool = True) -> tuple[dict[str, torch.Tensor], Timeline]:
        """One first inference: evict (cold=True), then run with the plan; returns outputs and the timeline."""
        self.program.check_inputs(inputs)
        plan = self.plan
        n = len(self.layers)
        gpu = isinstance(self.tier, HostTier)
        if gpu:  # a request's inputs arrive in host memory
            inputs = tuple(t.to(self.tier.device, non_blocking=True) for t in inputs)  # type: ignore[union-attr]
        channels = max(1, plan.channels)
        load_marks: dict[int, tuple[Any, Any]] = {}
        seg_start: list[Any] = [None] * n
        seg_end: list[Any] = [None] * n
        dispatched = [0.0] * n  # CPU ms per segment
        stalls: dict[int, list[tuple[Any, Any]]] = {}  # per layer: (before, after) its wait for its load
        futures: dict[int, Future[Any]] = {}
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        compute_cpus, io_cpus = self._cpus()
        affinity = _pin_this_thread(compute_cpus)
        # an I/O thread per channel: disk, it reads while the compute thread computes; GPU, it queues the
        # copies on the channel's copy stream (~20 us of CPU each) while the compute thread queues kernels
        # disk with read_depth > 1: the loads become one stream of chunk reads in issue order, `read_depth` of
        # them in flight, so the disk never waits for a thread to come back (see `worker`)
        streamed = isinstance(self.tier, DiskTier) and self.read_depth > 1
        pools = [ThreadPoolExecutor(max_workers=self.read_depth if streamed else 1, thread_name_prefix=f"morphc-io{c}",
                                    initializer=_pin_this_thread, initargs=(io_cpus,)) for c in range(channels)]
        try:
            for pool in pools:  # start the I/O threads now: a cold model's server has them running already
                pool.submit(int).result()
            self.tier.begin(cold)
            env: dict[fx.Node, Any] = {n: self._attr_value(str(n.target)) for n in self._attrs}  # see __init__
        except BaseException:
            with contextlib.suppress(Exception):  # the error that got here is the one to see
                self.tier.end()
            _pin_this_thread(affinity)
            for pool in pools:
                pool.shutdown(wait=False)
            raise
        lock = threading.Lock()
        switch = sys.getswitchinterval()
        # the I/O thread needs the GIL for a moment between reads: with the default 5 ms switch interval
        # it would wait behind the compute thread's Python dispatch; 0.2 ms keeps the channel busy
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        rb0 = read_bytes()
        wall0 = time.perf_counter()
        clock: _Clock = _CudaClock() if gpu else _Clock()
        groups, members = self._groups, self._members

        def do_load(group: int, channel: int) -> dict[str, torch.Tensor] | PendingLoad:  # on the I/O thread
            if isinstance(self.tier, HostTier):  # queued: the copy stream's events time it
                pending = self.tier.load(*self._group_ranges(group), channel=channel)
                marks = (pending.started, pending.done)
                out: dict[str, torch.Tensor] | PendingLoad = pending
            else:
                start = clock.now()
                out = self.tier.load(*self._group_ranges(group))
                marks = (start, clock.now())
            with lock:
                for i in members[group]:
                    load_marks[i] = marks
            return out

        resident = gpu and not cold  # GPU warm: the weights are on the device already, nothing to copy
        backlog: list[int] = []  # disk stream: groups issued, their chunks not yet queued

        def issue(g: int) -> None:
            """Hand read group `g` to its channel's I/O thread, once."""
            if g in futures:
                return
            if resident:
                futures[g] = Future()
                futures[g].set_result(self.tier.resident(*self._group_ranges(g)))  # type: ignore[union-attr]
                return
            channel = plan.layers[g][3]
            if streamed:
                futures[g] = Future()
                backlog.append(g)
            else:
                futures[g] = pools[channel].submit(do_load, g, channel)

        def finish(g: int, start: Any) -> dict[str, torch.Tensor]:
            """Disk stream: group `g`'s last chunk is in; record its load and yield its tensors."""
            marks = (start, clock.now())
            with lock:
                for i in members[g]:
                    load_marks[i] = marks
            return self.tier.tensors(*self._group_ranges(g))  # type: ignore[union-attr]

        stream = _ChunkStream(self.tier, clock, finish, self.read_depth) if streamed else None  # type: ignore[arg-type]

        def flush() -> None:
            """Queue the chunks of the groups issued since the last flush, all at once."""
            if stream is None or not backlog:
                return
            stream.add([(g, futures[g], self._spans[g]) for g in backlog])
            backlog.clear()

        direct_dense = [m == "direct" and isinstance(self.tier, DiskTier) and layer.name not in self.tier.sparse
                        for layer, m in zip(self.layers, plan.modes())]
        placeholders = iter(inputs)
        current: int | None = None
        prologue: list[Any] = [None, None]
        last_end: Any = clock.now()
        queued = False  # GPU: kernels queued since the last mark
        seg_wall = wall_last = 0.0  # when the CPU began the current segment, and finished its last operator

        def close_compute() -> None:
            """GPU: mark where the queued kernels end (CPU marks after every operator)."""
            nonlocal last_end, queued
            if queued:
                last_end, queued = clock.now(), False

        try:
            if stream is not None:  # its workers wait for chunks before the run's clock starts, as a server's
                stream.start(pools[0])  # would: waking a pool thread cost the first read ~0.5 ms
                wall0 = time.perf_counter()
                clock.restart()
                last_end = clock.now()
            # loads issued at the start go out before the walk reaches their prefetch nodes
            for g in self._groups_issued_at_start(groups):
                issue(g)
            flush()
            with torch.no_grad():
                for node, seg, run in self._steps:
                    if node.op == "placeholder":
                        env[node] = next(placeholders)
                    elif node.target is PREFETCH:
                        issue(groups[node.args[2]])
                        flush()
                        env[node] = env[node.args[0]]
                    elif node.target is WAIT:
                        i = node.args[1]
                        g = groups[i]
                        if g not in loaded:
                            close_compute()
                            before = clock.now()
                            got = futures[g].result()
                            if stream is not None:
                                stream.open()
                            if isinstance(got, PendingLoad):  # the compute stream waits, the CPU goes on queueing
                                torch.cuda.current_stream(self.tier.device).wait_event(got.done)  # type: ignore[union-attr]
                                got = got.tensors
                            loaded[g] = got
                            stalls.setdefault(i, []).append((before, clock.now()))
                        env[node] = loaded[g][str(_source(node).target)]
                    elif node.op == "call_function":
                        if seg != current and seg is not None:
                            close_compute()
                            wall = time.perf_counter()
                            if current is not None and current >= 0:
                                dispatched[current] += (wall_last - seg_wall) * 1e3
                                seg_end[current] = last_end
                            elif current == -1:
                                prologue[1] = last_end
                            if seg >= 0:
                                seg_start[seg] = clock.now()
                                if direct_dense[seg]:
                                    self.tier.will_need(self.layers.layers[seg].name)  # type: ignore[union-attr]
                            else:
                                prologue[0] = clock.now()
                            current, seg_wall = seg, wall
                        if run is not None:
                            run(env)
                        else:
                            args = fx.node.map_arg(node.args, env.__getitem__)
                            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                            if node in self._lookups:
                                self.tier.will_need_rows(self._lookups[node], args[1])  # type: ignore[union-attr]
                            env[node] = node.target(*args, **kwargs)
                        wall_last = time.perf_counter()
                        if gpu:
                            queued = True
                        else:
                            last_end = clock.now()
                    elif node.op == "output":
                        leaves = fx.node.map_arg(node.args[0], env.__getitem__)
                close_compute()
                if current is not None and current >= 0:
                    dispatched[current] += (wall_last - seg_wall) * 1e3
                    seg_end[current] = last_end
                elif current == -1:
                    prologue[1] = last_end
                for f in futures.values():
                    f.result()
                if gpu:  # the first inference is over when its outputs are
                    torch.cuda.synchronize(self.tier.device)  # type: ignore[union-attr]
                wall_ms = (time.perf_counter() - wall0) * 1e3
        finally:
            _pin_this_thread(affinity)
            sys.setswitchinterval(switch)
            if stream is not None:
                stream.close()
            for pool in pools:
                pool.shutdown(wait=True)
            env.clear()
            loaded.clear()
            futures.clear()
            self.tier.end()
        rb1 = read_bytes()
        ms = clock.ms
        end = ms(last_end)
        load_times = {i: (ms(a), ms(b)) for i, (a, b) in load_marks.items()}
        # CPU: the run ends with its last read or compute; GPU: when the outputs were ready for the host
        total = wall_ms if gpu else max([end, *(e for _, e in load_times.values())])
        prologue_start, prologue_end = (-1.0 if m is None else ms(m) for m in prologue)
        timings = []
        ends = [-1.0 if m is None else ms(m) for m in seg_end]
        for i, (layer, entry) in enumerate(zip(self.layers, plan.layers)):
            ls, le = load_times.get(i, (-1.0, -1.0))
            cs, ce = (-1.0 if seg_start[i] is None else ms(seg_start[i])), ends[i]
            if cs < 0:  # an empty segment (the layer shares its first use with the next one)
                cs = ce = max([x for x in ends[:i] if x >= 0], default=max(prologue_end, 0.0))
            waited = sum(ms(b) - ms(a) for a, b in stalls.get(i, ()))
            timings.append(LayerTiming(layer.name, entry[1], entry[3], ls, le, cs, ce, waited, dispatched[i]))
        outputs = dict(zip((o.name for o in self.program.outputs), leaves))
        # an output that is a loaded weight must outlive the next run's loads
        outputs = {k: v.clone() if isinstance(v, torch.Tensor) and self.tier.holds(v) else v
                   for k, v in outputs.items()}
        timeline = Timeline(plan.strategy, self.tier.name, total, prologue_start, prologue_end, tuple(timings),
                            None if rb0 is None or rb1 is None else rb1 - rb0, cold)
        return outputs, timeline

    # --- CUDA graphs (GPU) ------------------------------------------------------------------------

    def capture(self, *inputs: torch.Tensor) -> None:
        """GPU: record this schedule's first inference as CUDA graphs, once, warm (a server prepares a
        model's kernels ahead, as PipeSwitch does; only the weights are cold): cold ones (the loads as
        copies on the copy streams, forked where the plan issues them; each wait an event edge; direct
        access reading mapped host memory), with and without timing marks (external events at every
        segment and load boundary, for the timeline), and a resident one (no copy). `replay` then runs
        them with no kernel queued by the CPU, which is what eager batch-1 inference spends most on."""
        if not isinstance(self.tier, HostTier):
            raise ColdStartError("CUDA graphs are for the GPU tier: build the executor with device='cuda'")
        self.program.check_inputs(inputs)
        self.run(*inputs, cold=True)  # kernels chosen, allocator primed, before capturing
        self._static = tuple(t.to(self.tier.device).clone() for t in inputs)
        self._graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, Any, _GraphMarks | None]] = {}
        capture_stream = torch.cuda.Stream(device=self.tier.device)
        if any(capture_stream.cuda_stream == s.cuda_stream for s in self.tier.streams):
            raise ColdStartError("the CUDA graph capture stream is one of the copy streams: the copies would "
                                 "run before all compute")
        for cold, timed in ((True, False), (True, True), (False, False)):
            self.tier.begin(cold=False)
            graph = torch.cuda.CUDAGraph()
            marks = _GraphMarks(len(self.layers)) if timed else None
            with torch.no_grad(), torch.cuda.graph(graph, stream=capture_stream):
                leaves = self._walk_captured(self._static, cold, marks)
            self._graphs[cold, timed] = (graph, leaves, marks)

    def replay(self, *inputs: torch.Tensor, cold: bool = True,
               timed: bool = False) -> tuple[dict[str, torch.Tensor], Timeline]:
        """One first inference from the captured graph (cold: the device arena zeroed first, the weights
        copied in by the graph); its timeline's total is the wall time from the request to its outputs,
        and per layer (`timed`, cold only: the graph with marks, which cost a little) loads and compute."""
        if not getattr(self, "_graphs", None):
            raise ColdStartError("no CUDA graph captured: call capture(*inputs) first")
        if timed and not cold:
            raise ColdStartError("only the cold graph carries timing marks")
        self.program.check_inputs(inputs)
        graph, leaves, marks = self._graphs[cold, timed]
        self.tier.begin(cold)
        t0 = time.perf_counter()
        for static, x in zip(self._static, inputs):
            static.copy_(x, non_blocking=True)
        graph.replay()
        torch.cuda.synchronize(self.tier.device)  # type: ignore[union-attr]
        total = (time.perf_counter() - t0) * 1e3
        outputs = {o.name: t.clone() for o, t in zip(self.program.outputs, leaves)}
        rows = marks.rows(self.layers, self.plan) if marks is not None else ()
        return outputs, Timeline(self.plan.strategy, "host-graph", total, -1.0, -1.0, rows, None, cold)

    def _walk_captured(self, inputs: Sequence[torch.Tensor], cold: bool, marks: _GraphMarks | None) -> Any:
        """The scheduled graph's walk under capture: no thread, clock or synchronize, only the work (and
        timing marks where asked)."""
        tier = self.tier
        assert isinstance(tier, HostTier)
        plan = self.plan
        groups, members = self._groups, self._members
        compute = torch.cuda.current_stream(tier.device)
        pending: dict[int, PendingLoad | dict[str, torch.Tensor]] = {}
        forked: set[int] = set()  # channels whose copy stream joined the capture
        if marks is not None:
            marks.start.record()

        def issue(g: int) -> None:
            if g in pending:
                return
            layers = self._group_ranges(g)
            if cold:
                forked.add(plan.layers[g][3])
                load = tier.load(*layers, channel=plan.layers[g][3], after=compute, timed=marks is not None)
                if marks is not None:
                    for i in members[g]:
                        marks.loads[i] = (load.started, load.ended)
                pending[g] = load
            else:
                pending[g] = tier.resident(*layers)

        for g in self._groups_issued_at_start(groups):
            issue(g)
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        waited: set[int] = set()
        current: int | None = None
        for node, seg in self._node_steps:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "get_attr":
                env[node] = self._attr_value(str(node.target))
            elif node.target is PREFETCH:
                issue(groups[node.args[2]])
                env[node] = env[node.args[0]]
            elif node.target is WAIT:
                g = groups[node.args[1]]
                got = pending[g]
                if isinstance(got, PendingLoad):
                    if g not in waited:
                        compute.wait_event(got.done)
                        waited.add(g)
                    got = got.tensors
                env[node] = got[str(_source(node).target)]
            elif node.op == "call_function":
                if marks is not None and seg is not None and seg != current:
                    marks.boundary(current, seg)
                    current = seg
                env[node] = node.target(*fx.node.map_arg(node.args, env.__getitem__),
                                        **fx.node.map_arg(node.kwargs, env.__getitem__))
            elif node.op == "output":
                leaves = fx.node.map_arg(node.args[0], env.__getitem__)
        if marks is not None:
            marks.boundary(current, None)
        for channel in sorted(forked):  # join every fork before the capture ends
            compute.wait_stream(tier.streams[channel])
        return leaves


class _GraphMarks:
    """Timing marks recorded by a captured graph (external events, which a replay records): the start,
    each segment's start and end on the compute stream, each load's start and end on its copy stream."""

    def __init__(self, n: int) -> None:
        self.start = torch.cuda.Event(enable_timing=True, external=True)
        self.seg: list[list[torch.cuda.Event | None]] = [[None, None] for _ in range(n)]
        self.loads: dict[int, tuple[torch.cuda.Event | None, torch.cuda.Event | None]] = {}

    def boundary(self, ending: int | None, starting: int | None) -> None:
        event = torch.cuda.Event(enable_timing=True, external=True)
        event.record()
        if ending is not None and ending >= 0:
            self.seg[ending][1] = event
        if starting is not None and starting >= 0:
            self.seg[starting][0] = event

    def rows(self, layers: Layers, plan: LoadPlan) -> tuple[LayerTiming, ...]:
        def ms(e: torch.cuda.Event | None) -> float:
            return -1.0 if e is None else float(self.start.elapsed_time(e))

        out = []
        last = 0.0
        for i, (layer, entry) in enumerate(zip(layers, plan.layers)):
            ls, le = (ms(a) for a in self.loads.get(i, (None, None)))
            cs, ce = (ms(e) for e in self.seg[i])
            if cs < 0:  # an empty segment (the layer shares its first use with the next one)
                cs = ce = last
            last = ce
            out.append(LayerTiming(layer.name, entry[1], entry[3], ls, le, cs, ce, 0.0))
        return tuple(out)


class _ChunkStream:
    """The disk tier's loads as one queue of chunk reads in issue order, taken by `depth` workers (see
    READ_DEPTH); a group's future gets `finish(group, first chunk's start)` once its last chunk is in."""

    def __init__(self, tier: DiskTier, clock: _Clock, finish: Callable[[int, Any], Any], depth: int) -> None:
        self.tier, self.clock, self.finish = tier, clock, finish
        self.started = threading.Barrier(depth + 1)  # every worker running, and the caller
        self.chunks: collections.deque[tuple[int, int, int]] = collections.deque()  # (group, start, end)
        self.more = threading.Condition()
        self.futures: dict[int, Future[Any]] = {}
        self.left: dict[int, int] = {}  # per group: chunks not yet read
        self.first_start: dict[int, Any] = {}
        self.finished = False
        # one read in flight until compute has its first load: until then that load is the critical path,
        # and a second read would share the disk with it (ResNet-50's first compute: 1.4 ms, 2.3 without)
        self.opened = threading.Event()

    def add(self, groups: Sequence[tuple[int, Future[Any], Sequence[tuple[int, int]]]]) -> None:
        """Queue these groups' chunk reads (group, its future, its chunks) behind those queued already."""
        with self.more:
            for g, future, spans in groups:
                self.futures[g], self.left[g] = future, len(spans)
                self.chunks.extend((g, a, b) for a, b in spans)
            self.more.notify_all()

    def start(self, pool: ThreadPoolExecutor, timeout_s: float = 10.0) -> None:
        """Start the workers on `pool` and return once every one is running."""
        workers = self.started.parties - 1
        for k in range(workers):
            pool.submit(self.work, k)
        try:
            self.started.wait(timeout_s)
        except threading.BrokenBarrierError:
            raise ColdStartError(f"the disk stream's {workers} read workers were not all running after "
                                 f"{timeout_s:.0f} s (is the I/O pool smaller than read_depth?)") from None

    def open(self) -> None:
        """Compute has its first load: let every worker read."""
        self.opened.set()

    def close(self) -> None:
        """The run is over: workers leave once the queue is empty."""
        self.opened.set()
        with self.more:
            self.finished = True
            self.more.notify_all()

    def work(self, k: int) -> None:
        """Worker `k`: read chunks in queue order until the run is over (all but the first once open)."""
        self.started.wait()
        if k:
            self.opened.wait()
        while True:
            try:
                g, a, b = self.chunks.popleft()
            except IndexError:
                with self.more:
                    while not self.chunks and not self.finished:
                        self.more.wait()
                    if not self.chunks:
                        return
                continue
            self.first_start.setdefault(g, self.clock.now())
            future = self.futures[g]
            try:
                self.tier.read_span(a, b)
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            with self.more:
                self.left[g] -= 1
                if self.left[g] or future.done():
                    continue
            future.set_result(self.finish(g, self.first_start[g]))


class _Clock:
    """Marks of when things happened, in ms since the run began: CPU, the wall clock as they happen."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> Any:
        return (time.perf_counter() - self.t0) * 1e3

    def ms(self, mark: Any) -> float:
        return float(mark)


class _CudaClock(_Clock):
    """GPU: marks are events recorded on the current stream (the CPU runs ahead of the device: a mark
    happens when the device reaches it), read once the run has synchronized."""

    def __init__(self) -> None:
        super().__init__()
        self.start = self.now()

    def now(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, mark: Any) -> float:
        return float(self.start.elapsed_time(mark))


def _pin_this_thread(cpus: set[int] | None) -> set[int] | None:
    """Run the calling thread on `cpus` (nothing when empty or None); returns the CPUs it ran on before,
    None when it was not pinned. Pinning only helps timings: a refusal (a cpuset) leaves it as it was."""
    if not cpus:
        return None
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)  # 0: this thread
    except OSError:
        return None
    return before


Step = tuple[fx.Node, "int | None", "Callable[[dict[fx.Node, Any]], None] | None"]


def _compile_runs(steps: Sequence[tuple[fx.Node, int | None]], singles: Collection[fx.Node]) -> list[Step]:
    """The walk's steps, with every run of two or more operators of one segment (no schedule node, none in
    `singles`) made one generated function over the walk's environment, its marks taken once after its last
    operator: interpreting each node (two `map_arg`s, the dispatch on its kind, a timing mark) cost BERT-base's
    compute 1.2-1.6 ms of ~86 ms. The first node of a run stands for it."""

    def compilable(n: fx.Node) -> bool:
        return n.op == "call_function" and not is_schedule_node(n) and n not in singles

    out: list[Step] = []
    i = 0
    while i < len(steps):
        node, seg = steps[i]
        j = i + 1
        if compilable(node):
            while j < len(steps) and steps[j][1] == seg and compilable(steps[j][0]):
                j += 1
        out.append((node, seg, _run_function([n for n, _ in steps[i:j]]) if j - i > 1 else None))
        i = j
    return out


def _run_function(nodes: Sequence[fx.Node]) -> Callable[[dict[fx.Node, Any]], None]:
    """One Python function computing `nodes` in order, each into `env[node]` (what interpreting them one by
    one does, without the interpreter)."""
    names: dict[str, Any] = {}

    def bind(value: Any, prefix: str) -> str:
        name = f"{prefix}{len(names)}"
        names[name] = value
        return name

    def expr(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"env[{bind(a, 'n')}]"
        if isinstance(a, tuple):
            return "(" + "".join(f"{expr(x)}, " for x in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(expr(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{bind(k, 'c')}: {expr(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({expr(a.start)}, {expr(a.stop)}, {expr(a.step)})"
        return bind(a, "c")

    lines = ["def run(env):"]
    for node in nodes:
        args = [expr(a) for a in node.args]
        args += [f"{k}={expr(v)}" if k.isidentifier() and not keyword.iskeyword(k) else
                 f"**{{{bind(k, 'c')}: {expr(v)}}}" for k, v in node.kwargs.items()]
        lines.append(f"    env[{bind(node, 'n')}] = {bind(node.target, 'f')}({', '.join(args)})")
    scope = dict(names)
    exec(compile("\n".join(lines), f"<morphc cold-start run {nodes[0].name}..{nodes[-1].name}>", "exec"), scope)
    return scope["run"]


def _source(node: fx.Node) -> fx.Node:
    while is_schedule_node(node):
        node = node.args[0]  # type: ignore[assignment]
    return node


def run_cold(program: Program, weights: WeightsFile | str | Path, inputs: Sequence[torch.Tensor], *,
             runs: int = 1, device: str = "cpu") -> list[Timeline]:
    """`runs` cold first inferences of a scheduled program; the timelines in order."""
    exe = ColdStartExecutor(program, weights, device=device)
    return [exe.run(*inputs, cold=True)[1] for _ in range(runs)]
