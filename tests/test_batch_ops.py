"""batch-ops: parallel same-shape ops with different weights become one grouped/batched op.

Exactness on random programs is the property test's job (tests/test_properties.py covers every
semantics-preserving pass); here: that the pass fires where it should (op counts before/after),
on the strategies' programs too, that it leaves alone what it must, and its options.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_outputs_close, count_ops
from hypothesis import Phase, find, settings
from strategies import build_models, make_input, multi_task_specs
from torch import nn

import morphc
from morphc import zoo
from morphc.errors import PassOptionError, PipelineSyntaxError
from morphc.passes import PassContext, PassManager
from morphc.passes.batch_ops import BatchOps


def _ctx() -> PassContext:
    return PassContext(verify_each=True, reproducer_dir=None)


class SmallCNN(nn.Module):
    """A small CNN (conv-bn-relu, pool, conv-relu, global pool, linear): one architecture, many tasks."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fine_tuned_cnns(n: int, seed: int = 0) -> dict[str, nn.Module]:
    """n copies of one architecture with different weights and batch-norm statistics."""
    models = {}
    for i in range(n):
        torch.manual_seed(seed + i)
        m = SmallCNN()
        with torch.no_grad():
            bn = m.features[1]
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.3)
            bn.bias.normal_(0, 0.2)
        models[f"task{i}"] = m.eval()
    return models


def reference(models: dict[str, nn.Module], *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: m(*inputs) for name, m in models.items()}


@pytest.mark.parametrize("pipeline", ["batch-ops", "fold-batchnorm,batch-ops"])
def test_three_fine_tuned_cnns_become_one_batched_tower(pipeline: str) -> None:
    models = fine_tuned_cnns(3)
    x = torch.randn(2, 3, 16, 16)
    program = morphc.lower(models, x)
    assert (count_ops(program, "conv2d"), count_ops(program, "relu"), count_ops(program, "linear")) == (6, 6, 3)
    result = PassManager(pipeline).run(program, _ctx())
    # every layer runs once for all three tasks: 2 convs (the second grouped), 2 relus, 1 pool, one bmm head
    assert count_ops(result, "conv2d") == 2
    assert count_ops(result, "relu") == 2
    assert count_ops(result, "max_pool2d") == 1
    assert count_ops(result, "adaptive_avg_pool2d") == 1
    assert count_ops(result, "linear") == 0 and count_ops(result, "baddbmm") == 1
    assert count_ops(result, "_native_batch_norm_legit_no_training") == (0 if "fold" in pipeline else 1)
    grouped = [n for n in result.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default]
    assert sorted(n.args[6] if len(n.args) > 6 else 1 for n in grouped) == [1, 3]
    for inp in (x, torch.randn(2, 3, 16, 16)):
        assert_outputs_close(result(inp), reference(models, inp), rtol=1e-5, atol=1e-5)
    assert len(result.parameters()) < len(program.parameters())  # per-task tensors replaced by packed ones


def test_counts_statistics_and_is_idempotent() -> None:
    models = fine_tuned_cnns(4)
    x = torch.randn(1, 3, 8, 8)
    program = morphc.lower(models, x)
    result = BatchOps().run(program.clone(), _ctx())
    assert result.modified
    stats = result.statistics
    assert stats["shared-input-groups"] == 1 and stats["separate-input-groups"] == 0
    assert stats["ops-batched"] == 4 * 9  # conv, bn, relu, pool, conv, relu, pool, flatten, linear per task
    assert stats["groups"] == 9
    once = PassManager("batch-ops").run(program, _ctx())
    again = BatchOps().run(once.clone(), _ctx())
    assert not again.modified, "a second run must find nothing left to batch"


def test_qkv_projections_become_one_linear() -> None:
    class Attention(nn.Module):
        def __init__(self, d: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.heads = heads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, d = x.shape
            q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.o(y.transpose(1, 2).reshape(b, s, d))

    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    program = morphc.lower({"enc": model}, x)
    assert count_ops(program, "linear") == 4
    result = PassManager("batch-ops").run(program, _ctx())
    assert count_ops(result, "linear") == 2  # q/k/v -> one (16 -> 48) linear, plus the output projection
    fused = [n for n in result.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
             and result.meta(n).shape == (2, 5, 48)]
    assert len(fused) == 1
    assert_outputs_close(result(x), reference({"enc": model}, x))


def test_different_output_widths_on_one_input() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.relu(self.a(x)), torch.sigmoid(self.b(x)), self.c(x)

    torch.manual_seed(1)
    model = Heads().eval()
    x = torch.randn(2, 3, 6, 6)
    program = morphc.lower({"heads": model}, x)
    result = PassManager("batch-ops").run(program, _ctx())
    assert count_ops(result, "conv2d") == 2  # the two 3x3 convs (4 and 8 channels) merged; the 1x1 one alone
    split = next(n for n in result.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default)
    assert list(split.args[1]) == [4, 8]
    assert_outputs_close(result(x), program(x))


@pytest.mark.parametrize("batch", [1, 2])
def test_views_of_slices_and_outputs_stay_valid(batch: int) -> None:
    """After merging, each model sees a strided slice of the packed tensor: a `view` of it would fail
    and an output slice would surprise callers that `view` it, so the pass reshapes / copies."""
    class TwoWays(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            a, b = self.a(x), self.b(x)
            return a.view(a.shape[0], -1), b.mean((2, 3)), b

    torch.manual_seed(3)
    model = TwoWays().eval()
    x = torch.randn(batch, 3, 5, 5)
    program = morphc.lower({"m": model}, x)
    result = PassManager("batch-ops").run(program, _ctx())
    assert count_ops(result, "conv2d") == 1 and count_ops(result, "view") == 0
    # a channel slice is contiguous at batch 1 (no copy needed), strided at batch 2 (two outputs copied)
    assert count_ops(result, "clone") == (0 if batch == 1 else 2)
    got = result(x)
    assert_outputs_close(got, program(x))
    for value in got.values():
        value.view(-1)  # contiguous, like the model's own outputs


def test_separate_inputs_become_grouped_convolutions() -> None:
    models = list(fine_tuned_cnns(3, seed=5).values())
    wrapper = zoo.SeparateInputs(models).eval()
    xs = tuple(torch.randn(2, 3, 8, 8) for _ in models)
    program = morphc.lower({"all": wrapper}, xs)
    result = PassManager("fold-batchnorm,batch-ops").run(program, _ctx())
    assert count_ops(result, "conv2d") == 2 and count_ops(result, "cat") == 1
    assert count_ops(result, "linear") == 0
    convs = [n for n in result.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert all(n.args[6] == 3 for n in convs)  # groups = 1 x 3 models
    assert_outputs_close(result(*xs), program(*xs))
    off = PassManager("fold-batchnorm,batch-ops{separate-inputs=none}").run(program, _ctx())
    assert count_ops(off, "conv2d") == 6


def test_separate_input_linears_only_when_asked() -> None:
    torch.manual_seed(4)
    mlps = [nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval() for _ in range(3)]
    xs = tuple(torch.randn(4, 6) for _ in mlps)
    program = morphc.lower({"mlps": zoo.SeparateInputs(mlps).eval()}, xs)
    default = PassManager("batch-ops").run(program, _ctx())
    assert count_ops(default, "linear") == 6  # default: separate inputs only for convs
    batched = PassManager("batch-ops{separate-inputs=all}").run(program, _ctx())
    assert count_ops(batched, "linear") == 0 and count_ops(batched, "baddbmm") == 2
    assert count_ops(batched, "gelu") == 1
    assert_outputs_close(batched(*xs), program(*xs))


def test_input_computed_late_reorders_the_graph() -> None:
    """The second conv's input comes after the first conv's users in graph order: the batched conv
    goes after it and the graph is re-sorted so every node still follows its inputs."""
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.a(torch.relu(x)) * 2.0
            return z, self.b(torch.sigmoid(x))

    torch.manual_seed(5)
    model = Late().eval()
    x = torch.randn(1, 3, 6, 6)
    program = morphc.lower({"late": model}, x)
    result = BatchOps().run(program.clone(), _ctx())
    assert result.statistics["separate-input-groups"] == 1
    result.program.mark_modified()
    morphc.verify(result.program)
    assert count_ops(result.program, "conv2d") == 1 and count_ops(result.program, "cat") == 1
    assert_outputs_close(result.program(x), program(x))


def test_dependent_ops_are_not_batched() -> None:
    """Three identical convs in a chain: batching any two would need a value before it exists."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 5, 5)
    program = morphc.lower({"chain": model}, x)
    result = BatchOps().run(program.clone(), _ctx())
    assert not result.modified
    assert count_ops(result.program, "conv2d") == 3


def test_options_limit_what_is_batched() -> None:
    models = fine_tuned_cnns(3)
    x = torch.randn(1, 3, 8, 8)
    program = morphc.lower(models, x)
    untouched = PassManager("batch-ops{min-group=4}").run(program, _ctx())
    assert count_ops(untouched, "conv2d") == 6
    pairs = PassManager("batch-ops{max-group=2,separate-inputs=none}").run(program, _ctx())
    assert count_ops(pairs, "conv2d") == 3 + 1  # one pair batched (2 convs), the third model alone (2 convs)
    linear_only = PassManager("batch-ops{ops=linear,separate-inputs=all}").run(program, _ctx())
    assert count_ops(linear_only, "conv2d") == 6 and count_ops(linear_only, "linear") == 0
    for p in (untouched, pairs, linear_only):
        assert_outputs_close(p(x), reference(models, x))


@pytest.mark.parametrize(("text", "message"), [
    ("batch-ops{min-group=1}", "min-group.*>= 2"),
    ("batch-ops{max-group=2,min-group=3}", "max-group.*0 \\(no limit\\) or >= min-group"),
    ("batch-ops{ops=attention}", "comma-separated list of conv, linear"),
    ('batch-ops{ops=""}', "comma-separated list"),
])
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(PipelineSyntaxError, match=message):
        morphc.Pipeline.parse(text)


def test_bad_options_from_python() -> None:
    with pytest.raises(PassOptionError, match="min-group"):
        BatchOps(min_group=0)
    with pytest.raises(PassOptionError, match=r"'ops'.*got 'conv,bmm'"):
        BatchOps(ops="conv,bmm")


def test_pipeline_text_round_trips() -> None:
    text = 'batch-ops{min-group=3,max-group=8,ops=conv,separate-inputs=all}'
    assert str(morphc.Pipeline.parse(text)) == text
    assert str(morphc.Pipeline.parse('batch-ops{ops="conv,linear"}')) == "batch-ops"


def test_onnxruntime_target_runs_batched_program() -> None:
    pytest.importorskip("onnxruntime")
    models = fine_tuned_cnns(3)
    x = torch.randn(2, 3, 8, 8)
    program = morphc.lower(models, x)
    exe = PassManager("fold-batchnorm,batch-ops,compile{target=onnxruntime}").run(program, _ctx())
    assert exe.report.target == "onnxruntime"
    assert_outputs_close(exe(x), reference(models, x), atol=1e-4)


def _groups(spec) -> int:
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    return int(BatchOps().run(program, _ctx()).statistics["groups"])


@pytest.mark.parametrize("least", [1, 3])
def test_strategies_generate_programs_where_it_fires(least: int) -> None:
    """The property test only means something for batch-ops if its random programs contain parallel
    twins: perturbed copies of a task or of the shared prefix. Find one where >= `least` groups form."""
    spec = find(multi_task_specs(), lambda s: _groups(s) >= least,
                settings=settings(max_examples=300, phases=[Phase.generate], database=None, deadline=None))
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    result = PassManager("batch-ops").run(program, _ctx())
    assert_outputs_close(result(make_input(spec)), program(make_input(spec)))
