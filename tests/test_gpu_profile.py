"""The GPU profile, tested up to the CUDA edge without a GPU: the honest GPU space, the profiler's refusal,
the measurement path on a host stand-in backend, views made portable across devices, the MPS daemon check
and per-share worker dispatch with fakes (including "MPS unavailable -> share 100 only, reason recorded"),
the GPU config encoding, and a GPU-keyed records database read back into samples and a trained model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import morphc
from morphc.ir.program import OutputSpec, Program, TensorSpec
from morphc.predictors import gpu_collect, profiler, records, spaces
from morphc.predictors.corpus import VARIANTS, Variant
from morphc.predictors.cost_model import CostModelError, TrainItem, train
from morphc.predictors.dataset import CORPUS, OPGRAPH, STATIC, gpu_device, load_samples
from morphc.predictors.features import N_CONFIG, extract, graph_features, node_features, runtime_column
from morphc.predictors.gpu_collect import (
    GPU_FAILURE,
    MPS_SHARE_ENV,
    RESTART_RC,
    CollectionSettings,
    Job,
    MpsControl,
    ProbeError,
    check_mps,
    client_env,
    collect_gpu_profile,
    measure_share,
    run_workers,
    select_variants,
)
from morphc.predictors.gpu_profiler import (
    DRY_RUN_DEVICE,
    HostBackend,
    check_gpu_config,
    make_views_portable,
    process_sm_share,
    profile_ops_gpu,
    profile_program_gpu,
    to_device,
)
from morphc.predictors.profiler import LATENCY, OP_LATENCY
from morphc.predictors.records import RecordsDB, RecordsError
from morphc.predictors.spaces import ConfigError, CpuConfig, DeviceUnavailableError, GpuConfig, Knob


def _program(batch: int = 2) -> Program:
    torch.manual_seed(0)
    return morphc.lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(batch, 4))


# --- the space and the profiler's refusal -------------------------------------------------------


def test_gpu_space_says_what_each_knob_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    knobs = {k.name: k for k in spaces.GPU.knobs}
    monkeypatch.setattr(spaces, "gpu_available", lambda: False)
    assert not any(k.measurable_here for k in spaces.GPU.knobs)
    monkeypatch.setattr(spaces, "gpu_available", lambda: True)
    monkeypatch.setattr(spaces.shutil, "which", lambda name: None)
    assert knobs["batch"].measurable_here and not knobs["sm_share"].measurable_here
    monkeypatch.setattr(spaces.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert knobs["sm_share"].measurable_here
    assert not knobs["time_quota"].measurable_here  # no FaST-GShare scheduler, whatever the machine
    assert "not applied" in knobs["time_quota"].applied
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in knobs["sm_share"].applied
    with pytest.raises(ValueError, match=r"Knob\.needs must be one of"):
        Knob("x", (1,), "how", needs="tpu")


def test_profiler_refuses_gpu_configs_where_torch_sees_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    program = _program()
    for call in (lambda: profiler.profile_program(program, GpuConfig(sm_share=100)),
                 lambda: profiler.profile_ops(program, GpuConfig()),
                 lambda: profiler.profile_interleaved(program, [GpuConfig()])):
        with pytest.raises(DeviceUnavailableError, match=r"no GPU \(torch.cuda.is_available\(\) is False"):
            call()


def test_a_process_measures_only_its_own_share_and_no_time_quota() -> None:
    assert process_sm_share({}) == 100 and process_sm_share({MPS_SHARE_ENV: "20"}) == 20
    with pytest.raises(ConfigError, match="not a percentage"):
        process_sm_share({MPS_SHARE_ENV: "half"})
    assert check_gpu_config(GpuConfig(sm_share=50), {MPS_SHARE_ENV: "50"}) == GpuConfig(sm_share=50)
    with pytest.raises(DeviceUnavailableError, match=r"runs at SM share 100%.*CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50"):
        check_gpu_config(GpuConfig(sm_share=50), {})
    with pytest.raises(DeviceUnavailableError, match="FaST-GShare"):
        check_gpu_config(GpuConfig(time_quota=0.5), {})


def test_device_fingerprint_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert records.device_fingerprint("cuda").startswith("cuda|")  # no GPU here: no GPU parts, no error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(records, "_nvidia_driver", lambda: "580.65.06")
    fp = records.device_fingerprint("cuda")
    assert fp.endswith(f"|NVIDIA H100 80GB HBM3|cuda={torch.version.cuda}|driver=580.65.06")
    assert f"torch={torch.__version__}" in fp


# --- the measurement path, on the host stand-in -------------------------------------------------


def test_gpu_measurement_path_runs_on_a_host_backend() -> None:
    backend = HostBackend()
    program, rewritten = to_device(_program(batch=2), backend)
    assert rewritten == 0
    stats = profile_program_gpu(program, GpuConfig(batch=2), backend, environ={}, target_s=0.001, min_runs=3)
    assert stats.runs >= 3 and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    ops = profile_ops_gpu(program, GpuConfig(), backend, environ={}, warmup=0, repeats=2)
    assert sorted(ops) == sorted(n.name for n in program.graph.nodes if n.op == "call_function")
    with pytest.raises(DeviceUnavailableError, match="SM share"):
        profile_ops_gpu(program, GpuConfig(sm_share=50), backend, environ={})
    with pytest.raises(ValueError, match="config batch 8 differs"):
        profile_program_gpu(program, GpuConfig(batch=8), backend, environ={})
    meta = SimpleNamespace(device="meta", synchronize=lambda: None, event=backend.event)
    with pytest.raises(ValueError, match="move the program first"):
        profile_program_gpu(program, GpuConfig(), meta, environ={})  # type: ignore[arg-type]


def test_a_view_the_device_strides_do_not_allow_becomes_a_reshape() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    t = graph.call_function(torch.ops.aten.transpose.int, (x, 0, 1))
    graph.output((graph.call_function(torch.ops.aten.view.default, (t, [-1])),))
    inputs = (torch.arange(6.0).reshape(2, 3),)
    program = Program(fx.GraphModule(torch.nn.Module(), graph), [TensorSpec("x", (2, 3), torch.float32)],
                      [OutputSpec("out", (6,), torch.float32)], inputs, compute_meta=False)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        program.graph_module(*inputs)
    assert make_views_portable(program) == 1
    torch.testing.assert_close(program.graph_module(*inputs)[0], inputs[0].t().reshape(-1))
    assert make_views_portable(_program()) == 0  # views that work stay views


def test_attention_exported_on_cpu_runs_on_another_device_after_the_rewrite() -> None:
    """CPU attention returns its output in another layout than other devices' kernels: the exported
    transpose+view after it fails elsewhere (here on 'meta', as it would with a GPU kernel's layout)."""
    from morphc import zoo

    z = zoo.build("bert-small", batch_size=2, seq_len=8, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    program = morphc.lower(z.model, z.example_inputs).to("meta")
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        program(*program.example_inputs)
    assert make_views_portable(program) >= 1
    out = program(*program.example_inputs)
    assert all(t.device.type == "meta" for t in out.values())


# --- MPS and the per-share workers, with fakes ---------------------------------------------------


class FakeMps:
    """subprocess.run for nvidia-cuda-mps-control: records calls, answers like the daemon (or fails)."""

    def __init__(self, start_rc: int = 0, start_err: str = "") -> None:
        self.calls: list[tuple[list[str], str | None, dict[str, str]]] = []
        self.start_rc, self.start_err = start_rc, start_err

    def __call__(self, args: list[str], input: str | None = None, env: dict[str, str] | None = None,
                 **_: Any) -> subprocess.CompletedProcess:
        self.calls.append((args, input, dict(env or {})))
        if args[1:] == ["-d"]:
            return subprocess.CompletedProcess(args, self.start_rc, "", self.start_err)
        out = "4242\n" if input == "get_server_list\n" else ""
        return subprocess.CompletedProcess(args, 0, out, "")


def _probe(sms: dict[int, int], ms: dict[int, float], seen: list[dict[str, str]]):
    def probe(env: dict[str, str], **_: Any) -> dict[str, Any]:
        seen.append(env)
        share = int(env.get(MPS_SHARE_ENV, 100))
        return {"device": "cuda|fake", "name": "fake", "sm_count": sms[share], "matmul_ms": ms[share],
                "matmul_n": 8192}
    return probe


def test_mps_check_accepts_a_visible_share_and_says_why_not_otherwise(tmp_path: Path) -> None:
    which = lambda name: f"/usr/bin/{name}"  # noqa: E731
    runner, seen = FakeMps(), []
    mps = MpsControl(tmp_path / "a", runner=runner, which=which)
    status = check_mps(mps, _probe({100: 132, 20: 26}, {100: 1.6, 20: 7.9}, seen), {"CUDA_MPS_X": "stale"}, 20,
                       log=lambda m: None)
    assert status.works and "26 of 132 SMs" in status.reason and status.evidence["servers"] == ["4242"]
    assert [e[MPS_SHARE_ENV] for e in seen] == ["100", "20"]
    assert all(e["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "a" / "pipe") and "CUDA_MPS_X" not in e for e in seen)
    assert runner.calls[0][0][1:] == ["-d"] and runner.calls[0][2]["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "a/log")
    mps.quit(wait_s=0)
    assert runner.calls[-1][1] == "quit\n"

    (tmp_path / "b" / "log").mkdir(parents=True)
    (tmp_path / "b" / "log" / "control.log").write_text("[ERROR] server failed to start\n")
    same = check_mps(MpsControl(tmp_path / "b", runner=FakeMps(), which=which),
                     _probe({100: 132, 20: 132}, {100: 1.6, 20: 1.7}, []), {}, 20, log=lambda m: None)
    assert not same.works and "no visible effect" in same.reason and "server failed to start" in same.reason

    broken = check_mps(MpsControl(tmp_path / "c", runner=FakeMps(1, "permission denied"), which=which),
                       _probe({100: 1}, {100: 1.0}, []), {}, 20, log=lambda m: None)
    assert not broken.works and "exited with 1: permission denied" in broken.reason

    def failing(env: dict[str, str], **_: Any) -> dict[str, Any]:
        raise ProbeError("the probe process exited with 1: cudaErrorMPSConnectionFailed")

    client = check_mps(MpsControl(tmp_path / "d", runner=FakeMps(), which=which), failing, {}, 20, log=lambda m: None)
    assert not client.works and "cudaErrorMPSConnectionFailed" in client.reason
    absent = check_mps(MpsControl(tmp_path / "e", which=lambda name: None), failing, {}, 20, log=lambda m: None)
    assert not absent.works and "not on PATH" in absent.reason


def test_client_environments() -> None:
    base = {"PATH": "/bin", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert client_env(base, 100, None) == {"PATH": "/bin"}  # no stale share leaks into a non-MPS worker
    with pytest.raises(ValueError, match="needs an MPS daemon"):
        client_env(base, 50, None)
    mps = MpsControl("/tmp/m", which=lambda name: "/x")
    assert client_env(base, 50, mps) == {"PATH": "/bin", MPS_SHARE_ENV: "50", **mps.env()}


class FakeProc:
    def __init__(self, rc: int | None) -> None:
        self.rc, self.terminated = rc, False

    def wait(self, timeout: float | None = None) -> int:
        if self.rc is None and not self.terminated:
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return -15 if self.rc is None else self.rc

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.terminated = True


def test_one_worker_per_share_in_turn_with_equal_slices_and_restarts() -> None:
    now = [0.0]
    launched: list[tuple[list[str], dict[str, str]]] = []
    codes = {"100": [0], "50": [RESTART_RC, 0], "20": [None]}  # 50 breaks once; 20 overruns its slice

    def launcher(cmd: list[str], env: dict[str, str]) -> FakeProc:
        launched.append((cmd, env))
        now[0] += 10
        return FakeProc(codes[env[MPS_SHARE_ENV]].pop(0))

    mps = MpsControl("/tmp/m", which=lambda name: "/x")
    out = run_workers([100, 50, 20], lambda share, end: ["worker", str(share), f"{end:.0f}"],
                      lambda share: client_env({}, share, mps), deadline=300.0, clock=lambda: now[0],
                      launcher=launcher, log=lambda m: None)
    assert [c[1] for c, _ in launched] == ["100", "50", "50", "20"]
    assert [c[2] for c, _ in launched] == ["100", "155", "155", "300"]  # equal shares of the time left: 100, 145, 270
    assert out[100]["rc"] == 0 and out[50] == {"rc": 0, "attempts": 2, "seconds": 20.0}
    assert out[20]["rc"] == "killed at the end of its slice"
    late = run_workers([100, 50], lambda s, e: [], lambda s: {MPS_SHARE_ENV: str(s)}, deadline=10.0,
                       clock=lambda: 0.0, launcher=launcher, log=lambda m: None)
    assert all("not started" in r["status"] for r in late.values())


def test_select_variants_interleaves_families() -> None:
    chosen = select_variants(VARIANTS, 2)
    families = list(dict.fromkeys(v.family for v in VARIANTS))
    assert [v.family for v in chosen[:len(families)]] == families  # any prefix covers the families alike
    assert all(sum(v.family == f for v in chosen) == 2 for f in families)
    with pytest.raises(ValueError, match="unknown families"):
        select_variants(VARIANTS, 1, ["resnet-9000"])


def _tiny(width: int) -> Variant:
    def build(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)).eval(), (torch.randn(batch, 4),)

    return Variant(f"tiny[w={width}]", "tiny", {"width": width}, build)


def test_collection_without_mps_measures_share_100_only_and_says_why(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole collection, in process: lowering, the CUDA probe, MPS found missing (share 100 only, reason
    in the summary), the worker entry point measuring on the host backend, a resumed run measuring nothing."""
    monkeypatch.setattr(gpu_collect.signal, "signal", lambda *a: None)
    launched: list[list[str]] = []

    def launcher(cmd: list[str], env: dict[str, str]) -> FakeProc:
        assert cmd[1:4] == ["-m", "morphc.predictors.gpu_collect", "worker"] and MPS_SHARE_ENV not in env
        launched.append(cmd)
        return FakeProc(gpu_collect.main(cmd[3:]))

    def probe(env: dict[str, str], backend: str, **_: Any) -> dict[str, Any]:
        assert backend == "host" and "CUDA_MPS_PIPE_DIRECTORY" not in env
        return gpu_collect._probe_host()

    settings = CollectionSettings(db=tmp_path / "gpu.sqlite", variants=[_tiny(4), _tiny(8)], batches=(1, 2),
                                  shares=(100, 50, 20), budget_s=60, cache_dir=tmp_path / "cache",
                                  work_dir=tmp_path / "work", processes=1, target_s=0.001, backend="host")
    mps = MpsControl(tmp_path / "mps", which=lambda name: None)
    summary = collect_gpu_profile(settings, log=lambda m: None, probe=probe, launcher=launcher, mps_control=mps)
    assert summary["shares_measured"] == [100] and not summary["mps"]["works"]
    assert "not on PATH" in summary["mps"]["reason"]
    assert summary["records"][LATENCY] == {"100": 4} and summary["records"][OP_LATENCY] == {"100": 4}
    assert json.loads((tmp_path / "gpu.json").read_text())["mps"]["reason"] == summary["mps"]["reason"]
    assert not (tmp_path / "gpu.sqlite-wal").exists()  # checkpointed: one file to carry away
    samples = load_samples(tmp_path / "gpu.sqlite", device="cuda")
    assert len(samples) == 4 and {s.config for s in samples} == {GpuConfig(batch=1), GpuConfig(batch=2)}
    assert all(s.runtime is None for s in samples)  # per-op at 100% only: no second runtime column without MPS
    assert samples[0].fingerprint and DRY_RUN_DEVICE in gpu_device(RecordsDB(tmp_path / "gpu.sqlite"))
    again = collect_gpu_profile(settings, log=lambda m: None, probe=probe, launcher=launcher, mps_control=mps)
    assert again["records"][LATENCY] == {"100": 4} and len(launched) == 2  # resumed: the worker found all done
    # a repeat pass times every program again into the same database, without per-op profiles: each sample is
    # then the median of its passes, and the passes give the benchmark its re-measurement noise floor
    repeat = collect_gpu_profile(dataclasses.replace(settings, repeat=1), log=lambda m: None, probe=probe,
                                 launcher=launcher, mps_control=mps)
    assert launched[-1][-2:] == ["--repeat", "1"] and repeat["pass"] == 1
    assert repeat["records"][LATENCY] == {"100": 8} and repeat["records"][OP_LATENCY] == {"100": 4}
    twice = load_samples(tmp_path / "gpu.sqlite", device="cuda")
    assert len(twice) == 4 and all(len(s.passes) == 2 for s in twice)
    assert all(s.latency_ms == pytest.approx(sum(s.passes) / 2) for s in twice)
    first = {(s.fingerprint, s.config): s.latency_ms for s in samples}
    assert all(s.passes[0] == first[s.fingerprint, s.config] for s in twice)  # the first pass first


def test_collection_with_working_mps_measures_every_share_with_per_op_at_two(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """MPS found working (a low-share client sees fewer SMs): one worker per share, 100 first, each started with
    its share and the daemon's pipe in its environment; per-op profiles at 100 and 50 give runtime features."""
    monkeypatch.setattr(gpu_collect.signal, "signal", lambda *a: None)
    runner = FakeMps()
    mps = MpsControl(tmp_path / "mps", runner=runner, which=lambda name: f"/usr/bin/{name}")
    shares_seen: list[str] = []

    def launcher(cmd: list[str], env: dict[str, str]) -> FakeProc:
        shares_seen.append(env[MPS_SHARE_ENV])
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "pipe")
        with monkeypatch.context() as m:  # the worker reads its share from its environment, as a real one does
            m.setenv(MPS_SHARE_ENV, env[MPS_SHARE_ENV])
            return FakeProc(gpu_collect.main(cmd[3:]))

    def probe(env: dict[str, str], backend: str, timeout_s: float = 120.0) -> dict[str, Any]:
        assert timeout_s == (60.0 if "CUDA_MPS_PIPE_DIRECTORY" in env else 120.0)  # MPS clients may hang: less
        share = int(env.get(MPS_SHARE_ENV, 100))
        return {**gpu_collect._probe_host(), "sm_count": 132 * share // 100, "matmul_n": 8192}

    settings = CollectionSettings(db=tmp_path / "gpu.sqlite", variants=[_tiny(4)], batches=(1, 2),
                                  shares=(20, 100, 50), budget_s=90, cache_dir=tmp_path / "cache",
                                  work_dir=tmp_path / "work", processes=1, target_s=0.001, backend="host")
    summary = collect_gpu_profile(settings, log=lambda m: None, probe=probe, launcher=launcher, mps_control=mps)
    assert summary["mps"]["works"] and summary["shares_measured"] == [100, 50, 20] == [int(x) for x in shares_seen]
    assert summary["records"][LATENCY] == {"100": 2, "50": 2, "20": 2}
    assert summary["records"][OP_LATENCY] == {"100": 2, "50": 2}
    assert runner.calls[-1][1] == "quit\n"  # the daemon is quit when the collection ends
    samples = load_samples(tmp_path / "gpu.sqlite", device="cuda")
    assert len(samples) == 6 and all(s.runtime is not None and s.runtime.shape[1] == 2 for s in samples)


def test_a_failing_program_is_recorded_and_a_broken_context_ends_the_worker(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    db = RecordsDB(tmp_path / "g.sqlite")
    program = _program(batch=1)
    path = morphc.save(program, tmp_path / "p.safetensors")
    jobs = [Job("a", "f", 1, "fp-a", str(tmp_path / "missing.safetensors")), Job("b", "f", 1, "fp-b", str(path))]
    measured, rc = measure_share(db, jobs, 100, float("inf"), backend=HostBackend(), device="cuda|x", ops=False,
                                 target_s=0.001, environ={}, log=lambda m: None)
    assert (measured, rc) == (1, 0)
    failure = db.get(GPU_FAILURE, "fp-a", "cuda|x", GpuConfig(batch=1).as_record())
    assert failure is not None and "no saved program" in failure.stats["error"]

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_collect, "_measure_job", broken)
    jobs = [Job("c", "f", 1, "fp-c", str(path)), Job("d", "f", 1, "fp-d", str(path))]
    assert measure_share(db, jobs, 100, float("inf"), backend=HostBackend(), device="cuda|x", environ={},
                         log=lambda m: None) == (0, RESTART_RC)
    assert db.get(GPU_FAILURE, "fp-d", "cuda|x", GpuConfig(batch=1).as_record()) is None  # left for the next worker
    with pytest.raises(ValueError, match="asked for share 50%"):
        measure_share(db, jobs, 50, 0.0, backend=HostBackend(), device="cuda|x", environ={})


# --- encoding and the records -> dataset -> model round trip ------------------------------------


def test_gpu_configs_are_encoded_by_their_sm_share_and_cpu_encoding_is_unchanged() -> None:
    graph = extract(_program(batch=2))
    cfg = lambda c: node_features(graph, c)[0, -N_CONFIG:]  # noqa: E731
    np.testing.assert_allclose(cfg(CpuConfig(threads=2)), [0.25, 0.0, 0.5, 0.5])  # log2 batch/4, ratio, 1/t, log2 t/2
    np.testing.assert_allclose(cfg(GpuConfig(sm_share=100)), [0.25, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(cfg(GpuConfig(sm_share=50)), [0.25, 0.0, 2.0, -0.5])
    np.testing.assert_allclose(cfg(GpuConfig(batch=8, sm_share=20)), [0.75, 0.5, 5.0, np.log2(0.2) / 2], rtol=1e-6)
    assert graph_features(graph, GpuConfig(sm_share=50))[-2] == pytest.approx(2.0)
    assert [runtime_column(c) for c in (CpuConfig(threads=1), CpuConfig(threads=4), GpuConfig(sm_share=100),
                                        GpuConfig(sm_share=50), GpuConfig(sm_share=20),
                                        GpuConfig(sm_share=50, time_quota=0.5))] == [0, 1, 0, 1, None, None]


def _gpu_db(path: Path, device: str = "cuda|NVIDIA H100|torch=x") -> tuple[RecordsDB, list[Program]]:
    """A GPU-keyed corpus: 3 MLPs x batches 1, 4 x shares 100/50/20, per-op at 100 and 50 (synthetic times)."""
    db = RecordsDB(path)
    programs = []
    for width in (8, 32, 64):
        for batch in (1, 4):
            torch.manual_seed(0)
            program = morphc.lower(nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4)).eval(),
                                   torch.randn(batch, 16))
            programs.append(program)
            graph, fp = extract(program), records.program_fingerprint(program)
            db.put(OPGRAPH, fp, STATIC, {}, graph.to_json())
            db.put(CORPUS, f"mlp[w={width}]", STATIC, {"batch": batch},
                   {"fingerprint": fp, "family": "mlp", "spec": {}})
            for share in (100, 50, 20):
                ms = 0.05 + 1e-4 * width * batch * 100 / share
                spread = 20.0 if (width, batch, share) == (64, 4, 20) else 1.1
                key = GpuConfig(batch=batch, sm_share=share).as_record()
                db.put(LATENCY, fp, device, key, {"p10_ms": ms, "median_ms": ms * 1.02, "p90_ms": ms * spread,
                                                  "load_before": 0.1})
                if share in spaces.GPU_RUNTIME_SHARES:
                    db.put(OP_LATENCY, fp, device, key, {"ms": [0.0 if op == "input" else ms / 4 for op in graph.ops]})
    return db, programs


def test_gpu_records_round_trip_into_samples_and_a_cuda_model(tmp_path: Path) -> None:
    db, programs = _gpu_db(tmp_path / "gpu.sqlite")
    db.put(LATENCY, "other", "cpu|some cpu", {"batch": 1, "threads": 1}, {"p10_ms": 1.0, "p90_ms": 1.0})
    assert gpu_device(db) == "cuda|NVIDIA H100|torch=x"
    samples = load_samples(db, device="cuda")
    assert len(samples) == 18 and all(isinstance(s.config, GpuConfig) for s in samples)
    assert {s.config.sm_share for s in samples} == {100, 50, 20}
    assert sum(s.unstable for s in samples) == 1
    s = next(x for x in samples if x.config == GpuConfig(batch=4, sm_share=50) and x.variant == "mlp[w=32]")
    assert s.latency_ms == pytest.approx(0.05 + 1e-4 * 32 * 4 * 2)
    assert s.runtime is not None and s.runtime.shape == (s.graph.num_nodes, 2)
    np.testing.assert_allclose(s.runtime[1], [(0.05 + 1e-4 * 32 * 4) / 4, (0.05 + 1e-4 * 32 * 4 * 2) / 4])
    assert load_samples(db) == []  # no CPU measured these programs

    items = [TrainItem(x.graph, x.config, x.latency_ms, x.runtime, x.family) for x in samples if not x.unstable]
    model, _ = train(items, device=gpu_device(db), hidden=8, layers=1, steps=20, batch_size=8, show_progress=False)
    assert model.device_kind == "cuda" and model.meta["device_fingerprint"] == "cuda|NVIDIA H100|torch=x"
    assert model.predict(programs[0], GpuConfig(sm_share=50)) > 0
    with pytest.raises(CostModelError, match="trained on 'cuda' measurements and cannot predict a CpuConfig"):
        model.predict(programs[0], CpuConfig())
    with pytest.raises(ValueError, match="needs `device`"):
        train(items[:2], steps=1, show_progress=False)
    with pytest.raises(ValueError, match="mix"):
        train([items[0], TrainItem(items[0].graph, CpuConfig(), 1.0)], steps=1, show_progress=False)


def test_gpu_device_refuses_a_database_without_one_gpu(tmp_path: Path) -> None:
    db = RecordsDB(tmp_path / "cpu.sqlite")
    db.put(LATENCY, "m", "cpu|x", {"batch": 1, "threads": 1}, {"p10_ms": 1.0})
    with pytest.raises(RecordsError, match=r"no GPU latency records \(devices with latencies: \['cpu\|x'\]\)"):
        load_samples(db, device="cuda")
    db.put(LATENCY, "m", "cuda|A", GpuConfig(batch=1).as_record(), {"p10_ms": 1.0})
    db.put(LATENCY, "m", "cuda|B", GpuConfig(batch=1).as_record(), {"p10_ms": 1.0})
    with pytest.raises(RecordsError, match=r"2 devices; pass one of them as device=: cuda\|A; cuda\|B"):
        gpu_device(db)
