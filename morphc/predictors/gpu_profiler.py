"""GPU latency of Programs, measured in this process: end to end and per operator, on CUDA.

Why its own module: on a GPU the SM share is a property of the *process* (CUDA reads
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` when it creates the process's context, under an MPS daemon),
so unlike CPU threads it cannot be switched between timed calls. A process measures GpuConfigs of
its own share only, and refuses another share with a message saying how to get it (a worker
process started with that environment: `gpu_collect`). The time quota needs FaST-GShare's
scheduler, which morphc does not have: only time_quota=1.0 is measured, a lower one is refused.

End to end: the Program is moved to the device once (parameters, buffers, example inputs and the
`device=` arguments torch.export baked into factory ops: `Program.to`), warmed up, then timed call
by call with a synchronize before and after each call (wall time a serving client sees, including
kernel launches, which dominate small models), summarised as the CPU profiler does (median, p10,
p90). Per operator: each node of the graph runs in an fx interpreter between two CUDA events, read
after the run (one synchronize per run), so the times are GPU timeline times per operator,
launch gaps included; like the CPU per-op profile they are features, not a latency sum.

A graph exported on CPU can hold a `view` that is valid only for the strides a CPU kernel returned
(CPU attention returns its output in another memory layout than the GPU kernels); such a view is
run as `reshape` on the device (a copy where the layout needs one, as eager code's own
`.reshape`/`.contiguous()` would), found by running the graph once; the count is reported.

The device layer (`Backend`: synchronize, timing events) is a parameter so that everything above
CUDA runs in tests on CPU with a stand-in; `CudaBackend` is the real one.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.fx as fx

from morphc.ir.program import Program
from morphc.predictors.profiler import LatencyStats, OpTimer, WallEvent, _load, _summarize, resolve_config
from morphc.predictors.spaces import ConfigError, DeviceUnavailableError, GpuConfig

MPS_SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)  # stride-dependent reshapes of export
_RESHAPE = torch.ops.aten.reshape.default


class Event(Protocol):
    def record(self) -> None: ...
    def elapsed_time(self, end: Any) -> float: ...


class Backend(Protocol):
    """The device layer the measurement needs: where tensors go, a synchronize and timing events."""

    device: str

    def synchronize(self) -> None: ...
    def event(self) -> Event: ...


def check_cuda() -> None:
    """Refuse clearly where there is no CUDA device."""
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"GPU configs (batch, MPS SM share, time quota) cannot be measured here: this machine has no GPU "
            f"(torch.cuda.is_available() is False; torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}). Measure CpuConfigs here, or collect a GPU profile on a machine with "
            f"one: scripts/collect_gpu_profile.py")


class HostBackend:
    """A stand-in device layer on the CPU (wall-clock events, nothing to synchronize): runs the GPU
    measurement path where there is no GPU, for tests and dry runs. Its numbers are CPU numbers; records
    made with it carry `DRY_RUN_DEVICE` in their device fingerprint so they are never taken for a GPU's."""

    device = "cpu"

    def synchronize(self) -> None:
        pass

    def event(self) -> Event:
        return WallEvent()


DRY_RUN_DEVICE = "cuda|DRY-RUN-ON-CPU (HostBackend, not a GPU)"


class CudaBackend:
    """The real device layer: torch.cuda's synchronize and timing events on the current device."""

    device = "cuda"

    def __init__(self) -> None:
        check_cuda()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def event(self) -> Event:
        return torch.cuda.Event(enable_timing=True)


def process_sm_share(environ: Mapping[str, str] | None = None) -> int:
    """The SM share (percent) this process's CUDA context gets: its MPS active-thread percentage, 100 if unset."""
    env = os.environ if environ is None else environ
    raw = env.get(MPS_SHARE_ENV)
    if raw is None or raw.strip() == "":
        return 100
    try:
        share = int(float(raw))
    except ValueError:
        raise ConfigError(f"{MPS_SHARE_ENV}={raw!r} is not a percentage (an integer in 1..100)") from None
    if not 1 <= share <= 100:
        raise ConfigError(f"{MPS_SHARE_ENV}={raw!r} is outside 1..100")
    return share


def check_gpu_config(config: GpuConfig, environ: Mapping[str, str] | None = None) -> GpuConfig:
    """`config` if this process can measure it; otherwise DeviceUnavailableError saying what would."""
    if config.time_quota != 1.0:
        raise DeviceUnavailableError(
            f"time_quota={config.time_quota} needs FaST-GShare's token-bucket scheduler, which morphc does not have; "
            f"only time_quota=1.0 (the whole scheduling window) can be measured")
    share = process_sm_share(environ)
    if config.sm_share != share:
        raise DeviceUnavailableError(
            f"this process's CUDA context runs at SM share {share}% ({MPS_SHARE_ENV} is read when the context is "
            f"created); GpuConfig(sm_share={config.sm_share}) needs a process started with "
            f"{MPS_SHARE_ENV}={config.sm_share} under an MPS daemon (morphc.predictors.gpu_collect starts one worker "
            f"per share)")
    return config


class _PortableViews(fx.Interpreter):
    """Runs the graph once; a `view` the device's strides do not allow becomes a `reshape` (counted)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.rewritten = 0

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function" or n.target not in _VIEWS:
            return super().run_node(n)
        try:
            return super().run_node(n)
        except RuntimeError as exc:
            if "view size is not compatible" not in str(exc):
                raise
        n.target = _RESHAPE
        self.rewritten += 1
        return super().run_node(n)


def make_views_portable(program: Program) -> int:
    """Rewrite the views of `program` (already on its device) that fail there into reshapes; how many."""
    interp = _PortableViews(program.graph_module)
    with torch.no_grad():
        interp.run(*program.example_inputs)
    if interp.rewritten:
        program.graph_module.recompile()
    return interp.rewritten


def to_device(program: Program, backend: Backend) -> tuple[Program, int]:
    """A copy of `program` that runs on the backend's device, and how many views became reshapes."""
    moved = program.to(backend.device)
    return moved, make_views_portable(moved)


def measure_gpu(fn: Callable[[], Any], backend: Backend, *, warmup: int = 5, target_s: float = 0.1,
                min_runs: int = 20, max_runs: int = 200) -> LatencyStats:
    """Time `fn` call by call (synchronized before and after) after `warmup` calls; the number of runs
    adapts so the measurement takes about `target_s` (between `min_runs` and `max_runs`)."""
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    load_before = _load()
    for _ in range(warmup):
        fn()
    backend.synchronize()
    calib = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        backend.synchronize()
        calib.append(time.perf_counter() - start)
    runs = int(min(max(target_s / max(statistics.median(calib), 1e-6), min_runs), max_runs))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        backend.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summarize(samples, load_before)


def profile_program_gpu(program: Program, config: GpuConfig, backend: Backend | None = None, *,
                        environ: Mapping[str, str] | None = None, **measure: Any) -> LatencyStats:
    """End-to-end latency of `program` (already on the backend's device: `to_device`) under `config`."""
    backend = backend or CudaBackend()
    check_gpu_config(resolve_config(program, config), environ)  # type: ignore[arg-type]
    _check_on_device(program, backend)
    with torch.no_grad():
        return measure_gpu(lambda: program(*program.example_inputs), backend, **measure)


def profile_ops_gpu(program: Program, config: GpuConfig, backend: Backend | None = None, *, warmup: int = 1,
                    repeats: int = 3, environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """Median GPU time (ms) of every operator node of `program` (already on the device) by node name."""
    backend = backend or CudaBackend()
    check_gpu_config(resolve_config(program, config), environ)  # type: ignore[arg-type]
    _check_on_device(program, backend)
    timer = OpTimer(program.graph_module, backend.event, backend.synchronize)
    return timer.medians(program.example_inputs, warmup=warmup, repeats=repeats)


def _check_on_device(program: Program, backend: Backend) -> None:
    want = torch.device(backend.device).type
    wrong = [t.device for t in program.example_inputs if t.device.type != want]
    if wrong:
        raise ValueError(f"the program's example inputs are on {wrong[0]}, not {backend.device}: move the program "
                         f"first (gpu_profiler.to_device(program, backend))")


def probe(matmul_n: int = 8192, repeats: int = 10) -> dict[str, Any]:
    """What this process sees of the GPU: name, SM count (under MPS: of its share, where the driver says so),
    and the GPU time of a compute-bound fp16 matmul (slower at a lower SM share when MPS applies it)."""
    from morphc.predictors.records import device_fingerprint

    check_cuda()
    props = torch.cuda.get_device_properties(0)
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.float16)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"device": device_fingerprint("cuda"), "name": props.name, "sm_count": props.multi_processor_count,
            "total_memory_gb": round(props.total_memory / 2**30, 1), "share_env": os.environ.get(MPS_SHARE_ENV),
            "matmul_n": matmul_n, "matmul_ms": statistics.median(times), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": _flag(lambda: torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": _flag(lambda: torch.backends.cudnn.allow_tf32)}


def _flag(read: Callable[[], Any]) -> Any:
    try:
        return bool(read())
    except Exception as exc:  # a renamed or removed flag in another torch version: report, do not fail the probe
        return f"unknown ({type(exc).__name__})"
