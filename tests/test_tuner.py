"""The meta-learned config tuner: space, meta-model, SMBO loop, baselines, ground-truth collection.

Fast by construction: synthetic tables (a parametric latency law) and one tiny measured table
(tiny_mlp on a 26-config sub-space, 2 timed runs per config).
"""

from __future__ import annotations

import numpy as np
import pytest

from morphc.predictors.records import RecordsDB
from morphc.predictors.tuner import evaluation as ev
from morphc.predictors.tuner.baselines import BASELINES, make_baseline
from morphc.predictors.tuner.groundtruth import SERVING_LATENCY, collect, load_tables
from morphc.predictors.tuner.maml import MetaConfig, MetaModel
from morphc.predictors.tuner.smbo import SMBOTuner, TrialLog, run_loop
from morphc.predictors.tuner.space import (
    InfeasibleSLOError,
    TuningConfig,
    TuningError,
    cpu_space,
    gpu_space,
    objective_value,
    objective_vector,
)
from morphc.predictors.tuner.synthetic import synthetic_tables

FAST = MetaConfig(meta_steps=120, members=2, meta_batch=4)


@pytest.fixture(scope="module")
def tables():
    return synthetic_tables(5, seed=3)


@pytest.fixture(scope="module")
def meta(tables) -> MetaModel:
    return ev.train_meta(tables[:4], FAST)


def test_space_has_hundreds_of_distinct_configs_with_finite_features() -> None:
    space = cpu_space()
    assert len(space) == 208
    assert len(set(space.configs)) == len(space)
    feats = space.features()
    assert feats.shape[0] == 208 and np.isfinite(feats).all()
    assert len({tuple(r) for r in feats}) == 208  # every config is distinguishable by its features
    assert len(gpu_space()) == 144 and not gpu_space().measurable_here


def test_objective_and_slo() -> None:
    c = TuningConfig(batch=4, threads=2, backend="onnxruntime", optimization="all", execution_mode="parallel",
                     inter_op_threads=2, allow_spinning=True)
    assert c.cores() == 3
    assert objective_value(c, 10.0, "throughput", None) == pytest.approx(400.0)
    assert objective_value(c, 10.0, "throughput-per-core", None) == pytest.approx(400.0 / 3)
    assert objective_value(c, 10.0, "throughput", 5.0) is None
    with pytest.raises(TuningError, match="valid: throughput-per-core"):
        objective_value(c, 1.0, "speed", None)
    assert TuningConfig.from_key(c.key()) == c


def test_meta_model_adapts_and_round_trips(tables, meta, tmp_path) -> None:
    held = tables[4]
    feats = held.space.features()
    truth = np.log(held.latency_ms)
    zero = meta.predict(feats, held.embedding).mean(0)
    idx = np.arange(0, 208, 23)
    adapted = meta.predict(feats, held.embedding, meta.adapt(feats[idx], held.embedding, truth[idx])).mean(0)
    err0, err1 = np.abs(zero - truth).mean(), np.abs(adapted - truth).mean()
    assert err1 < err0  # a few measurements of the new model make the prediction better
    loaded = MetaModel.load(meta.save(tmp_path / "meta.npz"))
    np.testing.assert_allclose(loaded.predict(feats, held.embedding), meta.predict(feats, held.embedding), rtol=1e-6)


@pytest.mark.parametrize("acquisition", ["morphling", "ensemble-ei"])
def test_smbo_is_reproducible_for_a_fixed_seed(tables, meta, acquisition) -> None:
    held = tables[4]
    slo = ev.slo_for(held, 4.0)
    runs = [ev.replay(f"morphc-{acquisition}", held, objective="throughput-per-core", slo_ms=slo, budget=8, seed=1,
                      meta=meta) for _ in range(2)]
    assert [t.index for t in runs[0].trials] == [t.index for t in runs[1].trials]
    assert len({t.index for t in runs[0].trials}) == 8
    # and it finds something decent on the synthetic law: better than the median config
    values = sorted(v for v in objective_vector(held.space, held.latency_ms, "throughput-per-core", slo) if v > 0)
    assert runs[0].best is not None and runs[0].best.value >= values[len(values) // 2]


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_measure_distinct_configs_reproducibly(tables, name) -> None:
    held = tables[4]
    slo = ev.slo_for(held, 4.0)
    budget = 12 if name != "gp-bo" else 6
    runs = [ev.replay(name, held, objective="throughput-per-core", slo_ms=slo, budget=budget, seed=7)
            for _ in range(2)]
    assert len({t.index for t in runs[0].trials}) == budget
    assert [t.index for t in runs[0].trials] == [t.index for t in runs[1].trials]


def test_grid_starts_with_the_coarse_grid(tables) -> None:
    grid = make_baseline("grid", tables[0].space, objective="throughput", slo_ms=None, seed=0)
    result = run_loop(grid, ev.evaluator(tables[0]), 5)
    assert all((t.config.backend == "eager" and not t.config.pipeline) or t.config.execution_mode == "sequential"
               for t in result.trials)


def test_an_slo_no_config_meets_gives_a_clear_answer(tables, meta) -> None:
    held = tables[4]
    result = ev.replay("morphc-morphling", held, objective="throughput", slo_ms=1e-6, budget=5, seed=0, meta=meta)
    assert result.best is None
    with pytest.raises(InfeasibleSLOError, match=r"no configuration met the latency SLO of 1e-06 ms .* raise slo-ms"):
        result.require_best()


def test_an_interrupted_run_resumes_from_its_records(tables, meta) -> None:
    held = tables[4]
    slo = ev.slo_for(held, 4.0)
    tuner = SMBOTuner(meta, held.space, held.embedding, slo_ms=slo, seed=0)
    full = tuner.run(ev.evaluator(held), 7)

    db = RecordsDB(":memory:")
    calls: list[TuningConfig] = []

    def flaky(config: TuningConfig) -> float:
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the fourth measurement
        calls.append(config)
        return ev.evaluator(held)(config)

    with pytest.raises(KeyboardInterrupt):
        tuner.run(flaky, 7, log=TrialLog(db, "m", "cpu", "run-a"))
    assert len(TrialLog(db, "m", "cpu", "run-a").load()) == 3

    measured: list[TuningConfig] = []

    def counting(config: TuningConfig) -> float:
        measured.append(config)
        return ev.evaluator(held)(config)

    resumed = tuner.run(counting, 7, log=TrialLog(db, "m", "cpu", "run-a"))
    assert len(measured) == 4  # only what was missing
    assert [t.index for t in resumed.trials] == [t.index for t in full.trials]


def test_budget_must_be_positive(tables, meta) -> None:
    with pytest.raises(TuningError, match="budget must be >= 1"):
        ev.replay("random", tables[0], objective="throughput", slo_ms=None, budget=0, seed=0)


def test_groundtruth_collection_is_resumable_and_loads_as_a_table(tmp_path) -> None:
    space = cpu_space(batches=(1,), threads=(1,))
    db = RecordsDB(tmp_path / "gt.sqlite")
    n = collect(db, [("tiny", "zoo:tiny_mlp")], space, warmup=1, repeats=2, show_progress=False)
    assert n == len(space) == 26
    assert collect(db, [("tiny", "zoo:tiny_mlp")], space, warmup=1, repeats=2, show_progress=False) == 0
    [table] = load_tables(db, space)
    assert table.name == "tiny" and table.latency_ms.shape == (26,) and (table.latency_ms > 0).all()
    assert sum(1 for _ in db.query(SERVING_LATENCY)) == 26


def test_embedding_is_static_by_default_and_the_gnn_embedding_drops_in() -> None:
    from morphc import lower, zoo
    from morphc.predictors.tuner.embedding import STATIC_DIM, embed

    m = zoo.build("tiny_mlp")
    program = lower(m.model, m.example_inputs)
    static = embed(program)
    assert static.shape == (STATIC_DIM,) and np.isfinite(static).all() and static[0] > 0  # log FLOPs

    class FakeCostModel:
        def embed(self, program):
            return [0.5, 0.25]

    np.testing.assert_allclose(embed(program, "gnn", FakeCostModel()), [0.5, 0.25])
    with pytest.raises(ValueError, match="needs a trained cost model with embed"):
        embed(program, "gnn", None)


def test_evaluate_embedding_option_parses_and_held_out_models_never_shape_the_normalization(tables) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tuner as bench

    parser = bench.build_parser()
    assert parser.parse_args(["evaluate"]).embedding == "static"
    assert parser.parse_args(["evaluate", "--embedding", "both", "--out", "x"]).embedding == "both"
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--embedding", "graph"])

    by_name = {t.name: t for t in tables}
    names = list(by_name)
    rng = np.random.default_rng(0)
    gnn = {n: rng.normal(size=16).astype(np.float32) * 5 + 3 for n in names}
    fold = names[:1]
    assert bench._with_embedding(by_name, fold, "static", gnn) == by_name
    out = bench._with_embedding(by_name, fold, "gnn", gnn)
    train = np.stack([out[n].embedding for n in names[1:]])
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)  # z-scored on the training models
    moved = {**gnn, fold[0]: gnn[fold[0]] + 100.0}
    again = bench._with_embedding(by_name, fold, "gnn", moved)
    for n in names[1:]:  # the held-out model's embedding does not change anyone else's
        np.testing.assert_array_equal(again[n].embedding, out[n].embedding)
    assert np.abs(again[fold[0]].embedding).max() <= 3.0  # clipped
    both = bench._with_embedding(by_name, fold, "both", gnn)
    dim = tables[0].embedding.shape[-1]
    assert both[names[1]].embedding.shape == (dim + 16,)
