"""The ONNX Runtime target: Program -> ONNX (torch.onnx's dynamo exporter) -> InferenceSession.

The fastest CPU runtime measured on these machines (../shared/FACTS.md). onnx, onnxscript and
onnxruntime are optional dependencies (`pip install morphc[onnx]`), imported only when this target
compiles or loads. Options (PassContext.options["onnxruntime"] or `compile_program(options=...)`):

    threads        intra-op threads of the session (default: torch.get_num_threads())
    optimization   ONNX Runtime graph optimization level: disable | basic | extended | all (default all)
    providers      execution providers, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]
                   (default: CUDA first where this onnxruntime build has it and a GPU is present,
                   then CPU)
    transformer    run ONNX Runtime's transformer optimizer (fused attention, LayerNorm, GELU)
                   before the session: "bert" or "none" (default "none"; measure before enabling)

Ops the exporter has no ONNX function for (custom torch.library ops) fall back to torch through
`morphc.runtime.partition`. `export_onnx` is shared with the TensorRT target.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from morphc.ir.program import Program
from morphc.runtime.executable import (
    CompileError,
    CompileReport,
    Executable,
    UnsupportedOpsError,
    check_target_option,
    nodes_rejected,
    register_target,
)

MODEL_FILE = "model.onnx"
OPTIONS_FILE = "onnxruntime.json"
_LEVELS = ("disable", "basic", "extended", "all")
_VALID_OPTIONS = ("threads", "optimization", "providers", "transformer")
_TRANSFORMER = ("none", "bert")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise CompileError("the 'onnxruntime' target needs onnxruntime, onnx and onnxscript: "
                           "pip install 'morphc[onnx]'") from exc
    return onnxruntime


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision op and warns about training mode."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@functools.cache
def _onnx_registry() -> Any:
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    with _quiet_exporter():
        return ONNXRegistry.from_torchlib()


def unsupported(program: Program, target: str = "onnxruntime") -> dict[str, str]:
    """Nodes torch.onnx cannot export: non-ATen operators without an ONNX function (ATen ops
    lacking one are decomposed by the exporter, so they are not listed)."""
    registry = _onnx_registry()
    return nodes_rejected(program, lambda op: None if op.namespace == "aten" or registry.is_registered(op) else
                          f"torch.onnx has no ONNX function for {op.namespace}.{op._opname}.{op._overloadname}")


def export_onnx(program: Program, target: str = "onnxruntime") -> bytes:
    """The Program as a serialized, checked ONNX model whose inputs and outputs keep their names."""
    import onnx

    gm = program.graph_module
    gm.eval()  # GraphModules start in training mode; the ATen graph does not depend on it
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                gm, program.example_inputs, dynamo=True, optimize=True, verbose=False,
                input_names=[s.name for s in program.inputs], output_names=[s.name for s in program.outputs],
            )
    except Exception as exc:  # the exporter raises several types; the message names the op
        nodes = _nodes_named_in(str(exc), program)
        if nodes:
            raise UnsupportedOpsError(f"torch.onnx has no ONNX function for node(s) {sorted(nodes)} "
                                      f"(target '{target}')", nodes) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"torch.onnx could not export the program for target '{target}': {first}") from exc
    model = onnx_program.model_proto
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CompileError(f"the exported ONNX model is invalid: {exc}") from exc
    return model.SerializeToString()


def _nodes_named_in(message: str, program: Program) -> dict[str, str]:
    """Nodes whose operator the exporter's DispatchError names (directly or as the prims op an
    ATen op decomposes to, e.g. aten.hypot -> prims.hypot)."""
    match = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", message)
    if not match:
        return {}
    opname = match.group(1).rsplit(".", 1)[-1]
    reason = f"torch.onnx has no ONNX function for {match.group(1)}.{match.group(2)}"
    return {n.name: reason for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "_opname", None) == opname}


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_VALID_OPTIONS))
    if unknown:
        raise CompileError(f"target 'onnxruntime' has no option(s) {unknown}; "
                           f"valid options: {', '.join(_VALID_OPTIONS)}")
    threads = options.get("threads")
    opts = {"threads": int(threads) if threads is not None else torch.get_num_threads(),
            "optimization": str(options.get("optimization", "all")),
            "providers": list(options.get("providers", _default_providers())),
            "transformer": str(options.get("transformer", "none"))}
    check_target_option("onnxruntime", "transformer", opts["transformer"], choices=_TRANSFORMER)
    check_target_option("onnxruntime", "optimization", opts["optimization"], choices=_LEVELS)
    check_target_option("onnxruntime", "threads", opts["threads"], minimum=1)
    return opts


def _default_providers() -> list[str]:
    """CUDA where this onnxruntime build has it and torch sees a GPU, then CPU."""
    available = _import_ort().get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def optimize_transformer(model: bytes, program: Program) -> tuple[bytes, dict[str, int]]:
    """ONNX Runtime's transformer optimizer (model_type bert): fuses attention, LayerNorm, GELU."""
    import onnx
    from onnxruntime.transformers import optimizer

    with _quiet_exporter():
        optimized = optimizer.optimize_model(onnx.load_from_string(model), model_type="bert", num_heads=0,
                                             hidden_size=0, opt_level=0)
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    return optimized.model.SerializeToString(), fused


@register_target
class OnnxRuntimeExecutable(Executable):
    """Runs the Program as an ONNX model in an ONNX Runtime InferenceSession."""

    target = "onnxruntime"

    def __init__(self, program: Program, report: CompileReport, model: bytes, options: dict[str, Any]) -> None:
        super().__init__(program, report)
        self.model = model
        self.options = options
        ort = _import_ort()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options["threads"]
        session_options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options["optimization"]]
        available = set(ort.get_available_providers())
        missing = [p for p in options["providers"] if p not in available]
        if missing:
            raise CompileError(f"ONNX Runtime execution provider(s) {missing} are not available here; "
                               f"available: {sorted(available)}")
        self.session = ort.InferenceSession(model, session_options, providers=options["providers"])
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> OnnxRuntimeExecutable:
        opts = _check_options(options)
        _import_ort()
        report = CompileReport(target=cls.target, notes=[f"onnxruntime options: {opts}"])
        model = export_onnx(program)
        if opts["transformer"] != "none":
            model, fused = optimize_transformer(model, program)
            report.notes.append(f"transformer optimizer fused: {fused}")
        return cls(program, report, model, opts)

    @classmethod
    def unsupported_nodes(cls, program: Program, options: dict[str, Any]) -> dict[str, str]:
        return unsupported(program)

    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self._input_names, args)}
        results = self.session.run(self._output_names, feeds)
        by_name = dict(zip(self._output_names, results))
        return {o.name: torch.from_numpy(by_name[o.name]) for o in self.program.outputs}

    def save_artifacts(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self.model)
        (directory / OPTIONS_FILE).write_text(json.dumps(self.options, indent=2))

    @classmethod
    def load_from(cls, directory: Path, program: Program, report: CompileReport) -> OnnxRuntimeExecutable:
        return cls(program, report, (directory / MODEL_FILE).read_bytes(),
                   json.loads((directory / OPTIONS_FILE).read_text()))
