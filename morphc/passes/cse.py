"""Common-subexpression elimination, across task models too.

Hash-consing in topological order: a node whose operator, literal arguments and (already
canonical) input nodes equal an earlier node's is replaced by it. Parameters are keyed by their
content, so two task models that start with the same frozen layers (same weights, even as separate
tensors) end up sharing one copy of those layers: the prefix runs once.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from morphc.ir.annotations import SharedBy
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, register_pass
from morphc.passes.graph_utils import is_pure, remove_unused_tensors, task_reach
from morphc.passes.manager import PassContext


def _literal_key(a: Any) -> Any:
    """A hashable key for an argument that keeps 1, 1.0 and True apart."""
    if isinstance(a, fx.Node):
        return ("node", a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_literal_key(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((k, _literal_key(v)) for k, v in a.items())))
    return (type(a).__name__, a)


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(flat.numpy().tobytes(), digest_size=16).hexdigest()


def _param_keys(program: Program) -> dict[fx.Node, Any]:
    """Content keys for get_attr nodes; only tensors whose shape/dtype collide get hashed."""
    nodes = [n for n in program.graph.nodes if n.op == "get_attr"]
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for n in nodes:
        t = program.tensor(str(n.target))
        groups[(tuple(t.shape), t.dtype)].append(n)
    keys: dict[fx.Node, Any] = {}
    for (shape, dtype), members in groups.items():
        for n in members:
            t = program.tensor(str(n.target))
            keys[n] = ("param", shape, dtype, _digest(t) if len(members) > 1 else str(n.target))
    return keys


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same value, including identical layers of different task models."""

    name: ClassVar[str] = "cse"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        reach_before = task_reach(program)
        param_keys = _param_keys(program)
        canonical: dict[Any, fx.Node] = {}
        merged_params = merged_ops = 0
        absorbed: set[fx.Node] = set()
        for node in list(program.graph.nodes):
            if node.op == "get_attr":
                key = param_keys[node]
            elif is_pure(node):
                key = (node.target, _literal_key(node.args), _literal_key(dict(node.kwargs)))
            else:
                continue
            rep = canonical.get(key)
            if rep is None:
                canonical[key] = node
                continue
            if node.op == "get_attr" and not torch.equal(program.tensor(str(rep.target)),
                                                           program.tensor(str(node.target))):
                continue  # digest collision: keep both
            node.replace_all_uses_with(rep)
            program.graph.erase_node(node)
            absorbed.add(rep)
            if node.op == "get_attr":
                merged_params += 1
            else:
                merged_ops += 1
        freed = remove_unused_tensors(program)
        if absorbed:
            reach_after = task_reach(program)
            for rep in absorbed:
                tasks = reach_after[rep]
                if rep.op == "call_function" and len(tasks) > 1 and tasks != reach_before.get(rep):
                    program.annotate(SharedBy(tuple(t for t in program.tasks if t in tasks)), rep)
        return PassResult(program, modified=bool(absorbed),
                          statistics={"ops-merged": merged_ops, "params-merged": merged_params,
                                      "param-bytes-freed": freed})
