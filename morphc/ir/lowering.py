"""Lowering: one model or a dict of task models -> one Program, captured with torch.export.

torch.export (non-strict by default) captures real Hugging Face models where fx tracing fails.
Each task is exported separately on the same example inputs, then its graph is spliced into one
graph that shares the input placeholders; parameters become get_attr nodes named after their
task and module path.
"""

from __future__ import annotations

import operator
import re
import traceback
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from morphc.errors import LoweringError
from morphc.ir.metadata import MODULE_PATH_KEY
from morphc.ir.program import OutputSpec, Program, TensorSpec

DEFAULT_TASK = "model"
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def lower(
    models: torch.nn.Module | Mapping[str, torch.nn.Module],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    strict: bool = False,
) -> Program:
    """Capture one model, or several task models reading the same inputs, as one Program.

    `models` is a module (task name "model") or a {task name: module} dict; `example_inputs` a
    tensor or a tuple of positional tensors every model accepts. Shapes are static: lower again
    for another batch size.
    """
    tasks = {DEFAULT_TASK: models} if isinstance(models, torch.nn.Module) else dict(models)
    if not tasks:
        raise LoweringError("lower() needs at least one model; got an empty mapping")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise LoweringError(f"example input #{i} is a {type(a).__name__}; lower() takes positional tensors")
    for name, model in tasks.items():
        if not _TASK_NAME.match(name):
            raise LoweringError(f"task name {name!r} must be an identifier (letters, digits, underscore)")
        if not isinstance(model, torch.nn.Module):
            raise LoweringError(f"task '{name}' is a {type(model).__name__}, not a torch.nn.Module")
        training = next((path for path, m in model.named_modules() if m.training), None)
        if training is not None:
            which = f"model '{name}'" if not training else f"submodule '{training}' of model '{name}'"
            raise LoweringError(
                f"{which} is in training mode; call .eval() on the model before lowering "
                "(batch norm and dropout would be captured with their training behaviour)"
            )
    exported = {name: export_model(name, model, args, strict=strict) for name, model in tasks.items()}
    return _splice(exported, args, prefix_tasks=not isinstance(models, torch.nn.Module))


def export_model(task: str, model: torch.nn.Module, args: tuple[torch.Tensor, ...], *, strict: bool) -> ExportedProgram:
    """torch.export one model; failures become a LoweringError naming the op/line and a fix."""
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, strict=strict)
    except Exception as exc:  # torch raises many unrelated types here
        raise LoweringError(_explain_export_failure(task, exc)) from exc
    _check_operators(task, ep)
    # Functionalize (in-place ops become pure ones, state updates become mutation outputs, eval
    # dropout a clone, `to` a _to_copy, shape assertions go) while keeping whole ATen ops such as
    # conv2d, linear, layer_norm and scaled_dot_product_attention: one canonical form for passes.
    try:
        with warnings.catch_warnings():  # torch's own deprecation noise from copying tree specs
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
            return ep.run_decompositions({})
    except Exception as exc:
        raise LoweringError(f"torch.export captured model '{task}' but could not functionalize it: "
                            f"{type(exc).__name__}: {exc}") from exc


_HINTS: tuple[tuple[str, str], ...] = (
    ("data-dependent", "the model branches on a tensor's value (e.g. `if x.sum() > 0`, `.item()`, `.tolist()`): "
                       "use torch.where or torch.cond, or move the decision out of forward()"),
    ("GuardOnDataDependent", "the model branches on a tensor's value: use torch.where or torch.cond"),
    ("Could not guard on data-dependent", "the model branches on a tensor's value: use torch.where or torch.cond"),
    ("takes", "the example inputs do not fit forward()'s signature: pass a tuple of positional tensors"),
    ("missing", "the example inputs do not fit forward()'s signature: pass a tuple of positional tensors"),
    ("Unsupported", "the model uses a Python feature torch.export cannot trace: retry with strict=False, "
                    "or rewrite that line with torch ops"),
    ("mutat", "the model mutates a buffer or input in forward(): call .eval() and avoid in-place updates of state"),
)


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch/transformers internals: the user's line."""
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/site-packages/" in path or "/morphc/ir/" in path or path.startswith("<"):
            continue
        best = frame
    return f"{best.filename}:{best.lineno} ({best.line})" if best else None


def _explain_export_failure(task: str, exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    where = _user_frame(exc)
    # torch.export often names the user line itself ("File x.py, line N"): surface it
    match = re.search(r'File "([^"]+)", line (\d+)', text)
    if where is None and match and "/torch/" not in match.group(1):
        where = f"{match.group(1)}:{match.group(2)}"
    hint = next((h for key, h in _HINTS if key.lower() in text.lower()), "see the torch.export error above")
    parts = [f"torch.export could not capture model '{task}': {type(exc).__name__}: {first}"]
    if where:
        parts.append(f"at {where}")
    parts.append(f"suggestion: {hint}")
    return "\n  ".join(parts)


def _check_operators(task: str, ep: ExportedProgram) -> None:
    """Refuse what the IR cannot hold: calls that are not ATen operators, e.g. the higher-order
    operators torch.cond and torch.map (their branches are subgraphs, not ATen nodes)."""
    for node in ep.graph.nodes:
        if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is operator.getitem:
            continue
        name = getattr(node.target, "__name__", str(node.target))
        trace = [ln.strip() for ln in str(node.meta.get("stack_trace") or "").splitlines() if ln.strip()]
        files = [ln for ln in trace if ln.startswith("File ") and not ln.startswith('File "<')]
        where = f" at {files[-1]}" if files else ""
        raise LoweringError(
            f"model '{task}' calls '{name}'{where}, which morphc cannot lower (only ATen operators can be "
            "in a Program; higher-order operators such as torch.cond are not supported yet)\n  "
            "suggestion: compute both branches and select with torch.where"
        )


def _attr_name(qualname: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", qualname)
    if not base or base[0].isdigit():
        base = "p_" + base
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _leaf_names(ep: ExportedProgram, task: str, n_leaves: int) -> list[str]:
    """Name each flat output: the task name for one tensor, 'task.key' for structured outputs."""
    if n_leaves == 1:
        return [task]
    skeleton = pytree.tree_unflatten(list(range(n_leaves)), ep.call_spec.out_spec)
    paths = pytree.tree_flatten_with_path(skeleton)[0]
    names = []
    for i, (path, _) in enumerate(paths):
        key = pytree.keystr(path).strip(".[]'\"").replace("']['", ".").replace("][", ".") or str(i)
        names.append(f"{task}.{key}")
    return names


def _module_path(node: fx.Node, task: str, prefix: bool) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    path = re.sub(r"^L__self__[._]?", "", path).replace("L['self'].", "")
    if prefix:
        return f"{task}.{path}" if path else task
    return path


def _splice(exported: dict[str, ExportedProgram], args: tuple[torch.Tensor, ...], *, prefix_tasks: bool) -> Program:
    graph = fx.Graph()
    root = torch.nn.Module()
    taken: set[str] = set()
    input_nodes: list[fx.Node] = []
    inputs: list[TensorSpec] = []
    outputs: list[OutputSpec] = []
    output_values: list[fx.Node] = []

    first = next(iter(exported.values()))
    user_inputs = [s.arg.name for s in first.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    for name, arg in zip(user_inputs, args):
        ph = graph.placeholder(name)
        ph.meta[MODULE_PATH_KEY] = ""
        input_nodes.append(ph)
        inputs.append(TensorSpec(ph.name, tuple(arg.shape), arg.dtype))

    for task, ep in exported.items():
        sig = ep.graph_signature
        mutations = [f"input '{s.target}'" if s.kind == OutputKind.USER_INPUT_MUTATION else str(s.target)
                     for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
        if mutations:
            targets = ", ".join(mutations)
            raise LoweringError(
                f"model '{task}' mutates state in forward() ({targets}); morphc lowers inference graphs: "
                "call .eval() and remove in-place updates of buffers or inputs"
            )
        specs = {s.arg.name: s for s in sig.input_specs}
        state = {**ep.state_dict, **ep.constants}
        env: dict[fx.Node, fx.Node] = {}
        user_i = 0
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if spec.kind == InputKind.USER_INPUT:
                    env[node] = input_nodes[user_i]
                    user_i += 1
                    continue
                qual = f"{task}.{spec.target}" if prefix_tasks else str(spec.target)
                attr = _attr_name(qual, taken)
                tensor = state[spec.target]
                root.register_buffer(attr, tensor.detach() if isinstance(tensor, torch.Tensor) else tensor)
                new = graph.get_attr(attr)
                new.meta[MODULE_PATH_KEY] = qual
                env[node] = new
            elif node.op == "output":
                leaves = list(node.args[0])
                for leaf, leaf_name in zip(leaves, _leaf_names(ep, task, len(leaves))):
                    if not isinstance(leaf, fx.Node):
                        raise LoweringError(
                            f"model '{task}' returns a non-tensor value ({leaf!r}) as output '{leaf_name}'")
                    val = leaf.meta.get("val")
                    if not isinstance(val, torch.Tensor):
                        raise LoweringError(f"model '{task}' output '{leaf_name}' is not a tensor")
                    output_values.append(env[leaf])
                    outputs.append(OutputSpec(leaf_name, tuple(int(d) for d in val.shape), val.dtype, task=task))
            else:
                new = graph.node_copy(node, env.__getitem__)
                if prefix_tasks:
                    new._rename(f"{task}_{node.name}")
                new.meta[MODULE_PATH_KEY] = _module_path(node, task, prefix_tasks)
                env[node] = new
        if user_i != len(input_nodes):
            raise LoweringError(
                f"task models' inputs differ: '{task}' takes {user_i} tensor input(s), "
                f"'{next(iter(exported))}' takes {len(input_nodes)}; fused models must read the same inputs"
            )
    out = graph.output(tuple(output_values))
    out.meta[MODULE_PATH_KEY] = ""
    gm = fx.GraphModule(root, graph)
    return Program(gm, inputs, outputs, args)

