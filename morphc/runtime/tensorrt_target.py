"""The TensorRT target: Program -> ONNX (shared with the ONNX Runtime target) -> TensorRT engine.

Compiling exports the Program with `onnx_runtime.export_onnx` (checked with `onnx.checker`),
runs that ONNX model in ONNX Runtime and refuses it unless it matches eager torch (so what
TensorRT receives is known to be right), then builds an engine with TensorRT's ONNX parser in
FP32 or FP16. Engines are cached on disk, keyed by the ONNX model (ops, shapes, weights) and
the precision, so compiling the same model again loads the plan instead of rebuilding.

TensorRT is imported lazily. It cannot be installed from the registries reachable on the
machines this was developed on (and they have no GPU): there compiling stops after the checked
ONNX model with TensorRTMissingError, whose message says where that model was written (ready for
`trtexec --onnx=...`) and how to install TensorRT. Engine building and running are exercised only
where `import tensorrt` works.

Options (PassContext.options["tensorrt"] or `compile_program(options=...)`):

    precision      fp32 (default) or fp16
    cache_dir      engine cache directory (default ~/.cache/morphc/tensorrt)
    workspace_mb   builder workspace limit in MiB (default 1024)
    check_onnx     compare the ONNX model with eager in ONNX Runtime first (default True)
    atol, rtol     tolerance of that comparison (default 1e-4 each)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from morphc.errors import did_you_mean
from morphc.ir.program import Program
from morphc.runtime.executable import (
    CompileError,
    CompileReport,
    Executable,
    check_target_option,
    max_abs_difference,
    register_target,
)
from morphc.runtime.onnx_runtime import export_onnx, unsupported

PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
OPTIONS_FILE = "tensorrt.json"
_PRECISIONS = ("fp32", "fp16")
_VALID_OPTIONS = ("precision", "cache_dir", "workspace_mb", "check_onnx", "atol", "rtol")


class TensorRTMissingError(CompileError):
    """TensorRT (or a GPU for it) is not available; the checked ONNX model was still written."""


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_VALID_OPTIONS))
    if unknown:
        raise CompileError(f"target 'tensorrt' has no option(s) {unknown}{did_you_mean(unknown[0], _VALID_OPTIONS)}; "
                           f"valid options: {', '.join(_VALID_OPTIONS)}")
    default_cache = Path(os.environ.get("MORPHC_CACHE", Path.home() / ".cache" / "morphc")) / "tensorrt"
    opts = {"precision": str(options.get("precision", "fp32")),
            "cache_dir": str(options.get("cache_dir", default_cache)),
            "workspace_mb": int(options.get("workspace_mb", 1024)),
            "check_onnx": bool(options.get("check_onnx", True)),
            "atol": float(options.get("atol", 1e-4)), "rtol": float(options.get("rtol", 1e-4))}
    check_target_option("tensorrt", "precision", opts["precision"], choices=_PRECISIONS)
    check_target_option("tensorrt", "workspace_mb", opts["workspace_mb"], minimum=1)
    return opts


def engine_key(model: bytes, precision: str) -> str:
    """Cache key of an engine: the ONNX model (ops, shapes, weights), the precision, TensorRT's version."""
    try:
        import tensorrt as trt
        version = str(trt.__version__)
    except ImportError:
        version = "none"
    digest = hashlib.blake2b(model, digest_size=16)
    digest.update(f"|{precision}|trt={version}".encode())
    return digest.hexdigest()


def check_onnx_in_ort(model: bytes, program: Program, atol: float, rtol: float) -> float:
    """Run the ONNX model in ONNX Runtime on the example inputs; refuse it unless it matches eager."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(session.get_inputs(),
                                                                           program.example_inputs)}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, (torch.from_numpy(a) for a in session.run(names, feeds))))
    expected = program(*program.example_inputs)
    err, where = max_abs_difference(expected, {o.name: got[o.name] for o in program.outputs})
    scale = max((v.abs().max().item() for v in expected.values() if v.numel()), default=0.0)
    if not err <= atol + rtol * scale:
        raise CompileError(f"the ONNX model for TensorRT computes output '{where}' off by {err:.3g} from eager torch "
                           "in ONNX Runtime; refusing to build an engine from it")
    return err


def import_tensorrt(onnx_path: Path | None = None) -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        where = f"; the checked ONNX model it would get is at {onnx_path} (try `trtexec --onnx={onnx_path}`)" \
            if onnx_path else ""
        raise TensorRTMissingError("the 'tensorrt' target needs NVIDIA TensorRT and a CUDA GPU: "
                                   "pip install tensorrt --extra-index-url https://pypi.nvidia.com" + where) from exc
    if not torch.cuda.is_available():
        raise TensorRTMissingError("TensorRT is installed but torch sees no CUDA GPU to build or run an engine on")
    return trt


def build_engine(model: bytes, precision: str, workspace_mb: int) -> bytes:
    """Parse the ONNX model with TensorRT's parser and build a serialized engine (plan)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CompileError("TensorRT failed to build an engine (see its log above)")
    return bytes(plan)


@register_target
class TensorRTExecutable(Executable):
    """Runs the Program as a TensorRT engine on the GPU (inputs and outputs as torch tensors)."""

    target = "tensorrt"

    def __init__(self, program: Program, report: CompileReport, plan: bytes, model: bytes,
                 options: dict[str, Any]) -> None:
        super().__init__(program, report)
        trt = import_tensorrt()
        self.plan, self.model, self.options = plan, model, options
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise CompileError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()

    @classmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> TensorRTExecutable:
        opts = check_options(options)
        model = export_onnx(program, target=cls.target)
        notes = [f"tensorrt options: {opts}"]
        if opts["check_onnx"]:
            err = check_onnx_in_ort(model, program, opts["atol"], opts["rtol"])
            notes.append(f"ONNX model checked with onnx.checker and in ONNX Runtime (max error {err:.2g})")
        cache = Path(opts["cache_dir"])
        cache.mkdir(parents=True, exist_ok=True)
        key = engine_key(model, opts["precision"])
        onnx_path, plan_path = cache / f"{key}.onnx", cache / f"{key}.plan"
        onnx_path.write_bytes(model)
        import_tensorrt(onnx_path)
        if plan_path.is_file():
            plan = plan_path.read_bytes()
            notes.append(f"engine loaded from cache {plan_path}")
        else:
            plan = build_engine(model, opts["precision"], opts["workspace_mb"])
            plan_path.write_bytes(plan)
            notes.append(f"engine built ({opts['precision']}) and cached at {plan_path}")
        return cls(program, CompileReport(target=cls.target, notes=notes), plan, model, opts)

    @classmethod
    def unsupported_nodes(cls, program: Program, options: dict[str, Any]) -> dict[str, str]:
        return unsupported(program, cls.target)

    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        trt = import_tensorrt()
        inputs = [a.detach().to("cuda").contiguous() for a in args]
        outputs: dict[str, torch.Tensor] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        feeds = dict(zip((s.name for s in self.program.inputs), inputs))
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.context.set_tensor_address(name, feeds[name].data_ptr())
            else:
                spec = next(o for o in self.program.outputs if o.name == name)
                outputs[name] = torch.empty(spec.shape, dtype=spec.dtype, device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {o.name: outputs[o.name].cpu() for o in self.program.outputs}

    def save_artifacts(self, directory: Path) -> None:
        (directory / PLAN_FILE).write_bytes(self.plan)
        (directory / ONNX_FILE).write_bytes(self.model)
        (directory / OPTIONS_FILE).write_text(json.dumps(self.options, indent=2))

    @classmethod
    def load_from(cls, directory: Path, program: Program, report: CompileReport) -> TensorRTExecutable:
        return cls(program, report, (directory / PLAN_FILE).read_bytes(), (directory / ONNX_FILE).read_bytes(),
                   json.loads((directory / OPTIONS_FILE).read_text()))
