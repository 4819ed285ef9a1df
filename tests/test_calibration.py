"""Calibrating a checkpoint to this machine's speed: the fitted scale multiplies every prediction by its
thread count's factor, is robust to a disturbed probe, round-trips through its file, is refused for another
checkpoint or machine, and `calibrate` measures its probes resumably into a records database."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from morphc.predictors import calibration, dataset
from morphc.predictors.corpus import VARIANTS
from morphc.predictors.cost_model import (
    CostModel,
    CostModelError,
    CostModelWarning,
    load,
    load_default,
    make_query,
    shipped_checkpoints,
)
from morphc.predictors.dataset import Sample
from morphc.predictors.features import extract
from morphc.predictors.records import RecordsDB, device_fingerprint
from morphc.predictors.spaces import CpuConfig

MLP = next(v for v in VARIANTS if v.family == "mlp")
VGG = next(v for v in VARIANTS if v.family == "vgg")
# how many times slower than the checkpoint this synthetic machine runs convolutions, matrix products, the rest
SLOWER = {1: (1.2, 2.0, 1.5), 2: (1.3, 2.2, 1.6)}


@pytest.fixture(scope="module")
def shipped() -> CostModel:
    return load_default()


@pytest.fixture(scope="module")
def probes(shipped: CostModel) -> list[Sample]:
    """Probe samples of an MLP and a VGG measured as if each operator group ran SLOWER than the checkpoint
    predicts, three copies 1% apart, and one disturbed probe (15x)."""
    out = []
    for variant in (MLP, VGG):
        for b in (1, 8):
            graph = extract(dataset.lowered(variant, b))
            for threads, slower in SLOWER.items():
                config = CpuConfig(threads=threads, batch=b)
                ms, _, shares = shipped.predict_with_shares([make_query(graph, config)])
                here = ms[0] * float(shares[0] @ np.asarray(slower))
                for k, spread in enumerate((0.99, 1.0, 1.01)):
                    out.append(Sample(f"{variant.name}#{k}", variant.family, "fp", graph, config, here * spread,
                                      None, None))
                if (variant, b, threads) == (VGG, 8, 1):
                    out.append(Sample(f"{variant.name}#disturbed", variant.family, "fp", graph, config, here * 15,
                                      None, None))
    return out


def test_a_calibration_gives_each_operator_group_its_own_speed(shipped: CostModel, probes: list[Sample]) -> None:
    cal = calibration.fit(shipped, probes)
    for threads, slower in SLOWER.items():  # recovered despite the disturbed probe
        np.testing.assert_allclose(list(cal.factors(threads).values()), slower, rtol=0.05)
    assert cal.factors(4) == cal.factors(2)  # an uncalibrated thread count takes the nearest calibrated one
    assert cal.checkpoint == shipped.digest and cal.device_fingerprint == device_fingerprint("cpu")
    calibrated = calibration.apply(shipped, cal)
    queries = [make_query(s.graph, s.config) for s in probes]
    raw, _, shares = shipped.predict_with_shares(queries)
    expected = [float(sh @ np.asarray(list(cal.factors(s.config.threads).values()))) for s, sh in zip(probes, shares)]
    np.testing.assert_allclose(calibrated.predict_queries(queries)[0] / raw, expected, rtol=1e-5)
    undisturbed = [i for i, s in enumerate(probes) if not s.variant.endswith("disturbed")]
    measured = np.asarray([probes[i].latency_ms for i in undisturbed])
    assert np.abs(calibrated.predict_queries([queries[i] for i in undisturbed])[0] / measured - 1).max() < 0.05
    query = queries[-1]  # each node scaled by its own group's factor
    groups = np.asarray(["conv" if c == "conv" else "matmul" if c in ("linear", "attention") else "other"
                         for c in probes[-1].graph.classes])
    node = calibrated.predict_node_ms(query) / shipped.predict_node_ms(query)
    np.testing.assert_allclose(node, [cal.factors(2)[g] for g in groups], rtol=1e-5)
    assert shipped.log_factors == {}  # applying returns a new model; the checkpoint's own is unchanged
    assert calibration.fit(calibrated, probes).log_factors == cal.log_factors  # fitted against the raw checkpoint
    assert "1 thread: conv x1.2" in cal.summary()


def test_a_probe_the_collector_marked_disturbed_is_left_out_with_a_warning(
        shipped: CostModel, probes: list[Sample]) -> None:
    flagged = dataclasses.replace(probes[0], variant="mlp#flagged", latency_ms=probes[0].latency_ms * 40,
                                  unstable=True)
    with pytest.warns(CostModelWarning, match=r"1 of \d+ probe measurements were disturbed.*mlp#flagged batch 1"):
        cal = calibration.fit(shipped, [*probes, flagged])
    assert cal.log_factors == calibration.fit(shipped, probes).log_factors
    assert "mlp#flagged" not in {p.variant for p in cal.probes}


def test_one_group_the_probes_lack_keeps_the_common_factor(shipped: CostModel, probes: list[Sample]) -> None:
    """MLP probes hold no convolution: its factor stays near the probes' median ratio, not at a guess."""
    mlp = [s for s in probes if s.family == "mlp"]
    cal = calibration.fit(shipped, mlp)
    common = np.median([s.latency_ms / shipped.predict_queries([make_query(s.graph, s.config)])[0][0]
                        for s in mlp if s.config.threads == 1])
    assert cal.factors(1)["conv"] == pytest.approx(common, rel=0.02)
    fitted = calibration.apply(shipped, cal).predict_queries([make_query(s.graph, s.config) for s in mlp])[0]
    np.testing.assert_allclose(fitted, [s.latency_ms for s in mlp], rtol=0.03)  # the groups it holds still fit


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
             "nofield.json": json.dumps({k: v for k, v in body.items() if k != "log_factors"}),
             "groups.json": json.dumps({**body, "log_factors": {"1": {"conv": 0.1, "matmul": 0.2}}}),
             "infinite.json": json.dumps({**body, "log_factors": {"1": {"conv": math.inf, "matmul": 0, "other": 0}}}
                                         ).replace("Infinity", "1e999"),
             "badprobe.json": json.dumps({**body, "probes": [{"variant": "x"}]})}
    messages = {"missing.json": "does not exist", "text.json": "not readable JSON", "list.json": "this morphc reads",
                "version.json": "version 99", "nofield.json": "malformed: KeyError",
                "infinite.json": "no finite factors", "groups.json": "groups are not",
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
    with warnings.catch_warnings(record=True):  # a probe disturbed by a busy machine is left out, with a warning
        warnings.simplefilter("always")
        cal = calibration.calibrate(mlp_only, db, show_progress=False)
    assert sum(1 for _ in RecordsDB(db).query(kind="latency")) == 4  # every probe measured and kept
    stable = sorted((s.config.batch, s.config.threads) for s in dataset.load_samples(db) if not s.unstable)
    assert set(stable) <= {(1, 1), (1, 2), (8, 1), (8, 2)}
    assert sorted((p.batch, p.threads) for p in cal.probes) == stable  # the fit used exactly the undisturbed ones
    assert set(cal.log_factors) == {t for _, t in stable}
    assert all(abs(v) < math.log(20) for f in cal.log_factors.values() for v in f)
    monkeypatch.setattr(dataset, "profile_interleaved", lambda *a, **k: pytest.fail("measured again"))
    again = calibration.calibrate(mlp_only, db, show_progress=False)
    assert again.log_factors == cal.log_factors and again.measured_at == cal.measured_at
    with pytest.raises(CostModelError, match="none of which the corpus has"):
        calibration.probe_variants(dataclasses.replace(shipped, meta={**shipped.meta, "trained": {"groups": ["x"]}}))


def test_cli_calibrates_and_predicts_with_the_calibration(
        shipped: CostModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from morphc.cli import load_source, main

    checkpoint = dataclasses.replace(shipped, meta={**shipped.meta, "trained": {"groups": ["mlp"]}}).save(
        tmp_path / "mlp-only.npz")  # probed with one variant: quick
    out = tmp_path / "cal.json"
    assert main(["calibrate-cost-model", "--checkpoint", str(checkpoint), "--db", str(tmp_path / "cal.sqlite"),
                 "-o", str(out)]) == 0
    cal = calibration.load(out)
    assert calibration.load_calibrated(out, checkpoint).log_factors == cal.log_factors  # what a PassContext gets
    assert len(cal.probes) == 4 and "measurements in" in capsys.readouterr().err
    configs = ["--config", "threads=1", "--config", "threads=2"]
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(checkpoint), *configs]) == 0
    raw = [float(line.split()[-2]) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(checkpoint), *configs, "--calibration", str(out)]) == 0
    printed = capsys.readouterr()
    scaled = [float(line.split()[-2]) for line in printed.out.strip().splitlines()]
    program = load_source("zoo:tiny_mlp", 1)
    queries = [make_query(extract(program), CpuConfig(threads=t)) for t in (1, 2)]
    shares = load(checkpoint).predict_with_shares(queries)[2]
    expected = [float(sh @ np.asarray(list(cal.factors(t).values()))) for t, sh in zip((1, 2), shares)]
    np.testing.assert_allclose(np.divide(scaled, raw), expected, rtol=1e-2)
    assert "1 thread: conv x" in printed.err
    other = next(path for path in shipped_checkpoints() if load(path).digest != cal.checkpoint)
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(other), "--calibration", str(out)]) == 2
    assert main(["predict", "zoo:tiny_mlp", "--calibration", str(tmp_path / "none.json")]) == 2


def test_a_checkpoint_of_another_machine_calibrated_here_no_longer_warns(probes: list[Sample]) -> None:
    here = device_fingerprint("cpu")
    other = next(load(path) for path, fp in shipped_checkpoints().items() if fp != here)
    program = dataset.lowered(MLP, 1)
    with pytest.warns(CostModelWarning, match="predictions are for the former .calibrate it"):
        other.predict_many([(program, CpuConfig())])
    calibrated = calibration.apply(other, calibration.fit(other, probes))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostModelWarning)
        assert calibrated.predict_many([(program, CpuConfig())])[0] > 0


def _measured_as_slower(model: CostModel) -> list[Sample]:
    """The probes of an MLP-only checkpoint, measured as if this machine ran each group SLOWER than `model`."""
    out = []
    for b in calibration.PROBE_BATCHES:
        graph = extract(dataset.lowered(MLP, b))
        for threads, slower in SLOWER.items():
            config = CpuConfig(threads=threads, batch=b)
            ms, _, shares = model.predict_with_shares([make_query(graph, config)])
            out.append(Sample(MLP.name, MLP.family, "fp", graph, config, ms[0] * float(shares[0] @ np.asarray(slower)),
                              None, None))
    return out


def test_a_calibration_refits_to_another_checkpoint_without_measuring(
        shipped: CostModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After an upgrade brings another checkpoint, the stored probe times are fitted to it: same measurements,
    same day, the new checkpoint's digest, the factors fitting the measurements to it directly would give."""
    samples = _measured_as_slower(shipped)
    old = dataclasses.replace(calibration.fit(shipped, samples), measured_at="2026-01-02 03:04 UTC")
    monkeypatch.setattr(dataset, "profile_interleaved", lambda *a, **k: pytest.fail("measured again"))
    same = calibration.refit(shipped, old)
    np.testing.assert_allclose([same.log_factors[t] for t in SLOWER], [old.log_factors[t] for t in SLOWER],
                               atol=1e-6)
    other = next(load(path) for path in shipped_checkpoints() if load(path).digest != shipped.digest)
    new = calibration.refit(other, old)
    assert (new.checkpoint, new.measured_at) == (other.digest, old.measured_at)
    assert [p.measured_ms for p in new.probes] == [p.measured_ms for p in old.probes]
    direct = calibration.fit(other, samples)  # what fitting the measurements themselves to it gives
    np.testing.assert_allclose([new.log_factors[t] for t in SLOWER], [direct.log_factors[t] for t in SLOWER],
                               atol=1e-6)
    queries = [make_query(s.graph, s.config) for s in samples]
    measured = np.asarray([s.latency_ms for s in samples])
    raw, fitted = other.predict_queries(queries)[0], calibration.apply(other, new).predict_queries(queries)[0]
    assert np.abs(np.log(fitted / measured)).mean() < 0.5 * np.abs(np.log(raw / measured)).mean()

    from morphc.cli import main

    path, checkpoint = old.save(tmp_path / "old.json"), other.save(tmp_path / "other.npz")
    assert main(["calibrate-cost-model", "--refit", str(path), "--checkpoint", str(checkpoint),
                 "-o", str(tmp_path / "new.json")]) == 0
    assert calibration.load(tmp_path / "new.json").log_factors == new.log_factors
    assert "probe times of" in " ".join(capsys.readouterr().err.split())  # rich wraps the line
    assert main(["calibrate-cost-model", "--refit", str(path), "--db", str(tmp_path / "x.sqlite")]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(CostModelError, match="no probe measurements"):
        calibration.refit(other, dataclasses.replace(old, probes=()))
    renamed = dataclasses.replace(old, probes=(dataclasses.replace(old.probes[0], variant="mlp[gone]"),))
    with pytest.raises(CostModelError, match="'mlp\\[gone\\]' is not a corpus variant"):
        calibration.refit(other, renamed)
    monkeypatch.setattr(calibration, "device_fingerprint", lambda device="cpu": "cpu|Other CPU|cores=64|torch=2.13.0")
    with pytest.raises(CostModelError, match="its probe times are not this machine's"):
        calibration.refit(other, old)
