"""Small graph queries and clean-ups shared by several passes."""

from __future__ import annotations

import operator

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
    if op._schema.is_mutable:
        return False
    if any(tag in op.tags for tag in _IMPURE_TAGS) and not _dropout_free(node, op):
        return False
    return op._schema.name.split("::")[-1] not in ("empty", "empty_like", "empty_strided", "_assert_tensor_metadata")


def _dropout_free(node: fx.Node, op: torch._ops.OpOverload) -> bool:
    """Ops whose only randomness is a `dropout_p` argument (scaled_dot_product_attention) are
    deterministic when it is 0, as in every inference graph; without this, dead attention layers
    could never be removed or merged."""
    if torch.Tag.nondeterministic_bitwise in op.tags:
        return False
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == "dropout_p":
            value = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", arg.default_value)
            return value == 0
    return False


def remove_unused_params(program: Program) -> int:
    """Erase get_attr nodes nobody reads and the tensors behind them; returns the nodes erased."""
    erased = 0
    for node in reversed(list(program.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            program.graph.erase_node(node)
            erased += 1
    remove_unused_tensors(program)
    return erased


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
