"""torch.compile(backend="morphc"): registration, equality with eager, fallbacks, freeze guards, CSE."""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch._dynamo
from torch import nn

import morphc
from morphc import zoo
from morphc.ir.program import Program
from morphc.passes import Pass, PassContext, PassResult, PassTiming, register_pass
from morphc.runtime.dynamo import BackendOptionError, MorphcBackendWarning, morphc_backend


@register_pass
@dataclass(frozen=True)
class _Explode(Pass):
    """A pass that always fails: drives the backend's fallback path."""

    name: ClassVar[str] = "test-dynamo-explode"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom from a test pass")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager(model: nn.Module, *args: torch.Tensor):
    with torch.no_grad():
        return model(*args)


def _assert_matches(got, expected) -> None:
    """Equal to a tolerance relative to the output's magnitude (some zoo outputs are ~1e-25)."""
    flat = torch.utils._pytree.tree_leaves(expected)
    scale = max(t.abs().max().item() for t in flat)
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-4)


def _no_morphc_warnings(fn, *args):
    """Call fn; fail if the backend warned (a warning means it fell back instead of compiling)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    fell_back = [str(w.message) for w in caught if issubclass(w.category, MorphcBackendWarning)]
    assert not fell_back, fell_back
    return out


# --- registration ------------------------------------------------------------------------


def test_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert eps.get("morphc") == "morphc.runtime.dynamo:morphc_backend"
    assert "morphc" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("morphc") is morphc_backend


# --- equality with eager on every small zoo model ------------------------------------------


@pytest.mark.parametrize("name", zoo.names(size="small"))
def test_small_zoo_model_matches_eager(name: str):
    m = zoo.build(name, batch_size=2)
    expected = _eager(m.model, *m.example_inputs)
    timing = PassTiming()
    compiled = torch.compile(m.model, backend="morphc", options={"instruments": [timing]})
    got = _no_morphc_warnings(compiled, *m.example_inputs)
    _assert_matches(got, expected)
    again = _no_morphc_warnings(compiled, *m.example_inputs)  # the cached compiled graph
    _assert_matches(again, expected)
    assert any(r.pass_text.startswith("compile") for r in timing.records), "the morphc pipeline never ran"


def test_target_and_pipeline_options_are_used():
    m = zoo.build("tiny_mlp", batch_size=3)
    timing = PassTiming()
    opts = {"pipeline": "cse", "target": "eager", "verify_each": True, "instruments": [timing]}
    got = _no_morphc_warnings(torch.compile(m.model, backend="morphc", options=opts), *m.example_inputs)
    torch.testing.assert_close(got, _eager(m.model, *m.example_inputs))
    assert [r.pass_text.split("{")[0] for r in timing.records] == ["cse", "compile"]


# --- option errors, fallback, strict --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pipline": "cse"}, "no option 'pipline'.*did you mean 'pipeline'"),
        ({"target": "tpu"}, "option 'target' must be one of"),
        ({"strict": "yes"}, "option 'strict' must be True or False"),
        ({"pipeline": "cse,compile"}, "must not contain a terminal pass"),
        ({"pipeline": "cse,,dce"}, "expected a pass name"),
    ],
)
def test_invalid_options_raise(options, match):
    m = zoo.build("tiny_mlp")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match):
        torch.compile(m.model, backend="morphc", options=options)(*m.example_inputs)


def test_direct_call_rejects_bad_options():
    with pytest.raises(BackendOptionError, match="valid options: pipeline, target"):
        morphc_backend(torch.fx.symbolic_trace(nn.ReLU()), [torch.zeros(1)], {"bogus": 1})


def test_failing_pass_falls_back_with_warning():
    m = zoo.build("resnet_block_cnn", batch_size=2)
    compiled = torch.compile(m.model, backend="morphc", options={"pipeline": "cse,test-dynamo-explode"})
    with pytest.warns(MorphcBackendWarning, match=r"stage 'pipeline'.*pass 'test-dynamo-explode' failed.*boom"):
        got = compiled(*m.example_inputs)
    torch.testing.assert_close(got, _eager(m.model, *m.example_inputs))


class _CountingModel(nn.Module):
    """Mutates a buffer in forward(): a side effect a morphc Program cannot express."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) + self.calls


def test_mutating_graph_falls_back_and_strict_raises():
    x = torch.randn(2, 4)
    model, reference = _CountingModel().eval(), _CountingModel().eval()
    reference.load_state_dict(model.state_dict())
    with pytest.warns(MorphcBackendWarning, match="stage 'inputs'.*in place"):
        got = torch.compile(model, backend="morphc")(x)
    torch.testing.assert_close(got, _eager(reference, x))
    assert model.calls.item() == reference.calls.item() == 1  # compiling ran no extra side effect
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="stage 'inputs'"):
        torch.compile(_CountingModel().eval(), backend="morphc", options={"strict": True})(x)


def test_strict_raises_on_failing_pass():
    m = zoo.build("tiny_mlp")
    compiled = torch.compile(m.model, backend="morphc", options={"pipeline": "test-dynamo-explode", "strict": True})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="boom from a test pass"):
        compiled(*m.example_inputs)


def test_dynamic_shapes_fall_back():
    m = zoo.build("tiny_mlp")
    compiled = torch.compile(m.model, backend="morphc", dynamic=True)
    x = torch.randn(5, 32)
    with pytest.warns(MorphcBackendWarning, match="dynamic=False"):
        got = compiled(x)
    torch.testing.assert_close(got, _eager(m.model, x))


# --- freeze guard ---------------------------------------------------------------------------


def test_two_instances_through_one_compiled_function():
    a, b = zoo.build("resnet_block_cnn", seed=0), zoo.build("resnet_block_cnn", seed=1)
    x = a.example_inputs[0]
    assert not torch.allclose(_eager(a.model, x), _eager(b.model, x))  # a stale graph would be caught

    @torch.compile(backend="morphc")
    def run(model: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return model(inp)

    torch.testing.assert_close(_no_morphc_warnings(run, a.model, x), _eager(a.model, x))
    # Dynamo reuses the graph for another instance of the class; its weights are not the frozen ones
    with pytest.warns(MorphcBackendWarning, match="replaced or modified"):
        torch.testing.assert_close(run(b.model, x), _eager(b.model, x))
    torch.testing.assert_close(run(a.model, x), _eager(a.model, x))


def test_replaced_and_in_place_updated_weights():
    m = zoo.build("tiny_mlp", batch_size=2)
    x = m.example_inputs[0]
    compiled = torch.compile(m.model, backend="morphc")
    torch.testing.assert_close(_no_morphc_warnings(compiled, x), _eager(m.model, x))
    before = _eager(m.model, x)
    with torch.no_grad():
        m.model.fc1.bias.add_(1.0)  # same tensor object, new version
    assert not torch.allclose(before, _eager(m.model, x))
    with pytest.warns(MorphcBackendWarning, match="fc1_parameters_bias"):
        torch.testing.assert_close(compiled(x), _eager(m.model, x))
    m.model.fc3.weight = nn.Parameter(torch.randn_like(m.model.fc3.weight))  # new object
    torch.testing.assert_close(compiled(x), _eager(m.model, x))


def test_freeze_false_keeps_weights_as_inputs():
    m = zoo.build("tiny_mlp", batch_size=2)
    x = m.example_inputs[0]
    compiled = torch.compile(m.model, backend="morphc", options={"freeze": False})
    torch.testing.assert_close(_no_morphc_warnings(compiled, x), _eager(m.model, x))
    m.model.fc3.weight = nn.Parameter(torch.randn_like(m.model.fc3.weight))
    torch.testing.assert_close(_no_morphc_warnings(compiled, x), _eager(m.model, x))


# --- cross-model CSE through torch.compile --------------------------------------------------


class _BothTasks(nn.Module):
    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict(models)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tasks["classify"](x), self.tasks["regress"](x)


def test_twin_tasks_share_prefix_through_torch_compile():
    models, (x,) = zoo.twin_tasks(batch_size=2)
    both = _BothTasks(models).eval()
    timing = PassTiming()
    compiled = torch.compile(both, backend="morphc", options={"pipeline": "cse,dce", "instruments": [timing]})
    got = _no_morphc_warnings(compiled, x)
    expected = _eager(both, x)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got, expected)
    cse = next(r for r in timing.records if r.pass_text == "cse")
    # the second prefix (3 conv-bn blocks) is merged into the first: weights and the ops on them
    assert cse.statistics["params-merged"] > 0 and cse.statistics["ops-merged"] > 0
    assert cse.nodes_after < cse.nodes_before


def test_backend_is_importable_from_the_package():
    assert morphc.runtime.dynamo.morphc_backend is morphc_backend


def test_fake_example_inputs_compile_at_first_call():
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = zoo.build("tiny_mlp", batch_size=2)
    gm = torch.fx.symbolic_trace(m.model)
    x = m.example_inputs[0]
    fake = FakeTensorMode().from_tensor(x)
    compiled = morphc_backend(gm, [fake], {"strict": True})
    assert not isinstance(compiled, torch.fx.GraphModule)
    torch.testing.assert_close(compiled(x), _eager(m.model, x))
