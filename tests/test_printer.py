"""The printed IR: a golden check on a tiny model, and stability (the same program always prints
the same text: twice, across independent lowerings, clones, and save/load)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import morphc
from morphc.ir.annotations import SharedBy
from morphc.ir.printer import format_arg, print_node
from morphc.ir.program import Program


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * 0.5


def tiny_twins() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    age = Tiny().eval()
    return {"age": age, "gender": copy.deepcopy(age)}


@pytest.fixture(scope="module")
def program() -> Program:
    return morphc.lower(tiny_twins(), torch.randn(2, 4))


GOLDEN = """\
program tasks=[age, gender] params=4 (0.00 MB)
  input %x : f32[2, 4]
  %age_fc_weight : f32[3, 4] = param "age.fc.weight"
  %age_fc_bias : f32[3] = param "age.fc.bias"
  %age_linear : f32[2, 3] = aten.linear(%x, %age_fc_weight, %age_fc_bias)  # linear age.fc flops=48
  %age_relu : f32[2, 3] = aten.relu(%age_linear)  # activation age
  %age_mul : f32[2, 3] = aten.mul.Tensor(%age_relu, 0.5)  # elementwise age
  %gender_fc_weight : f32[3, 4] = param "gender.fc.weight"
  %gender_fc_bias : f32[3] = param "gender.fc.bias"
  %gender_linear : f32[2, 3] = aten.linear(%x, %gender_fc_weight, %gender_fc_bias)  # linear gender.fc flops=48
  %gender_relu : f32[2, 3] = aten.relu(%gender_linear)  # activation gender
  %gender_mul : f32[2, 3] = aten.mul.Tensor(%gender_relu, 0.5)  # elementwise gender
  return age=%age_mul, gender=%gender_mul
"""


def test_golden_text(program: Program) -> None:
    assert str(program) == GOLDEN
    assert morphc.print_program(program) == GOLDEN


def test_golden_text_after_cse(program: Program) -> None:
    text = str(morphc.Pipeline.parse("cse,dce").run(program))
    lines = text.splitlines()
    assert lines[0] == "program tasks=[age, gender] params=2 (0.00 MB)"
    assert lines[1] == '  @pipeline-history(pipelines=("cse,dce",))'
    shared = ' @shared-by(tasks=("age", "gender"))'
    assert "  %age_linear : f32[2, 3] = aten.linear(%x, %age_fc_weight, %age_fc_bias)  # linear age.fc flops=48" \
           + shared in lines
    assert "  %age_mul : f32[2, 3] = aten.mul.Tensor(%age_relu, 0.5)  # elementwise age" + shared in lines
    assert lines[-1] == "  return age=%age_mul, gender=%age_mul"
    assert "%gender_" not in text  # the second copy is gone


def test_printing_is_stable(program: Program, tmp_path: Path) -> None:
    text = str(program)
    assert str(program) == text
    assert str(program.clone()) == text
    again = morphc.lower(tiny_twins(), torch.randn(2, 4))  # an independent lowering of equal models
    assert str(again) == text
    assert str(morphc.load(morphc.save(program, tmp_path / "p.safetensors"))) == text
    generation = program.generation
    str(program)
    assert program.generation == generation


def test_printing_is_stable_after_passes_and_save_load(program: Program, tmp_path: Path) -> None:
    optimized = morphc.Pipeline.parse("fold-constants,cse,dce").run(program)
    text = str(optimized)
    assert "@shared-by" in text and "@pipeline-history" in text
    loaded = morphc.load(morphc.save(optimized, tmp_path / "o.safetensors"))
    assert str(loaded) == text
    assert str(morphc.load(morphc.save(loaded, tmp_path / "o2.safetensors"))) == text


def test_no_addresses_or_ids(program: Program) -> None:
    text = str(morphc.Pipeline.parse("cse").run(program))
    assert not re.search(r"0x[0-9a-fA-F]{4,}", text)
    assert " object at " not in text


class Split(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = torch.split(x, 2, dim=1)
        return {"first": a.to(torch.float64), "second": b.sum(dim=1, keepdim=True)}


def test_multi_output_nodes_literals_and_structured_outputs() -> None:
    program = morphc.lower({"parts": Split().eval()}, torch.randn(3, 4))
    text = str(program)
    lines = text.splitlines()
    assert "  %parts_split : (f32[3, 2], f32[3, 2]) = aten.split.Tensor(%x, 2, 1)  # shape parts" in lines
    assert "  %parts_getitem : f32[3, 2] = getitem(%parts_split, 0)  # shape parts" in lines
    assert "  %parts__to_copy : f64[3, 2] = aten._to_copy(%parts_getitem, dtype=f64)  # elementwise parts" in lines
    assert "  %parts_sum_1 : f32[3, 1] = aten.sum.dim_IntList(%parts_getitem_1, [1], True)  # reduction parts" in lines
    assert lines[-1] == "  return parts.first=%parts__to_copy, parts.second=%parts_sum_1"


def test_annotations_print_on_every_kind_of_node(program: Program) -> None:
    clone = program.clone()
    for name in ("x", "age_fc_weight", "age_relu"):
        clone.annotate(SharedBy(("age",)), clone.node(name))
    text = str(clone)
    assert '  input %x : f32[2, 4]  # @shared-by(tasks=("age",))' in text
    assert '  %age_fc_weight : f32[3, 4] = param "age.fc.weight"  # @shared-by(tasks=("age",))' in text
    assert '  %age_relu : f32[2, 3] = aten.relu(%age_linear)  # activation age @shared-by(tasks=("age",))' in text


def test_node_without_metadata_prints_a_question_mark(program: Program) -> None:
    clone = program.clone()
    node = clone.node("age_relu")
    del node.meta["morphc"]
    assert print_node(node) == "%age_relu : ? = aten.relu(%age_linear)"


@pytest.mark.parametrize(("value", "text"), [
    (0.5, "0.5"),
    (1e-05, "1e-05"),
    (float("inf"), "inf"),
    (3, "3"),
    (True, "True"),
    (None, "None"),
    ("a \"q\"", '"a \\"q\\""'),
    ((1,), "(1,)"),
    ((1, 2), "(1, 2)"),
    ([1, 2], "[1, 2]"),
    ({"k": 1.0}, "{k: 1.0}"),
    (torch.float16, "f16"),
    (torch.bfloat16, "bf16"),
    (torch.int64, "i64"),
    (torch.bool, "bool"),
])
def test_format_arg(value: object, text: str) -> None:
    assert format_arg(value) == text
