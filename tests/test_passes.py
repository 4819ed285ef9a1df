"""Unit tests of the built-in passes, with exact node counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CountOps, assert_outputs_close, call_nodes, count_ops
from torch import nn

import morphc
from morphc import zoo
from morphc.ir.annotations import PipelineHistory, SharedBy
from morphc.ir.metadata import MODULE_PATH_KEY
from morphc.ir.program import Program
from morphc.passes import PassContext, PassTiming

aten = torch.ops.aten


def n_modules(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


BATCH_NORM = "_native_batch_norm_legit_no_training"  # eval batch norm in the functional IR


def run(program: Program, text: str, **ctx: object) -> Program:
    ctx.setdefault("verify_each", True)
    ctx.setdefault("reproducer_dir", None)
    return morphc.Pipeline.parse(text).run(program, PassContext(**ctx))


def expected_outputs(models: dict[str, nn.Module], *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: m(*inputs) for name, m in models.items()}


# --- cse -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins() -> tuple[dict[str, nn.Module], tuple[torch.Tensor, ...], Program]:
    models, inputs = zoo.twin_tasks(batch_size=2)
    return models, inputs, morphc.lower(models, inputs)


def test_cse_runs_the_shared_prefix_once(twins) -> None:
    models, inputs, program = twins
    prefix_convs = n_modules(models["classify"].prefix, nn.Conv2d)
    head_convs = {name: n_modules(m.head, nn.Conv2d) for name, m in models.items()}
    assert prefix_convs == 6 and head_convs == {"classify": 0, "regress": 1}  # what the counts below rely on
    n_linear = sum(n_modules(m, nn.Linear) for m in models.values())

    assert count_ops(program, "conv2d") == 2 * prefix_convs + 1
    result = run(program, "cse")
    assert count_ops(result, "conv2d") == prefix_convs + 1
    assert count_ops(result, BATCH_NORM) == prefix_convs + 1
    assert count_ops(result, "linear") == n_linear  # heads differ: nothing merged there

    # at run time too: the merged program executes each prefix convolution once
    with CountOps() as before:
        program(*inputs)
    with CountOps() as after:
        result(*inputs)
    assert before.counts["convolution"] == 2 * prefix_convs + 1
    assert after.counts["convolution"] == prefix_convs + 1

    assert_outputs_close(result(*inputs), expected_outputs(models, *inputs))
    x_new = torch.randn_like(inputs[0])
    assert_outputs_close(result(x_new), expected_outputs(models, x_new))


def test_cse_annotates_the_shared_nodes(twins) -> None:
    _, _, program = twins
    result = run(program, "cse")
    shared = [n for n in call_nodes(result) if result.annotation(SharedBy, n) is not None]
    prefix_nodes = [n for n in call_nodes(result) if n.meta[MODULE_PATH_KEY].startswith("classify.prefix")]
    assert prefix_nodes and set(shared) == set(prefix_nodes)
    for node in shared:
        assert result.annotation(SharedBy, node) == SharedBy(("classify", "regress"))
    assert not any(result.annotation(SharedBy, n) for n in call_nodes(result)
                   if n.meta[MODULE_PATH_KEY].startswith(("classify.head", "regress.head")))
    assert "@shared-by(tasks=(\"classify\", \"regress\"))" in str(result)


def test_cse_statistics_and_freed_parameters(twins) -> None:
    models, _, program = twins
    timing = PassTiming()
    result = run(program, "cse", instruments=[timing])
    (record,) = timing.records
    prefix = models["classify"].prefix
    prefix_tensors = len(list(prefix.parameters())) + len([b for b in prefix.buffers() if b.is_floating_point()])
    assert record.statistics["params-merged"] >= prefix_tensors
    merged = record.statistics["ops-merged"] + record.statistics["params-merged"]
    assert merged == record.nodes_before - record.nodes_after
    assert record.statistics["param-bytes-freed"] > 0
    assert result.param_bytes() < program.param_bytes()
    assert result.param_bytes() == program.param_bytes() - record.statistics["param-bytes-freed"]


def test_cse_does_not_merge_different_weights() -> None:
    models, inputs = zoo.twin_tasks()
    with torch.no_grad():  # one element of one prefix weight differs
        models["regress"].prefix[2].conv2.weight[0, 0, 0, 0] += 1e-3
    program = morphc.lower(models, inputs)
    result = run(program, "cse")
    # everything up to (and excluding) the changed conv is shared, the rest of the prefix is not
    assert count_ops(result, "conv2d") == count_ops(program, "conv2d") - 5
    assert_outputs_close(result(*inputs), expected_outputs(models, *inputs))


def test_cse_does_not_merge_independent_models() -> None:
    models = {"a": zoo.build("branchy_cnn", seed=0).model, "b": zoo.build("branchy_cnn", seed=1).model}
    x = torch.randn(1, 3, 32, 32)
    program = morphc.lower(models, x)
    result = run(program, "cse")
    assert count_ops(result, "conv2d") == count_ops(program, "conv2d") > 0
    assert not any(result.annotation(SharedBy, n) for n in call_nodes(result))


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.rand_like(x)) * (x + torch.rand_like(x))


def test_cse_does_not_merge_nondeterministic_ops() -> None:
    program = morphc.lower(Noisy().eval(), torch.randn(2, 3))
    assert count_ops(program, "rand_like") == 2
    assert count_ops(program, "add") == 2
    result = run(program, "cse")
    assert count_ops(result, "rand_like") == 2
    assert count_ops(result, "add") == 2  # the adds read different random tensors


class Repeated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) + torch.tanh(self.lin(x)) * 2


def test_cse_merges_within_one_model() -> None:
    program = morphc.lower(Repeated().eval(), torch.randn(2, 4))
    assert (count_ops(program, "linear"), count_ops(program, "tanh")) == (2, 2)
    result = run(program, "cse")
    assert (count_ops(result, "linear"), count_ops(result, "tanh")) == (1, 1)
    # within one task nothing is "shared by" several tasks
    assert not any(result.annotation(SharedBy, n) for n in call_nodes(result))


class InPlace(nn.Module):
    """Two equal convolutions, one updated in place before the other is read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a += 1.0
        b = self.conv(x)
        return a * b


def test_lowering_functionalizes_in_place_updates_so_cse_merges_safely() -> None:
    """Regression: merging `b` into `a` made `b` see the `+= 1` applied to `a`. Lowering now
    functionalizes (`add_` becomes `add`), so the two equal convolutions merge and stay correct."""
    model = InPlace().eval()
    x = torch.randn(1, 3, 6, 6)
    program = morphc.lower(model, x)
    assert count_ops(program, "add_") == 0 and count_ops(program, "add") == 1
    assert count_ops(program, "conv2d") == 2
    result = run(program, "cse")
    assert count_ops(result, "conv2d") == 1
    assert_outputs_close(result(x), expected_outputs({"model": model}, x))


# --- dce -----------------------------------------------------------------------------------------


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_dce_removes_dead_nodes_and_their_parameters() -> None:
    program = morphc.lower(LinearBN().eval(), torch.randn(2, 4))
    # lowering keeps the unused num_batches_tracked buffer: the one dead node to start with
    dead = [n.name for n in program.graph.nodes if not n.users and n.op not in ("placeholder", "output")]
    assert dead == ["bn_num_batches_tracked"]
    # add a dead chain: a parameter read only by a mul read by nothing
    program = program.clone()
    program.graph_module.register_buffer("unused_scale", torch.ones(4))
    x = program.placeholders()[0]
    with program.graph.inserting_after(x):
        scale = program.graph.get_attr("unused_scale")
    with program.graph.inserting_after(scale):
        program.graph.call_function(aten.mul.Tensor, (x, scale))
    program.mark_modified()
    n_before = len(program.graph.nodes)

    timing = PassTiming()
    result = run(program, "dce", instruments=[timing])
    assert len(result.graph.nodes) == n_before - 3
    assert timing.records[0].statistics["nodes-removed"] == 3
    assert timing.records[0].statistics["param-bytes-freed"] == 4 * 4 + 8  # f32[4] + the i64 counter
    assert not hasattr(result.graph_module, "unused_scale")
    assert "unused_scale" not in result.parameters() and "bn_num_batches_tracked" not in result.parameters()
    x_in = torch.randn(2, 4)
    assert torch.equal(result(x_in)["model"], program(x_in)["model"])


def test_dce_keeps_live_and_impure_nodes() -> None:
    program = morphc.lower(LinearBN().eval(), torch.randn(2, 4)).clone()
    x = program.placeholders()[0]
    with program.graph.inserting_after(x):
        program.graph.call_function(aten.rand_like.default, (x,))  # unused, but not pure
    program.mark_modified()
    result = run(program, "dce")
    assert count_ops(result, "rand_like") == 1
    assert count_ops(result, "linear") == 1 and count_ops(result, BATCH_NORM) == 1
    again = run(result, "dce")
    assert len(again.graph.nodes) == len(result.graph.nodes)  # nothing left to remove


def test_dce_reports_unmodified() -> None:
    program = run(morphc.lower(LinearBN().eval(), torch.randn(2, 4)), "dce")
    timing = PassTiming()
    run(program, "dce", instruments=[timing])
    assert timing.records[0].modified is False


# --- fold-constants -------------------------------------------------------------------------------


class ConstChains(nn.Module):
    """A weight transposed twice and scaled, a scaled buffer, and a position range: all foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.register_buffer("big", torch.randn(64, 64))  # 16 KB once folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t().t() * 2.0  # t, t, mul: a parameter-only chain
        y = F.linear(x, w)  # [B, 6]
        pos = torch.arange(6, dtype=x.dtype)  # a creation op: no input at all
        big = (self.big * 0.5).sum(0)[:6]  # mul is 16 KB; sum/slice are small
        return y + pos + big


def test_fold_constants_folds_parameter_only_chains() -> None:
    model = ConstChains().eval()
    x = torch.randn(3, 8)
    program = morphc.lower(model, x)
    ops = [str(n.target) for n in call_nodes(program)]
    assert ops.count("aten.t.default") == 2 and count_ops(program, "arange") == 1
    timing = PassTiming()
    result = run(program, "fold-constants", instruments=[timing])
    # what is left reads the input: linear and the two adds
    assert sorted(str(n.target) for n in call_nodes(result)) == ["aten.add.Tensor", "aten.add.Tensor",
                                                                  "aten.linear.default"]
    stats = timing.records[0].statistics
    assert stats["values-folded"] == 3  # the weight chain, the range, the buffer chain
    linear = next(n for n in call_nodes(result) if n.target is aten.linear.default)
    folded_weight = result.tensor(str(linear.args[1].target))
    assert torch.equal(folded_weight, model.weight.detach() * 2.0)
    assert_outputs_close(result(x), expected_outputs({"model": model}, x))
    assert "big" not in result.parameters() and "weight" not in result.parameters()


class TwoSizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("big", torch.randn(64, 64))
        self.register_buffer("small", torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [64, 64]
        return (x + self.big * 0.5) * (self.small * 3.0).sum()  # f32[64, 64] (16 KB) and f32[] constants


def test_fold_constants_respects_max_mb() -> None:
    model = TwoSizes().eval()
    x = torch.randn(64, 64)
    program = morphc.lower(model, x)
    timing = PassTiming()
    result = run(program, "fold-constants{max-mb=0.01}", instruments=[timing])  # 10 KB
    assert timing.records[0].statistics["values-folded"] == 1
    assert timing.records[0].statistics["folded-bytes"] == 4
    assert [str(n.target) for n in call_nodes(result)] == ["aten.mul.Tensor", "aten.add.Tensor", "aten.mul.Tensor"]
    assert result.node("mul").args == (result.node("big"), 0.5)  # the 16 KB value is still computed
    assert count_ops(result, "sum") == 0
    assert_outputs_close(result(x), expected_outputs({"model": model}, x))

    everything = run(program, "fold-constants{max-mb=1.0}")
    assert [str(n.target) for n in call_nodes(everything)] == ["aten.add.Tensor", "aten.mul.Tensor"]
    nothing = run(program, "fold-constants{max-mb=0.0}")
    assert [str(n.target) for n in call_nodes(nothing)] == [str(n.target) for n in call_nodes(program)]


class InPlaceConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * 2.0
        w += x.sum()  # updated in place with an input-dependent value
        return x * w


def test_fold_constants_does_not_fold_values_updated_in_place() -> None:
    """Regression: `w = weight * 2` was folded into a stored constant that `w +=` then updated on
    every call, so each call saw the previous call's value."""
    model = InPlaceConstant().eval()
    x = torch.randn(3, 4)
    program = morphc.lower(model, x)
    result = run(program, "fold-constants")
    for _ in range(3):
        assert_outputs_close(result(x), expected_outputs({"model": model}, x))


class ConstantOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.t().t() * 2.0  # does not read x at all


def test_fold_constants_keeps_outputs_fresh_tensors() -> None:
    """Regression: a folded output was the stored constant itself, so a caller updating the
    result in place changed what every later call returned."""
    model = ConstantOutput().eval()
    x = torch.randn(1)
    result = run(morphc.lower(model, x), "fold-constants")
    assert [str(n.target) for n in call_nodes(result)] == ["aten.mul.Tensor"]  # the transposes are folded
    first = result(x)["model"]
    first.add_(100.0)
    assert_outputs_close(result(x), expected_outputs({"model": model}, x))


class Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(4)


def test_fold_constants_leaves_nondeterministic_and_input_dependent_nodes() -> None:
    program = morphc.lower(Random().eval(), torch.randn(2, 4))
    result = run(program, "fold-constants")
    assert count_ops(result, "rand") == 1 and count_ops(result, "add") == 1


# --- fold-batchnorm -----------------------------------------------------------------------------


def test_fold_batchnorm_removes_batch_norms_after_convs(twins) -> None:
    models, inputs, program = twins
    result = run(program, "fold-batchnorm")
    assert count_ops(program, BATCH_NORM) == count_ops(program, "conv2d") == 13
    assert count_ops(result, BATCH_NORM) == 0
    assert count_ops(result, "conv2d") == 13
    assert_outputs_close(result(*inputs), expected_outputs(models, *inputs), atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_without_a_foldable_pair_still_reports_its_clean_up() -> None:
    """Regression: with nothing to fold, the pass still erased the unused num_batches_tracked
    reads but returned modified=False, so the program ran stale code reading a deleted tensor."""
    model = LinearBN().eval()
    x = torch.randn(2, 4)
    timing = PassTiming()
    result = run(morphc.lower(model, x), "fold-batchnorm", instruments=[timing])
    assert timing.records[0].statistics["batchnorms-folded"] == 0
    assert timing.records[0].modified
    assert "bn_num_batches_tracked" not in result.parameters()
    assert_outputs_close(result(x), expected_outputs({"model": model}, x))


# --- PassContext: opt_level, disabled passes ------------------------------------------------------


def test_opt_level_skips_passes_above_it(twins) -> None:
    _, _, program = twins
    timing = PassTiming()
    result = run(program, "cse,dce", opt_level=0, instruments=[timing])
    assert morphc.registered_passes()["cse"].opt_level > 0 and morphc.registered_passes()["dce"].opt_level == 0
    assert [r.pass_text for r in timing.records] == ["dce"]
    assert count_ops(result, "conv2d") == 13  # not merged


def test_disabled_passes_are_skipped(twins) -> None:
    _, _, program = twins
    timing = PassTiming()
    result = run(program, "cse,dce", disabled_passes=frozenset({"cse"}), instruments=[timing])
    assert [r.pass_text for r in timing.records] == ["dce"]
    assert count_ops(result, "conv2d") == 13
    enabled = run(program, "cse,dce", disabled_passes=frozenset({"dce"}))
    assert count_ops(enabled, "conv2d") == 7


def test_terminal_pass_runs_whatever_the_opt_level(twins) -> None:
    _, _, program = twins
    exe = run(program, "cse,compile", opt_level=0)
    assert isinstance(exe, morphc.Executable)
    assert count_ops(exe.program, "conv2d") == 13


# --- the PassManager leaves its input alone and records history -----------------------------------


def test_pipeline_run_does_not_modify_its_input(twins) -> None:
    _, inputs, program = twins
    text, params = str(program), dict(program.parameters())
    outputs = program(*inputs)
    for pipeline in ("fold-constants,cse,fold-batchnorm,dce", "cse,compile"):
        run(program, pipeline)
    assert str(program) == text
    assert program.annotation(PipelineHistory) is None
    assert set(program.parameters()) == set(params)
    assert all(program.tensor(k) is v for k, v in params.items())
    for name, value in program(*inputs).items():
        assert torch.equal(value, outputs[name])


def test_pipeline_history_is_recorded(twins) -> None:
    _, _, program = twins
    first = run(program, "fold-constants{max-mb=1.0},cse")
    assert first.annotation(PipelineHistory) == PipelineHistory(("fold-constants{max-mb=1.0},cse",))
    second = run(first, "dce")
    assert second.annotation(PipelineHistory) == PipelineHistory(("fold-constants{max-mb=1.0},cse", "dce"))
    assert first.annotation(PipelineHistory) == PipelineHistory(("fold-constants{max-mb=1.0},cse",))
    assert '@pipeline-history(pipelines=("fold-constants{max-mb=1.0},cse", "dce"))' in str(second)
    empty = run(program, "")
    assert empty.annotation(PipelineHistory) == PipelineHistory(("",))


class NoOps(nn.Module):
    """Eval dropout, a cast to the dtype it has, a reshape to the shape it has, and a returned copy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.drop(self.fc(x)).to(torch.float32).reshape(2, 4)
        return torch.tanh(y), y, y.clone()


def test_canonicalize_removes_ops_that_compute_nothing() -> None:
    model = NoOps().eval()
    x = torch.randn(2, 4)
    program = morphc.lower(model, x)
    assert count_ops(program, "clone") == 2  # eval dropout became a clone, plus the returned copy
    result = run(program, "canonicalize")
    assert count_ops(result, "clone") == 1  # the returned copy stays: outputs never alias
    assert count_ops(result, "reshape") + count_ops(result, "view") == 0
    assert count_ops(result, "_to_copy") == 0
    out = result(x)
    expected = model(x)
    torch.testing.assert_close(out["model.0"], expected[0])
    torch.testing.assert_close(out["model.1"], expected[1])
    torch.testing.assert_close(out["model.2"], expected[2])
    assert out["model.1"].data_ptr() != out["model.2"].data_ptr()  # the returned copy is still a copy


def test_canonicalize_keeps_casts_and_reshapes_that_change_something() -> None:
    class Casts(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float64).reshape(8) * 2

    program = morphc.lower(Casts().eval(), torch.randn(2, 4))
    result = run(program, "canonicalize")
    assert count_ops(result, "_to_copy") == 1
    assert count_ops(result, "reshape") + count_ops(result, "view") == 1


class _TwoAttentions(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        a = F.scaled_dot_product_attention(q, q, q)
        b = F.scaled_dot_product_attention(q, q, q)
        return a + b


def test_attention_without_dropout_is_pure_so_cse_and_dce_see_it() -> None:
    """scaled_dot_product_attention carries a 'nondeterministic_seeded' tag for its dropout; at
    dropout_p=0 it is deterministic, and identical attentions merge (dead ones are removed)."""
    q = torch.randn(1, 2, 4, 8)
    program = morphc.lower(_TwoAttentions().eval(), (q,))
    assert count_ops(program, "scaled_dot_product_attention") == 2
    result = morphc.Pipeline.parse("cse,dce").run(program)
    assert count_ops(result, "scaled_dot_product_attention") == 1
    assert_outputs_close(result(q), program(q))
