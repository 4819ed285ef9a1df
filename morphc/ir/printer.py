"""A stable, readable text form of a Program (what `--print-ir-after-all` and tests compare).

    program tasks=[age, gender] params=12 (1.23 MB)
      input %x : f32[1, 3, 32, 32]
      %age_c_weight : f32[16, 3, 3, 3] = param "age.c.weight"
      %age_conv2d : f32[1, 16, 30, 30] = aten.conv2d(%x, %age_c_weight, %age_c_bias)  # conv age.c flops=...
      return age=%age_linear, gender=%gender_linear

Only node names, operators, literal arguments, metadata and annotations appear: no object ids,
addresses or timings, so the same program always prints the same text.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.fx as fx

from morphc.ir.annotations import ANNOTATIONS_KEY
from morphc.ir.metadata import META_KEY, NodeMeta, dtype_name, op_name
from morphc.ir.program import Program


def format_arg(a: Any) -> str:
    """Render one node argument: %node for values, Python-like literals otherwise."""
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(format_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, str):
        return json.dumps(a)
    return str(a)


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        overload = t._overloadname
        base = f"{ns}.{op_name(t)}"
        return base if overload == "default" else f"{base}.{overload}"
    return op_name(t)


def _type(meta: NodeMeta | None) -> str:
    if meta is None:
        return "?"
    if len(meta.outputs) == 1:
        return str(meta.outputs[0])
    return "(" + ", ".join(str(o) for o in meta.outputs) + ")"


def _trailer(meta: NodeMeta | None, node: fx.Node) -> str:
    bits = []
    if meta is not None and node.op == "call_function":
        bits.append(meta.op_class.value)
        if meta.module_path:
            bits.append(meta.module_path)
        if meta.flops:
            bits.append(f"flops={meta.flops}")
    for kind, ann in sorted(node.meta.get(ANNOTATIONS_KEY, {}).items()):
        fields = ", ".join(f"{k}={format_arg(v)}" for k, v in ann.to_json().items() if k != "kind")
        bits.append(f"@{kind}({fields})")
    return f"  # {' '.join(bits)}" if bits else ""


def print_node(node: fx.Node) -> str:
    meta: NodeMeta | None = node.meta.get(META_KEY)
    if node.op == "placeholder":
        return f"input %{node.name} : {_type(meta)}{_trailer(None, node)}"
    if node.op == "get_attr":
        source = meta.module_path if meta else node.target
        return f"%{node.name} : {_type(meta)} = param \"{source}\"{_trailer(None, node)}"
    if node.op == "output":
        return "return"
    args = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    return f"%{node.name} : {_type(meta)} = {_target(node)}({', '.join(args)}){_trailer(meta, node)}"


def print_program(program: Program) -> str:
    params = program.parameters()
    lines = [f"program tasks=[{', '.join(program.tasks)}] params={len(params)} "
             f"({program.param_bytes() / 1e6:.2f} MB)"]
    for kind, ann in sorted(program.annotations.items()):
        fields = ", ".join(f"{k}={format_arg(v)}" for k, v in ann.to_json().items() if k != "kind")
        lines.append(f"  @{kind}({fields})")
    for node in program.graph.nodes:
        if node.op != "output":
            lines.append("  " + print_node(node))
    leaves = program.output_node.args[0]
    rets = ", ".join(f"{spec.name}={format_arg(leaf)}" for spec, leaf in zip(program.outputs, leaves))
    lines.append(f"  return {rets}")
    return "\n".join(lines) + "\n"
