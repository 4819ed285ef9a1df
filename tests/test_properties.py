"""Property tests on random multi-task models (see tests/strategies.py).

The central one: every registered pass that claims `preserves_semantics` (and is not terminal)
keeps the outputs of the task models it is given, whatever the models. It is parametrized over
the pass registry, so a new pass is tested the moment it registers.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from helpers import assert_outputs_close, temporary_pass
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    PASSES,
    SMALL_SPEC,
    build_models,
    examples,
    make_input,
    multi_task_specs,
    pass_instances,
    pipelines,
    reference_outputs,
)

import morphc
from morphc.ir.annotations import ANNOTATIONS_KEY, Annotation, annotation
from morphc.ir.program import Program
from morphc.passes import PassContext, PassManager, PassResult

SEMANTIC_PASSES = sorted(name for name, cls in PASSES.items() if cls.preserves_semantics and not cls.terminal)
ALL_OPT_LEVELS = 1_000  # run every pass whatever its opt_level


def _context() -> PassContext:
    return PassContext(verify_each=True, opt_level=ALL_OPT_LEVELS, reproducer_dir=None)


def check_equivalent(program: Program, models: dict[str, torch.nn.Module], spec, context: str = "") -> None:
    """`program` computes what `models` compute: on the example input, on a new input, and again
    (a second call must not see state the first one left, e.g. a constant updated in place, or an
    output the caller updated in place)."""
    x = make_input(spec)
    x_new = make_input(spec, seed=spec.input_seed + 1)
    for label, inp in (("example input", x), ("new input", x_new), ("new input, second call", x_new)):
        got = program(inp.clone())
        assert_outputs_close(got, reference_outputs(models, inp), context=f"{context}{label}: ")
        for value in got.values():
            value.mul_(-3.0)  # callers own what they get back


def test_semantic_passes_are_found() -> None:
    """The parametrization below is not empty and sees the core passes (guards against a silent no-op)."""
    assert {"cse", "dce", "fold-constants"} <= set(SEMANTIC_PASSES)
    assert "compile" not in SEMANTIC_PASSES


@pytest.mark.parametrize("pass_name", SEMANTIC_PASSES)
@settings(max_examples=examples(60))
@given(spec=multi_task_specs(), data=st.data())
def test_pass_preserves_outputs(pass_name: str, spec, data) -> None:
    p = data.draw(pass_instances(PASSES[pass_name]), label="pass")
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    before = str(program)
    result = PassManager([p]).run(program, _context())
    assert isinstance(result, Program)
    check_equivalent(result, models, spec, context=f"after {p.to_text()}, ")
    assert str(program) == before, "the pass manager must not modify the program it is given"


NON_SEMANTIC_PASSES = sorted(name for name, cls in PASSES.items()
                             if not cls.preserves_semantics and not cls.terminal and not cls.context_needs)
NEEDY_PASSES = sorted(name for name, cls in PASSES.items() if cls.context_needs)


@pytest.mark.parametrize("pass_name", NON_SEMANTIC_PASSES)
@settings(max_examples=examples(15))
@given(spec=multi_task_specs(), data=st.data())
def test_other_passes_produce_valid_programs(pass_name: str, spec, data) -> None:
    """Passes that may change values (quantization, pruning, ...) must still produce verified IR
    with the same inputs and outputs."""
    p = data.draw(pass_instances(PASSES[pass_name]), label="pass")
    program = morphc.lower(build_models(spec), make_input(spec))
    result = PassManager([p]).run(program, _context())
    assert result.inputs == program.inputs and result.outputs == program.outputs
    got = result(make_input(spec))
    assert [tuple(v.shape) for v in got.values()] == [o.shape for o in program.outputs]


@settings(max_examples=examples(60))
@given(spec=multi_task_specs(), pipeline=pipelines(semantic_only=True, min_size=2, max_size=6))
def test_random_pipelines_preserve_outputs(spec, pipeline) -> None:
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    result = pipeline.run(program, _context())
    check_equivalent(result, models, spec, context=f"after {pipeline}, ")
    assert result.annotation(morphc.ir.annotations.PipelineHistory).pipelines == (str(pipeline),)


@settings(max_examples=examples(15))
@given(spec=multi_task_specs(max_tasks=2, max_ops=4), pipeline=pipelines(semantic_only=True, max_size=3))
def test_pipeline_with_compile_matches_models(spec, pipeline) -> None:
    """The full path: passes, then the terminal compile pass, then the executable."""
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    exe = morphc.Pipeline([*pipeline, PASSES["compile"]()]).run(program, _context())
    assert isinstance(exe, morphc.Executable)
    check_equivalent(exe, models, spec, context=f"after {pipeline},compile: ")  # type: ignore[arg-type]


# --- the property check itself must be able to fail ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PerturbFirstParameter(morphc.Pass):
    """Test-only: claims to preserve semantics but scales one parameter used by an output."""

    name: ClassVar[str] = "test-properties-perturb"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        for node in program.graph.nodes:
            if node.op == "get_attr" and node.users and program.tensor(str(node.target)).is_floating_point():
                setattr(program.graph_module, str(node.target), program.tensor(str(node.target)) * 1.5 + 0.25)
                return PassResult(program, modified=True)
        return PassResult(program, modified=False)


def test_property_check_catches_a_wrong_pass() -> None:
    spec = SMALL_SPEC
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    check_equivalent(program, models, spec)  # the unmodified program passes
    with temporary_pass(_PerturbFirstParameter):
        wrong = PassManager([_PerturbFirstParameter()]).run(program, _context())
    with pytest.raises(AssertionError, match="not close"):
        check_equivalent(wrong, models, spec)


# --- pipeline text round-trip --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _QuotingPass(morphc.Pass):
    """Test-only pass with every option type, including strings that need quotes."""

    name: ClassVar[str] = "test-properties-quoting"
    label: str = morphc.option("plain", "any text")
    count: int = morphc.option(3, "an integer")
    ratio: float = morphc.option(0.5, "a float")
    flag: bool = morphc.option(False, "a flag")
    mode: Literal["fast", "two words", "x,y"] = morphc.option("fast", "a choice")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        return PassResult(program, modified=False)


CANONICAL_TEXTS = [
    "",
    "cse",
    "cse,dce",
    "fold-constants{max-mb=0.5},cse,dce",
    "fold-constants{max-mb=1e-06}",
    "dce,compile",
    "compile{verify=false,atol=0.01}",
    "compile{rtol=0.25}",
    "cse,cse,fold-constants{max-mb=0.0},dce",
]


@pytest.mark.parametrize("text", CANONICAL_TEXTS)
def test_canonical_text_round_trips(text: str) -> None:
    assert str(morphc.Pipeline.parse(text)) == text


@pytest.mark.parametrize(("text", "canonical"), [
    ("  cse ,  dce  ", "cse,dce"),
    ("fold-constants{ max-mb = 2 }", "fold-constants{max-mb=2.0}"),
    ("fold-constants{max-mb=64.0}", "fold-constants"),  # default values are omitted
    ("fold-constants{}", "fold-constants"),
    ('fold-constants{max-mb="1.5"}', "fold-constants{max-mb=1.5}"),
    ("compile{verify=no,target=eager}", "compile{verify=false}"),
    ("compile{rtol=0.001,atol=0.002}", "compile{atol=0.002,rtol=0.001}"),  # declaration order
])
def test_text_normalizes(text: str, canonical: str) -> None:
    assert str(morphc.Pipeline.parse(text)) == canonical
    assert morphc.Pipeline.parse(canonical) == morphc.Pipeline.parse(text)


def test_quoted_values_round_trip_exactly() -> None:
    with temporary_pass(_QuotingPass):
        p = _QuotingPass(label='a "b", {c}=d \\ e', mode="x,y", count=-2, ratio=float("inf"), flag=True)
        text = str(morphc.Pipeline([p]))
        assert text == ('test-properties-quoting{label="a \\"b\\", {c}=d \\\\ e",count=-2,ratio=inf,flag=true,'
                        'mode="x,y"}')
        assert morphc.Pipeline.parse(text) == morphc.Pipeline([p])


@settings(max_examples=examples(200))
@given(pipeline=pipelines(min_size=0, max_size=5, terminal=True, extra=(_QuotingPass,),
                          text=st.text(max_size=16)))
def test_pipeline_objects_round_trip(pipeline: morphc.Pipeline) -> None:
    with temporary_pass(_QuotingPass):
        text = str(pipeline)
        parsed = morphc.Pipeline.parse(text)
        assert parsed == pipeline, f"{text!r} parsed to {parsed}"
        assert str(parsed) == text  # printing is canonical: text from objects round-trips too


# --- save / load ---------------------------------------------------------------------------------


@annotation("morphc-tests.note", scope="node")
class Note(Annotation):
    """Test-only node annotation with JSON field types (str, int, float, bool, None, tuples)."""

    text: str
    number: float
    values: tuple


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=8),
                         st.floats(allow_nan=False))
NOTES = st.builds(Note, text=st.text(max_size=20), number=st.floats(allow_nan=False),
                  values=st.lists(st.one_of(JSON_SCALARS, st.tuples(JSON_SCALARS, JSON_SCALARS)),
                                  max_size=3).map(tuple))


def _annotations_by_node(program: Program) -> dict[str, dict[str, Annotation]]:
    return {n.name: Program.node_annotations(n) for n in program.graph.nodes if Program.node_annotations(n)}


@settings(max_examples=examples(30))
@given(spec=multi_task_specs(max_ops=5), pipeline=pipelines(semantic_only=True, min_size=0, max_size=4),
       data=st.data())
def test_save_load_round_trip(spec, pipeline, data) -> None:
    models = build_models(spec)
    program = pipeline.run(morphc.lower(models, make_input(spec)), _context())
    nodes = [n for n in program.graph.nodes if n.op != "output"]
    for node in data.draw(st.lists(st.sampled_from(nodes), max_size=4, unique=True), label="annotated nodes"):
        program.annotate(data.draw(NOTES, label=f"note on {node.name}"), node)
    with tempfile.TemporaryDirectory() as tmp:
        path = morphc.save(program, Path(tmp) / "program.safetensors")
        loaded = morphc.load(path)
    assert str(loaded) == str(program)
    assert loaded.inputs == program.inputs and loaded.outputs == program.outputs
    assert loaded.annotations == program.annotations
    assert _annotations_by_node(loaded) == _annotations_by_node(program)
    morphc.verify(loaded)
    for inp in (make_input(spec), make_input(spec, seed=spec.input_seed + 1)):
        got, expected = loaded(inp), program(inp)
        assert list(got) == list(expected)
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"output '{name}' changed across save/load"


# --- clones ---------------------------------------------------------------------------------------


@settings(max_examples=examples(25))
@given(spec=multi_task_specs(max_ops=5), data=st.data())
def test_rewriting_a_clone_leaves_the_original_unchanged(spec, data) -> None:
    models = build_models(spec)
    program = morphc.lower(models, make_input(spec))
    first = next(n for n in program.graph.nodes if n.op == "call_function")
    program.annotate(Note("original", 1.0, ()), first)
    text, attrs = str(program), set(program.parameters())
    outputs = program(make_input(spec))

    clone = program.clone()
    # rewrite the clone: random passes, then by hand: annotations, a new node, a dropped tensor
    for p in data.draw(pipelines(semantic_only=True, min_size=0, max_size=3), label="passes").passes:
        if p.run(clone, _context()).modified:
            clone.mark_modified()
    for node in clone.graph.nodes:
        if node.op == "call_function":
            clone.annotate(Note("clone", 2.0, (1,)), node)
    leaf = clone.output_node.args[0][0]
    with clone.graph.inserting_before(clone.output_node):
        doubled = clone.graph.call_function(torch.ops.aten.mul.Tensor, (leaf, 2.0))
    clone.output_node.args = ((doubled, *clone.output_node.args[0][1:]),)
    clone.graph_module.register_buffer("test_extra", torch.ones(3))
    clone.mark_modified()

    assert str(program) == text
    assert set(program.parameters()) == attrs
    assert not hasattr(program.graph_module, "test_extra")
    assert program.annotation(Note, first) == Note("original", 1.0, ())
    morphc.verify(program)
    for name, value in program(make_input(spec)).items():
        assert torch.equal(value, outputs[name])
    first_output = program.outputs[0].name
    assert torch.allclose(clone(make_input(spec))[first_output], 2.0 * outputs[first_output], atol=1e-5, rtol=1e-5)


def test_annotations_on_a_clone_do_not_leak_into_the_original() -> None:
    """Regression: clone() used to share each node's annotation dict with the original."""
    spec = SMALL_SPEC
    program = morphc.lower(build_models(spec), make_input(spec))
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    program.annotate(Note("a", 0.0, ()), node)
    clone = program.clone()
    clone.annotate(Note("b", 0.0, ()), clone.node(node.name))
    assert program.annotation(Note, node) == Note("a", 0.0, ())
    assert ANNOTATIONS_KEY in node.meta


@pytest.mark.parametrize("pass_name", NEEDY_PASSES)
def test_passes_refuse_clearly_without_what_they_need(pass_name: str) -> None:
    """A pass that needs calibration data or a tuner (tested with them in its own file) names the missing
    need instead of running on defaults."""
    assert NEEDY_PASSES, "no pass declares context_needs"
    spec_program = morphc.lower(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    with pytest.raises(morphc.PassFailure) as info:
        PassManager([PASSES[pass_name]()]).run(spec_program, _context())
    message = str(info.value)
    for need in PASSES[pass_name].context_needs:
        assert need.split("[")[0] in message, f"{pass_name}: error does not name {need}: {message}"
