"""Calibrating a checkpoint to this machine's speed: the fitted scale multiplies every prediction by its
thread count's factor, is robust to a disturbed probe, round-trips through its file, is refused for another
checkpoint or machine, and `calibrate` measures its probes resumably into a records database."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from morphc.predictors import calibration, dataset
from morphc.predictors.corpus import VARIANTS
from morphc.predictors.cost_model import CostModel, CostModelError, load, load_default, make_query, shipped_checkpoints
from morphc.predictors.dataset import Sample
from morphc.predictors.features import extract
from morphc.predictors.records import RecordsDB, device_fingerprint
from morphc.predictors.spaces import CpuConfig

MLP = next(v for v in VARIANTS if v.family == "mlp")


@pytest.fixture(scope="module")
def shipped() -> CostModel:
    return load_default()


@pytest.fixture(scope="module")
def probes(shipped: CostModel) -> list[Sample]:
    """Probe samples measured 1.5x (1 thread) and 2x (2 threads) slower than the checkpoint predicts, one of
    them disturbed (10x)."""
    graphs = {b: extract(dataset.lowered(MLP, b)) for b in (1, 8)}
    out = []
    for b, graph in graphs.items():
        for threads, slower in ((1, 1.5), (2, 2.0)):
            config = CpuConfig(threads=threads, batch=b)
            predicted = shipped.predict_queries([make_query(graph, config)])[0][0]
            for k, spread in enumerate((0.99, 1.0, 1.01)):
                out.append(Sample(f"{MLP.name}#{k}", MLP.family, "fp", graph, config, predicted * slower * spread,
                                  None, None))
            if (b, threads) == (8, 1):
                out.append(Sample(f"{MLP.name}#disturbed", MLP.family, "fp", graph, config, predicted * 15, None, None))
    return out


def test_a_calibration_scales_each_prediction_by_its_thread_count(shipped: CostModel, probes: list[Sample]) -> None:
    cal = calibration.fit(shipped, probes)
    assert cal.factor(1) == pytest.approx(1.5, rel=1e-4)  # the median, not the disturbed probe's 10x
    assert cal.factor(2) == pytest.approx(2.0, rel=1e-4)
    assert cal.factor(4) == cal.factor(2)  # an uncalibrated thread count takes the nearest calibrated one
    assert cal.checkpoint == shipped.digest and cal.device_fingerprint == device_fingerprint("cpu")
    calibrated = calibration.apply(shipped, cal)
    queries = [make_query(s.graph, s.config) for s in probes]
    raw, scaled = shipped.predict_queries(queries)[0], calibrated.predict_queries(queries)[0]
    np.testing.assert_allclose(scaled / raw, [cal.factor(s.config.threads) for s in probes], rtol=1e-6)
    node = calibrated.predict_node_ms(queries[-1]) / shipped.predict_node_ms(queries[-1])
    np.testing.assert_allclose(node, cal.factor(2), rtol=1e-5)  # the node times still sum to the prediction
    assert shipped.log_scale == {}  # applying returns a new model; the checkpoint's own is unchanged
    assert calibration.fit(calibrated, probes).log_scale == cal.log_scale  # fitted against the raw checkpoint
    assert "x1.50 at 1 thread, x2.00 at 2 threads" in cal.summary()


def test_a_calibration_round_trips_and_is_refused_where_it_does_not_belong(
        shipped: CostModel, probes: list[Sample], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cal = calibration.fit(shipped, probes)
    again = calibration.load(cal.save(tmp_path / "cal.json"))
    assert again == cal
    other = dataclasses.replace(cal, checkpoint="0123456789abcdef")
    with pytest.raises(CostModelError, match="fitted to checkpoint 0123456789abcdef, not this one"):
        calibration.apply(shipped, other)
    monkeypatch.setattr(calibration, "device_fingerprint", lambda device="cpu": "cpu|Other CPU|cores=64|torch=2.13.0")
    with pytest.raises(CostModelError, match=r"measured on 'cpu\|.+', this machine is 'cpu\|Other CPU"):
        calibration.apply(shipped, cal)


def test_a_bad_calibration_file_is_refused(shipped: CostModel, probes: list[Sample], tmp_path: Path) -> None:
    path = calibration.fit(shipped, probes).save(tmp_path / "cal.json")
    body = json.loads(path.read_text())
    cases = {"missing.json": None, "text.json": "not json {", "list.json": json.dumps([1, 2]),
             "version.json": json.dumps({**body, "version": 99}),
             "nofield.json": json.dumps({k: v for k, v in body.items() if k != "log_scale"}),
             "infinite.json": json.dumps({**body, "log_scale": {"1": math.inf}}).replace("Infinity", "1e999"),
             "badprobe.json": json.dumps({**body, "probes": [{"variant": "x"}]})}
    messages = {"missing.json": "does not exist", "text.json": "not readable JSON", "list.json": "this morphc reads",
                "version.json": "version 99", "nofield.json": "malformed: KeyError", "infinite.json": "no finite scale",
                "badprobe.json": "malformed"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(CostModelError, match=messages[name]):
            calibration.load(tmp_path / name)


def test_calibrate_measures_its_probes_once_into_a_records_database(
        shipped: CostModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint trained on the mlp family alone is probed with that family's first variant at batch 1 and 8
    and 1 and 2 threads; a second calibration on the same database measures nothing again."""
    mlp_only = dataclasses.replace(shipped, meta={**shipped.meta, "trained": {"groups": ["mlp"]}})
    assert [v.name for v in calibration.probe_variants(mlp_only)] == [MLP.name]
    db = tmp_path / "cal.sqlite"
    cal = calibration.calibrate(mlp_only, db, show_progress=False)
    assert sorted((p.batch, p.threads) for p in cal.probes) == [(1, 1), (1, 2), (8, 1), (8, 2)]
    assert set(cal.log_scale) == {1, 2} and all(abs(s) < math.log(20) for s in cal.log_scale.values())
    assert sum(1 for _ in RecordsDB(db).query(kind="latency")) == 4
    monkeypatch.setattr(dataset, "profile_interleaved", lambda *a, **k: pytest.fail("measured again"))
    again = calibration.calibrate(mlp_only, db, show_progress=False)
    assert again.log_scale == cal.log_scale and again.measured_at == cal.measured_at
    with pytest.raises(CostModelError, match="none of which the corpus has"):
        calibration.probe_variants(dataclasses.replace(shipped, meta={**shipped.meta, "trained": {"groups": ["x"]}}))


def test_cli_calibrates_and_predicts_with_the_calibration(
        shipped: CostModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from morphc.cli import main

    checkpoint = dataclasses.replace(shipped, meta={**shipped.meta, "trained": {"groups": ["mlp"]}}).save(
        tmp_path / "mlp-only.npz")  # probed with one variant: quick
    out = tmp_path / "cal.json"
    assert main(["calibrate-cost-model", "--checkpoint", str(checkpoint), "--db", str(tmp_path / "cal.sqlite"),
                 "-o", str(out)]) == 0
    cal = calibration.load(out)
    assert len(cal.probes) == 4 and "measurements in" in capsys.readouterr().err
    configs = ["--config", "threads=1", "--config", "threads=2"]
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(checkpoint), *configs]) == 0
    raw = [float(line.split()[-2]) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(checkpoint), *configs, "--calibration", str(out)]) == 0
    printed = capsys.readouterr()
    scaled = [float(line.split()[-2]) for line in printed.out.strip().splitlines()]
    np.testing.assert_allclose(np.divide(scaled, raw), [cal.factor(1), cal.factor(2)], rtol=1e-2)
    assert "probes: x" in printed.err
    other = next(path for path in shipped_checkpoints() if load(path).digest != cal.checkpoint)
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(other), "--calibration", str(out)]) == 2
    assert main(["predict", "zoo:tiny_mlp", "--calibration", str(tmp_path / "none.json")]) == 2
