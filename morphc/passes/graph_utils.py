"""Small graph queries and clean-ups shared by several passes."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from morphc.ir.program import Program

_IMPURE_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise)


def is_pure(node: fx.Node) -> bool:
    """True when the node's value depends only on its inputs and it has no side effects.

    Such nodes may be merged (CSE), precomputed (constant folding) or removed when unused.
    """
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if op._schema.is_mutable or any(tag in op.tags for tag in _IMPURE_TAGS):
        return False
    return op._schema.name.split("::")[-1] not in ("empty", "empty_like", "empty_strided", "_assert_tensor_metadata")


def _inputs_by_argument(node: fx.Node) -> list[tuple[Any, fx.Node]]:
    """(schema argument, input node) for each input of an ATen call; argument None without a schema."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return [(None, n) for n in node.all_input_nodes]
    out: list[tuple[Any, fx.Node]] = []
    for i, arg in enumerate(op._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        fx.node.map_arg(value, lambda n, arg=arg: out.append((arg, n)))
    return out


def mutated_values(program: Program) -> set[fx.Node]:
    """Nodes whose value some node updates in place, directly or through an alias (a view, an
    in-place op's result, a getitem of a view list), and those aliases.

    torch.export keeps in-place ops (`nn.ReLU(inplace=True)` -> aten.relu_, `x += y` ->
    aten.add_): such values differ before and after the update, so passes must neither merge,
    precompute nor reorder them, nor merge nodes reading them.
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written: list[fx.Node] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:  # an element of a tuple/list that may hold views
            aliased = list(node.all_input_nodes)
        else:
            # arguments annotated Tensor(a) / Tensor(a!) alias the result; without a schema
            # (a non-ATen call) assume the worst: aliased and written
            pairs = _inputs_by_argument(node)
            aliased = [n for arg, n in pairs if arg is None or arg.alias_info is not None]
            written += [n for arg, n in pairs
                        if arg is None or (arg.alias_info is not None and arg.alias_info.is_write)]
        for n in aliased:
            parent[find(n)] = find(node)
    roots = {find(n) for n in written}
    return {n for n in program.graph.nodes if find(n) in roots}


def remove_unused_tensors(program: Program) -> int:
    """Delete tensors registered on the GraphModule that no get_attr reads; returns bytes freed."""
    gm = program.graph_module
    used = {str(n.target) for n in program.graph.nodes if n.op == "get_attr"}
    freed = 0
    for name, buf in list(gm.named_buffers(recurse=False)):
        if name not in used:
            freed += buf.numel() * buf.element_size()
            delattr(gm, name)
    return freed


def task_reach(program: Program) -> dict[fx.Node, frozenset[str]]:
    """For every node, the tasks whose outputs depend on it."""
    reach: dict[fx.Node, set[str]] = {n: set() for n in program.graph.nodes}
    leaves = program.output_node.args[0]
    for spec, leaf in zip(program.outputs, leaves):
        if isinstance(leaf, fx.Node):
            reach[leaf].add(spec.task)
    for node in reversed(list(program.graph.nodes)):
        for inp in node.all_input_nodes:
            reach[inp] |= reach[node]
    return {n: frozenset(t) for n, t in reach.items()}


def fresh_attr(program: Program, base: str) -> str:
    """An attribute name on the program's GraphModule that nothing uses yet."""
    name, k = base, 1
    while hasattr(program.graph_module, name):
        name, k = f"{base}_{k}", k + 1
    return name
