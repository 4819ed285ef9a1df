"""Mutators: every mutation keeps the graph valid, histories replay exactly, merges cut at block boundaries."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_models, examples, make_input, multi_task_specs

import morphc
from morphc.ir.provenance import FusionAdapter, FusionProvenance
from morphc.passes import mutators as M
from morphc.zoo import cnn

MUTATORS = (M.InputMutator(), M.OperatorMutator(), M.InsertMutator(), M.MergeMutator(),
            M.MergeMutator(adapters=False))


def _shapes(outputs: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in outputs.items()}


@settings(max_examples=examples(10))
@given(spec=multi_task_specs(max_tasks=3, max_ops=5), seed=st.integers(0, 2**16), n=st.integers(1, 5))
def test_random_mutation_sequences_keep_programs_valid_and_replay_exactly(spec, seed: int, n: int) -> None:
    models = build_models(spec)
    x = make_input(spec)
    original = morphc.lower(models, x)
    expected = _shapes(original(x))
    program = original.clone()
    rng = random.Random(seed)
    sampler = M.RandomSampler(seed)
    applied = 0
    for _ in range(n):
        mutator = rng.choice(MUTATORS)
        try:
            mutator.apply(program, sampler)
        except M.NoCandidates:
            continue
        applied += 1
        morphc.verify(program)
        assert list(program.tasks) == list(original.tasks)
        assert _shapes(program(x)) == expected, f"after {mutator.name}"
    records = M.history(program)
    assert len(records) == applied
    rebuilt = M.replay(original, records)
    assert M.structure_digest(rebuilt) == M.structure_digest(program)
    for name, got in rebuilt(x).items():
        torch.testing.assert_close(got, program(x)[name], rtol=0, atol=0)
    # save/load keeps the provenance; replaying the loaded history gives the same program again
    reloaded = M.history(_roundtrip(program))
    assert [r.key() for r in reloaded] == [r.key() for r in records]


def _roundtrip(program: morphc.Program) -> morphc.Program:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.safetensors"
        morphc.save(program, path)
        return morphc.load(path)


@settings(max_examples=examples(5))
@given(spec=multi_task_specs(max_tasks=3, max_ops=5), seed=st.integers(0, 2**16))
def test_insert_mutator_preserves_outputs(spec, seed: int) -> None:
    models = build_models(spec)
    x = make_input(spec)
    original = morphc.lower(models, x)
    program = original.clone()
    try:
        M.InsertMutator().apply(program, M.RandomSampler(seed))
    except M.NoCandidates:
        return
    for name, ref in original(x).items():
        torch.testing.assert_close(program(x)[name], ref, rtol=1e-5, atol=1e-5)


@functools.cache
def _three_cnns(batch: int = 2) -> tuple[morphc.Program, torch.Tensor]:
    """Three CNNs (two residual, one with an inception block) as one Program; lowered once per batch size
    (tests mutate clones only)."""
    torch.manual_seed(0)
    models = {"a": cnn.ResNetBlockCNN().eval(), "b": cnn.BranchyCNN().eval(), "c": cnn.ResNetBlockCNN(width=8).eval()}
    x = torch.randn(batch, 3, 16, 16)
    return morphc.lower(models, x), x


def test_merges_undone_give_the_originals_exactly() -> None:
    original, x = _three_cnns()
    fused = original.clone()
    sampler = M.RandomSampler(3)
    for _ in range(4):
        M.MergeMutator().apply(fused, sampler)
    morphc.verify(fused)
    assert len(list(fused.graph.nodes)) < len(list(original.graph.nodes))  # layers are shared now
    outputs = fused(x)
    assert any(not torch.equal(outputs[t], original(x)[t]) for t in original.tasks)
    undone = M.replay(original, [r for r in M.history(fused) if r.mutator != "merge"])
    assert M.program_digest(undone) == M.program_digest(original)
    assert str(undone).replace(str(undone.annotation(FusionProvenance) or ""), "") == str(original)
    for t, ref in original(x).items():
        assert torch.equal(undone(x)[t], ref)
    # the recorded history rebuilds the fused model exactly (also at another batch size)
    redone = M.replay(original, M.history(fused))
    for t, ref in outputs.items():
        assert torch.equal(redone(x)[t], ref)
    original8, _x8 = _three_cnns(batch=8)
    at8 = M.replay(original8, M.history(fused))
    morphc.verify(at8)
    assert M.structure_digest(at8) != M.structure_digest(fused)  # other shapes, same wiring
    assert [n.name for n in at8.graph.nodes] == [n.name for n in fused.graph.nodes]


def test_cut_points_are_block_boundaries_of_residual_graphs() -> None:
    original, _ = _three_cnns()
    cuts = [n.name for n in M.cut_points(original, "a")]
    # stem output, residual block 1 output (it feeds block 2's two branches), pooled features, logits
    assert cuts == ["a_relu", "a_relu_2", "a_view", "a_linear"]
    inside = {"a_conv2d_1", "a_relu_1", "a_conv2d_2", "a_add"}  # residual block internals are never cut points
    assert not inside & set(cuts)
    for name in cuts:  # a cut point dominates: removing it disconnects the task's output from the input
        node = original.node(name)
        heavy = M.heavy_dataflow(original)
        assert node in heavy


def test_merge_with_adapter_and_provenance() -> None:
    original, x = _three_cnns()
    fused = original.clone()
    # c's stem output (8 channels) reuses a's stem output (16 channels): a 1x1 conv adapter
    record = M.MergeMutator().apply(fused, M.FixedSampler([("c_relu", "a_relu")]))
    assert record.choices == (("c_relu", "a_relu"),)
    adapters = [n for n in fused.graph.nodes if fused.annotation(FusionAdapter, n) is not None]
    assert len(adapters) == 1
    ann = fused.annotation(FusionAdapter, adapters[0])
    assert (ann.task, ann.replaces, ann.source) == ("c", "c_relu", "a_relu") and len(ann.params) == 2
    assert not any(n.name.startswith("c_conv2d") and n.name == "c_conv2d" for n in fused.graph.nodes)  # c's stem gone
    prov = fused.annotation(FusionProvenance)
    assert prov is not None and prov.original == M.program_digest(original) and len(prov.mutations) == 1
    assert _shapes(fused(x)) == _shapes(original(x))
    for t in ("a", "b"):
        assert torch.equal(fused(x)[t], original(x)[t])  # tasks that were not merged are untouched


def test_transformer_layers_merge_at_layer_boundaries() -> None:
    from morphc import zoo

    z1 = zoo.build("bert-small", batch_size=1, seed=0)
    z2 = zoo.build("bert-small", batch_size=1, seed=1)
    program = morphc.lower({"a": z1.model, "b": z2.model}, z1.example_inputs)
    cuts = M.cut_points(program, "b")
    assert len(cuts) >= 2  # embeddings output and each encoder layer's output (attention inside is not cut)
    assert all(n.meta["morphc"].op_class.value != "attention" for n in cuts)
    fused = program.clone()
    M.MergeMutator(adapters=False).apply(fused, M.FixedSampler([(cuts[1].name, M.cut_points(program, "a")[1].name)]))
    morphc.verify(fused)
    assert _shapes(fused(*z1.example_inputs)) == _shapes(program(*z1.example_inputs))


def test_replaying_a_foreign_choice_is_a_clear_error() -> None:
    original, _ = _three_cnns()
    with pytest.raises(M.MutationError, match="not valid in this program"):
        M.MergeMutator().apply(original.clone(), M.FixedSampler([("no_such_node", "a_relu")]))
    with pytest.raises(M.MutationError, match="unknown mutator"):
        M.replay(original, [M.MutationRecord("shuffle", (), ())])
