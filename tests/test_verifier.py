"""The verifier accepts what lowering and the passes produce, and rejects hand-broken programs
with messages that name the offending node."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import morphc
from morphc import VerificationError, verify
from morphc.ir.annotations import ANNOTATIONS_KEY, PipelineHistory, SharedBy
from morphc.ir.metadata import META_KEY, TensorMeta
from morphc.ir.program import OutputSpec, Program, TensorSpec


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def lowered() -> Program:
    torch.manual_seed(0)
    return morphc.lower({"age": Tiny().eval(), "gender": Tiny().eval()}, torch.randn(1, 3, 5, 5))


@pytest.fixture
def program(lowered: Program) -> Program:
    """A fresh copy to break (its tensors are shared with `lowered`: never update them in place)."""
    return lowered.clone()


def problems_of(program: Program) -> list[str]:
    with pytest.raises(VerificationError) as info:
        verify(program)
    assert str(info.value).startswith("IR verification failed")
    assert all(p in str(info.value) for p in info.value.problems)
    return info.value.problems


def test_accepts_lowered_program(program: Program) -> None:
    verify(program)


def test_accepts_program_after_passes(lowered: Program) -> None:
    result = morphc.Pipeline.parse("fold-constants,cse,dce").run(lowered)
    verify(result)


def test_accepts_loaded_program(lowered: Program, tmp_path) -> None:
    verify(morphc.load(morphc.save(lowered, tmp_path / "p.safetensors")))


def test_use_before_definition(program: Program) -> None:
    relu = program.node("age_relu")
    program.placeholders()[-1].append(relu)  # move relu before the batch norm result it reads
    (problem,) = problems_of(program)
    assert "age_relu" in problem and "age_getitem" in problem and "before it has been defined" in problem


def test_node_after_output(program: Program) -> None:
    program.output_node.append(program.node("gender_linear"))
    problems = problems_of(program)
    assert any("output node must be the graph's last node" in p for p in problems)
    assert any("gender_linear" in p for p in problems)


def test_get_attr_of_missing_tensor(program: Program) -> None:
    delattr(program.graph_module, "age_conv_weight")
    problems = problems_of(program)
    assert any(p.startswith("node %age_conv_weight (get_attr age_conv_weight) reads 'age_conv_weight', "
                            "which is not a tensor") for p in problems)


def test_get_attr_of_a_non_tensor(program: Program) -> None:
    program.graph_module.add_submodule("not_a_tensor", nn.ReLU())
    program.node("gender_bn_weight").target = "not_a_tensor"
    problems = problems_of(program)
    assert any("%gender_bn_weight" in p and "'not_a_tensor', which is not a tensor" in p for p in problems)


def test_call_module_node(program: Program) -> None:
    program.graph_module.add_submodule("act", nn.ReLU())
    relu = program.node("age_relu")
    with program.graph.inserting_after(relu):
        program.graph.call_module("act", (relu,))
    (problem,) = problems_of(program)
    assert problem == "node %act (call_module act): call_module nodes are not part of the IR; lower to ATen operators"


def test_call_method_node(program: Program) -> None:
    relu = program.node("age_relu")
    with program.graph.inserting_after(relu):
        program.graph.call_method("sigmoid", (relu,))
    (problem,) = problems_of(program)
    assert problem.startswith("node %sigmoid (call_method sigmoid): call_method nodes are not part of the IR")


def test_non_aten_call_function(program: Program) -> None:
    relu = program.node("age_relu")
    with program.graph.inserting_after(relu):
        program.graph.call_function(torch.sigmoid, (relu,))
    (problem,) = problems_of(program)
    assert problem.startswith("node %sigmoid (call_function sigmoid) calls <built-in method sigmoid")
    assert "only ATen operators" in problem


def test_in_place_operator(program: Program) -> None:
    relu = program.node("age_relu")
    with program.graph.inserting_after(relu):
        program.graph.call_function(torch.ops.aten.sigmoid_.default, (relu,))
    program.mark_modified()
    (problem,) = problems_of(program)
    assert problem.startswith("node %sigmoid__default (call_function sigmoid_.default) updates a tensor in place")
    assert "the IR is functional" in problem


def test_getitem_is_allowed(program: Program) -> None:
    import operator

    x = program.placeholders()[0]
    with program.graph.inserting_after(x):
        split = program.graph.call_function(torch.ops.aten.split.Tensor, (x, 2))
    with program.graph.inserting_after(split):
        program.graph.call_function(operator.getitem, (split, 0))
    program.mark_modified()
    verify(program)


def test_output_arity_differs_from_declared_outputs(program: Program) -> None:
    program.output_node.args = (program.output_node.args[0][:1],)
    program.mark_modified()
    (problem,) = problems_of(program)
    assert problem == "output node returns 1 value(s) but the program declares 2 output(s): ['age', 'gender']"


def test_duplicate_output_names(program: Program) -> None:
    program.outputs = (program.outputs[0], dataclasses.replace(program.outputs[1], name="age"))
    problems = problems_of(program)
    assert any("output names must be unique" in p for p in problems)


def test_metadata_inconsistent_with_traced_shape(program: Program) -> None:
    node = program.node("age_relu")
    node.meta[META_KEY] = dataclasses.replace(node.meta[META_KEY], outputs=(TensorMeta((1, 4, 5, 6), torch.float32),))
    (problem,) = problems_of(program)
    assert problem == ("node %age_relu (call_function relu.default) metadata says f32[1, 4, 5, 6] "
                       "but torch.export traced f32[1, 4, 5, 5]")


def test_metadata_dtype_tampered(program: Program) -> None:
    node = program.node("gender_conv2d")
    node.meta[META_KEY] = dataclasses.replace(node.meta[META_KEY], outputs=(TensorMeta((1, 4, 5, 5), torch.float16),))
    (problem,) = problems_of(program)
    assert "%gender_conv2d" in problem and "f16[1, 4, 5, 5]" in problem


def test_output_metadata_differs_from_declared_output(program: Program) -> None:
    program.outputs = (dataclasses.replace(program.outputs[0], shape=(1, 3)), program.outputs[1])
    (problem,) = problems_of(program)
    assert problem == "output 'age' is declared f32[1, 3] but %age_linear computes ['f32[1, 2]']"


def test_node_without_metadata(program: Program) -> None:
    del program.node("gender_relu").meta[META_KEY]
    (problem,) = problems_of(program)
    assert problem.startswith("node %gender_relu (call_function relu.default) has no metadata")


def test_metadata_check_can_be_skipped(program: Program) -> None:
    del program.node("gender_relu").meta[META_KEY]
    verify(program, metadata=False)


def test_stale_generated_code(program: Program) -> None:
    """A pass that rewrites the graph but does not report it leaves code that runs the old graph."""
    relu = program.node("age_relu")
    relu.replace_all_uses_with(relu.args[0])
    program.graph.erase_node(relu)
    (problem,) = problems_of(program)
    assert "generated code is stale" in problem and "modified=False" in problem
    program.mark_modified()
    verify(program)


def test_annotation_naming_unknown_task(program: Program) -> None:
    program.annotate(SharedBy(("age", "height")), program.node("age_relu"))
    (problem,) = problems_of(program)
    assert problem == ("node %age_relu (call_function relu.default): annotation 'shared-by': shared-by names "
                       "unknown task(s) ['height']; tasks are ['age', 'gender']")


def test_valid_annotation_is_accepted(program: Program) -> None:
    program.annotate(SharedBy(("age", "gender")), program.node("age_relu"))
    program.annotate(PipelineHistory(("cse",)))
    verify(program)


def test_program_annotation_on_a_node(program: Program) -> None:
    program.node("age_relu").meta[ANNOTATIONS_KEY] = {"pipeline-history": PipelineHistory(("cse",))}
    (problem,) = problems_of(program)
    assert problem == ("node %age_relu (call_function relu.default): annotation 'pipeline-history' is "
                       "program-scoped but attached to a node")


def test_node_annotation_on_the_program(program: Program) -> None:
    program.annotations["shared-by"] = SharedBy(("age",))
    (problem,) = problems_of(program)
    assert problem == "annotation 'shared-by' is node-scoped but attached to a program"


def test_annotation_under_the_wrong_kind(program: Program) -> None:
    program.annotations["other-kind"] = PipelineHistory(("cse",))
    (problem,) = problems_of(program)
    assert problem == "annotation stored under 'other-kind' is of kind 'pipeline-history'"


def test_annotation_that_is_not_an_annotation(program: Program) -> None:
    program.node("gender_conv2d").meta[ANNOTATIONS_KEY] = {"note": "free text"}
    (problem,) = problems_of(program)
    assert "%gender_conv2d" in problem and "annotation 'note' is a str, not a morphc Annotation" in problem


def test_annotate_refuses_wrong_scope(program: Program) -> None:
    with pytest.raises(ValueError, match="node-scoped"):
        program.annotate(SharedBy(("age",)))
    with pytest.raises(ValueError, match="program-scoped"):
        program.annotate(PipelineHistory(()), program.node("age_relu"))


def test_input_declared_with_another_shape(program: Program) -> None:
    program.inputs = (TensorSpec("x", (2, 3, 5, 5), torch.float32),)
    (problem,) = problems_of(program)
    assert problem == "input %x computes f32[1, 3, 5, 5] but is declared x: f32[2, 3, 5, 5]"


def test_input_declared_with_another_name(program: Program) -> None:
    program.inputs = (TensorSpec("images", (1, 3, 5, 5), torch.float32),)
    (problem,) = problems_of(program)
    assert problem == "input placeholders ['x'] do not match the declared inputs ['images']"


def test_extra_placeholder(program: Program) -> None:
    with program.graph.inserting_after(program.placeholders()[0]):
        program.graph.placeholder("mask")
    problems = problems_of(program)
    assert any("input placeholders ['x', 'mask'] do not match the declared inputs ['x']" in p for p in problems)


def test_all_problems_reported_at_once(program: Program) -> None:
    del program.node("gender_relu").meta[META_KEY]
    program.annotate(SharedBy(("nobody",)), program.node("age_conv2d"))
    program.outputs = (program.outputs[0], OutputSpec("gender", (1, 7), torch.float32, task="gender"))
    problems = problems_of(program)
    assert len(problems) == 3
    assert any("%gender_relu" in p for p in problems)
    assert any("%age_conv2d" in p and "nobody" in p for p in problems)
    assert any("output 'gender'" in p for p in problems)


def test_pass_name_in_message(program: Program) -> None:
    del program.node("gender_relu").meta[META_KEY]
    with pytest.raises(VerificationError, match="after pass 'cse'") as info:
        verify(program, after_pass="cse")
    assert info.value.after_pass == "cse"
