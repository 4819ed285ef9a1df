"""The fuse-models pass end to end on tiny CNNs over real images (scikit-learn digits), a few steps each.

Candidates are scored by agreement with the original models (labels=None), so no original needs
training here; latency is the deterministic FLOPs estimate (`latency=flops`) so runs are reproducible.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import morphc
from morphc.errors import LoweringError, PassOptionError
from morphc.ir.provenance import FusionProvenance
from morphc.passes import PassContext
from morphc.passes import mutators as M
from morphc.passes.fusion.data import FusionData, FusionDataError, TaskEval, accuracy, batched, cosine_similarity
from morphc.passes.fusion.distill import extrapolate
from morphc.passes.fusion.fuse_models import FuseModels
from morphc.passes.fusion.report import FusionReport
from morphc.zoo import cnn
from morphc.zoo.datasets import digits

OPTIONS = "max-candidates=4,steps=12,latency=flops,min-gain=-1.0,seed=3"


def _net(width: int, classes: int, residual: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    block: nn.Module = cnn.BasicBlock(width, width) if residual else nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), block, nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, classes)).eval()


@functools.cache
def _setup() -> tuple[morphc.Program, morphc.Program, FusionData]:
    """Three task models of different architectures (one residual) at batch 2, their twin at batch 32, data."""
    models = {"a": _net(8, 10, True, 0), "b": _net(12, 4, False, 1), "c": _net(6, 2, True, 2)}
    x, _ = digits()
    x = x[:, None]
    program = morphc.lower(models, x[:2])
    train = morphc.lower(models, x[:32])
    data = FusionData(calibration=batched([x[:256]], 32), eval_inputs=batched([x[256:384]], 32),
                      tasks={t: TaskEval(None) for t in models})
    return program, train, data


def _fuse(options: str, data: FusionData | None = None,
          **ctx_options: Any) -> tuple[morphc.Program, dict[str, float], FusionReport]:
    program, train, default_data = _setup()
    data = data or default_data
    ctx = PassContext(calibration=data, options={"fusion_train_program": train, "progress": False, **ctx_options})
    (p,) = morphc.Pipeline.parse(f"fuse-models{{{options}}}").passes
    result = p.run(program.clone(), ctx)
    return result.program, dict(result.statistics), ctx.options["fusion_report"]


@functools.cache
def _uninterrupted() -> tuple[morphc.Program, dict[str, float], FusionReport]:
    return _fuse(f"max-acc-drop=1.0,{OPTIONS}")


def test_fuse_models_end_to_end() -> None:
    program, _, _ = _setup()
    fused, stats, report = _uninterrupted()
    morphc.verify(fused)
    assert stats["met_bound"] == 1.0 and stats["candidates_trained"] >= 3
    assert stats["latency_after_ms"] < stats["latency_before_ms"]
    assert stats["acc_drop"] <= 1.0
    for key in ("candidates_filtered", "search_seconds", "accuracy_before.a", "accuracy_after.c"):
        assert key in stats
    assert len(list(fused.graph.nodes)) < len(list(program.graph.nodes))
    prov = fused.annotation(FusionProvenance)
    assert prov is not None and prov.mutations and prov.original == M.program_digest(program)
    x = program.example_inputs[0]
    assert {k: v.shape for k, v in fused(x).items()} == {k: v.shape for k, v in program(x).items()}
    # the search ran at batch 32; the result is the batch-2 program with the trained tensors
    assert fused.inputs == program.inputs
    best = report.outcome.best
    assert best.merges and best.status == "trained"
    assert report.outcome.pareto()[0].latency <= best.latency
    assert "Pareto front" in report.markdown() and best.key[:8] in report.markdown()


def test_report_writes_markdown_and_plot(tmp_path: Path) -> None:
    _, _, report = _uninterrupted()
    md = report.write(tmp_path)
    assert md.is_file() and (tmp_path / "fusion_pareto.png").stat().st_size > 1000
    assert "![pareto](fusion_pareto.png)" in md.read_text()
    assert report.to_json()["trained"] == report.outcome.trained


def test_unreachable_bound_returns_the_originals() -> None:
    program, _, data = _setup()
    # scored by cosine similarity with the originals' logits: a merged task never matches them exactly
    exact = FusionData(data.calibration, data.eval_inputs, {t: TaskEval(None, cosine_similarity) for t in data.tasks})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, stats, report = _fuse("max-acc-drop=0.0,max-candidates=2,steps=2,latency=flops,min-gain=-1.0", exact)
    assert stats["met_bound"] == 0.0 and stats["candidates_trained"] == 2
    assert any("no fused candidate met max-acc-drop=0.0" in str(w.message) for w in caught)
    assert M.structure_digest(fused) == M.structure_digest(program)
    assert report.outcome.best is report.outcome.original
    assert "original models are returned unchanged" in report.markdown()


class _Killed(RuntimeError):
    pass


def test_search_resumes_after_a_kill_without_retraining(tmp_path: Path) -> None:
    state = tmp_path / "search.sqlite"
    trained: list[str] = []

    def kill_after_two(ev: Any) -> None:
        trained.append(ev.key)
        if len(trained) == 2:
            raise _Killed("simulated kill")

    with pytest.raises(_Killed):
        _fuse(f"max-acc-drop=1.0,{OPTIONS},state={state}", fusion_on_candidate=kill_after_two)
    first = list(trained)
    trained.clear()
    fused, stats, report = _fuse(f"max-acc-drop=1.0,{OPTIONS},state={state}", fusion_on_candidate=trained.append)
    ref_fused, ref_stats, ref_report = _uninterrupted()
    assert stats["candidates_resumed"] == 2
    assert not set(ev.key for ev in trained) & set(first)  # nothing finished before the kill is trained again
    assert stats["candidates_trained"] == ref_stats["candidates_trained"] - 2
    assert report.outcome.best.key == ref_report.outcome.best.key
    assert report.outcome.best.drop == ref_report.outcome.best.drop
    x = fused.example_inputs[0]
    for t, ref in ref_fused(x).items():
        assert torch.equal(fused(x)[t], ref)  # same seed: the same candidates, trained to the same weights


def test_ray_executor_gives_the_local_result() -> None:
    pytest.importorskip("ray")
    fused, _stats, report = _fuse(f"max-acc-drop=1.0,{OPTIONS},executor=ray")
    ref_fused, _ref_stats, ref_report = _uninterrupted()
    assert [c.key for c in report.outcome.candidates] == [c.key for c in ref_report.outcome.candidates]
    assert [c.drop for c in report.outcome.candidates] == [c.drop for c in ref_report.outcome.candidates]
    x = fused.example_inputs[0]
    for t, ref in ref_fused(x).items():
        assert torch.equal(fused(x)[t], ref)


def test_bad_inputs_get_clear_errors() -> None:
    program, _train, data = _setup()
    fuse = FuseModels(max_candidates=1, steps=1, latency="flops")
    with pytest.raises(FusionDataError, match="needs calibration and held-out data"):
        fuse.run(program.clone(), PassContext())
    wrong = FusionData(calibration=[(torch.zeros(4, 1, 9, 9),)], eval_inputs=data.eval_inputs, tasks=data.tasks)
    with pytest.raises(FusionDataError, match=r"calibration\[0\]\[0\] has shape \[4, 1, 9, 9\].*\[N, 1, 8, 8\]"):
        fuse.run(program.clone(), PassContext(calibration=wrong))
    missing = FusionData(data.calibration, data.eval_inputs, {"a": TaskEval(None)})
    with pytest.raises(FusionDataError, match=r"missing \['b', 'c'\]"):
        fuse.run(program.clone(), PassContext(calibration=missing))
    five = TaskEval(torch.zeros(5, dtype=torch.long))
    few = FusionData(data.calibration, data.eval_inputs, {**data.tasks, "a": five})
    with pytest.raises(FusionDataError, match="task 'a' has 5 labels but eval_inputs hold 128"):
        fuse.run(program.clone(), PassContext(calibration=few))
    other = morphc.lower({"a": _net(8, 10, True, 0), "b": _net(12, 4, False, 1)}, program.example_inputs)
    with pytest.raises(FusionDataError, match="same task models lowered at another batch size"):
        fuse.run(program.clone(), PassContext(calibration=data, options={"fusion_train_program": other}))
    with pytest.raises(morphc.MorphcError, match="expects one of anneal, greedy, random"):
        morphc.Pipeline.parse("fuse-models{strategy=sideways}")
    with pytest.raises(PassOptionError, match="workers must be >= 1"):
        FuseModels(workers=0)

    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    # task models whose inputs differ cannot become one Program: lowering names the model
    with pytest.raises(LoweringError, match="could not capture model 'b'"):
        morphc.lower({"a": _net(8, 10, True, 0), "b": TwoInputs().eval()}, program.example_inputs)


def test_pipeline_text_round_trips() -> None:
    text = "fuse-models{max-acc-drop=0.02,strategy=greedy,max-candidates=5,executor=ray,workers=2,state=s.sqlite}"
    assert str(morphc.Pipeline.parse(text)) == text


def test_learning_curve_extrapolation() -> None:
    steps = [25, 50, 75, 100]
    converging = [(t, 0.30 * t ** -0.5) for t in steps]
    predicted, gain = extrapolate(converging, 400)
    assert predicted == pytest.approx(0.015, abs=1e-3) and gain > 0
    hopeless = [(t, 0.20 + 0.5 * t ** -1.0) for t in steps]
    predicted, _ = extrapolate(hopeless, 400)
    assert predicted > 0.19  # plateaus far above a 1% bound: training stops early


def test_accuracy_metric() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(logits, logits) == 1.0  # against the original's outputs: agreement
    with pytest.raises(FusionDataError, match="one label per output row"):
        accuracy(logits, torch.tensor([0, 1]))


FACTORY = '''
import torch
from torch import nn
from morphc.passes.fusion.data import FusionData, TaskEval, batched
from morphc.zoo.datasets import digits


def build():
    torch.manual_seed(0)

    def net(w, k):
        return nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, k)).eval()

    x = digits()[0][:, None]
    data = FusionData(batched([x[:64]], 32), batched([x[64:128]], 32), {"a": TaskEval(None), "b": TaskEval(None)})
    return {"a": net(4, 3), "b": net(6, 2)}, x[:1], data, x[:32]
'''


def test_cli_fuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from morphc.cli import main

    factory = tmp_path / "fusion_models.py"
    factory.write_text(FACTORY)
    out = tmp_path / "fused.safetensors"
    code = main(["fuse", f"{factory}:build", "--options", "max-acc-drop=1.0,max-candidates=2,steps=4,latency=flops",
                 "-o", str(out), "--report", str(tmp_path / "report")])
    assert code == 0
    assert "Pareto front" in capsys.readouterr().out
    fused = morphc.load(out)
    assert fused.annotation(FusionProvenance) is not None and (tmp_path / "report" / "fusion_report.md").is_file()
    assert main(["fuse", f"{factory}:nothing"]) == 2  # a clear error, not a traceback


def test_search_state_lives_beside_the_records_database(tmp_path: Path) -> None:
    from morphc.predictors.records import RecordsDB

    db = RecordsDB(tmp_path / "records.sqlite")
    db.put("latency", "m", "cpu", {"threads": 1}, {"median_ms": 1.0})
    program, train, data = _setup()
    ctx = PassContext(calibration=data, records=db, options={"fusion_train_program": train, "progress": False})
    FuseModels(max_acc_drop=1.0, max_candidates=1, steps=2, latency="flops", min_gain=-1.0).run(program.clone(), ctx)
    db.close()
    reopened = RecordsDB(tmp_path / "records.sqlite")  # still a valid records database, its records intact
    assert len(reopened) == 1
    rows = reopened.conn.execute("SELECT COUNT(*) FROM fusion_candidates").fetchone()[0]
    assert rows == 1


def test_cli_fuse_with_the_cost_model_predicts_latencies_and_names_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`morphc fuse --cost-model`: fuse-models{latency=auto} predicts every candidate's latency with the shipped
    checkpoint at the --latency-config, and the report says so."""
    from morphc.cli import main
    from morphc.predictors.cost_model import load_default

    factory = tmp_path / "fusion_models.py"
    factory.write_text(FACTORY)
    code = main(["fuse", f"{factory}:build", "--options", "max-acc-drop=1.0,max-candidates=2,steps=4",
                 "--cost-model", "--latency-config", "threads=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"- latency: cost-model {load_default().digest} at CpuConfig(threads=2" in out
    assert main(["fuse", f"{factory}:build", "--calibration", "c.json"]) == 2  # a calibration of no cost model
    assert "give --cost-model too" in capsys.readouterr().err


def test_a_search_keyed_by_one_cost_model_is_not_resumed_with_another() -> None:
    """The search-state key holds the cost model's digest, calibration and config: another checkpoint, another
    calibration or another config is another search, never a mix of two models' latencies."""
    from types import SimpleNamespace

    from morphc.passes.fusion.search import cost_model_latency_name

    a = SimpleNamespace(digest="aaaa", log_factors={})
    names = {cost_model_latency_name(a, "threads=1"), cost_model_latency_name(a, "threads=2"),
             cost_model_latency_name(SimpleNamespace(digest="bbbb", log_factors={}), "threads=1"),
             cost_model_latency_name(SimpleNamespace(digest="aaaa", log_factors={1: (0.4, 0.1, 0.2)}), "threads=1"),
             cost_model_latency_name(SimpleNamespace(digest="aaaa", log_factors={1: (0.4, 0.1, 0.3)}), "threads=1")}
    assert len(names) == 5
