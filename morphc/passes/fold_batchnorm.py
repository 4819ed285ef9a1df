"""Fold inference-mode batch norm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from morphc.ir.metadata import MODULE_PATH_KEY
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, register_pass
from morphc.passes.graph_utils import fresh_attr, remove_unused_params
from morphc.passes.manager import PassContext

aten = torch.ops.aten


def _const(program: Program, arg: object) -> torch.Tensor | None:
    """The tensor behind a get_attr argument, None for a missing optional, else raise LookupError."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return program.tensor(str(arg.target))
    raise LookupError


def _match_batchnorm(node: fx.Node) -> tuple[fx.Node, tuple, float] | None:
    """(node holding the normalized value, (gamma, beta, mean, var) args, eps) for inference batch
    norm, which functionalized graphs hold as `getitem(_native_batch_norm_legit_no_training(...), 0)`."""
    if node.op != "call_function" or node.target is not aten._native_batch_norm_legit_no_training.default:
        return None
    users = list(node.users)
    if not all(u.target is operator.getitem for u in users):
        return None
    outs = [u for u in users if u.args[1] == 0]
    if len(outs) != 1 or any(u.users for u in users if u.args[1] != 0):
        return None
    eps = node.args[6] if len(node.args) > 6 else node.kwargs.get("eps", 1e-5)
    return outs[0], tuple(node.args[1:5]), float(eps)


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold inference batch norm after a conv2d (constant statistics) into the conv2d.

    W' = W * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Saves a full pass over the activation per folded layer; exact up to float rounding.
    """

    name: ClassVar[str] = "fold-batchnorm"

    @torch.no_grad()
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        graph = program.graph
        folded = 0
        for bn in list(graph.nodes):
            match = _match_batchnorm(bn)
            if match is None:
                continue
            result, (gamma_arg, beta_arg, mean_arg, var_arg), eps = match
            conv = bn.args[0]
            if not (isinstance(conv, fx.Node) and conv.target is aten.conv2d.default and len(conv.users) == 1):
                continue
            try:
                weight = _const(program, conv.args[1])
                bias = _const(program, conv.args[2] if len(conv.args) > 2 else None)
                gamma, beta, mean, var = (_const(program, a) for a in (gamma_arg, beta_arg, mean_arg, var_arg))
            except LookupError:
                continue  # statistics or weights computed at run time: leave alone
            if weight is None or mean is None or var is None:
                continue
            scale = torch.rsqrt(var.double() + eps)
            if gamma is not None:
                scale = scale * gamma.double()
            new_w = (weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
            base = bias.double() if bias is not None else torch.zeros_like(mean, dtype=torch.float64)
            new_b = (base - mean.double()) * scale + (beta.double() if beta is not None else 0.0)
            w_attr = fresh_attr(program, f"{conv.name}_bnfolded_weight")
            program.graph_module.register_buffer(w_attr, new_w.contiguous())
            b_attr = fresh_attr(program, f"{conv.name}_bnfolded_bias")
            program.graph_module.register_buffer(b_attr, new_b.to(weight.dtype).contiguous())
            with graph.inserting_before(conv):
                w_node, b_node = graph.get_attr(w_attr), graph.get_attr(b_attr)
            for n in (w_node, b_node):
                n.meta[MODULE_PATH_KEY] = conv.meta.get(MODULE_PATH_KEY, "")
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[1], args[2] = w_node, b_node
            conv.args = tuple(args)
            result.replace_all_uses_with(conv)
            for node in [*bn.users, bn]:
                graph.erase_node(node)
            folded += 1
        removed = remove_unused_params(program)
        return PassResult(program, modified=folded > 0 or removed > 0, statistics={"batchnorms-folded": folded})
