"""Constant folding: precompute what depends only on parameters and constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from morphc.errors import PassOptionError
from morphc.ir.metadata import MODULE_PATH_KEY
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.graph_utils import fresh_attr, is_pure, remove_unused_params
from morphc.passes.manager import PassContext


def _run_node(program: Program, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    return node.target(*args, **kwargs)


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate nodes that read no program input once, and store their results as constants.

    Transposed or reshaped weights, position-id ranges and masks built from constants become
    ready tensors instead of work done on every call. Results larger than `max-mb` are left
    unfolded (an `expand` to a big shape is cheaper to recompute than to store).
    """

    name: ClassVar[str] = "fold-constants"
    max_mb: float = option(64.0, "largest tensor (MB) a folded value may materialize")

    def __post_init__(self) -> None:
        if self.max_mb < 0:
            raise PassOptionError(f"option 'max-mb' of pass '{self.name}' must be >= 0, got {self.max_mb}")

    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        graph = program.graph
        env: dict[fx.Node, Any] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                env[node] = program.tensor(str(node.target))
            elif is_pure(node) and all(i in env for i in node.all_input_nodes):
                env[node] = _run_node(program, node, env)
        for leaf in program.output_node.all_input_nodes:
            if leaf.op != "get_attr":  # an output stays a new tensor per call (callers may update it in
                env.pop(leaf, None)  # place): fold what it reads, not the output itself
        limit = self.max_mb * 1e6
        folded = folded_bytes = 0
        for node, value in env.items():
            if node.op == "get_attr" or not isinstance(value, torch.Tensor):
                continue
            if all(u in env for u in node.users):
                continue  # only consumed by other foldable nodes: fold at the frontier instead
            nbytes = value.numel() * value.element_size()
            if nbytes > limit:
                continue
            attr = fresh_attr(program, f"folded_{node.name}")
            program.graph_module.register_buffer(attr, value.contiguous().clone())
            with graph.inserting_before(node):
                const = graph.get_attr(attr)
            const.meta[MODULE_PATH_KEY] = node.meta.get(MODULE_PATH_KEY, "")
            node.replace_all_uses_with(const)
            folded += 1
            folded_bytes += nbytes
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node in env and node.op != "get_attr" and not node.users:
                graph.erase_node(node)
                removed += 1
        removed += remove_unused_params(program)
        return PassResult(program, modified=folded > 0 or removed > 0,
                          statistics={"values-folded": folded, "nodes-removed": removed, "folded-bytes": folded_bytes})

