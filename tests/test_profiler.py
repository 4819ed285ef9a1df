"""Device profiles, config spaces, interleaved and per-op profiling, resumable corpus collection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import morphc
from morphc.predictors import dataset, profiler
from morphc.predictors.corpus import VARIANTS, Variant
from morphc.predictors.dataset import collect_corpus, load_samples
from morphc.predictors.profiler import profile_interleaved, profile_ops, resolve_config
from morphc.predictors.records import RecordsDB, RecordsError
from morphc.predictors.spaces import (
    CPU,
    GPU,
    ConfigError,
    CpuConfig,
    DeviceUnavailableError,
    GpuConfig,
    parse_config,
)
from morphc.runtime.denormals import flush_denormal_enabled


def _program(batch: int = 2) -> morphc.Program:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return morphc.lower(model, torch.randn(batch, 4))


def test_cpu_space_declares_how_knobs_are_applied() -> None:
    assert [k.name for k in CPU.knobs] == ["batch", "threads", "flush_denormal"]
    assert all(k.applied and k.measurable_here for k in CPU.knobs)
    assert {k.name for k in GPU.knobs} == {"batch", "sm_share", "time_quota"}
    assert not any(k.measurable_here for k in GPU.knobs)
    grid = list(CPU.configs(batch=(1, 8)))
    assert grid == [CpuConfig(threads=1, batch=1), CpuConfig(threads=2, batch=1), CpuConfig(threads=1, batch=8),
                    CpuConfig(threads=2, batch=8)]
    with pytest.raises(ConfigError, match="no knob 'sm_share'"):
        list(CPU.configs(sm_share=(50,)))


def test_parse_config_and_its_errors() -> None:
    assert parse_config("batch=8, threads=2") == CpuConfig(threads=2, batch=8)
    assert parse_config("sm_share=50,time_quota=0.5", "cuda") == GpuConfig(sm_share=50, time_quota=0.5)
    assert parse_config("threads=2,flush_denormal=true") == CpuConfig(threads=2, flush_denormal=True)
    with pytest.raises(ConfigError, match="flush_denormal must be true or false, got 1"):
        parse_config("flush_denormal=1")
    with pytest.raises(ConfigError, match=r"no knob\(s\) \['cores'\]; valid knobs: \['batch', 'flush_denormal', "
                                          r"'threads'\]"):
        parse_config("cores=2")
    with pytest.raises(ConfigError, match="must be knob=value"):
        parse_config("threads")
    with pytest.raises(ConfigError, match="sm_share is an MPS active-thread percentage"):
        parse_config("sm_share=150", "cuda")


def test_batch_is_a_property_of_the_program_and_gpu_is_refused() -> None:
    program = _program(batch=2)
    assert resolve_config(program, CpuConfig(threads=2)) == CpuConfig(threads=2, batch=2)
    with pytest.raises(ValueError, match="config batch 8 differs from the program's batch 2; lower the model"):
        profiler.profile_program(program, CpuConfig(batch=8))
    with pytest.raises(DeviceUnavailableError, match="this machine has no GPU"):
        profiler.profile_program(program, GpuConfig(sm_share=50))


def test_interleaved_profile_restores_threads_and_reports_load() -> None:
    program = _program()
    before = torch.get_num_threads()
    stats = profile_interleaved(program, [CpuConfig(threads=1), CpuConfig(threads=2, flush_denormal=True)],
                                target_s=0.01, min_runs=5)
    assert torch.get_num_threads() == before and not flush_denormal_enabled()
    assert len(stats) == 2 and all(s.runs >= 5 and s.median_ms > 0 for s in stats)
    assert all(s.p10_ms <= s.median_ms <= s.p90_ms for s in stats)


def test_per_op_profile_covers_every_operator() -> None:
    program = _program()
    times = profile_ops(program, CpuConfig(threads=1), warmup=0, repeats=2)
    ops = [n.name for n in program.graph.nodes if n.op == "call_function"]
    assert sorted(times) == sorted(ops) and all(t > 0 for t in times.values())


def _tiny_variant(width: int) -> Variant:
    def build(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        return nn.Sequential(nn.Linear(4, width), nn.ReLU()).eval(), (torch.randn(batch, 4),)

    return Variant(f"tiny[w={width}]", "tiny", {"width": width}, build)


def test_corpus_collection_survives_a_killed_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "corpus.sqlite"
    script = f"""
import os, torch
from torch import nn
from morphc.predictors.corpus import Variant
from morphc.predictors.dataset import collect_corpus
from morphc.predictors.records import RecordsDB
def make(width):
    def build(batch):
        if width == 16:
            os._exit(9)  # killed while the third variant is being prepared
        return nn.Sequential(nn.Linear(4, width), nn.ReLU()).eval(), (torch.randn(batch, 4),)
    return Variant(f"tiny[w={{width}}]", "tiny", {{"width": width}}, build)
collect_corpus(RecordsDB({str(path)!r}), [make(w) for w in (4, 8, 16)], batches=(1,), show_progress=False,
               target_s=0.001)
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=300)
    assert proc.returncode == 9
    db = RecordsDB(path)
    assert len(load_samples(db)) == 4  # 2 variants x threads {1, 2} survived the kill
    calls: list[int] = []
    real = dataset.profile_interleaved
    monkeypatch.setattr(dataset, "profile_interleaved", lambda *a, **k: calls.append(1) or real(*a, **k))
    measured = collect_corpus(db, [_tiny_variant(w) for w in (4, 8, 16)], batches=(1,), show_progress=False,
                              target_s=0.001, retries=0)  # no retry of a noisy 1 ms measurement: one call each
    assert measured == 1 and len(calls) == 1  # only the missing variant was measured
    samples = load_samples(db)
    assert len(samples) == 6 and all(s.runtime is not None and s.runtime.shape[1] == 2 for s in samples)
    assert {s.config for s in samples} == {CpuConfig(threads=1, batch=1), CpuConfig(threads=2, batch=1)}


def test_repeat_passes_are_kept_and_learned_as_their_median(tmp_path: Path) -> None:
    db = RecordsDB(tmp_path / "corpus.sqlite")
    variants = [_tiny_variant(4)]
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001) == 1
    first = {s.config: s.latency_ms for s in load_samples(db)}
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001, repeat=1) == 1
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001, repeat=1) == 0  # resumed
    samples = load_samples(db)
    assert len(samples) == 2  # one sample per config, not one per pass
    for s in samples:
        assert len(s.passes) == 2 and s.passes[0] == first[s.config]
        assert s.latency_ms == pytest.approx(sum(s.passes) / 2)  # the median of two


def test_a_collection_made_on_another_cpu_is_read_as_that_machines(tmp_path: Path) -> None:
    """The stored corpus describes the machine it was measured on: elsewhere it is still evaluated and
    trained on (a checkpoint then names that machine), and this machine's own records win when present."""
    from morphc.cli import main
    from morphc.predictors.cost_model import load
    from morphc.predictors.records import device_fingerprint

    db = RecordsDB(tmp_path / "corpus.sqlite")
    collect_corpus(db, [_tiny_variant(4), _tiny_variant(8)], batches=(1,), show_progress=False, target_s=0.001)
    here = device_fingerprint("cpu")
    assert dataset.cpu_device(db) == here and len(load_samples(db)) == 4
    other = "cpu|Another CPU|cores=2|torch=x"
    with db.conn:
        db.conn.execute("UPDATE records SET device=? WHERE device=?", (other, here))
    assert dataset.cpu_device(db) == other
    samples = load_samples(db)
    assert len(samples) == 4 and all(s.runtime is not None for s in samples)  # per-op records moved with them
    assert main(["train-cost-model", "--db", str(db.path), "-o", str(tmp_path / "m.npz"), "--steps", "5",
                 "--members", "1"]) == 0
    assert load(tmp_path / "m.npz").meta["device_fingerprint"] == other
    with db.conn:
        db.conn.execute("INSERT INTO records (kind, model, device, config, stats, created) SELECT kind, model, ?, "
                        "config, stats, created FROM records WHERE device=?", ("cpu|A third CPU", other))
    with pytest.raises(RecordsError, match=r"CPU latencies of 2 other machines and none of this one .*pass one of "
                                           r"them as device=: cpu\|A third CPU; cpu\|Another CPU"):
        load_samples(db)
    assert len(load_samples(db, device=other)) == 4
    collect_corpus(db, [_tiny_variant(4)], batches=(1,), show_progress=False, target_s=0.001)
    assert dataset.cpu_device(db) == here and len(load_samples(db)) == 2  # this machine's own, once it has some


def test_loading_a_missing_or_foreign_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="does not exist"):
        load_samples(tmp_path / "nope.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 200)
    with pytest.raises(RecordsError, match="not a usable morphc records database"):
        load_samples(bad)


def test_corpus_is_broad_and_names_are_unique() -> None:
    families = {v.family for v in VARIANTS}
    assert {"mlp", "vgg", "bert", "vit", "gpt2", "hf-resnet", "multitask"} <= families
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)


def test_stored_op_graphs_are_re_extracted_for_the_same_programs_only(tmp_path: Path) -> None:
    """After a new OPGRAPH_VERSION the measurements stay and the graphs are extracted again; a variant
    that now lowers to another program is refused (its measurements describe the old one)."""
    db = RecordsDB(tmp_path / "corpus.sqlite")
    variants = [_tiny_variant(4), _tiny_variant(8)]
    collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001)
    fp = db.get(dataset.CORPUS, variants[0].name, dataset.STATIC, {"batch": 1}).stats["fingerprint"]
    db.put(dataset.OPGRAPH, fp, dataset.STATIC, {}, {"opgraph": "stale"})
    with pytest.raises(RecordsError, match="--refresh-op-graphs"):
        load_samples(db)
    assert dataset.refresh_op_graphs(db, variants, show_progress=False) == 2
    assert len(load_samples(db)) == 4
    changed = Variant(variants[0].name, "tiny", {}, lambda b: (nn.Sequential(nn.Linear(4, 5)).eval(),
                                                              (torch.randn(b, 4),)))
    with pytest.raises(RecordsError, match="lowers to program"):
        dataset.refresh_op_graphs(db, [changed], show_progress=False)


def test_a_variant_is_lowered_from_its_own_builder_not_one_of_the_same_name_built_before() -> None:
    """The lowering cache keeps the last variant built; another definition under the same name (a test's,
    an edited family's) must be built anew, or its records would describe the other model."""
    wider = Variant("tiny[w=4]", "tiny", {"width": 4}, lambda b: (nn.Sequential(nn.Linear(4, 4), nn.ReLU(),
                                                                                nn.Linear(4, 2)).eval(),
                                                                  (torch.randn(b, 4),)))
    first = dataset.lowered(wider, 1)
    second = dataset.lowered(_tiny_variant(4), 1)
    assert len(first.graph_module.graph.nodes) > len(second.graph_module.graph.nodes)


def test_the_flushed_protocol_is_kept_apart_and_read_as_one(tmp_path: Path) -> None:
    """Latencies measured with subnormals flushed go under their own keys: both protocols live in one
    database, each is resumed and read on its own, a mixed read is refused, and training records which."""
    from morphc.predictors.cost_model import CostModelWarning, TrainItem, train

    db = RecordsDB(tmp_path / "corpus.sqlite")
    variants = [_tiny_variant(4)]
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001) == 1
    assert load_samples(db)[0].config.flush_denormal is False  # the one protocol it has
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001, flush_denormal=True) == 1
    assert collect_corpus(db, variants, batches=(1,), show_progress=False, target_s=0.001, flush_denormal=True) == 0
    with pytest.raises(RecordsError, match="both with and without subnormals flushed"):
        load_samples(db)
    flushed = load_samples(db, flush_denormal=True)
    assert len(flushed) == 2 and all(s.config.flush_denormal and s.runtime is not None for s in flushed)
    assert len(load_samples(db, flush_denormal=False)) == 2
    items = [TrainItem(s.graph, s.config, s.latency_ms, s.runtime) for s in flushed]
    model, _ = train(items, steps=2, members=1, show_progress=False)
    assert model.meta["flush_denormal"] is True
    with pytest.warns(CostModelWarning, match="measured with subnormals flushed to zero, the query asks for"):
        model.predict_ms(dataset.lowered(variants[0], 1), CpuConfig(threads=1))
