"""Retiarii-style mutators over the IR, a sampler interface that strategies implement, and a
recorded mutation history (the `fusion-provenance` annotation) that replays any candidate.

A `Mutator` rewrites a Program in place; every decision it makes goes through `self.choice(...)`,
which asks a `Sampler` (a search strategy: random, annealing, greedy, or `FixedSampler` replaying
recorded choices). The choices (node names, JSON values) are recorded, so a candidate is the
original Program plus a list of `MutationRecord`s, and `replay(original, records)` rebuilds it
exactly: at the same or another batch size (node names do not depend on shapes), in another
process, after a crash.

Mutators:
  input     rewires one input of a node to another earlier value of the same shape (Retiarii's input mutator)
  operator  swaps an operator for another of the same signature (activations; add/sub/mul)
  insert    inserts an identity-initialised trainable layer (1x1 conv / linear) after a value
  merge     fusion: a layer output of task B is replaced by the corresponding output of task A
            (through a small trainable adapter when shapes differ); B then shares A's upstream and
            B's own upstream is removed. Merge points are block boundaries: nodes that dominate the
            task's output in its dataflow graph (single-tensor cut points), so residual blocks and
            attention layers are merged whole.

Every mutation leaves a valid Program (verified by a property test): nodes are re-sorted
topologically, dead nodes and tensors are removed and metadata recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import networkx as nx
import torch
import torch.fx as fx

from morphc.errors import MorphcError
from morphc.ir.annotations import ANNOTATIONS_KEY, SharedBy
from morphc.ir.metadata import META_KEY, MODULE_PATH_KEY, OpClass, node_meta
from morphc.ir.printer import format_arg, print_node
from morphc.ir.program import Program
from morphc.ir.provenance import FusionAdapter, FusionProvenance
from morphc.passes.graph_utils import fresh_attr, is_pure, remove_unused_tensors, task_reach

aten = torch.ops.aten


class MutationError(MorphcError, ValueError):
    """A mutation that cannot be applied or replayed (no candidates, a recorded choice that no longer fits)."""


class NoCandidates(MutationError):
    """The mutator found nothing to choose from in this program."""


# --- records and samplers --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class MutationRecord:
    """One applied mutation: which mutator (with its parameters) and the choices it made, in order."""

    mutator: str
    params: tuple[tuple[str, Any], ...]
    choices: tuple[Any, ...]

    def to_json(self) -> str:
        return json.dumps({"mutator": self.mutator, "params": dict(self.params),
                           "choices": _jsonable(list(self.choices))}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MutationRecord:
        try:
            data = json.loads(text)
            return cls(data["mutator"], tuple(sorted(data.get("params", {}).items())), tuple(data["choices"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MutationError(f"not a mutation record: {text!r} ({exc})") from exc

    def key(self) -> str:
        """A stable identity (two records with equal keys make the same change)."""
        return self.to_json()


class Sampler(ABC):
    """What a search strategy implements: pick one of `candidates` for `mutator`'s `index`-th decision."""

    @abstractmethod
    def choice(self, candidates: Sequence[Any], mutator: Mutator, program: Program, index: int) -> Any:
        """Return one element of `candidates` (never empty)."""


class RandomSampler(Sampler):
    """Uniform random choices from a seeded generator (deterministic for a seed)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choice(self, candidates: Sequence[Any], mutator: Mutator, program: Program, index: int) -> Any:
        return candidates[self.rng.randrange(len(candidates))]


class FixedSampler(Sampler):
    """Replays recorded choices; a choice that is not among the candidates any more is an error."""

    def __init__(self, choices: Sequence[Any]) -> None:
        self.choices = list(choices)

    def choice(self, candidates: Sequence[Any], mutator: Mutator, program: Program, index: int) -> Any:
        if index >= len(self.choices):
            raise MutationError(f"mutator '{mutator.name}' asks for decision #{index} but only "
                                f"{len(self.choices)} were recorded")
        wanted = json.dumps(_jsonable(self.choices[index]))
        for c in candidates:
            if json.dumps(_jsonable(c)) == wanted:
                return c
        raise MutationError(f"recorded choice {self.choices[index]!r} of mutator '{mutator.name}' is not valid "
                            f"in this program ({len(candidates)} candidates); was the history recorded on "
                            "another program?")


# --- mutator base and registry ---------------------------------------------------------------------

MUTATORS: dict[str, type[Mutator]] = {}


def register_mutator(cls: type[Mutator]) -> type[Mutator]:
    MUTATORS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Mutator(ABC):
    """Rewrites a Program in place; all decisions go through `choice` so they can be replayed."""

    name: ClassVar[str]

    def candidates(self, program: Program) -> list[Any]:
        """The first decision's options (used by strategies that rank them, and by `applicable`)."""
        return []

    @abstractmethod
    def mutate(self, program: Program, choose: _Chooser) -> None:
        """Make the change, calling `choose(candidates)` for every decision."""

    def apply(self, program: Program, sampler: Sampler) -> MutationRecord:
        """Mutate `program` in place, tidy it (topological order, dead code, metadata) and record."""
        original = program.annotation(FusionProvenance)
        if original is None:
            original = FusionProvenance(program_digest(program), program.tasks, ())
        chooser = _Chooser(self, program, sampler)
        self.mutate(program, chooser)
        tidy(program)
        record = MutationRecord(self.name, tuple(sorted(dataclasses.asdict(self).items())), tuple(chooser.made))
        program.annotate(FusionProvenance(original.original, original.tasks, (*original.mutations, record.to_json())))
        return record


class _Chooser:
    def __init__(self, mutator: Mutator, program: Program, sampler: Sampler) -> None:
        self.mutator, self.program, self.sampler = mutator, program, sampler
        self.made: list[Any] = []

    def __call__(self, candidates: Sequence[Any]) -> Any:
        if not candidates:
            raise NoCandidates(f"mutator '{self.mutator.name}' has no candidates in this program")
        picked = self.sampler.choice(candidates, self.mutator, self.program, len(self.made))
        self.made.append(picked)
        return picked


def make_mutator(name: str, params: Any = ()) -> Mutator:
    if name not in MUTATORS:
        raise MutationError(f"unknown mutator '{name}'; known: {', '.join(sorted(MUTATORS))}")
    return MUTATORS[name](**dict(params))


def history(program: Program) -> list[MutationRecord]:
    """The mutations recorded on `program` (empty for an original)."""
    prov = program.annotation(FusionProvenance)
    return [MutationRecord.from_json(t) for t in prov.mutations] if prov else []


def replay(original: Program, records: Sequence[MutationRecord]) -> Program:
    """A copy of `original` with `records` applied in order (the same program they were recorded on,
    possibly lowered at another batch size: node names do not depend on shapes)."""
    program = original.clone()
    for record in records:
        make_mutator(record.mutator, record.params).apply(program, FixedSampler(record.choices))
    return program


# --- graph tidying ---------------------------------------------------------------------------------


def topo_sort(graph: fx.Graph) -> None:
    """Re-order nodes topologically, keeping the current order wherever it is already valid."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n.name) for n in nodes if pending[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        _, name = heapq.heappop(ready)
        node = by_name[name]
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (index[user], user.name))
    if len(order) != len(nodes):
        raise MutationError("the mutation created a cycle in the dataflow graph")
    out = next(n for n in nodes if n.op == "output")
    for node in order:
        if node is not out:
            out.prepend(node)


def eliminate_dead_code(program: Program) -> int:
    removed = 0
    for node in reversed(list(program.graph.nodes)):
        if not node.users and node.op not in ("placeholder", "output") and (node.op == "get_attr" or is_pure(node)):
            program.graph.erase_node(node)
            removed += 1
    remove_unused_tensors(program)
    return removed


def reset_names(program: Program) -> None:
    """Rebuild the graph so its name table holds only live nodes' names.

    fx keeps the names of erased nodes reserved, so a node created later would be named after the
    program's whole past; after this, the names new nodes get depend only on the current graph, and
    a history replays to the same names whichever way (fresh, or from a cached intermediate) it runs.
    """
    graph = fx.Graph()
    out = graph.output(graph.graph_copy(program.graph, {}))
    out.meta.update(program.output_node.meta)
    program.graph_module = fx.GraphModule(program.graph_module, graph)


def tidy(program: Program) -> None:
    """After a rewrite: topological order, no dead code, fresh name table, code and metadata."""
    topo_sort(program.graph)
    eliminate_dead_code(program)
    reset_names(program)
    program.mark_modified()


# --- digests -------------------------------------------------------------------------------------


def structure_digest(program: Program) -> str:
    """Identity of a program's computation (ops, wiring, shapes, module paths), not of its weights
    nor annotations: two histories that make the same graph have the same digest."""
    lines = []
    for node in program.graph.nodes:
        saved = node.meta.pop(ANNOTATIONS_KEY, None)
        try:
            lines.append(print_node(node))
        finally:
            if saved is not None:
                node.meta[ANNOTATIONS_KEY] = saved
    leaves = program.output_node.args[0]
    lines.append(", ".join(f"{spec.name}={format_arg(leaf)}" for spec, leaf in zip(program.outputs, leaves)))
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=12).hexdigest()


_DIGESTS: dict[tuple[Any, ...], tuple[str, list[torch.Tensor]]] = {}


def program_digest(program: Program, *, weights: bool = True) -> str:
    """Structure digest plus (by default) the bytes of every parameter.

    Memoised on the tensors' addresses and versions (the memo holds the tensors, so an address cannot
    be reused while its entry lives): clones share tensors, so replaying many candidates from one
    original hashes its (possibly large) weights once.
    """
    structure = structure_digest(program)
    if not weights:
        return structure
    params = program.parameters()
    memo = (structure, tuple((n, t.data_ptr(), t._version, tuple(t.shape)) for n, t in params.items()))
    if memo not in _DIGESTS:
        h = hashlib.blake2b(structure.encode(), digest_size=12)
        for name, t in params.items():
            h.update(name.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if len(_DIGESTS) >= 8:
            _DIGESTS.clear()
        _DIGESTS[memo] = (h.hexdigest(), list(params.values()))
    return _DIGESTS[memo][0]


# --- analyses: dataflow, cut points ----------------------------------------------------------------

HEAVY = frozenset({OpClass.CONV, OpClass.LINEAR, OpClass.ATTENTION, OpClass.NORM, OpClass.EMBEDDING})


def _single_float(node: fx.Node) -> bool:
    meta = node.meta.get(META_KEY)
    return meta is not None and meta.shape is not None and meta.dtype is not None and meta.dtype.is_floating_point


def heavy_dataflow(program: Program) -> set[fx.Node]:
    """Nodes on the main dataflow: they depend on an input through a heavy operator (conv, linear,
    attention, norm, embedding). Input-only side computations (masks, scaling) are not on it."""
    data: set[fx.Node] = set()
    heavy: set[fx.Node] = set()
    for n in program.graph.nodes:
        if n.op == "placeholder":
            data.add(n)
        elif n.op == "call_function" and any(i in data for i in n.all_input_nodes):
            data.add(n)
            if node_meta(n).op_class in HEAVY or any(i in heavy for i in n.all_input_nodes):
                heavy.add(n)
    return heavy


def dominators(program: Program, task: str, heavy: set[fx.Node] | None = None) -> list[fx.Node]:
    """Nodes every main-dataflow path to `task`'s outputs passes through, in graph order."""
    heavy = heavy_dataflow(program) if heavy is None else heavy
    reach = task_reach(program)
    leaves = [leaf for spec, leaf in zip(program.outputs, program.output_node.args[0])
              if spec.task == task and isinstance(leaf, fx.Node)]
    g: nx.DiGraph = nx.DiGraph()
    source, sink = "__source__", "__sink__"
    g.add_node(source)
    for n in program.graph.nodes:
        if n not in heavy or task not in reach[n]:
            continue
        preds = [i for i in n.all_input_nodes if i in heavy]
        g.add_node(n)
        if not preds:
            g.add_edge(source, n)
        for p in preds:
            g.add_edge(p, n)
    for leaf in leaves:
        if leaf in g:
            g.add_edge(leaf, sink)
    if sink not in g:
        return []
    idom = nx.immediate_dominators(g, source)
    chain = []
    x = idom[sink]
    while x != source:
        chain.append(x)
        x = idom[x]
    return list(reversed(chain))


def cut_points(program: Program, task: str, heavy: set[fx.Node] | None = None) -> list[fx.Node]:
    """Block boundaries of `task`: single-tensor dominators of its outputs, skipping a dominator whose
    only user is the next dominator and a cheap op (conv -> bn -> relu counts once, after the relu)."""
    doms = dominators(program, task, heavy)
    out = []
    for i, node in enumerate(doms):
        if not _single_float(node):
            continue
        nxt = doms[i + 1] if i + 1 < len(doms) else None
        users = list(node.users)
        if (nxt is not None and len(users) == 1 and users[0] is nxt
                and node_meta(nxt).op_class not in HEAVY - {OpClass.NORM}):
            continue
        out.append(node)
    return out


# --- adapters ------------------------------------------------------------------------------------


def adapter_plan(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[str, ...] | None:
    """Layers mapping a value of shape `src` to shape `dst`, or None when no small adapter does."""
    if src == dst:
        return ()
    if not src or not dst or src[0] != dst[0]:
        return None
    if len(src) == 4 and len(dst) == 4:
        steps: list[str] = []
        if src[2:] != dst[2:]:
            if src[2] < dst[2] or src[3] < dst[3]:
                return None  # no upsampling adapters
            steps.append("pool")
        if src[1] != dst[1]:
            steps.append("conv1x1")
        return tuple(steps)
    if len(src) == 2 and len(dst) == 2:
        return ("linear",)
    if len(src) == 3 and len(dst) == 3 and src[1] == dst[1]:
        return ("linear",)
    if len(src) == 4 and len(dst) == 2:
        return ("mean",) if src[1] == dst[1] else ("mean", "linear")
    return None


def stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(parts).encode(), digest_size=4).digest(), "little")


def _new_param(program: Program, base: str, tensor: torch.Tensor, module_path: str) -> fx.Node:
    attr = fresh_attr(program, base)
    program.graph_module.register_buffer(attr, tensor)
    node = program.graph.get_attr(attr)
    node.meta[MODULE_PATH_KEY] = module_path
    return node


def _linear_weight(n_out: int, n_in: int, gen: torch.Generator, identity: bool) -> torch.Tensor:
    if identity and n_out == n_in:
        return torch.eye(n_in)
    return torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5


def build_adapter(program: Program, source: fx.Node, dst: tuple[int, ...], *, task: str, tag: str, seed: int,
                  identity: bool = True) -> tuple[fx.Node, list[str]]:
    """ATen nodes mapping `source` to shape `dst`; returns the last node and the new parameters' names."""
    src = node_meta(source).shape
    assert src is not None
    plan = adapter_plan(src, dst)
    if plan is None:
        raise MutationError(f"no adapter maps {list(src)} to {list(dst)}")
    gen = torch.Generator().manual_seed(seed)
    path = f"{task}.fusion.{tag}"
    x, shape, params = source, src, []
    g = program.graph
    for step in plan:
        if step == "pool":
            x = g.create_node("call_function", aten.adaptive_avg_pool2d.default, (x, [dst[2], dst[3]]),
                              name=f"fusion_{tag}_pool")
            shape = (shape[0], shape[1], dst[2], dst[3])
        elif step == "mean":
            x = g.create_node("call_function", aten.mean.dim, (x, [-2, -1]), name=f"fusion_{tag}_mean")
            shape = (shape[0], shape[1])
        elif step in ("conv1x1", "linear"):
            w = _linear_weight(dst[1] if step == "conv1x1" else dst[-1], shape[1] if step == "conv1x1" else shape[-1],
                               gen, identity)
            if step == "conv1x1":
                w = w[:, :, None, None]
            wn = _new_param(program, f"fusion_{tag}_weight", w.contiguous(), path)
            bn = _new_param(program, f"fusion_{tag}_bias", torch.zeros(w.shape[0]), path)
            params += [str(wn.target), str(bn.target)]
            op = aten.conv2d.default if step == "conv1x1" else aten.linear.default
            x = g.create_node("call_function", op, (x, wn, bn), name=f"fusion_{tag}_{step}")
            shape = (*shape[:-3], w.shape[0], *shape[-2:]) if step == "conv1x1" else (*shape[:-1], w.shape[0])
        x.meta[MODULE_PATH_KEY] = path
    return x, params


# --- the mutators ----------------------------------------------------------------------------------


def _before(program: Program) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(program.graph.nodes)}


@register_mutator
@dataclass(frozen=True)
class InputMutator(Mutator):
    """Rewire one tensor input of a node to another earlier value of the same shape and dtype."""

    name: ClassVar[str] = "input"

    def candidates(self, program: Program) -> list[Any]:
        order = _before(program)
        values = [n for n in program.graph.nodes if n.op in ("placeholder", "call_function") and _single_float(n)]
        by_type: dict[Any, list[fx.Node]] = {}
        for v in values:
            by_type.setdefault(node_meta(v).outputs[0], []).append(v)
        out = []
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            for i, arg in enumerate(node.args):
                if not isinstance(arg, fx.Node) or arg.op == "get_attr" or not _single_float(arg):
                    continue
                for alt in by_type.get(node_meta(arg).outputs[0], []):
                    if alt is not arg and order[alt] < order[node]:
                        out.append((node.name, i, alt.name))
        return out

    def mutate(self, program: Program, choose: _Chooser) -> None:
        name, i, alt = choose(self.candidates(program))
        node = program.node(name)
        args = list(node.args)
        args[i] = program.node(alt)
        node.args = tuple(args)


_UNARY = ("relu", "gelu", "sigmoid", "tanh", "silu")
_BINARY = ("add", "sub", "mul")


def _op_of(name: str) -> Any:
    return getattr(aten, name).default if name in _UNARY else getattr(aten, name).Tensor


@register_mutator
@dataclass(frozen=True)
class OperatorMutator(Mutator):
    """Swap a node's operator for another of the same signature: activations, or add/sub/mul."""

    name: ClassVar[str] = "operator"

    def candidates(self, program: Program) -> list[Any]:
        out = []
        for node in program.graph.nodes:
            if node.op != "call_function" or node.kwargs:
                continue
            for group, n_args in ((_UNARY, 1), (_BINARY, 2)):
                current = next((g for g in group if node.target is _op_of(g)), None)
                if current is None or len(node.args) != n_args:
                    continue
                if n_args == 2 and not all(isinstance(a, fx.Node) and _single_float(a) for a in node.args):
                    continue
                out += [(node.name, g) for g in group if g != current]
        return out

    def mutate(self, program: Program, choose: _Chooser) -> None:
        name, op = choose(self.candidates(program))
        program.node(name).target = _op_of(op)


@register_mutator
@dataclass(frozen=True)
class InsertMutator(Mutator):
    """Insert an identity-initialised trainable layer after a value (1x1 conv on 4-d, else linear on the
    last dimension): the outputs do not change until the layer is trained."""

    name: ClassVar[str] = "insert"
    max_width: int = 512

    def candidates(self, program: Program) -> list[Any]:
        out = []
        for node in program.graph.nodes:
            if node.op not in ("placeholder", "call_function") or not _single_float(node) or not node.users:
                continue
            shape = node_meta(node).shape
            assert shape is not None
            width = shape[1] if len(shape) == 4 else (shape[-1] if len(shape) >= 2 else 0)
            if 1 <= width <= self.max_width:
                out.append(node.name)
        return out

    def mutate(self, program: Program, choose: _Chooser) -> None:
        name = choose(self.candidates(program))
        node = program.node(name)
        shape = node_meta(node).shape
        assert shape is not None
        users = list(node.users)
        w_shape = (shape[1], shape[1], 1, 1) if len(shape) == 4 else (shape[-1], shape[-1])
        tag = f"insert_{name}"
        w = _new_param(program, f"{tag}_weight",
                       torch.eye(w_shape[0]).reshape(w_shape).contiguous(), f"insert.{name}")
        b = _new_param(program, f"{tag}_bias", torch.zeros(w_shape[0]), f"insert.{name}")
        op = aten.conv2d.default if len(shape) == 4 else aten.linear.default
        new = program.graph.create_node("call_function", op, (node, w, b), name=tag)
        new.meta[MODULE_PATH_KEY] = f"insert.{name}"
        for user in users:
            user.replace_input_with(node, new)


def merge_candidates(program: Program, *, adapters: bool = True) -> list[tuple[str, str]]:
    """(target, source) pairs: target is a block boundary exclusive to one task B, source a block
    boundary of another task that B does not use yet, with equal shapes or a small adapter between.
    Task outputs are neither targets (some layers must stay to adapt) nor sources (logits are no features)."""
    heavy = heavy_dataflow(program)
    reach = task_reach(program)
    cuts = {t: cut_points(program, t, heavy) for t in program.tasks}
    leaves = {leaf for leaf in program.output_node.args[0] if isinstance(leaf, fx.Node)}
    out = []
    for b in program.tasks:
        for target in cuts[b]:
            if reach[target] != frozenset({b}) or target in leaves:
                continue  # a task's own output is never replaced: some of its layers must stay to adapt
            dst = node_meta(target).shape
            for a in program.tasks:
                if a == b:
                    continue
                for source in cuts[a]:
                    if b in reach[source] or source in leaves:
                        continue  # another task's outputs (logits) are not features to build on
                    plan = adapter_plan(node_meta(source).shape or (), dst or ())
                    if plan is None or (plan and not adapters):
                        continue
                    out.append((target.name, source.name))
    return sorted(set(out), key=lambda p: (p[0], p[1]))


def merge(program: Program, target_name: str, source_name: str) -> None:
    """Make the only task using `target_name` read `source_name` (through an adapter if shapes differ)."""
    reach = task_reach(program)
    target, source = program.node(target_name), program.node(source_name)
    tasks = reach[target]
    if len(tasks) != 1:
        raise MutationError(f"merge target %{target_name} is used by tasks {sorted(tasks)}; it must belong to one task")
    (task,) = tasks
    if task in reach[source]:
        raise MutationError(f"merge source %{source_name} already feeds task '{task}'")
    dst = node_meta(target).shape
    assert dst is not None
    out, params = build_adapter(program, source, dst, task=task, tag=f"{task}_{target_name}",
                                seed=stable_seed(target_name, source_name))
    target.replace_all_uses_with(out)
    if out is not source:
        program.annotate(FusionAdapter(task, target_name, source_name, tuple(params)), out)
    shared = tuple(t for t in program.tasks if t in reach[source] | {task})
    program.annotate(SharedBy(shared), source)


@register_mutator
@dataclass(frozen=True)
class MergeMutator(Mutator):
    """Fusion: one task reuses another task's layer output at a block boundary (see module docstring)."""

    name: ClassVar[str] = "merge"
    adapters: bool = True

    def candidates(self, program: Program) -> list[Any]:
        return merge_candidates(program, adapters=self.adapters)

    def mutate(self, program: Program, choose: _Chooser) -> None:
        target, source = choose(self.candidates(program))
        merge(program, target, source)


def merges(records: Sequence[MutationRecord]) -> frozenset[tuple[str, str]]:
    """The (target, source) pairs of the merge records in a history."""
    return frozenset((str(r.choices[0][0]), str(r.choices[0][1])) for r in records if r.mutator == "merge")
