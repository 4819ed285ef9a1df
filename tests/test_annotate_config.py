"""The `serving-config` annotation, the `annotate-config` pass, and the runtime that applies it."""

from __future__ import annotations

import os

import pytest
import torch

import morphc as mc
from morphc import zoo
from morphc.errors import PassFailure, VerificationError
from morphc.ir.annotations import ServingConfig
from morphc.passes import PassContext, PassManager, Pipeline
from morphc.passes.annotate_config import MissingTunerError
from morphc.predictors.records import RecordsDB
from morphc.predictors.tuner import evaluation as ev
from morphc.predictors.tuner.maml import MetaConfig
from morphc.predictors.tuner.service import ConfigTuner
from morphc.predictors.tuner.space import TuningError, gpu_space
from morphc.predictors.tuner.synthetic import synthetic_tables
from morphc.runtime import serving
from morphc.runtime.denormals import flush_denormal_enabled


@pytest.fixture(scope="module")
def program() -> mc.Program:
    m = zoo.build("tiny_mlp", batch_size=4)
    return mc.lower(m.model, m.example_inputs)


@pytest.fixture(scope="module")
def tuner() -> ConfigTuner:
    meta = ev.train_meta(synthetic_tables(3, seed=5), MetaConfig(meta_steps=60, members=2, meta_batch=4))
    return ConfigTuner(meta=meta, groundtruth=None, warmup=1, repeats=2)


def _ort_config(batch: int, threads: int) -> ServingConfig:
    return ServingConfig(batch=batch, threads=threads, backend="onnxruntime",
                         backend_options=(("optimization", "extended"), ("execution_mode", "sequential"),
                                          ("allow_spinning", False)), objective="throughput", slo_ms=5.0)


def test_annotation_round_trips_through_save_and_load(program, tmp_path) -> None:
    p = program.clone()
    ann = _ort_config(4, 2)
    p.annotate(ann)
    mc.verify(p)
    loaded = mc.load(mc.save(p, tmp_path / "p.safetensors"))
    assert loaded.annotation(ServingConfig) == ann
    assert "serving-config" in mc.print_program(loaded)


def test_verifier_rejects_a_bad_serving_config(program) -> None:
    p = program.clone()
    p.annotate(ServingConfig(batch=8, threads=0, backend="onnxruntime", backend_options=(("optimization", "max"),)))
    with pytest.raises(VerificationError) as info:
        mc.verify(p)
    text = str(info.value)
    assert "threads must be an integer >= 1" in text
    assert "option 'optimization' must be one of" in text
    assert "batch 8 does not match the program's input batch" in text


def test_runtime_applies_threads_and_batch(program) -> None:
    p = program.clone()
    p.annotate(ServingConfig(batch=4, threads=2))
    before = torch.get_num_threads()
    runner = serving.build_runner(p)
    with runner.activate():
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert torch.get_num_threads() == before
    batcher = serving.Batcher(runner)
    x = program.example_inputs[0]
    requests = [(x[i:i + 1],) for i in range(4)] + [(x[:2],)]  # 6 samples -> batches of 4 (the last padded)
    outs = batcher(requests)
    assert batcher.batches_run == [4, 4]
    reference = program(x)[program.outputs[0].name]
    for i in range(4):
        torch.testing.assert_close(outs[i][program.outputs[0].name], reference[i:i + 1])
    torch.testing.assert_close(outs[4][program.outputs[0].name], reference[:2])


def test_runtime_applies_onnxruntime_options(program) -> None:
    p = program.clone()
    p.annotate(_ort_config(4, 2))
    runner = serving.build_runner(p)
    so = runner.session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.graph_optimization_level.name == "ORT_ENABLE_EXTENDED"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch.testing.assert_close(runner(*program.example_inputs)[program.outputs[0].name],
                               program(*program.example_inputs)[program.outputs[0].name], rtol=1e-4, atol=1e-5)


def test_gpu_share_goes_to_the_environment_and_the_deployment_snippet() -> None:
    cfg = ServingConfig(batch=8, threads=1, device="cuda", sm_share=30, time_quota=0.5, slo_ms=20.0)
    assert serving.environment(cfg)[serving.MPS_ENV] == "30"
    snippet = serving.deployment_snippet(cfg, "faces")
    assert 'fast-gshare/gpu_sm_partition: "30"' in snippet
    assert 'fast-gshare/gpu_quota_request: "0.5"' in snippet
    assert 'morphc/batch-size: "8"' in snippet
    assert f'{{name: {serving.MPS_ENV}, value: "30"}}' in snippet
    if not torch.cuda.is_initialized():
        previous = os.environ.get(serving.MPS_ENV)
        try:
            serving.apply(cfg)
            assert os.environ[serving.MPS_ENV] == "30"
        finally:
            if previous is None:
                os.environ.pop(serving.MPS_ENV, None)
            else:
                os.environ[serving.MPS_ENV] = previous


def test_pass_writes_a_verified_config_and_resumes_from_records(program, tuner, tmp_path) -> None:
    db = RecordsDB(tmp_path / "records.sqlite")
    ctx = PassContext(options={"tuner": tuner}, records=db, verify_each=True)
    out = PassManager("annotate-config{slo-ms=1000.0,objective=throughput,budget=3}").run(program, ctx)
    ann = out.annotation(ServingConfig)
    assert ann is not None and ann.trials == 3 and ann.batch == 4 and ann.latency_ms > 0
    assert ann.objective == "throughput" and ann.slo_ms == 1000.0
    mc.verify(out)
    # the same run again (e.g. after being killed) finds its trials in the records: nothing new is measured
    stored = len(db)
    again = PassManager("annotate-config{slo-ms=1000.0,objective=throughput,budget=3}").run(program, ctx)
    assert again.annotation(ServingConfig) == ann
    assert len(db) == stored
    # a larger budget continues the same run: only the extra trials are measured
    more = PassManager("annotate-config{slo-ms=1000.0,objective=throughput,budget=5}").run(program, ctx)
    assert more.annotation(ServingConfig).trials == 5
    assert len(db) == stored + 2 * 2  # two new measurements, each with its trial record


def test_pass_with_an_unmeetable_slo_fails_clearly(program, tuner) -> None:
    ctx = PassContext(options={"tuner": tuner}, reproducer_dir=None)
    with pytest.raises(PassFailure, match=r"no configuration met the latency SLO of 1e-06 ms .*raise slo-ms"):
        PassManager("annotate-config{slo-ms=0.000001,budget=2}").run(program, ctx)


def test_pass_without_a_tuner_says_how_to_get_one(program) -> None:
    with pytest.raises(PassFailure, match=r"needs a tuner in PassContext\.options"):
        PassManager("annotate-config").run(program, PassContext(reproducer_dir=None))
    assert issubclass(MissingTunerError, mc.MorphcError)


def test_pipeline_text_round_trips() -> None:
    text = "annotate-config{slo-ms=20.0,objective=throughput,budget=5,strategy=morphling,rebatch=true}"
    assert str(Pipeline.parse(text)) == text


def test_cli_tune_writes_annotated_program_report_and_snippet(tuner, tmp_path) -> None:
    from morphc.cli import main

    meta = tuner.meta.save(tmp_path / "meta.npz")
    out, report, pod = tmp_path / "tuned.safetensors", tmp_path / "tune.md", tmp_path / "pod.yaml"
    rc = main(["tune", "zoo:tiny_mlp", "--slo-ms", "50", "--budget", "3", "--repeats", "2", "--meta", str(meta),
               "--records", str(tmp_path / "r.sqlite"), "-o", str(out), "--report", str(report), "--deploy", str(pod)])
    assert rc == 0
    ann = mc.load(out).annotation(ServingConfig)
    assert ann is not None and ann.trials == 3
    assert mc.load(out).inputs[0].shape[0] == ann.batch  # the program is lowered at the chosen batch
    assert f'morphc/batch-size: "{ann.batch}"' in pod.read_text()
    assert "![convergence]" in report.read_text() and report.with_suffix(".png").exists()


class _Halve(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def test_flush_denormal_flushes_subnormals_while_active_and_changes_nothing_else() -> None:
    """Serving with flush_denormal: a subnormal result is zero while the config is active (eager and ONNX
    Runtime), normal values are bit-identical, and the process's own mode comes back on exit."""
    x = torch.tensor([[3e-39, 1.5, -2.0, 4e-38]])
    program = mc.lower(_Halve().eval(), (x,))
    out = program.outputs[0].name
    plain = program(x)[out]
    assert plain[0, 0] != 0  # a subnormal result without flushing
    assert not flush_denormal_enabled()
    for backend in ("eager", "onnxruntime"):
        runner = serving.build_runner(program, ServingConfig(batch=1, threads=1, backend=backend, flush_denormal=True))
        with runner.activate():
            assert flush_denormal_enabled()
            flushed = runner(x)[out]
        assert not flush_denormal_enabled()
        assert flushed[0, 0] == 0, backend
        assert torch.equal(flushed[0, 1:], plain[0, 1:]), backend
    ort = serving.build_runner(program, ServingConfig(batch=1, threads=1, backend="onnxruntime", flush_denormal=True))
    assert ort.session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert 'morphc/flush-denormal: "true"' in serving.deployment_snippet(ort.config)


def test_flush_denormal_is_refused_where_it_means_nothing(program) -> None:
    p = program.clone()
    p.annotate(ServingConfig(batch=4, threads=1, device="cuda", flush_denormal=True))
    with pytest.raises(VerificationError, match="flush_denormal is a CPU knob"):
        mc.verify(p)
    with pytest.raises(TuningError, match="flush_denormal is a CPU knob"):
        gpu_space().with_flush(True)


def test_the_tuner_measures_and_annotates_with_flush_denormal(program, tuner, tmp_path) -> None:
    db = RecordsDB(tmp_path / "records.sqlite")
    ctx = PassContext(options={"tuner": tuner}, records=db)
    out = PassManager("annotate-config{objective=throughput,budget=2,flush-denormal=true}").run(program, ctx)
    ann = out.annotation(ServingConfig)
    assert ann.flush_denormal and ann.trials == 2
    keys = [r.config for r in db.query(kind="serving-latency")]
    assert keys and all(k.get("flush_denormal") is True for k in keys)  # not mixed with unflushed measurements
    plain = PassManager("annotate-config{objective=throughput,budget=2}").run(program, ctx)
    assert not plain.annotation(ServingConfig).flush_denormal
    assert any("flush_denormal" not in r.config for r in db.query(kind="serving-latency"))


def test_flushing_reaches_every_intra_op_thread() -> None:
    """torch.set_flush_denormal alone sets the calling thread's mode: a 2-thread multiply then flushed half
    its output. `set_flush_denormal` sets it on the whole OpenMP team, and clears it there again."""
    from morphc.runtime.denormals import set_flush_denormal

    x = torch.full((4_000_000,), 3e-39)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.set_flush_denormal(True)
        partial = float(((x * 0.5) != 0).float().mean())
        set_flush_denormal(True)
        everywhere = float(((x * 0.5) != 0).float().mean())
        set_flush_denormal(False)
        cleared = float(((x * 0.5) != 0).float().mean())
    finally:
        set_flush_denormal(False)
        torch.set_num_threads(previous)
    assert 0.0 < partial < 1.0  # what the torch call alone does: the worker thread's half is not flushed
    assert everywhere == 0.0 and cleared == 1.0
