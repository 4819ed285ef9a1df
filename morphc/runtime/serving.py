"""Applying a `serving-config` annotation: threads, backend and its options, batch size, GPU share.

The tuner measures configurations through this module and the runtime serves through it, so a
configuration means the same thing when it is measured and when it is deployed:

- threads: `torch.set_num_threads` for eager, the session's intra-op pool for ONNX Runtime
  (`Runner.activate()` sets the process-wide values and restores them on exit);
- flush_denormal: subnormal floats flushed to zero, on every intra-op thread for eager
  (`morphc.runtime.denormals`), by the session option `session.set_denormal_as_zero` for ONNX Runtime;
- backend options: ONNX Runtime graph optimization level, execution mode, inter-op threads and
  thread spinning, as `SessionOptions`; `pipeline` is pass pipeline text run before serving;
- batch: a `Batcher` groups single requests into batches of the configured size (programs have
  static shapes, so the Program must be lowered at that batch; a partial batch is padded);
- GPU share: `environment()` gives `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (read by the CUDA driver
  when the process creates its CUDA context, so it must be set before any CUDA call) and
  `deployment_snippet()` writes FaST-GShare-style pod annotations (gpu_sm_partition,
  gpu_quota_request, batch size). This project's machines have no GPU: the GPU knobs are written
  and exported, never measured here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from morphc.errors import MorphcError
from morphc.ir.annotations import ServingConfig
from morphc.ir.program import Program
from morphc.ir.verifier import verify
from morphc.runtime.denormals import set_threads_and_flush, threads_and_flush

MPS_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


class ServingError(MorphcError, ValueError):
    """A serving config that cannot be applied to this program or these requests."""


def serving_config_of(program: Program) -> ServingConfig:
    """The program's serving-config annotation; a clear error when `annotate-config` has not run."""
    config = program.annotation(ServingConfig)
    if config is None:
        raise ServingError("the program has no 'serving-config' annotation: run the 'annotate-config' pass "
                           "(or `morphc tune`) first, or pass a ServingConfig explicitly")
    return config


def cores_used(config: ServingConfig) -> int:
    """CPU cores the config occupies: intra-op threads, plus the extra inter-op threads of a parallel ORT session."""
    opts = config.options()
    extra = int(opts.get("inter_op_threads", 1)) - 1 if opts.get("execution_mode") == "parallel" else 0
    return config.threads + max(0, extra)


def environment(config: ServingConfig) -> dict[str, str]:
    """Environment variables a serving process needs for this config (set before torch/CUDA start)."""
    env = {"OMP_NUM_THREADS": str(config.threads)}
    if config.device == "cuda" and config.sm_share is not None:
        env[MPS_ENV] = str(config.sm_share)
    return env


def ort_session_options(config: ServingConfig) -> Any:
    """ONNX Runtime SessionOptions for the config (threads, optimization, execution mode, spinning)."""
    import onnxruntime as ort

    opts = config.options()
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.threads
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.get("optimization", "all")]
    parallel = opts.get("execution_mode", "sequential") == "parallel"
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = int(opts.get("inter_op_threads", 1)) if parallel else 1
    if config.flush_denormal:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    spin = "1" if opts.get("allow_spinning", True) else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3
    return so


class Runner:
    """The program compiled for one serving config: `runner(*inputs) -> {output name: tensor}`."""

    def __init__(self, program: Program, config: ServingConfig, *, onnx_model: bytes | None = None) -> None:
        self.config = config
        self.program = program
        self.batch_size = config.batch
        self.threads = config.threads
        self.session: Any = None
        if config.pipeline:
            from morphc.passes.manager import PassManager

            self.program = PassManager(config.pipeline).run(program)
        if config.backend == "onnxruntime":
            import onnxruntime as ort

            from morphc.runtime.onnx_runtime import export_onnx

            model = onnx_model if onnx_model is not None else export_onnx(self.program)
            self.session = ort.InferenceSession(model, ort_session_options(config), providers=["CPUExecutionProvider"])
            self._input_names = [i.name for i in self.session.get_inputs()]
            self._output_names = [o.name for o in self.session.get_outputs()]
        elif config.backend != "eager":
            raise ServingError(f"serving backend '{config.backend}' is not supported; valid: eager, onnxruntime")

    @contextlib.contextmanager
    def activate(self) -> Iterator[Runner]:
        """Set the process-wide knobs (torch threads, flush mode, environment) for the duration of the block."""
        _check_environment_settable(self.config)
        previous_env = {k: os.environ.get(k) for k in environment(self.config)}
        try:
            with threads_and_flush(self.config.threads, self.config.flush_denormal):
                os.environ.update(environment(self.config))
                yield self
        finally:
            for key, value in previous_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.session is None:
            return self.program(*inputs)
        self.program.check_inputs(inputs)
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self._input_names, inputs)}
        results = dict(zip(self._output_names, self.session.run(self._output_names, feeds)))
        return {o.name: torch.from_numpy(results[o.name]) for o in self.program.outputs}


def apply(config: ServingConfig) -> None:
    """Apply the process-wide part of a config now: torch threads, flush mode and environment variables."""
    _check_environment_settable(config)
    set_threads_and_flush(config.threads, config.flush_denormal)
    os.environ.update(environment(config))


def _check_environment_settable(config: ServingConfig) -> None:
    if config.device == "cuda" and config.sm_share is not None and torch.cuda.is_initialized():
        raise ServingError(f"{MPS_ENV} must be set before the process creates its CUDA context, but CUDA is "
                           "already initialized: apply the serving config (or export the environment) at start-up")



def build_runner(program: Program, config: ServingConfig | None = None, *, onnx_model: bytes | None = None) -> Runner:
    """A Runner for `program` under `config` (default: the program's own serving-config annotation).

    Explicit configs are validated against the program like annotations are (batch matches the
    program's inputs, known backend options), so a bad config fails here with the reason."""
    config = config or serving_config_of(program)
    problems = config.validate(program, None)
    if problems:
        raise ServingError("serving config cannot be applied: " + "; ".join(problems))
    return Runner(program, config, onnx_model=onnx_model)


class Batcher:
    """Groups requests into batches of `runner.batch_size` samples (padding the last), splits the outputs.

    A request is a tuple of tensors whose leading dimension is its number of samples. `batches_run`
    records the leading size of every batch handed to the runner (what `batch` changed)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.batch_size = runner.batch_size
        self.batches_run: list[int] = []

    def __call__(self, requests: Sequence[tuple[torch.Tensor, ...]]) -> list[dict[str, torch.Tensor]]:
        if not requests:
            return []
        n_inputs = len(requests[0])
        sizes = []
        for i, req in enumerate(requests):
            if len(req) != n_inputs or any(t.dim() == 0 for t in req) or len({t.shape[0] for t in req}) != 1:
                raise ServingError(f"request {i} must be {n_inputs} tensor(s) sharing a leading (sample) dimension")
            sizes.append(int(req[0].shape[0]))
        columns = [torch.cat([req[j] for req in requests]) for j in range(n_inputs)]
        total = sum(sizes)
        merged: dict[str, list[torch.Tensor]] = {}
        for start in range(0, total, self.batch_size):
            chunk = [c[start:start + self.batch_size] for c in columns]
            real = chunk[0].shape[0]
            if real < self.batch_size:  # pad with copies of the last sample
                chunk = [torch.cat([c, c[-1:].expand(self.batch_size - real, *c.shape[1:])]) for c in chunk]
            outputs = self.runner(*chunk)
            self.batches_run.append(chunk[0].shape[0])
            for name, value in outputs.items():
                if value.dim() == 0 or value.shape[0] != self.batch_size:
                    raise ServingError(f"output '{name}' has shape {tuple(value.shape)}: batching needs a leading "
                                       f"batch dimension of {self.batch_size}")
                merged.setdefault(name, []).append(value[:real])
        flat = {name: torch.cat(parts) for name, parts in merged.items()}
        out, offset = [], 0
        for size in sizes:
            out.append({name: value[offset:offset + size] for name, value in flat.items()})
            offset += size
        return out


def serve(program: Program, *, onnx_model: bytes | None = None) -> Batcher:
    """Apply the program's serving config to this process and return its batching front end."""
    verify(program, metadata=False)
    runner = build_runner(program, onnx_model=onnx_model)
    apply(runner.config)
    return Batcher(runner)


def deployment_snippet(config: ServingConfig, name: str = "morphc-model") -> str:
    """A Kubernetes pod fragment (FaST-GShare-style annotations) that deploys this config."""
    annotations = {"morphc/batch-size": str(config.batch), "morphc/backend": config.backend,
                   "morphc/threads": str(config.threads)}
    for key, value in config.backend_options:
        annotations[f"morphc/{config.backend}-{key.replace('_', '-')}"] = str(value).lower()
    if config.flush_denormal:
        annotations["morphc/flush-denormal"] = "true"
    if config.slo_ms is not None:
        annotations["morphc/slo-ms"] = f"{config.slo_ms:g}"
    if config.device == "cuda":
        if config.sm_share is not None:
            annotations["fast-gshare/gpu_sm_partition"] = str(config.sm_share)
        if config.time_quota is not None:
            annotations["fast-gshare/gpu_quota_request"] = f"{config.time_quota:g}"
            annotations["fast-gshare/gpu_quota_limit"] = "1.0"
    env = environment(config)
    lines = ["apiVersion: v1", "kind: Pod", "metadata:", f"  name: {name}", "  annotations:"]
    lines += [f'    {k}: "{v}"' for k, v in annotations.items()]
    lines += ["spec:", "  containers:", f"  - name: {name}", "    env:"]
    lines += [f'    - {{name: {k}, value: "{v}"}}' for k, v in env.items()]
    lines += ["    resources:", "      requests:", f'        cpu: "{cores_used(config)}"']
    return "\n".join(lines) + "\n"
