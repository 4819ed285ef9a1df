"""Dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, register_pass
from morphc.passes.graph_utils import is_pure, remove_unused_tensors
from morphc.passes.manager import PassContext


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose values no output needs, and the parameters only they read."""

    name: ClassVar[str] = "dce"
    opt_level: ClassVar[int] = 0

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        graph = program.graph
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr" or is_pure(node):
                graph.erase_node(node)
                removed += 1
        freed = remove_unused_tensors(program)
        return PassResult(program, modified=removed > 0 or freed > 0,
                          statistics={"nodes-removed": removed, "param-bytes-freed": freed})
