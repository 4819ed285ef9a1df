"""The GNN cost model: training lowers the loss, checkpoints round-trip, bad ones are refused, the
shipped checkpoint predicts sensibly, and passes reach it through the PassContext."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import morphc
from morphc.predictors import cost_model
from morphc.predictors.cost_model import CostModelError, TrainItem, load, load_default, make_query, train
from morphc.predictors.features import extract
from morphc.predictors.spaces import CpuConfig, GpuConfig


def _mlp(width: int, depth: int, batch: int = 1) -> morphc.Program:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return morphc.lower(nn.Sequential(*layers).eval(), torch.randn(batch, 16))


@pytest.fixture(scope="module")
def tiny_model() -> tuple[cost_model.CostModel, list[float], list[TrainItem]]:
    items = []
    for width, depth in ((8, 1), (32, 2), (64, 3), (16, 4)):
        graph = extract(_mlp(width, depth))
        for threads in (1, 2):
            latency = 0.02 * graph.num_nodes * (1.5 if threads == 2 else 1.0)  # synthetic, size-dependent
            items.append(TrainItem(graph, CpuConfig(threads=threads, batch=1), latency))
    model, losses = train(items, hidden=16, layers=2, steps=150, batch_size=8, lr=1e-2, show_progress=False)
    return model, losses, items


def test_training_reduces_the_loss(tiny_model: tuple) -> None:
    _, losses, _ = tiny_model
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:5])


def test_checkpoint_round_trip(tiny_model: tuple, tmp_path: Path) -> None:
    model, _, items = tiny_model
    path = model.save(tmp_path / "m.npz")
    again = load(path)
    queries = [make_query(it.graph, it.config) for it in items]
    np.testing.assert_allclose(model.predict_queries(queries)[0], again.predict_queries(queries)[0], rtol=1e-6)
    assert again.meta["feature_schema"] == model.meta["feature_schema"]


def test_an_ensemble_averages_its_members_in_log_space(tiny_model: tuple, tmp_path: Path) -> None:
    """Members differ (own seeds); the ensemble predicts their geometric mean and survives a round trip."""
    _, _, items = tiny_model
    ensemble, losses = train(items, hidden=16, layers=2, steps=60, batch_size=8, lr=1e-2, members=2,
                             show_progress=False)
    assert len(ensemble.members) == 2 and len(losses) == 60
    queries = [make_query(it.graph, it.config) for it in items]
    alone = [cost_model.CostModel((m,), ensemble.meta).predict_queries(queries)[0] for m in ensemble.members]
    assert not np.allclose(alone[0], alone[1])
    np.testing.assert_allclose(ensemble.predict_queries(queries)[0], np.sqrt(alone[0] * alone[1]), rtol=1e-5)
    again = load(ensemble.save(tmp_path / "ensemble.npz"))
    assert len(again.members) == 2
    np.testing.assert_allclose(again.predict_queries(queries)[0], ensemble.predict_queries(queries)[0], rtol=1e-6)


def _rewrite(path: Path, out: Path, edit_meta: dict | None = None, edit_array: str | None = None) -> Path:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    meta.update(edit_meta or {})
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if edit_array:
        arrays[edit_array] = np.full_like(arrays[edit_array], np.nan)
    np.savez(out, **arrays)
    return out


def test_bad_checkpoints_are_refused(tiny_model: tuple, tmp_path: Path) -> None:
    model, _, _ = tiny_model
    good = model.save(tmp_path / "good.npz")
    with pytest.raises(CostModelError, match="does not exist"):
        load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(CostModelError, match="not a morphc cost-model checkpoint"):
        load(tmp_path / "junk.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CostModelError, match="not a morphc cost-model checkpoint"):
        load(truncated)
    with pytest.raises(CostModelError, match=r"feature schema 'old-schema'.*retrain"):
        load(_rewrite(good, tmp_path / "schema.npz", {"feature_schema": "old-schema"}))
    with pytest.raises(CostModelError, match="version 99"):
        load(_rewrite(good, tmp_path / "version.npz", {"version": 99}))
    with pytest.raises(CostModelError, match="non-finite values"):
        load(_rewrite(good, tmp_path / "nan.npz", edit_array="p0"))
    with pytest.raises(CostModelError, match="declares 0 ensemble members"):
        load(_rewrite(good, tmp_path / "members.npz", {"members": 0}))
    with pytest.raises(CostModelError, match="of member 1 is missing"):
        load(_rewrite(good, tmp_path / "member.npz", {"members": 2}))
    with pytest.raises(CostModelError, match=r"parameter .* has shape \[16\], expected \[32\]"):
        load(_rewrite(good, tmp_path / "shape.npz", {"hidden": 32}))
    no_meta = tmp_path / "nometa.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(no_meta, "w") as zout:
        for name in zin.namelist():
            if not name.startswith("__meta__"):
                zout.writestr(name, zin.read(name))
    with pytest.raises(CostModelError, match="no valid morphc cost-model header"):
        load(no_meta)


def test_gpu_config_is_refused_by_a_cpu_model(tiny_model: tuple) -> None:
    model, _, _ = tiny_model
    with pytest.raises(CostModelError, match="trained on 'cpu' measurements and cannot predict a GpuConfig"):
        model.predict(_mlp(8, 1), GpuConfig(sm_share=50))


@pytest.fixture(scope="module")
def shipped() -> cost_model.CostModel:
    return load_default()


def test_the_shipped_checkpoint_of_this_machine_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = cost_model.shipped_checkpoints()
    assert shipped and all(fp.startswith("cpu|") for fp in shipped.values())  # headers read, every one a CPU's
    default = next(p for p in shipped if p.name == cost_model.DEFAULT_CHECKPOINT)
    fake = {Path("cpu-a.npz"): "cpu|CPU A|cores=2|torch=2.13.0", Path("cpu-b.npz"): "cpu|CPU B|cores=2|torch=2.13.0",
            Path("cpu-b16.npz"): "cpu|CPU B|cores=16|torch=2.13.0"}
    monkeypatch.setattr(cost_model, "shipped_checkpoints", lambda: fake)
    assert cost_model.default_checkpoint_path("cpu|CPU B|cores=16|torch=2.13.0").name == "cpu-b16.npz"  # exact
    assert cost_model.default_checkpoint_path("cpu|CPU A|cores=8|torch=2.11.0").name == "cpu-a.npz"  # its CPU model
    assert cost_model.default_checkpoint_path("cpu|CPU C|cores=2|torch=2.13.0") == default  # none: the default


def test_shipped_checkpoint_predicts_and_ranks(shipped: cost_model.CostModel) -> None:
    assert cost_model.default_checkpoint_path().is_file()
    small, big = _mlp(16, 1), _mlp(512, 8, batch=8)
    p_small, p_big = shipped.predict(small, CpuConfig(threads=1)), shipped.predict(big, CpuConfig(threads=1))
    assert np.isfinite([p_small, p_big]).all() and 0 < p_small < p_big
    assert p_small < 1.0  # seconds; a tiny MLP is far below a second
    many = shipped.predict_many([(small, CpuConfig(threads=1)), (big, CpuConfig(threads=1))])
    np.testing.assert_allclose(many, [p_small, p_big], rtol=1e-5)
    assert shipped.predict_ms(small) == pytest.approx(p_small * 1e3, rel=1e-5)
    # a bigger batch of the same program is predicted slower
    assert shipped.predict(big, CpuConfig(threads=1, batch=64)) > p_big


def test_embedding_for_the_tuner(shipped: cost_model.CostModel) -> None:
    a, b = shipped.embed(_mlp(16, 1)), shipped.embed(_mlp(256, 6))
    assert a.shape == b.shape == (2 * shipped.meta["hidden"],) and np.isfinite(a).all()
    assert not np.allclose(a, b)


def test_passes_reach_it_through_the_pass_context(shipped: cost_model.CostModel) -> None:
    ctx = morphc.PassContext(cost_model=shipped)
    program = _mlp(32, 2)
    assert ctx.cost_model.predict(program, CpuConfig(threads=2)) > 0
    program.graph_module.graph.eliminate_dead_code()
    program.mark_modified()  # a changed program is re-extracted (cache keyed by generation)
    assert ctx.cost_model.predict(program, CpuConfig(threads=2)) > 0


def test_cli_profile_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from morphc.cli import main
    from morphc.predictors.records import RecordsDB

    assert main(["profile", "--space"]) == 0
    db = tmp_path / "r.sqlite"
    assert main(["profile", "zoo:tiny_mlp", "--threads", "1", "--repeats", "3", "--ops", "--db", str(db)]) == 0
    assert sorted(r.kind for r in RecordsDB(db).query()) == ["latency", "op-latency"]
    capsys.readouterr()
    assert main(["predict", "zoo:tiny_mlp", "--config", "threads=1", "--config", "batch=4,threads=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(" ms") and float(line.split()[-2]) > 0 for line in lines)
    assert main(["predict", "zoo:tiny_mlp", "--config", "cores=2"]) == 2
    assert main(["predict", "zoo:tiny_mlp", "--checkpoint", str(tmp_path / "none.npz")]) == 2


def test_cli_profile_says_where_page_faults_come_from(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`morphc profile` shows the page faults per call, and names the cause and the remedy when they are many."""
    import itertools

    from morphc.cli import main
    from morphc.predictors import profiler

    counter = itertools.count(0, 3000)  # every reading 3000 faults after the last: 1000 per call over 3 repeats
    monkeypatch.setattr(profiler, "_minor_faults", lambda: next(counter))
    args = ["profile", "zoo:tiny_mlp", "--repeats", "3", "--db"]
    assert main([*args, str(tmp_path / "r.sqlite"), "--threads", "1"]) == 0
    said = capsys.readouterr()
    out = " ".join((said.out + said.err).split())
    assert "page faults per call: 1000 at 1 thread" in out  # and the table has the column
    assert "MALLOC_TRIM_THRESHOLD_" in out
    monkeypatch.setattr(profiler, "_minor_faults", lambda: 0)
    assert main([*args, str(tmp_path / "q.sqlite"), "--threads", "2"]) == 0
    said = capsys.readouterr()
    assert "MALLOC_TRIM_THRESHOLD_" not in said.out + said.err


def test_the_per_operator_loss_skips_the_inputs_the_profiler_does_not_time() -> None:
    """Inputs are never timed (their measured 0 ms is absence, not speed): fitting them would pull the
    learned profiler cost towards zero and leave it inside every operator's time."""
    graph = extract(_mlp(8, 2))
    op_ms = np.where(np.asarray(graph.ops) == "input", 0.0, 0.05)
    targets = cost_model._node_targets(graph, op_ms)
    is_input = np.asarray(graph.ops) == "input"
    assert is_input.any() and np.isnan(targets[is_input]).all()
    np.testing.assert_allclose(targets[~is_input], np.log(0.05 + cost_model.NODE_FLOOR_MS))


def test_operator_names_no_training_graph_had_are_predicted_as_hidden(tiny_model: tuple, tmp_path: Path) -> None:
    """The tiny model saw only Linear and ReLU: a GELU's name column kept its random initial weights, so a
    GELU is predicted as an operator whose name is hidden ("other"), as op dropout trained the network for."""
    import dataclasses

    from morphc.predictors.cost_model import _hide_op_names
    from morphc.predictors.features import VOCAB_COLUMNS, VOCAB_NAMES

    model = tiny_model[0]
    assert {"linear", "relu"} <= set(model.meta["seen_ops"]) and "gelu" not in model.meta["seen_ops"]
    torch.manual_seed(0)
    program = morphc.lower(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval(), torch.randn(1, 16))
    graph = extract(program)
    query = make_query(graph, CpuConfig(threads=1, batch=1))
    gelu = np.asarray([op == "gelu" for op in graph.ops])
    assert gelu.any() and query.x[gelu, VOCAB_COLUMNS][:, VOCAB_NAMES.index("gelu")].all()
    hidden = _hide_op_names(query, gelu)
    as_is = dataclasses.replace(model, hide_unseen_ops=False)
    predicted = model.predict_queries([query])[0]
    assert predicted == pytest.approx(as_is.predict_queries([hidden])[0], rel=1e-6)
    assert predicted != pytest.approx(as_is.predict_queries([query])[0], rel=1e-6)  # the noise it removes
    # the names survive a checkpoint; one that does not record them hides nothing
    assert load(model.save(tmp_path / "m.npz")).meta["seen_ops"] == model.meta["seen_ops"]
    old = load(_rewrite(tmp_path / "m.npz", tmp_path / "old.npz", {"seen_ops": None}))
    assert not old.unseen_op_columns().any()
    assert old.predict_queries([query])[0] == pytest.approx(as_is.predict_queries([query])[0], rel=1e-6)


def _moved_by_context(member: cost_model.LatencyGNN, query: cost_model.Query, node: int, scale: float) -> float:
    """How far `node`'s predicted log time moves when every other node's features are perturbed (noise of `scale`)."""
    import jax.numpy as jnp

    others = np.arange(len(query.x)) != node
    x = query.x.copy()
    x[others] += np.random.default_rng(0).normal(0.0, scale, size=x[others].shape).astype(np.float32)
    changed = dataclasses.replace(query, x=x)
    times = [np.asarray(member.with_nodes({k: jnp.asarray(v) for k, v in cost_model.pack([q])[0].items()}, 1)[2])
             for q in (query, changed)]
    return float(abs(times[1][node] - times[0][node]))


def test_a_bounded_context_moves_each_node_by_at_most_the_bound(tiny_model: tuple, tmp_path: Path) -> None:
    """With `context_bound`, a node's coefficients come from its own features and what its neighbours add is
    bounded: changing every other node moves its predicted log time by at most the bound (and does move it).
    The option is a hyperparameter of the checkpoint: it survives a round trip."""

    items = tiny_model[2]
    model, _ = train(items, hidden=16, layers=2, steps=60, batch_size=8, lr=1e-2, context_bound=0.3,
                     context_classes=(), show_progress=False)  # no classes named: every node is bounded
    again = load(model.save(tmp_path / "bounded.npz"))
    assert again.meta["context_bound"] == 0.3 and "context_classes" not in again.meta
    assert tiny_model[0].meta["context_classes"] == ["conv", "pool"]  # the default since session 17
    query = make_query(items[5].graph, items[5].config)
    for member in again.members:
        assert 0.0 < _moved_by_context(member, query, node=2, scale=1.0) <= 0.3 + 1e-5
    with pytest.raises(ValueError, match="context_bound must be >= 0"):
        train(items, steps=1, context_bound=-0.5, show_progress=False)
    queries = [make_query(it.graph, it.config) for it in items]
    np.testing.assert_allclose(model.predict_queries(queries)[0], again.predict_queries(queries)[0], rtol=1e-6)


def test_a_context_bound_for_some_classes_bounds_only_their_nodes(tiny_model: tuple, tmp_path: Path) -> None:
    """`context_classes` limits the bound to the named operator classes: what the context adds to their nodes stays
    within +-bound when every other node changes, the others are free; the option survives a round trip, and
    nonsense is refused."""

    items = tiny_model[2]
    model, _ = train(items, hidden=16, layers=2, steps=60, batch_size=8, lr=1e-2, context_bound=0.05,
                     context_classes=("linear",), show_progress=False)
    again = load(model.save(tmp_path / "bounded.npz"))
    assert again.meta["context_classes"] == ["linear"]
    item = items[5]
    query = make_query(item.graph, item.config)
    moved = {cls: _moved_by_context(again.members[0], query, node=item.graph.classes.index(cls), scale=3.0)
             for cls in ("linear", "activation")}
    # what the context adds lies within +-bound, so two contexts differ by less than twice it
    assert 0.0 < moved["linear"] < 2 * 0.05 < moved["activation"]  # only the named class is held
    with pytest.raises(ValueError, match="unknown operator classes \\['pools'\\]; valid: input"):
        train(items, steps=1, context_bound=0.5, context_classes=("pools",), show_progress=False)
    unbounded = train(items, hidden=16, layers=2, steps=20, context_bound=0, context_classes=("pool",),
                      show_progress=False)[0]
    assert "context_bound" not in unbounded.meta and "context_classes" not in unbounded.meta
    queries = [make_query(it.graph, it.config) for it in items]
    np.testing.assert_allclose(model.predict_queries(queries)[0], again.predict_queries(queries)[0], rtol=1e-6)


def test_node_times_are_the_terms_the_prediction_sums(tiny_model: tuple) -> None:
    """Per-operator predictions (for diagnosis) are what the graph's prediction adds up before its graph-level
    correction: one per node, positive, their sum times exp(correction) is the prediction."""
    import jax.numpy as jnp
    from flax import nnx

    model, _, items = tiny_model
    query = make_query(items[3].graph, items[3].config)
    nodes = model.predict_node_ms(query)
    assert nodes.shape == (items[3].graph.num_nodes,) and (nodes > 0).all()
    member = model.members[0]
    batch = {k: jnp.asarray(v) for k, v in cost_model.pack([query])[0].items()}
    total, _, z = member.with_nodes(batch, 1)
    np.testing.assert_allclose(nodes, np.exp(np.asarray(z)[:len(nodes)]), rtol=1e-5)  # one member: its own
    correction = float(total[0]) - np.log(nodes.sum())
    pooled = jnp.concatenate([member(batch, 1)[1], batch["gfeat"]], axis=-1)
    g = float(member.graph_out(nnx.gelu(member.graph_hidden(pooled)))[0, 0])
    assert correction == pytest.approx(g, abs=1e-4)
    assert 0 < model.probe_ms < 1.0


def test_a_correction_bound_holds_the_graph_correction_within_it(tiny_model: tuple, tmp_path: Path) -> None:
    """`correction_bound` keeps the graph MLP's correction of the summed node times within +-bound, however far the
    MLP would move it; the option survives a round trip, and a negative bound is refused."""
    import jax.numpy as jnp

    items = tiny_model[2]
    bounded = load(train(items, hidden=16, layers=2, steps=40, batch_size=8, lr=1e-2, correction_bound=0.05,
                         show_progress=False)[0].save(tmp_path / "bounded.npz"))
    free = train(items, hidden=16, layers=2, steps=40, batch_size=8, lr=1e-2, show_progress=False)[0]
    assert bounded.meta["correction_bound"] == 0.05 and "correction_bound" not in free.meta
    query = make_query(items[3].graph, items[3].config)
    batch = {k: jnp.asarray(v) for k, v in cost_model.pack([query])[0].items()}
    corrections = {}
    for name, model in (("bounded", bounded), ("free", free)):
        member = model.members[0]
        member.graph_out.bias[...] = jnp.full_like(member.graph_out.bias[...], 3.0)  # an MLP that wants +3 in log
        total, _, z = member.with_nodes(batch, 1)
        corrections[name] = float(total[0]) - float(jnp.log(jnp.exp(z[:items[3].graph.num_nodes]).sum()))
    assert corrections["bounded"] == pytest.approx(0.05, abs=1e-3)
    assert corrections["free"] > 2.5
    with pytest.raises(ValueError, match="correction_bound must be >= 0"):
        train(items, steps=1, correction_bound=-0.1, show_progress=False)
    with pytest.raises(ValueError, match="needs correction_bound > 0"):
        train(items, steps=1, correction_offset=True, show_progress=False)
    # centred: the bound holds around a learned offset shared by every graph, which itself is free
    centred = load(train(items, hidden=16, layers=2, steps=40, batch_size=8, lr=1e-2, correction_bound=0.05,
                         correction_offset=True, show_progress=False)[0].save(tmp_path / "centred.npz"))
    member = centred.members[0]
    assert centred.meta["correction_offset"] is True and member.correction_offset is not None
    member.correction_offset[...] = jnp.asarray(-0.7, dtype=jnp.float32)
    member.graph_out.bias[...] = jnp.full_like(member.graph_out.bias[...], 3.0)
    total, _, z = member.with_nodes(batch, 1)
    correction = float(total[0]) - float(jnp.log(jnp.exp(z[:items[3].graph.num_nodes]).sum()))
    assert correction == pytest.approx(-0.7 + 0.05, abs=1e-3)


@pytest.fixture(scope="module")
def validation() -> Any:
    """benchmarks/cost_model_validation.py, the protocol that chooses between cost-model candidates."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cost_model_validation

    return cost_model_validation


def test_the_validation_rule_adopts_only_a_candidate_lower_on_every_split_by_two_standard_errors(
        validation: Any) -> None:
    """benchmarks/cost_model_validation.py's `decide`: the rule that keeps candidates chosen by chance out."""
    decide = validation.decide

    def runs(diffs_a: list[float], diffs_b: list[float]) -> list[dict]:
        out = []
        for split, diffs in (("a", diffs_a), ("b", diffs_b)):
            for seed, d in enumerate(diffs):
                out += [{"split": split, "seed": seed, "arm": "baseline", "mape_pct": 12.0},
                        {"split": split, "seed": seed, "arm": "candidate", "mape_pct": 12.0 + d}]
        return out

    clear = decide(runs([-1.0, -0.8, -1.2, -0.9], [-0.5, -0.7, -0.6, -0.4]))
    assert clear["adopt"] and clear["pairs"] == 8 and clear["mean_diff"] == pytest.approx(-0.7625)
    noisy = decide(runs([-3.0, 2.0, -2.5, 1.5], [-2.0, 1.0, -1.5, 2.0]))  # lower on both splits, within noise
    assert noisy["lower_on_every_split"] and not noisy["adopt"]
    one_split = decide(runs([-2.0, -2.1, -1.9, -2.0], [0.2, 0.3, 0.1, 0.2]))  # a large mean, but worse on b
    assert one_split["mean_diff"] < -2 * one_split["se"] and not one_split["adopt"]
    with_b = runs([-1.0, -0.8], [-0.5, -0.7]) + [{"split": "(b): gpt2", "seed": 0, "arm": a, "mape_pct": m}
                                                 for a, m in (("baseline", 9.0), ("candidate", 30.0))]
    assert decide(with_b)["pairs"] == 4  # (b) never counts
    with pytest.raises(ValueError, match="at least 2"):
        decide(runs([-1.0], []))


def test_validation_ensembles_average_their_members_log_latencies(validation: Any) -> None:
    """benchmarks/cost_model_validation.py's `ensembles`: members off by the factors 1.2 and 1/1.2 make an exact
    ensemble (as a shipped checkpoint averages log latencies), scored per group of consecutive seeds."""
    ensembles = validation.ensembles

    true = [1.0, 2.0, 4.0]
    configs = {"a": [["v", "f", "cfg", t] for t in true]}
    factor = {0: 1.2, 1: 1 / 1.2, 2: 1.5, 3: 1.5}
    runs = [{"split": "a", "seed": seed, "arm": "baseline", "pred_ms": [t * f for t in true]}
            for seed, f in factor.items()]
    found = ensembles(runs, configs, size=2)
    assert [seeds for seeds, _ in found["a", "baseline"]] == [[0, 1], [2, 3]]
    assert [m for _, m in found["a", "baseline"]] == pytest.approx([0.0, 50.0])
    assert ensembles(runs, configs, size=8) == {}


def test_mixed_ensembles_take_half_their_members_from_each_arm(validation: Any) -> None:
    """`mixed_ensembles`: per group of 4 seeds, half the members from each arm, averaged over the two ways of
    splitting the group; `decide_mixed` applies the rule to them against the baseline's own ensembles."""
    true = [1.0, 2.0, 4.0]
    configs = {split: [["v", "f", "cfg", t] for t in true] for split in ("a", "b")}
    factor = {("baseline", 0): 1.2, ("baseline", 1): 1.2, ("baseline", 2): 1.44, ("baseline", 3): 1.44}
    factor |= {("candidate", seed): 1 / 1.2 for seed in range(4)}
    runs = [{"split": split, "seed": seed, "arm": arm, "pred_ms": [t * f for t in true]}
            for split in ("a", "b") for (arm, seed), f in factor.items()]
    groups = validation.mixed_ensembles(runs, configs)
    assert [(g["split"], g["seeds"]) for g in groups] == [("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3])]
    # baseline 0,1 (x1.2) + candidate 2,3 (/1.2) is exact; candidate 0,1 + baseline 2,3 (x1.44) is off by sqrt(1.2)
    assert groups[0]["mixed"] == pytest.approx((0.0 + (1.2 ** 0.5 - 1) * 100) / 2)
    assert groups[0]["baseline"] == pytest.approx((1.728 ** 0.5 - 1) * 100)
    assert groups[0]["candidate"] == pytest.approx((1 - 1 / 1.2) * 100)
    verdict = validation.decide_mixed(groups)
    assert verdict["pairs"] == 2 and verdict["lower_on_every_split"]
    assert verdict["mean_diff"] == pytest.approx(groups[0]["mixed"] - groups[0]["baseline"])
    assert validation.mixed_ensembles([r for r in runs if r["arm"] == "baseline"], configs) == []
    # one validation split beside (b), which never counts: too few pairs for the rule, and the report still renders
    only_a = [r for r in runs if r["split"] == "a"] + [{**r, "split": "(b): f"} for r in runs if r["split"] == "b"]
    table = validation._mixed_table(only_a, {"a": configs["a"], "(b): f": configs["b"]})
    assert "| (b): f | 0-3 |" in table and "Decision: none (the rule needs at least 2" in table


def test_reused_baseline_runs_are_those_trained_with_todays_defaults(validation: Any, tmp_path: Path) -> None:
    """`--reuse-baseline` takes a file's baseline arm when it was trained with today's train() defaults, or its
    candidate arm when the candidate's options are today's defaults (session 17's bound became them), reading options
    train() has lost as today's training where they were off; a file whose arms are neither, or whose defaults were
    not recorded, or that holds extra data, is refused."""
    import argparse
    import json

    today = validation._baseline_options()
    db = tmp_path / "records.sqlite"

    def results(name: str, baseline: dict[str, Any] | None, candidate: dict[str, Any], extra: str | None = None) -> str:
        runs = [{"split": "s", "seed": 3, "arm": arm, "mape_pct": mape} for arm, mape in (("baseline", 1.0),
                                                                                         ("candidate", 2.0))]
        settings = {"db": str(db), "extra_db": extra, "candidate_options": candidate, "steps": 10}
        if baseline is not None:
            settings["baseline_options"] = baseline
        (tmp_path / name).write_text(json.dumps({"settings": settings, "results": {"runs": runs}}))
        return str(tmp_path / name)

    older = {**today, "context_bound": 0.0, "context_classes": []}
    older.pop("correction_bound")  # an option train() gained since: its absence means the old behaviour
    files = {"same": results("same.json", today, {"hidden": 32}),
             "became": results("became.json", older, {"context_bound": today["context_bound"],
                                                      "context_classes": today["context_classes"]}),
             "other": results("other.json", {**today, "hidden": 32}, {"lr": 1.0}),
             # an option train() has lost since (session 21's candidate): off, it is today's training; on, it is not
             "removed": results("removed.json", {**today, "batch_blind_correction": False},
                                {"batch_blind_correction": True}),
             "removed_on": results("removed_on.json", {**today, "hidden": 32, "batch_blind_correction": False},
                                   {"hidden": today["hidden"], "batch_blind_correction": True}),
             "unrecorded": results("unrecorded.json", None, {}),
             "extra": results("extra.json", older, {"context_bound": today["context_bound"],
                                                    "context_classes": today["context_classes"]}, extra="x.sqlite")}

    class Refused(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise Refused(message)

    def reuse(name: str) -> dict:
        return validation._reused_baseline(Parser(), argparse.Namespace(db=str(db), steps=10,
                                                                        reuse_baseline=[files[name]]))

    assert reuse("same")["s", 3]["mape_pct"] == 1.0
    assert reuse("removed")["s", 3]["mape_pct"] == 1.0
    became = reuse("became")["s", 3]
    assert became["mape_pct"] == 2.0 and became["arm"] == "baseline" and "(candidate)" in became["reused_from"]
    for name, says in (("other", "neither of its arms"), ("removed_on", "neither of its arms"),
                       ("unrecorded", "not recorded"), ("extra", "--extra-db")):
        with pytest.raises(Refused, match=says):
            reuse(name)
    with pytest.raises(Refused, match="with 10 steps; this run uses"):
        validation._reused_baseline(Parser(), argparse.Namespace(db=str(db), steps=11, reuse_baseline=[files["same"]]))


def test_a_killed_validation_run_resumes_from_its_finished_runs(validation: Any, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Each finished (split, seed, arm) run is kept as it finishes; a rerun with the same settings takes them back,
    one with other settings (or an unreadable file) starts afresh and says why. Runs reused from --reuse-baseline
    files are not copied (they are kept where they came from)."""
    path = tmp_path / "v.partial.json"
    settings = {"db": "r.sqlite", "candidate_options": {"node_loss": 0.5}, "steps": 10}
    runs = [{"split": "s", "seed": 3, "arm": "baseline", "mape_pct": 1.0, "reused_from": "old.json"},
            {"split": "s", "seed": 3, "arm": "candidate", "mape_pct": 2.0}]
    assert validation._resumed_runs(path, settings) == {}
    validation._save_partial(path, settings, runs)
    assert validation._resumed_runs(path, settings) == {("s", 3, "candidate"): runs[1]}
    assert validation._resumed_runs(path, {**settings, "steps": 11}) == {}
    assert "other settings" in capsys.readouterr().out
    path.write_text("{not json")
    assert validation._resumed_runs(path, settings) == {}
    assert "not a partial results file" in capsys.readouterr().out
