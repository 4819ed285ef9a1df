"""Canonicalization: remove operators that compute nothing in an inference graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from morphc.ir.metadata import node_meta
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, register_pass
from morphc.passes.manager import PassContext

aten = torch.ops.aten

_ALWAYS_IDENTITY = frozenset({aten.alias.default, aten.detach.default, aten.clone.default,
                              aten.lift_fresh_copy.default})
_COPIES = frozenset({aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default})
_SAME_SHAPE_IDENTITY = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                  aten.expand.default, aten.flatten.using_ints})


def _forwarded_input(node: fx.Node) -> fx.Node | None:
    """The input this node merely passes on, or None when it computes something."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    same_type = node_meta(src).outputs == node_meta(node).outputs and len(node_meta(node).outputs) == 1
    target = node.target
    if target in _ALWAYS_IDENTITY:
        if target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.preserve_format):
            return None
        return src if same_type else None
    if target in _SAME_SHAPE_IDENTITY:
        return src if same_type else None
    if target is aten._to_copy.default:
        src_val = node_meta(src)
        changes = {k: v for k, v in node.kwargs.items() if v is not None and k != "non_blocking"}
        # a device argument may move the tensor (metadata does not record devices): keep those
        keeps = (set(changes) <= {"dtype", "layout"}
                 and changes.get("dtype", src_val.dtype) == src_val.dtype
                 and changes.get("layout", torch.strided) == torch.strided)
        return src if keeps and same_type else None
    if target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return src if not train and same_type else None
    return None


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Remove copies, aliases, same-shape views, eval dropout and shape assertions that compute nothing.

    Functionalization turns eval-mode dropout into `clone`, HF models carry `to(dtype)` casts to
    the dtype they already have, and reshapes often restate the shape; each costs a dispatch and
    sometimes a copy per call. Copies the graph returns stay copies, and two outputs never become
    the same tensor.
    """

    name: ClassVar[str] = "canonicalize"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        removed = 0
        output = program.output_node
        for node in list(program.graph.nodes):
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                program.graph.erase_node(node)  # shapes and dtypes are static and verified
                removed += 1
                continue
            src = _forwarded_input(node)
            if src is None:
                continue
            if output in node.users and (node.target in _COPIES or src in output.all_input_nodes):
                continue  # a returned copy stays a copy; two outputs never become one tensor
            node.replace_all_uses_with(src)
            program.graph.erase_node(node)
            removed += 1
        return PassResult(program, modified=removed > 0, statistics={"ops-removed": removed})
