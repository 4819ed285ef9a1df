"""Operator batching (NetFuse, Retiarii): parallel same-shape ops with different weights become one op.

Several task models of the same architecture (one backbone fine-tuned per task) run the same
layers N times on N small tensors. Batched, each layer runs once on a tensor N times wider:

  (a) convs / linears reading the SAME input: one op with the weights concatenated along the
      output channels, then `split_with_sizes` hands every consumer its slice;
  (b) convs / linears with identical configs reading DIFFERENT inputs of one shape: the inputs
      are concatenated along channels (features) and run as one grouped convolution (groups x N)
      or one batched matmul (`bmm` over stacked weights), then split. Linears only with
      `separate-inputs=all`: on CPU a cat + bmm costs about what N small linears do (measured);
  (c) propagation: when every member of a split is consumed by the same kind of op (conv, linear,
      batch norm, pooling, reductions, views, any pointwise op such as relu/add/mul), that op runs
      once on the packed tensor instead, so N identical towers become one batched tower.

A packed value is always `split_with_sizes(P, sizes, dim)` + getitems in the graph, so the pass is
stateless between rewrites and also batches splits the model wrote itself. Every rewrite keeps the
values exactly (up to float summation order). Views of a split member are turned into reshapes,
because a slice of a packed tensor is not contiguous.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from morphc.errors import PassOptionError
from morphc.ir.metadata import META_KEY, MODULE_PATH_KEY, NodeMeta, TensorMeta, classify, node_meta
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.graph_utils import fresh_attr, is_pure, remove_unused_params
from morphc.passes.manager import PassContext

aten = torch.ops.aten

CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
LINEAR_OPS = {aten.linear.default}
OP_KINDS = ("conv", "linear")
SPLIT = aten.split_with_sizes.default
BATCH_NORM = aten._native_batch_norm_legit_no_training.default
POOL_OPS = {  # channel-wise: each channel pooled independently; value = number of spatial dims
    aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.adaptive_avg_pool1d.default: 1,
    aten.max_pool2d.default: 2, aten.avg_pool2d.default: 2, aten.adaptive_avg_pool2d.default: 2,
    aten._adaptive_avg_pool2d.default: 2, aten.max_pool3d.default: 3, aten.avg_pool3d.default: 3,
    aten.adaptive_avg_pool3d.default: 3,
}
REDUCE_OPS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SHAPE_OPS = {aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims}


class _Reject(Exception):
    """A candidate group cannot be batched (internal control flow)."""


@dataclass(frozen=True)
class Packed:
    """A value holding N member values concatenated along `dim` (sizes[i] each)."""

    node: fx.Node
    dim: int
    sizes: tuple[int, ...]


def _shape(node: fx.Node) -> tuple[int, ...]:
    """The node's single output shape; _Reject for tuples and for nodes made by this pass without one."""
    meta = node.meta.get(META_KEY)
    if meta is None or meta.shape is None:
        raise _Reject
    return meta.shape


def _dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get(META_KEY)
    return meta.dtype if meta is not None else None


def _member_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(split node, index) when `node` is getitem(split_with_sizes(...), index)."""
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target is SPLIT:
            return src, int(node.args[1])  # type: ignore[arg-type]
    return None


def _split_info(split: fx.Node) -> tuple[Packed, list[fx.Node]] | None:
    """The packed value behind a split and its member getitems (one per index), or None."""
    src = split.args[0]
    sizes = split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(src, fx.Node) or not isinstance(sizes, (list, tuple)):
        return None
    rank = len(_shape(src))
    members: dict[int, fx.Node] = {}
    for user in split.users:
        if user.target is not operator.getitem or user.args[1] in members:
            return None
        members[int(user.args[1])] = user  # type: ignore[arg-type]
    if sorted(members) != list(range(len(sizes))):
        return None
    return Packed(src, int(dim) % rank, tuple(int(s) for s in sizes)), [members[i] for i in range(len(sizes))]


# --- keys: when are N nodes "the same op with different weights"? ----------------------------------


def _key(node: fx.Node, index: int | None) -> Any:
    """Structure of a call with tensors reduced to shape/dtype; split members at `index` are named by
    their split, so members of one pack line up. View shapes are left out (checked by the rule)."""
    def arg_key(a: Any) -> Any:
        if isinstance(a, fx.Node):
            member = _member_of(a)
            if index is not None and member is not None and member[1] == index:
                return ("member", member[0])
            return ("tensor", _shape(a), _dtype(a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg_key(x) for x in a))
        return (type(a).__name__, a)

    args = node.args[:1] if node.target in VIEW_OPS else node.args
    return (node.target, arg_key(tuple(args)), arg_key(tuple(sorted(node.kwargs.items()))))


def _batchable(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and is_pure(node)


# --- the pass ---------------------------------------------------------------------------------------


@register_pass
@dataclass(frozen=True)
class BatchOps(Pass):
    """Run parallel same-shape convs/linears with different weights, and the towers they start, as one
    grouped convolution / batched matmul (NetFuse, Retiarii operator batching)."""

    name: ClassVar[str] = "batch-ops"

    min_group: int = option(2, "fewest parallel ops worth batching (>= 2)")
    max_group: int = option(0, "most ops batched into one (0: no limit)")
    ops: str = option("conv,linear", "op kinds that start a batch, comma-separated: conv, linear")
    separate_inputs: Literal["conv", "all", "none"] = option(
        "conv", "batch ops reading different inputs (concatenate + grouped op): convs only, convs and linears, none")

    def __post_init__(self) -> None:
        if self.min_group < 2:
            raise PassOptionError(f"option 'min-group' of pass '{self.name}' must be >= 2, got {self.min_group}")
        if self.max_group != 0 and self.max_group < self.min_group:
            raise PassOptionError(f"option 'max-group' of pass '{self.name}' must be 0 (no limit) or >= min-group "
                                  f"({self.min_group}), got {self.max_group}")
        kinds = [k.strip() for k in self.ops.split(",") if k.strip()]
        bad = [k for k in kinds if k not in OP_KINDS]
        if bad or not kinds:
            raise PassOptionError(f"option 'ops' of pass '{self.name}' takes a comma-separated list of "
                                  f"{', '.join(OP_KINDS)}; got {self.ops!r}")

    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if any(META_KEY not in n.meta for n in program.graph.nodes):
            program.refresh_metadata()
        rewriter = _Rewriter(program, self)
        rewriter.run()
        if not rewriter.stats["groups"]:
            for attr in rewriter.registered:  # packed weights of groups that were planned but not built
                delattr(program.graph_module, attr)
            return PassResult(program, modified=False, statistics=dict(rewriter.stats))
        rewriter.stats["params-replaced"] = remove_unused_params(program)  # the per-model weights, now packed
        return PassResult(program, modified=True, statistics=dict(rewriter.stats))


class _Rewriter:
    """Finds groups of parallel ops and replaces each group with one op on a packed tensor."""

    def __init__(self, program: Program, options: BatchOps) -> None:
        self.program = program
        self.graph = program.graph
        self.opts = options
        self.kinds = {k.strip() for k in options.ops.split(",") if k.strip()}
        self.stats: dict[str, int] = {"groups": 0, "ops-batched": 0, "shared-input-groups": 0,
                                      "separate-input-groups": 0}
        self.registered: list[str] = []  # parameters this pass added to the GraphModule
        self.splits_made: set[fx.Node] = set()  # splits of packed values this pass built (contiguous)

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> None:
        while (self._propagate_once() or self._seed_once(shared_input=True)
               or (self.opts.separate_inputs != "none" and self._seed_once(shared_input=False))):
            pass
        if self.stats["groups"]:
            self._finish_members()

    def _size_ok(self, n: int) -> bool:
        return n >= self.opts.min_group and (self.opts.max_group == 0 or n <= self.opts.max_group)

    def _seed_kind(self, node: fx.Node) -> bool:
        return (node.target in CONV_OPS and "conv" in self.kinds) or (node.target in LINEAR_OPS
                                                                      and "linear" in self.kinds)

    # -- (c) propagation through split members -----------------------------------------------------

    def _propagate_once(self) -> bool:
        for split in [n for n in self.graph.nodes if n.op == "call_function" and n.target is SPLIT]:
            try:
                info = _split_info(split)
            except _Reject:
                continue
            if info is None or not self._size_ok(len(info[1])):
                continue
            members = info[1]
            for u0 in list(members[0].users):
                group = self._matching_users(u0, members)
                if group is not None and self._batch(group, _plan_propagate):
                    return True
        return False

    def _matching_users(self, u0: fx.Node, members: list[fx.Node]) -> list[fx.Node] | None:
        """One user per member, each the same op as `u0` with the member in the same place."""
        if not _batchable(u0):
            return None
        try:
            key = _key(u0, 0)
            group = [u0]
            for i, member in enumerate(members[1:], start=1):
                match = next((u for u in member.users if u.target is u0.target and u not in group
                              and _batchable(u) and _key(u, i) == key), None)
                if match is None:
                    return None
                group.append(match)
        except _Reject:
            return None
        return group

    # -- (a) / (b) seeds: convs and linears not yet packed ---------------------------------------------

    def _seed_once(self, *, shared_input: bool) -> bool:
        buckets: dict[Any, list[fx.Node]] = defaultdict(list)
        for node in self.graph.nodes:
            if node.op != "call_function" or not self._seed_kind(node) or not isinstance(node.args[0], fx.Node) \
                    or not isinstance(node.args[1], fx.Node):
                continue
            if not shared_input and self.opts.separate_inputs == "conv" and node.target not in CONV_OPS:
                continue  # a cat + bmm per linear layer costs about what N linears do on CPU
            try:
                if shared_input:  # output channels may differ: weight shape without dim 0, no bias shape
                    literal = _key(node, None)
                    key = (node.target, node.args[0], _shape(node.args[1])[1:], _dtype(node.args[1]),
                           literal[1][1][3:], literal[2], len(node.args) > 2 and node.args[2] is not None)
                else:
                    key = _key(node, None)
            except _Reject:
                continue
            buckets[key].append(node)
        for nodes in buckets.values():
            if len(nodes) < self.opts.min_group:
                continue
            if shared_input:
                step = self.opts.max_group or len(nodes)
                chunks = [nodes[i:i + step] for i in range(0, len(nodes), step)]
                if any(self._batch(c, _plan_shared_input) for c in chunks if len(c) >= self.opts.min_group):
                    return True
            elif any(self._batch(g, _plan_separate_inputs) for g in self._independent_groups(nodes)):
                return True
        return False

    def _independent_groups(self, nodes: list[fx.Node]) -> list[list[fx.Node]]:
        """Greedy groups (in graph order) of nodes none of which depends on another."""
        reach = {n: _descendants([n]) | {n} for n in nodes}
        groups: list[list[fx.Node]] = []
        left = list(nodes)
        while len(left) >= self.opts.min_group:
            group: list[fx.Node] = []
            rest: list[fx.Node] = []
            for n in left:
                fits = all(not (set(n.all_input_nodes) & reach[m]) and not (set(m.all_input_nodes) & reach[n])
                           for m in group)
                (group if fits and (self.opts.max_group == 0 or len(group) < self.opts.max_group) else rest).append(n)
            if len(group) >= self.opts.min_group:
                groups.append(group)
            left = rest
        return groups

    # -- building blocks ----------------------------------------------------------------------------

    def param(self, value: torch.Tensor, name: str) -> Deferred:
        attr = fresh_attr(self.program, name)
        self.program.graph_module.register_buffer(attr, value.contiguous())
        self.registered.append(attr)
        return Deferred(lambda: self.graph.get_attr(attr), [])

    def cat(self, nodes: Sequence[fx.Node], dim: int, name: str) -> Deferred:
        """`nodes` concatenated along `dim`: a new parameter when they all are parameters, else aten.cat."""
        if all(n.op == "get_attr" for n in nodes):
            return self.param(torch.cat([self.program.tensor(str(n.target)) for n in nodes], dim), name)
        return Deferred(lambda: self.graph.call_function(aten.cat.default, (list(nodes), dim)), list(nodes))

    def stack(self, nodes: Sequence[fx.Node], name: str, *, transpose: bool) -> Deferred:
        """(N, ...) stack of `nodes`, with their last two dims swapped when `transpose`."""
        if all(n.op == "get_attr" for n in nodes):
            value = torch.stack([self.program.tensor(str(n.target)) for n in nodes])
            return self.param(value.transpose(-1, -2) if transpose else value, name)

        def build() -> fx.Node:
            stacked = self.graph.call_function(aten.stack.default, (list(nodes), 0))
            return self.graph.call_function(aten.transpose.int, (stacked, -1, -2)) if transpose else stacked
        return Deferred(build, list(nodes))

    # -- one group -------------------------------------------------------------------------------------

    def _batch(self, group: list[fx.Node], planner: Callable[[_Rewriter, list[fx.Node]], Plan | None]) -> bool:
        """Replace the parallel nodes of `group` by one batched op; False when no rule applies."""
        try:
            plan = planner(self, group)
        except _Reject:
            return False
        if plan is None:
            return False
        point = self._insertion_point(plan.inputs, group)
        if point is None:
            return False
        where, needs_sort = point
        anchor = where.prev
        with self.graph.inserting_before(where):
            packed = plan.build()
            split = self.graph.call_function(SPLIT, (packed, list(plan.out_sizes), plan.out_dim))
            self.splits_made.add(split)
            pieces = [self.graph.call_function(operator.getitem, (split, i)) for i in range(len(plan.out_sizes))]
        path = "+".join(dict.fromkeys(str(g.meta.get(MODULE_PATH_KEY, "")) for g in group))
        node = anchor.next
        while node is not where:
            node.meta.setdefault(MODULE_PATH_KEY, path)
            node = node.next
        # Shapes of the new values for later rewrites (the PassManager recomputes all metadata after the pass).
        results = [node_meta(r).outputs[0] for r in plan.results]
        total = list(results[0].shape)
        total[plan.out_dim] = sum(plan.out_sizes)
        _set_meta(packed, (TensorMeta(tuple(total), results[0].dtype),), path)
        _set_meta(split, tuple(results), path)
        for old, new, meta in zip(plan.results, pieces, results):
            _set_meta(new, (meta,), path)
            old.replace_all_uses_with(new)
        self._erase_dead([*plan.results, *group])
        if needs_sort:
            _topo_sort(self.graph)
        self.stats["groups"] += 1
        self.stats["ops-batched"] += len(group)
        if planner is _plan_shared_input:
            self.stats["shared-input-groups"] += 1
        elif planner is _plan_separate_inputs:
            self.stats["separate-input-groups"] += 1
        return True

    def _insertion_point(self, inputs: Sequence[fx.Node], group: Sequence[fx.Node]) -> tuple[fx.Node, bool] | None:
        """Where the batched nodes go: before the first group member when every input is computed
        there, else after the last input (the graph is re-sorted afterwards); None on a cycle."""
        order = {n: k for k, n in enumerate(self.graph.nodes)}
        first = min(group, key=order.__getitem__)
        if all(order[x] < order[first] for x in inputs):
            return first, False
        if set(inputs) & (_descendants(group) | set(group)):
            return None
        return max(inputs, key=order.__getitem__).next, True

    def _erase_dead(self, roots: Sequence[fx.Node]) -> None:
        """Erase the replaced nodes and the pure nodes only they used (parameters: remove_unused_params)."""
        todo = list(roots)
        erased: set[fx.Node] = set()
        while todo:
            node = todo.pop()
            if node in erased or node.op != "call_function" or not (is_pure(node) or node.target is operator.getitem):
                continue
            if node.users and all(u.target is operator.getitem and not u.users for u in node.users):
                for user in list(node.users):  # unused extra outputs (batch norm's saved statistics)
                    self.graph.erase_node(user)
                    erased.add(user)
            if node.users:
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            erased.add(node)
            todo.extend(inputs)

    def _finish_members(self) -> None:
        """Members of a split are strided slices where the replaced values were contiguous: `view` of
        one would fail (use `reshape`), `as_strided` would read other members, and callers may `view`
        program outputs: outputs that are members or views of one get a contiguous copy."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node) \
                    or _member_of(node.args[0]) is None:
                continue
            if node.target in (aten.view.default, aten._unsafe_view.default):
                node.target = aten.reshape.default
            elif node.target is aten.as_strided.default:
                with self.graph.inserting_before(node):
                    node.replace_input_with(node.args[0], self.graph.call_function(aten.clone.default, (node.args[0],)))
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        for leaf in dict.fromkeys(a for a in output.all_input_nodes if _views_a_member(a, self.splits_made)):
            with self.graph.inserting_before(output):
                copy = self.graph.call_function(aten.clone.default, (leaf,))
            output.replace_input_with(leaf, copy)


def _views_a_member(node: fx.Node, made: set[fx.Node]) -> bool:
    """True when `node` is a split member or a view of one, and maybe strided where the model's value was
    not: a slice along `dim` of a contiguous tensor (what this pass's packed values are, the splits in
    `made`) is contiguous when every dim before `dim` has size 1."""
    while node.op == "call_function" and node.target in VIEW_OPS | SHAPE_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    member = _member_of(node)
    if member is None:
        return False
    try:
        info = _split_info(member[0])
        shape = _shape(node)
    except _Reject:
        return True
    return member[0] not in made or info is None or math.prod(shape[:info[0].dim]) != 1


def _set_meta(node: fx.Node, outputs: tuple[TensorMeta, ...], path: str) -> None:
    node.meta[META_KEY] = NodeMeta(outputs=outputs, flops=0, bytes_moved=0, param_bytes=0, op_class=classify(node),
                                   module_path=path)


def _descendants(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _topo_sort(graph: fx.Graph) -> None:
    """Reorder nodes so that every node follows its inputs, keeping the current order where valid."""
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for root in list(graph.nodes):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(root.all_input_nodes))]
        while stack:
            node, inputs = stack[-1]
            nxt = next((x for x in inputs if x not in seen), None)
            if nxt is None:
                stack.pop()
                order.append(node)
            else:
                seen.add(nxt)
                stack.append((nxt, iter(nxt.all_input_nodes)))
    for prev, node in itertools.pairwise(order):
        if prev.next is not node:
            prev.append(node)


# --- plans: how one group of parallel ops becomes one op --------------------------------------------


@dataclass
class Deferred:
    """A value to create at the insertion point, and the existing graph nodes it will read."""

    build: Callable[[], Any]
    reads: list[fx.Node]

    def __call__(self) -> Any:
        return self.build()


def _const(value: Any) -> Deferred:
    return Deferred(lambda: value, [value] if isinstance(value, fx.Node) else [])


@dataclass
class Plan:
    """Build the batched value (at the insertion point), split it along out_dim into out_sizes, and
    hand piece i to every user of results[i]."""

    build: Callable[[], fx.Node]
    inputs: list[fx.Node]
    out_dim: int
    out_sizes: tuple[int, ...]
    results: list[fx.Node]


def _arg(node: fx.Node, pos: int, default: Any = None) -> Any:
    return node.args[pos] if len(node.args) > pos else default


def _per_member(rw: _Rewriter, group: list[fx.Node], pos: int, dim: int, name: str) -> Deferred:
    """The group's tensors at argument `pos` concatenated along `dim`; None when all are None."""
    values = [_arg(g, pos) for g in group]
    if all(v is None for v in values):
        return _const(None)
    if not all(isinstance(v, fx.Node) for v in values):
        raise _Reject
    return rw.cat(values, dim, name)


def _plan_shared_input(rw: _Rewriter, group: list[fx.Node]) -> Plan | None:
    """(a) N convs (groups=1) / linears on one input: one op, weights concatenated on output channels."""
    node0 = group[0]
    rank = len(_shape(node0))
    if node0.kwargs or (node0.target in CONV_OPS and (_arg(node0, 6, 1) != 1 or rank != CONV_OPS[node0.target] + 2)):
        return None  # grouped convs interleave their outputs; unbatched (C, H, W) inputs have channels first
    weight = _per_member(rw, group, 1, 0, f"{node0.name}_batched_weight")
    bias = _per_member(rw, group, 2, 0, f"{node0.name}_batched_bias")
    out_sizes = tuple(_shape(g)[1 if node0.target in CONV_OPS else -1] for g in group)

    def build() -> fx.Node:
        args = list(node0.args)
        args[1] = weight()
        if len(args) > 2:
            args[2] = bias()
        return rw.graph.call_function(node0.target, tuple(args))

    return Plan(build, [node0.args[0], *weight.reads, *bias.reads],  # type: ignore[list-item]
                1 if node0.target in CONV_OPS else rank - 1, out_sizes, list(group))


def _plan_separate_inputs(rw: _Rewriter, group: list[fx.Node]) -> Plan | None:
    """(b) N identical convs / linears on N inputs of one shape: concatenate them, then one grouped op."""
    node0 = group[0]
    xs = [g.args[0] for g in group]
    rank = len(_shape(node0.args[0]))  # type: ignore[arg-type]
    dim = 1 if node0.target in CONV_OPS else rank - 1
    size = _shape(node0.args[0])[dim]  # type: ignore[arg-type]
    x = rw.cat(xs, dim, f"{node0.name}_batched_input")  # type: ignore[arg-type]
    rule = _plan_conv if node0.target in CONV_OPS else _plan_linear
    return rule(rw, group, x, dim, (size,) * len(group), rank)


def _plan_propagate(rw: _Rewriter, group: list[fx.Node]) -> Plan | None:
    """(c) N ops each consuming member i of one split: one op on the packed value."""
    node0 = group[0]
    pos = next((k for k, a in enumerate(node0.args) if isinstance(a, fx.Node)
                and (m := _member_of(a)) is not None and m[1] == 0), None)
    if pos is None:
        return None
    packed = _packed_column(rw, [g.args[pos] for g in group])  # type: ignore[misc]
    if packed is None:
        return None
    target, dim, sizes = node0.target, packed.dim, packed.sizes
    rank = len(_shape(packed.node))
    x = _const(packed.node)
    if torch.Tag.pointwise in target.tags:  # type: ignore[union-attr]
        # clone: the contiguous copies of program outputs made by this pass; nothing to gain batching them
        return _plan_pointwise(rw, group, packed, rank) if target is not aten.clone.default else None
    if pos != 0:
        return None
    if target in CONV_OPS:
        return _plan_conv(rw, group, x, dim, sizes, rank)
    if target in LINEAR_OPS:
        return _plan_linear(rw, group, x, dim, sizes, rank)
    if target is BATCH_NORM:
        return _plan_batch_norm(rw, group, x, dim, sizes)
    if target in POOL_OPS:
        return _same_op(rw, group, x, dim, sizes) if dim == 1 and rank == POOL_OPS[target] + 2 else None
    if target in REDUCE_OPS:
        return _plan_reduce(rw, group, x, dim, sizes, rank)
    if target in VIEW_OPS or target in SHAPE_OPS:
        return _plan_view(rw, group, x, dim)
    return None


def _packed_column(rw: _Rewriter, nodes: list[fx.Node]) -> Packed | None:
    """The packed value when `nodes` are exactly the members of one split, in order."""
    first = _member_of(nodes[0])
    if first is None or first[1] != 0:
        return None
    info = _split_info(first[0])
    if info is None or info[1] != nodes:
        return None
    return info[0]


def _plan_conv(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int, sizes: tuple[int, ...],
               rank: int) -> Plan | None:
    """N convs on N equal channel blocks: one convolution with groups x N."""
    node0 = group[0]
    spatial = CONV_OPS[node0.target]  # type: ignore[index]
    groups = _arg(node0, 6, 1)
    if node0.kwargs or dim != 1 or rank != spatial + 2 or len(set(sizes)) != 1 or not isinstance(groups, int):
        return None
    weight = _per_member(rw, group, 1, 0, f"{node0.name}_batched_weight")
    bias = _per_member(rw, group, 2, 0, f"{node0.name}_batched_bias")
    out_channels = _shape(node0)[1]

    def build() -> fx.Node:
        args = [x(), weight(), bias(), _arg(node0, 3, [1] * spatial), _arg(node0, 4, [0] * spatial),
                _arg(node0, 5, [1] * spatial), groups * len(group)]
        return rw.graph.call_function(node0.target, tuple(args))

    return Plan(build, [*x.reads, *weight.reads, *bias.reads], 1, (out_channels,) * len(group), list(group))


def _plan_linear(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int, sizes: tuple[int, ...],
                 rank: int) -> Plan | None:
    """N linears on N equal feature blocks: (M, N, F) -> (N, M, F) @ (N, F, O) -> (M, N, O), one bmm."""
    node0 = group[0]
    if node0.kwargs or dim != rank - 1 or len(set(sizes)) != 1:
        return None
    n, features = len(group), sizes[0]
    out_shape = _shape(node0)
    rows, out = math.prod(out_shape[:-1]), out_shape[-1]
    weights, biases = [g.args[1] for g in group], [_arg(g, 2) for g in group]
    if not all(isinstance(w, fx.Node) for w in weights):
        return None
    weight = rw.stack(weights, f"{node0.name}_batched_weight", transpose=True)  # type: ignore[arg-type]
    if all(b is None for b in biases):
        bias = None
    elif all(isinstance(b, fx.Node) and b.op == "get_attr" for b in biases):  # (N, 1, O), made now
        stacked = torch.stack([rw.program.tensor(str(b.target)) for b in biases]).unsqueeze(1)  # type: ignore[union-attr]
        bias = rw.param(stacked, f"{node0.name}_batched_bias")
    elif all(isinstance(b, fx.Node) for b in biases):
        stacked_bias = rw.stack(biases, f"{node0.name}_batched_bias", transpose=False)  # type: ignore[arg-type]
        bias = Deferred(lambda: rw.graph.call_function(aten.unsqueeze.default, (stacked_bias(), 1)),
                        stacked_bias.reads)
    else:
        return None

    def build() -> fx.Node:
        g = rw.graph
        x3 = g.call_function(aten.reshape.default, (x(), [rows, n, features]))
        xt = g.call_function(aten.transpose.int, (x3, 0, 1))
        if bias is None:
            y = g.call_function(aten.bmm.default, (xt, weight()))
        else:
            y = g.call_function(aten.baddbmm.default, (bias(), xt, weight()))
        yt = g.call_function(aten.transpose.int, (y, 0, 1))
        return g.call_function(aten.reshape.default, (yt, [*out_shape[:-1], n * out]))

    reads = [*x.reads, *weight.reads, *(bias.reads if bias is not None else [])]
    return Plan(build, reads, rank - 1, (out,) * n, list(group))


def _plan_batch_norm(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int,
                     sizes: tuple[int, ...]) -> Plan | None:
    """Inference batch norm: per-channel statistics and affine parameters concatenated."""
    if dim != 1 or group[0].kwargs:
        return None
    results = []
    for bn in group:
        outs = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outs) != 1 or any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
            return None
        results.append(outs[0])
    node0 = group[0]
    params = [_per_member(rw, group, pos, 0, f"{node0.name}_batched_p{pos}") for pos in (1, 2, 3, 4)]

    def build() -> fx.Node:
        args = [x(), *(p() for p in params), *node0.args[5:]]
        bn = rw.graph.call_function(BATCH_NORM, tuple(args))
        return rw.graph.call_function(operator.getitem, (bn, 0))

    return Plan(build, [*x.reads, *(r for p in params for r in p.reads)], 1, sizes, results)


def _same_op(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int, sizes: tuple[int, ...]) -> Plan:
    """The op itself on the packed input: for ops that treat every channel on its own (pooling)."""
    node0 = group[0]

    def build() -> fx.Node:
        return rw.graph.call_function(node0.target, (x(), *node0.args[1:]), dict(node0.kwargs))

    return Plan(build, list(x.reads), dim, sizes, list(group))


def _plan_reduce(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int, sizes: tuple[int, ...],
                 rank: int) -> Plan | None:
    """Reductions over dims other than the packed one (global average pooling as mean over H, W)."""
    node0 = group[0]
    dims = _arg(node0, 1, node0.kwargs.get("dim"))
    keepdim = _arg(node0, 2, node0.kwargs.get("keepdim", False))
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    reduced = {int(d) % rank for d in dims}
    if dim in reduced:
        return None
    plan = _same_op(rw, group, x, dim, sizes)
    plan.out_dim = dim if keepdim else dim - sum(1 for d in reduced if d < dim)
    return plan


def _plan_view(rw: _Rewriter, group: list[fx.Node], x: Deferred, dim: int) -> Plan | None:
    """Views (view, reshape, flatten, squeeze, unsqueeze) that keep the dims before the packed one.

    Row-major: each prefix index holds the members' blocks one after another, so any per-member
    view (s[:dim], sizes[i], ...) -> (s[:dim], t_i[dim], tail) is a view of the packed block too."""
    new_sizes, tails = [], set()
    for g in group:
        s, t = _shape(g.args[0]), _shape(g)  # type: ignore[arg-type]
        if len(t) <= dim or t[:dim] != s[:dim]:
            return None
        new_sizes.append(t[dim])
        tails.add(t[dim + 1:])
    if len(tails) != 1:
        return None
    shape = [*_shape(group[0])[:dim], sum(new_sizes), *tails.pop()]

    def build() -> fx.Node:
        return rw.graph.call_function(aten.reshape.default, (x(), shape))

    return Plan(build, list(x.reads), dim, tuple(new_sizes), list(group))


def _plan_pointwise(rw: _Rewriter, group: list[fx.Node], packed: Packed, rank: int) -> Plan | None:
    """Elementwise ops. Other tensor arguments: packs of the same layout; one shared tensor that does
    not vary along the packed dim; or per-member tensors, concatenated along it."""
    node0 = group[0]
    dim, sizes = packed.dim, packed.sizes
    if any(isinstance(v, fx.Node) for v in node0.kwargs.values()):
        return None
    for g, size in zip(group, sizes):
        out = _shape(g)
        if len(out) != rank or out[dim] != size:
            return None
    args: list[Deferred] = []
    for pos, a0 in enumerate(node0.args):
        column = [g.args[pos] for g in group]
        if not isinstance(a0, fx.Node):
            if isinstance(a0, (list, tuple)) and any(isinstance(v, fx.Node) for v in a0):
                return None
            args.append(_const(a0))
            continue
        other = _packed_column(rw, column)  # type: ignore[arg-type]
        if other is not None:
            if other.dim != dim or other.sizes != sizes or len(_shape(other.node)) != rank:
                return None
            args.append(_const(other.node))
            continue
        shape = _shape(a0)
        aligned = dim - (rank - len(shape))
        varies = aligned >= 0 and shape[aligned] != 1
        if all(c is a0 for c in column) and not varies:
            args.append(_const(a0))
        elif not varies:  # per-member constants equal along the packed dim: fine if all the same
            if not all(isinstance(c, fx.Node) and c.op == "get_attr" for c in column):
                return None
            first = rw.program.tensor(str(a0.target))
            if not all(torch.equal(first, rw.program.tensor(str(c.target))) for c in column):  # type: ignore[union-attr]
                return None
            args.append(_const(a0))
        elif all(shape[aligned] == s for s in sizes):
            args.append(rw.cat(column, aligned, f"{node0.name}_batched_arg{pos}"))  # type: ignore[arg-type]
        else:
            return None

    def build() -> fx.Node:
        return rw.graph.call_function(node0.target, tuple(a() for a in args), dict(node0.kwargs))

    return Plan(build, [r for a in args for r in a.reads], dim, sizes, list(group))
