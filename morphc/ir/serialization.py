"""save/load of a Program as one safetensors file: tensors as tensors, the graph as JSON metadata.

The graph is written node by node (op, ATen target, arguments, module path, annotations), so the
file is readable with any safetensors tool, needs no pickle and no model code to load, and round-
trips exactly. Tensors that alias each other (a module shared by two tasks) are stored once.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.fx as fx
from safetensors.torch import save_file

from morphc.errors import SerializationError
from morphc.ir.annotations import ANNOTATIONS_KEY, annotation_from_json
from morphc.ir.metadata import META_KEY, MODULE_PATH_KEY, node_meta
from morphc.ir.program import OutputSpec, Program, TensorSpec

FORMAT = "morphc.program"
VERSION = 1

_ENUM_TYPES: dict[str, type] = {"dtype": torch.dtype, "device": torch.device, "layout": torch.layout,
                                 "memory_format": torch.memory_format}
_PY_TARGETS = {"operator.getitem": operator.getitem}


def _dtype_from(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise SerializationError(f"unknown dtype '{name}' in saved program")
    return value


def _encode(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_encode(x) for x in a]}
    if isinstance(a, list):
        return [_encode(x) for x in a]
    if isinstance(a, dict):
        return {"dict": {k: _encode(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, (torch.layout, torch.memory_format)):
        kind = "layout" if isinstance(a, torch.layout) else "memory_format"
        return {kind: str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise SerializationError(f"cannot save argument {a!r} of type {type(a).__name__}")


def _decode(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    (kind, value), = a.items()
    if kind == "node":
        if value not in env:
            raise SerializationError(f"saved graph uses node '{value}' before defining it")
        return env[value]
    if kind == "tuple":
        return tuple(_decode(x, env) for x in value)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in value.items()}
    if kind == "dtype":
        return _dtype_from(value)
    if kind == "device":
        return torch.device(value)
    if kind in ("layout", "memory_format"):
        return getattr(torch, value)
    raise SerializationError(f"unknown argument encoding '{kind}' in saved program")


def _encode_target(node: fx.Node) -> str | None:
    t = node.target
    if node.op != "call_function":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._schema.name.split('::')[-1]}.{t._overloadname}"
    for name, fn in _PY_TARGETS.items():
        if t is fn:
            return name
    raise SerializationError(f"node %{node.name} calls {t!r}, which morphc cannot save (not an ATen operator)")


def _decode_target(op: str, text: str) -> Any:
    if op != "call_function":
        return text
    if text in _PY_TARGETS:
        return _PY_TARGETS[text]
    try:
        ns, rest = text.split("::", 1)
        name, overload = rest.rsplit(".", 1)
        return getattr(getattr(getattr(torch.ops, ns), name), overload)
    except (ValueError, AttributeError) as exc:
        raise SerializationError(
            f"saved program calls unknown operator '{text}' (from another torch version?)") from exc


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    d = {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch.")}
    if isinstance(spec, OutputSpec):
        d["task"] = spec.task
    return d


def save(program: Program, path: str | Path) -> Path:
    """Write `program` (graph, parameters, example inputs, annotations) to one .safetensors file."""
    path = Path(path)
    nodes = []
    for node in program.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op, "target": _encode_target(node),
                                 "args": _encode(node.args), "kwargs": _encode(dict(node.kwargs))}
        module_path = node.meta.get(MODULE_PATH_KEY) or (node_meta(node).module_path if META_KEY in node.meta else "")
        if module_path:
            entry["module_path"] = module_path
        anns = node.meta.get(ANNOTATIONS_KEY)
        if anns:
            entry["annotations"] = [a.to_json() for a in anns.values()]
        nodes.append(entry)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for attr, t in program.parameters().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in by_storage and t.numel() > 0:
            aliases[attr] = by_storage[key]
            continue
        by_storage[key] = f"param/{attr}"
        tensors[f"param/{attr}"] = t.detach().contiguous().clone()
    for i, t in enumerate(program.example_inputs):
        tensors[f"input/{i}"] = t.detach().contiguous().clone()
    doc = {
        "inputs": [_spec_json(s) for s in program.inputs],
        "outputs": [_spec_json(s) for s in program.outputs],
        "annotations": [a.to_json() for a in program.annotations.values()],
        "nodes": nodes,
        "aliases": aliases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(VERSION), "program": json.dumps(doc)})
    return path


def load(path: str | Path, *, metadata: bool = True) -> Program:
    """Read a Program written by `save`; SerializationError for corrupt or foreign files.

    `metadata=False` skips computing node metadata (shapes, FLOPs: most of the load time): for a
    program that is only run, e.g. timed on another device; passes and printing need the metadata."""
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"no saved program at '{path}'")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # clone: safetensors hands out tensors at unaligned addresses, on which CPU kernels take
            # other paths (slower, and rounding differently from the program that was saved)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise SerializationError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise SerializationError(f"'{path}' is not a saved morphc program (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise SerializationError(f"'{path}' was saved in format version {meta.get('version')}; "
                                 f"this morphc reads version {VERSION}")
    try:
        doc = json.loads(meta["program"])
        return _rebuild(doc, tensors, metadata)
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"'{path}' holds an incomplete program description: {exc!r}") from exc
    except RuntimeError as exc:  # metadata is computed by running the graph on the saved example inputs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SerializationError(f"'{path}' holds a program that does not run on its own example inputs "
                                 f"(tensors that do not fit the graph?): {first}") from exc


def _rebuild(doc: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: bool = True) -> Program:
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[str, fx.Node] = {}
    for entry in doc["nodes"]:
        op = entry["op"]
        if op == "get_attr":
            attr = entry["target"]
            key = doc["aliases"].get(attr, f"param/{attr}")
            if key not in tensors:
                raise SerializationError(f"saved program lacks tensor '{key}' read by node %{entry['name']}")
            if not hasattr(root, attr):
                root.register_buffer(attr, tensors[key])
        target = _decode_target(op, entry["target"])
        args = _decode(entry["args"], env)
        kwargs = _decode(entry["kwargs"], env)
        node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        if node.name != entry["name"]:
            raise SerializationError(f"duplicate node name '{entry['name']}' in saved program")
        node.meta[MODULE_PATH_KEY] = entry.get("module_path", "")
        if entry.get("annotations"):
            node.meta[ANNOTATIONS_KEY] = {a["kind"]: annotation_from_json(a) for a in entry["annotations"]}
        env[node.name] = node
    inputs = [TensorSpec(s["name"], tuple(s["shape"]), _dtype_from(s["dtype"])) for s in doc["inputs"]]
    outputs = [OutputSpec(s["name"], tuple(s["shape"]), _dtype_from(s["dtype"]), task=s["task"])
               for s in doc["outputs"]]
    examples = [tensors[f"input/{i}"] for i in range(len(inputs))]
    annotations = {a["kind"]: annotation_from_json(a) for a in doc["annotations"]}
    return Program(fx.GraphModule(root, graph), inputs, outputs, examples, annotations, compute_meta=metadata)
