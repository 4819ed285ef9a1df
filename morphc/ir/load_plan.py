"""Load plans in the IR: layers, per-layer costs, the `load-plan` annotation and the schedule ops.

When a model's weights start off the device (on disk for a CPU, in host memory for a GPU), the
first inference can overlap reading weights with computing on the weights already there, and can
compute on some weights where they lie ("direct access": an mmap'd file page, mapped pinned host
memory) instead of copying them first (DeepPlan, EuroSys'23; PipeSwitch, OSDI'20).

This module holds what the IR needs to express such a schedule; planning is the
`insert-load-schedule` pass and running it is `morphc.runtime.cold_start` (over
`morphc.runtime.memory_tiers` and `morphc.runtime.weights_file`):

- `group_layers`: the unit of loading. Parameters are grouped by the module that owns them
  (`layer1.0.conv1.weight` and `.bias` -> layer `layer1.0.conv1`), ordered by first use; the
  graph's compute nodes are cut into one segment per layer at each layer's first use.
- Two schedule operators, `morphc::prefetch(weight, after, layer)` and `morphc::wait(weight,
  layer)`, identities on the weight (they return an alias: no copy, no numeric change). A loaded
  weight flows `get_attr -> prefetch -> wait -> users`; `prefetch` takes as `after` the last
  activation computed before the load is issued, so its place in the dataflow is the issue time
  (and constant folding cannot hoist it); `wait` sits right before the layer's first use. A
  direct-access weight keeps its plain `get_attr`. Running the Program eagerly gives exactly the
  unscheduled outputs; torch.export/ONNX decompose the ops to `alias` (CompositeImplicitAutograd).
- `LayerCosts`: a per-layer profile (load, compute resident, compute with direct access).
- `LoadPlan`: the program annotation holding the chosen plan and its predicted timeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from morphc.ir.annotations import Annotation, annotation
from morphc.ir.metadata import META_KEY, MODULE_PATH_KEY, op_name

if TYPE_CHECKING:
    from morphc.ir.program import Program

# --- the schedule operators ----------------------------------------------------------------------

_LIB = torch.library.Library("morphc", "FRAGMENT")  # FRAGMENT: other modules may add morphc ops too
_LIB.define("prefetch(Tensor(a) weight, Tensor? after, int layer) -> Tensor(a)")
_LIB.define("wait(Tensor(a) weight, int layer) -> Tensor(a)")


def _prefetch_impl(weight: torch.Tensor, after: torch.Tensor | None, layer: int) -> torch.Tensor:
    return torch.ops.aten.alias.default(weight)


def _wait_impl(weight: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.ops.aten.alias.default(weight)


# CompositeImplicitAutograd: works on every backend and under fake tensors, and exporters see `alias`
_LIB.impl("prefetch", _prefetch_impl, "CompositeImplicitAutograd")
_LIB.impl("wait", _wait_impl, "CompositeImplicitAutograd")

PREFETCH = torch.ops.morphc.prefetch.default
WAIT = torch.ops.morphc.wait.default
SCHEDULE_OPS = (PREFETCH, WAIT)

MODES = ("load", "direct")
STRATEGIES = ("plan", "pipeline", "on-demand", "direct")


def is_schedule_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SCHEDULE_OPS


def weight_source(node: fx.Node) -> fx.Node | None:
    """The get_attr node a value is, looking through prefetch/wait; None for computed values."""
    while is_schedule_node(node):
        node = node.args[0]  # type: ignore[assignment]
    return node if node.op == "get_attr" else None


# --- layers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One unit of loading: the parameters one module owns, and the compute segment that starts
    at their first use (the nodes up to the next layer's first use)."""

    index: int
    name: str
    attrs: tuple[str, ...]  # GraphModule attributes (get_attr targets) of the layer's tensors
    nbytes: int
    touched_bytes: int  # bytes direct access reads (embedding lookups touch only their rows)
    first_use: str  # name of the first compute node reading the layer
    nodes: tuple[str, ...]  # compute nodes of the segment, in graph order
    flops: int
    bytes_moved: int


@dataclass(frozen=True)
class Layers:
    """The layer view of a Program: layers in first-use order plus the prologue (compute that
    reads no parameter and comes before the first layer)."""

    layers: tuple[Layer, ...]
    prologue: tuple[str, ...]
    prologue_flops: int
    prologue_bytes_moved: int

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def segment_of(self) -> dict[str, int]:
        """Compute node name -> layer index (-1 for the prologue)."""
        out = dict.fromkeys(self.prologue, -1)
        for layer in self.layers:
            out.update(dict.fromkeys(layer.nodes, layer.index))
        return out

    def by_attr(self) -> dict[str, int]:
        return {a: layer.index for layer in self.layers for a in layer.attrs}


PAGE = 4096


def _layer_key(node: fx.Node) -> str:
    path = node.meta.get(MODULE_PATH_KEY) or ""
    if META_KEY in node.meta and not path:
        path = node.meta[META_KEY].module_path
    if not path:
        return str(node.target)
    return path.rsplit(".", 1)[0] if "." in path else path


def _tensor_nbytes(program: Program, attr: str) -> int:
    t = program.tensor(attr)
    return t.numel() * t.element_size()


def _touched(program: Program, get_attr: fx.Node, uses: Iterable[fx.Node]) -> int:
    """Bytes of this tensor that computing on it in place reads: rows for embedding lookups, all else."""
    t = program.tensor(str(get_attr.target))
    full = t.numel() * t.element_size()
    rows = 0
    for use in uses:
        source = use.args[0] if isinstance(use.args[0], fx.Node) else None
        if op_name(use.target) != "embedding" or source is None or weight_source(source) is not get_attr:
            return full
        indices = use.args[1]
        meta = indices.meta.get(META_KEY) if isinstance(indices, fx.Node) else None
        if meta is None or not meta.outputs:
            return full
        n = 1
        for d in meta.outputs[0].shape:
            n *= d
        rows += n
    if rows == 0 or t.dim() != 2:
        return full
    row_bytes = t.shape[1] * t.element_size()
    return min(full, rows * (row_bytes + PAGE))  # a row touches its pages (at most one more than it spans)


def _compute_users(node: fx.Node) -> list[fx.Node]:
    """The compute nodes reading a weight, looking through schedule nodes."""
    out: list[fx.Node] = []
    for user in node.users:
        if is_schedule_node(user):
            out += _compute_users(user)
        elif user.op == "call_function":
            out.append(user)
    return out


def group_layers(program: Program) -> Layers:
    """Group the program's parameters into layers by owning module, ordered by first use.

    Works on scheduled programs too (schedule nodes are looked through), so the executor and the
    pass see the same layers.
    """
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    groups: dict[str, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.op == "get_attr" and _compute_users(node):
            groups.setdefault(_layer_key(node), []).append(node)
    first_use: dict[str, fx.Node] = {}
    for key, attrs in groups.items():
        first_use[key] = min((u for a in attrs for u in _compute_users(a)), key=order.__getitem__)
    ordered = sorted(groups, key=lambda k: (order[first_use[k]], min(order[a] for a in groups[k])))
    starts = {first_use[k]: k for k in reversed(ordered)}  # several layers may start at one node
    compute = [n for n in program.graph.nodes if n.op == "call_function" and not is_schedule_node(n)]
    segments: dict[str, list[str]] = {k: [] for k in ordered}
    prologue: list[str] = []
    current: str | None = None
    for node in compute:
        if node in starts:
            current = max((k for k in ordered if first_use[k] is node), key=ordered.index)
        (segments[current] if current is not None else prologue).append(node.name)
    by_name = {n.name: n for n in compute}

    def cost(names: Sequence[str]) -> tuple[int, int]:
        metas = [by_name[n].meta.get(META_KEY) for n in names]
        return sum(m.flops for m in metas if m), sum(m.bytes_moved for m in metas if m)

    layers = []
    for i, key in enumerate(ordered):
        attrs = groups[key]
        unique = list(dict.fromkeys(str(a.target) for a in attrs))
        touched = sum(_touched(program, a, _compute_users(a)) for a in attrs)
        flops, moved = cost(segments[key])
        layers.append(Layer(i, key, tuple(unique), sum(_tensor_nbytes(program, a) for a in unique),
                            min(touched, sum(_tensor_nbytes(program, a) for a in unique)),
                            first_use[key].name, tuple(segments[key]), flops, moved))
    pflops, pmoved = cost(prologue)
    return Layers(tuple(layers), tuple(prologue), pflops, pmoved)


def layer_profile_key(program: Program) -> str:
    """What a layer profile depends on: the layers (names, bytes) and each segment's operators and
    shapes; the same for a program before and after scheduling (schedule nodes are left out)."""
    layers = group_layers(program)
    by_name = {n.name: n for n in program.graph.nodes}
    parts = [f"prologue:{_ops(by_name, layers.prologue)}"]
    for layer in layers:
        parts.append(f"{layer.name}:{layer.nbytes}:{layer.touched_bytes}:{_ops(by_name, layer.nodes)}")
    parts += [f"in:{s}" for s in program.inputs]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()


def _ops(by_name: dict[str, fx.Node], names: Sequence[str]) -> str:
    out = []
    for name in names:
        node = by_name[name]
        meta = node.meta.get(META_KEY)
        shapes = ",".join(str(o) for o in meta.outputs) if meta else "?"
        out.append(f"{op_name(node.target)}[{shapes}]")
    return ";".join(out)


# --- per-layer costs -----------------------------------------------------------------------------


def io_ms(nbytes: int, gbs: float) -> float:
    """Time to move `nbytes` at `gbs` GB/s (0 when no rate is known)."""
    return nbytes / (gbs * 1e6) if gbs > 0 else 0.0


def reads_sparsely(layer: Layer | LayerCost) -> bool:
    """Whether computing on the layer where it lies reads less than half of it (an embedding lookup
    reads its rows). On one disk only such layers are worth computing in place: a dense layer computed
    there reads the same bytes from the same disk, a page fault at a time, while the loads behind it
    wait or compete. Measured: BERT-base's 9.4 MB `layer.0.output.dense`, planned in place at 29 ms
    beside the streaming loads, took 105 ms in the cold runs, and the plan 186 ms against the
    pipeline's 145 ms. The disk tier also asks for a sparse layer's pages row by row, a dense one's
    all at once."""
    return layer.touched_bytes < layer.nbytes // 2


def read_ms(nbytes: int, gbs: float, overhead_ms: float) -> float:
    """The load cost of one read: its fixed overhead plus its bytes at the streaming rate. The one
    model the measured profile, the analytic estimate and re-simulation at another speed share."""
    return overhead_ms + io_ms(nbytes, gbs)


@dataclass(frozen=True)
class LayerCost:
    """Measured or estimated costs of one layer, in milliseconds."""

    name: str
    nbytes: int
    touched_bytes: int
    load_ms: float  # read/copy the layer's weights to the device tier (one channel, cold)
    compute_ms: float  # compute the layer's segment with the weights resident
    direct_ms: float  # compute the segment on the weights where they lie (cold: includes the reads)
    # CPU time to queue the segment's kernels where the device runs them asynchronously (GPU): the CPU
    # walks the graph ahead of the device, also while it waits for loads; 0 where compute is synchronous
    dispatch_ms: float = 0.0


@dataclass(frozen=True)
class LayerCosts:
    """A per-layer profile: what the planner simulates. `source` says where it came from
    ("measured" from the records database, "analytic" from metadata)."""

    layers: tuple[LayerCost, ...]
    prologue_ms: float
    source: str
    tier: str  # "disk" (file -> RAM, CPU) or "host" (pinned host -> GPU memory)
    bandwidth_gbs: float  # read/copy bandwidth one channel achieves (GB/s)
    link_gbs: float = 0.0  # device-to-device link for parallel transmission (GB/s), 0 when none
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    read_overhead_ms: float = 0.0  # fixed cost of one read/copy (syscall, latency, hand-off), in every load_ms
    overlap_slowdown: float = 1.0  # compute runs this much slower while loads are still streaming in
    read_slowdown: float = 1.0  # and loads read this much slower while compute runs beside them
    readahead_bytes: int = 0  # how far the kernel reads ahead of a sequential reader (queued before a fault)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(c) for c in self.layers]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerCosts:
        data = dict(data)
        layers = tuple(LayerCost(**c) for c in data.pop("layers"))
        return cls(layers=layers, **data)

    def at_speed(self, compute_scale: float = 1.0, bandwidth_gbs: float | None = None) -> LayerCosts:
        """These costs on the same machine at another speed: compute times times `compute_scale`, loads
        at another streaming rate (the per-read overhead kept; direct times, which include their reads,
        scale as compute). For comparing a prediction with runs
        taken while a shared machine ran faster or slower than when it was profiled."""
        bw = self.bandwidth_gbs if bandwidth_gbs is None else bandwidth_gbs
        reload = bandwidth_gbs is not None and bandwidth_gbs > 0
        layers = tuple(replace(c, compute_ms=c.compute_ms * compute_scale, direct_ms=c.direct_ms * compute_scale,
                               load_ms=read_ms(c.nbytes, bw, self.read_overhead_ms) if reload else c.load_ms)
                       for c in self.layers)
        return replace(self, layers=layers, prologue_ms=self.prologue_ms * compute_scale, bandwidth_gbs=bw)

    def check_matches(self, layers: Layers) -> list[str]:
        """Problems using this profile for these layers (empty when it fits)."""
        if len(self.layers) != len(layers):
            return [f"profile has {len(self.layers)} layers but the program has {len(layers)}"]
        return [f"layer {i}: profile is for '{c.name}', program has '{layer.name}'"
                for i, (c, layer) in enumerate(zip(self.layers, layers)) if c.name != layer.name][:3]


# --- the plan annotation -------------------------------------------------------------------------

# one entry of LoadPlan.layers: (name, mode, issue_after, channel, nbytes, group); `group` is the index of
# the first layer of the load group the layer is read with (one read for consecutive loaded layers; the
# layer's own index when it is read alone, -1 for direct access). Five-field entries (no group) mean
# every loaded layer is read alone.
# one entry of LoadPlan.predicted: (load_start, load_end, compute_start, compute_end) in ms, -1 when none


@annotation("load-plan", scope="program")
class LoadPlan(Annotation):
    """Which layers load and which are computed on in place, when each load is issued, on which
    channel, and the timeline the planner predicted for the first inference from the cold state."""

    strategy: str
    tier: str
    channels: int
    profile: str  # where the costs came from: "measured" | "analytic" | ...
    layers: tuple  # ((name, mode, issue_after, channel, nbytes, group), ...) in first-use order
    predicted: tuple  # ((load_start, load_end, compute_start, compute_end), ...) ms
    predicted_total_ms: float
    prologue_ms: float = 0.0

    def modes(self) -> tuple[str, ...]:
        return tuple(e[1] for e in self.layers)

    def groups(self) -> tuple[int, ...]:
        """Per layer, the first layer of its load group (-1 for direct access)."""
        return entry_groups(self.layers)

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        problems = plan_problems(self.strategy, self.channels, self.layers, self.predicted)
        loaded = {i for i, e in enumerate(self.layers) if e[1] == "load"}
        for n in program.graph.nodes:
            if is_schedule_node(n):
                layer = n.args[-1] if n.target is PREFETCH else n.args[1]
                if not isinstance(layer, int) or layer not in loaded:
                    problems.append(f"%{n.name} schedules layer {layer!r}, which the plan does not load")
                elif n.target is WAIT and not (isinstance(n.args[0], fx.Node) and n.args[0].target is PREFETCH
                                               and n.args[0].args[2] == layer):
                    problems.append(f"%{n.name} waits for layer {layer} without a prefetch of that layer before it")
        return problems


def entry_groups(layers: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    """Per plan entry, the first layer of its load group (its own index when the entry has no group
    field, -1 for direct access)."""
    return tuple(-1 if e[1] != "load" else (e[5] if len(e) > 5 else i) for i, e in enumerate(layers))


def group_members(groups: Sequence[int]) -> dict[int, list[int]]:
    """First layer of each read group -> the layers read with it, in order (direct layers, -1, left out)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            members.setdefault(g, []).append(i)
    return members


def plan_problems(strategy: str, channels: int, layers: Sequence[Sequence[Any]],
                  predicted: Sequence[Sequence[float]] = ()) -> list[str]:
    """Why a plan is not executable (empty when it is): every load issued before its layer is used,
    on an existing channel; and, if a timeline is given, no layer computed before its weights arrived."""
    problems: list[str] = []
    if strategy not in STRATEGIES:
        problems.append(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if channels < 1:
        problems.append(f"channels must be >= 1, got {channels}")
    for i, entry in enumerate(layers):
        if len(entry) not in (5, 6):
            problems.append(f"layer entry {i} must be (name, mode, issue_after, channel, nbytes[, group]), "
                            f"got {entry!r}")
            continue
        name, mode, issue_after, channel, _ = entry[:5]
        if mode == "load" and len(entry) == 6:
            problems += _group_problems(layers, i)
        if mode not in MODES:
            problems.append(f"layer {i} ('{name}') has mode {mode!r}; valid modes: {', '.join(MODES)}")
        elif mode == "load" and not (isinstance(issue_after, int) and -1 <= issue_after < i):
            problems.append(f"layer {i} ('{name}') is loaded after segment {issue_after!r}: a load must be "
                            f"issued before the layer's own segment (-1 <= issue_after < {i})")
        if mode == "load" and not (isinstance(channel, int) and 0 <= channel < max(channels, 1)):
            problems.append(f"layer {i} ('{name}') uses channel {channel!r}; the plan has {channels}")
    if predicted and len(predicted) != len(layers):
        problems.append(f"predicted timeline has {len(predicted)} entries for {len(layers)} layers")
    elif predicted:
        for i, ((name, mode, *_), (_ls, le, cs, ce)) in enumerate(zip(layers, predicted)):
            if mode == "load" and cs + 1e-9 < le:
                problems.append(f"layer {i} ('{name}') is predicted to compute at {cs:.3f} ms before its load "
                                f"ends at {le:.3f} ms")
            if ce + 1e-9 < cs:
                problems.append(f"layer {i} ('{name}') ends before it starts in the predicted timeline")
    return problems


def _group_problems(layers: Sequence[Sequence[Any]], i: int) -> list[str]:
    """A loaded layer's group must start at a loaded layer at or before it, every layer in between
    belonging to the same group, read on the same channel and issued at the same point."""
    name, group = layers[i][0], layers[i][5]
    if not (isinstance(group, int) and 0 <= group <= i):
        return [f"layer {i} ('{name}') is read with group {group!r}; a group starts at a loaded layer "
                f"at or before it (0 <= group <= {i})"]
    span = layers[group:i + 1]
    if any(len(e) != 6 or e[1] != "load" or e[5] != group or e[2:4] != layers[i][2:4] for e in span):
        return [f"layer {i} ('{name}') is read with group {group}, but layers {group}..{i} are not all loaded "
                "in that group on the same channel and issue point: a group is one contiguous read"]
    return []


def plan_to_json(plan: LoadPlan) -> str:
    """The plan as readable JSON (one object per layer)."""
    rows = []
    for entry, group, (ls, le, cs, ce) in zip(plan.layers, plan.groups(), plan.predicted):
        name, mode, issue_after, channel, nbytes = entry[:5]
        rows.append({"layer": name, "mode": mode, "issue_after": issue_after, "channel": channel, "bytes": nbytes,
                     "group": group, "load_start_ms": ls, "load_end_ms": le, "compute_start_ms": cs,
                     "compute_end_ms": ce})
    doc = {"format": "morphc.load-plan", "version": 1, "strategy": plan.strategy, "tier": plan.tier,
           "channels": plan.channels, "profile": plan.profile, "prologue_ms": plan.prologue_ms,
           "predicted_total_ms": plan.predicted_total_ms, "layers": rows}
    return json.dumps(doc, indent=1)


def plan_from_json(text: str) -> LoadPlan:
    """Read a plan written by `plan_to_json` (ValueError naming what is missing when malformed)."""
    doc = json.loads(text)
    if doc.get("format") != "morphc.load-plan":
        raise ValueError(f"not a morphc load plan (format={doc.get('format')!r})")
    try:
        layers = tuple((r["layer"], r["mode"], r["issue_after"], r["channel"], r["bytes"],
                        r.get("group", i if r["mode"] == "load" else -1)) for i, r in enumerate(doc["layers"]))
        predicted = tuple((r["load_start_ms"], r["load_end_ms"], r["compute_start_ms"], r["compute_end_ms"])
                          for r in doc["layers"])
        return LoadPlan(doc["strategy"], doc["tier"], doc["channels"], doc["profile"], layers, predicted,
                        doc["predicted_total_ms"], doc.get("prologue_ms", 0.0))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"load plan file lacks {exc}") from exc
