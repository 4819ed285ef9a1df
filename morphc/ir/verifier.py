"""The IR's invariants, checked with messages that name the node and what was expected.

`verify(program)` collects every problem and raises one VerificationError listing them, so a pass
author sees all that a rewrite broke at once. The PassManager runs it after each pass with
`verify_each`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from morphc.errors import VerificationError
from morphc.ir.annotations import ANNOTATIONS_KEY, Annotation
from morphc.ir.metadata import META_KEY, NodeMeta, TensorMeta
from morphc.ir.program import Program

ALLOWED_PYTHON_TARGETS = (operator.getitem,)


def _where(node: fx.Node) -> str:
    return f"node %{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _check_structure(program: Program) -> list[str]:
    problems: list[str] = []
    try:
        program.graph.lint()
    except Exception as exc:  # fx raises RuntimeError/AssertionError with its own wording
        problems.append(f"malformed graph: {exc}")
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        problems.append(f"graph must have exactly one output node, found {len(outputs)}")
    elif outputs[0] is not list(program.graph.nodes)[-1]:
        problems.append("the output node must be the graph's last node")
    else:
        leaves = outputs[0].args[0] if outputs[0].args else ()
        if not isinstance(leaves, (tuple, list)) or len(leaves) != len(program.outputs):
            n = len(leaves) if isinstance(leaves, (tuple, list)) else "a non-tuple"
            problems.append(f"output node returns {n} value(s) but the program declares "
                            f"{len(program.outputs)} output(s): {[o.name for o in program.outputs]}")
    names = [o.name for o in program.outputs]
    if len(set(names)) != len(names):
        problems.append(f"output names must be unique, got {names}")
    placeholders = program.placeholders()
    if [p.name for p in placeholders] != [s.name for s in program.inputs]:
        problems.append(f"input placeholders {[p.name for p in placeholders]} do not match the declared "
                        f"inputs {[s.name for s in program.inputs]}")
    for node in program.graph.nodes:
        if node.op == "get_attr":
            value = getattr(program.graph_module, str(node.target), None)
            if not isinstance(value, torch.Tensor):
                problems.append(f"{_where(node)} reads '{node.target}', which is not a tensor of the program")
        elif node.op == "call_function":
            if not isinstance(node.target, torch._ops.OpOverload) and node.target not in ALLOWED_PYTHON_TARGETS:
                problems.append(f"{_where(node)} calls {node.target!r}: only ATen operators (torch.ops.aten.*) "
                                "and operator.getitem are allowed in the IR")
            elif isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
                problems.append(f"{_where(node)} updates a tensor in place: the IR is functional (lowering "
                                "functionalizes); use the out-of-place operator")
        elif node.op in ("call_module", "call_method"):
            problems.append(f"{_where(node)}: {node.op} nodes are not part of the IR; lower to ATen operators")
    if not problems and program.graph.python_code(root_module="self").src != program.graph_module.code:
        problems.append("the GraphModule's generated code is stale: the graph was changed without "
                        "Program.mark_modified() (did a pass rewrite it but return modified=False?)")
    return problems


def _check_metadata(program: Program) -> list[str]:
    problems: list[str] = []
    for node in program.graph.nodes:
        meta: NodeMeta | None = node.meta.get(META_KEY)
        if meta is None:
            problems.append(f"{_where(node)} has no metadata (a pass created it without "
                            "Program.mark_modified()/refresh_metadata())")
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
            traced = TensorMeta(tuple(int(d) for d in val.shape), val.dtype)
            if meta.outputs and meta.outputs[0] != traced:
                problems.append(f"{_where(node)} metadata says {meta.outputs[0]} but torch.export traced {traced}")
    for spec, ph in zip(program.inputs, program.placeholders()):
        meta = ph.meta.get(META_KEY)
        if meta is not None and meta.outputs != (TensorMeta(spec.shape, spec.dtype),):
            problems.append(f"input %{ph.name} computes {', '.join(map(str, meta.outputs))} but is declared {spec}")
    leaves = program.output_node.args[0] if program.output_node.args else ()
    for spec, leaf in zip(program.outputs, leaves):
        meta = leaf.meta.get(META_KEY) if isinstance(leaf, fx.Node) else None
        if meta is not None and meta.outputs[:1] != (TensorMeta(spec.shape, spec.dtype),):
            problems.append(f"output '{spec.name}' is declared {TensorMeta(spec.shape, spec.dtype)} "
                            f"but %{leaf.name} computes {list(map(str, meta.outputs))}")
    return problems


def _check_annotations(program: Program) -> list[str]:
    problems: list[str] = []
    for kind, ann in program.annotations.items():
        problems += _check_one(program, None, kind, ann)
    for node in program.graph.nodes:
        for kind, ann in node.meta.get(ANNOTATIONS_KEY, {}).items():
            problems += [f"{_where(node)}: {p}" for p in _check_one(program, node, kind, ann)]
    return problems


def _check_one(program: Program, node: fx.Node | None, kind: str, ann: object) -> list[str]:
    if not isinstance(ann, Annotation):
        return [f"annotation '{kind}' is a {type(ann).__name__}, not a morphc Annotation"]
    if ann.kind != kind:
        return [f"annotation stored under '{kind}' is of kind '{ann.kind}'"]
    expected = "program" if node is None else "node"
    if ann.scope != expected:
        return [f"annotation '{kind}' is {ann.scope}-scoped but attached to a {expected}"]
    return [f"annotation '{kind}': {p}" for p in ann.validate(program, node)]


def verify(program: Program, *, metadata: bool = True, after_pass: str | None = None) -> None:
    """Raise VerificationError listing every broken invariant; return None when the program is valid."""
    problems = _check_structure(program)
    if metadata and not problems:
        problems += _check_metadata(program)
    problems += _check_annotations(program)
    if problems:
        raise VerificationError(problems, after_pass=after_pass)
