"""Errors say what is wrong, where, and what would be valid."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import morphc
from morphc import (
    CompileError,
    InputMismatchError,
    LoweringError,
    MorphcError,
    PassOptionError,
    PipelineSyntaxError,
    SerializationError,
    UnknownPassError,
)
from morphc.ir.program import Program
from morphc.passes import get_pass


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


@pytest.fixture(scope="module")
def program() -> Program:
    torch.manual_seed(0)
    return morphc.lower(Small().eval(), torch.randn(2, 4))


# --- pass names and options -----------------------------------------------------------------------


def test_unknown_pass_lists_registered_and_suggests() -> None:
    with pytest.raises(UnknownPassError) as info:
        get_pass("fold-constant")
    message = str(info.value)
    assert message.startswith("unknown pass 'fold-constant'; did you mean 'fold-constants'?")
    assert f"registered passes: {', '.join(morphc.registered_passes())}" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, MorphcError)


def test_unknown_pass_without_close_match() -> None:
    with pytest.raises(UnknownPassError) as info:
        get_pass("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "registered passes: " in str(info.value)


def test_unknown_pass_in_pipeline_text_points_at_it() -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        morphc.Pipeline.parse("cse,dcee")
    err = info.value
    assert err.column == 5
    assert "unknown pass 'dcee'; did you mean 'dce'?" in str(err)
    assert "registered passes: " in str(err)
    assert_caret(err, "cse,dcee", 5)


def assert_caret(err: PipelineSyntaxError, text: str, column: int) -> None:
    """The message ends with the text and a caret under `column` (1-based)."""
    lines = str(err).splitlines()
    assert lines[-2] == "  " + text
    assert lines[-1] == "  " + " " * (column - 1) + "^"
    assert f"(column {column})" in lines[-3]


def test_unknown_option_lists_valid_options() -> None:
    cls = morphc.registered_passes()["fold-constants"]
    with pytest.raises(PassOptionError) as info:
        cls.from_options({"max-m": "1"})
    assert str(info.value) == ("pass 'fold-constants' has no option 'max-m'; did you mean 'max-mb'?; "
                               "valid options: max-mb (float, default 64.0)")


def test_unknown_option_of_pass_without_options() -> None:
    with pytest.raises(PassOptionError, match="pass 'cse' has no option 'level'; valid options: none"):
        morphc.registered_passes()["cse"].from_options({"level": "3"})


def test_unknown_option_in_text_points_at_the_option() -> None:
    text = "cse,fold-constants{max-m=1}"
    with pytest.raises(PipelineSyntaxError) as info:
        morphc.Pipeline.parse(text)
    assert info.value.column == text.index("max-m") + 1
    assert "valid options: max-mb (float, default 64.0)" in str(info.value)
    assert_caret(info.value, text, info.value.column)


@pytest.mark.parametrize(("text", "expected"), [
    ("fold-constants{max-mb=big}", "option 'max-mb' of pass 'fold-constants' expects a number, got 'big'"),
    ("compile{verify=maybe}", "option 'verify' of pass 'compile' expects true or false, got 'maybe'"),
    ('compile{atol="1e-3x"}', "option 'atol' of pass 'compile' expects a number, got '1e-3x'"),
])
def test_bad_option_value_points_at_the_value(text: str, expected: str) -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        morphc.Pipeline.parse(text)
    assert expected in str(info.value)
    value_start = text.index("=") + 1
    assert info.value.column == value_start + 1
    assert_caret(info.value, text, value_start + 1)


def test_bad_option_value_from_options() -> None:
    with pytest.raises(PassOptionError, match=r"expects a number, got '1,5'"):
        morphc.registered_passes()["fold-constants"].from_options({"max-mb": "1,5"})


def test_invalid_option_value_rejected_by_the_pass() -> None:
    with pytest.raises(PassOptionError, match=r"option 'max-mb' of pass 'fold-constants' must be >= 0, got -1\.0"):
        morphc.registered_passes()["fold-constants"](max_mb=-1.0)
    with pytest.raises(PipelineSyntaxError, match=r"must be >= 0, got -1\.0") as info:
        morphc.Pipeline.parse("cse,fold-constants{max-mb=-1}")
    assert info.value.column == 5  # the pass, as the value alone is fine


def test_option_given_twice() -> None:
    text = "compile{atol=1.0,atol=2.0}"
    with pytest.raises(PipelineSyntaxError, match="option 'atol' of pass 'compile' is given twice") as info:
        morphc.Pipeline.parse(text)
    assert info.value.column == text.rindex("atol") + 1


@pytest.mark.parametrize(("text", "column", "message"), [
    ("cse,,dce", 5, "expected a pass name, found ','"),
    ("cse dce", 5, "expected ',' between passes, found 'd'"),
    ("cse,", 5, "expected a pass name, found end of text"),
    ("fold-constants{max-mb=1.0", 26, "expected '}' to close the options of pass 'fold-constants', found end of text"),
    ("fold-constants{max-mb}", 22, "expected '=' after option name 'max-mb', found '}'"),
    ("fold-constants{max-mb=}", 23, "expected a value for option 'max-mb'"),
    ('compile{target="eager}', 16, "unterminated string value of option 'target'"),
    ("cse}", 4, "expected ',' between passes, found '}'"),
    ("{cse}", 1, "expected a pass name, found '{'"),
    ("fold-constants{,}", 16, "expected an option name of pass 'fold-constants', found ','"),
])
def test_malformed_text_points_at_the_column(text: str, column: int, message: str) -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        morphc.Pipeline.parse(text)
    err = info.value
    assert err.column == column
    assert err.text == text
    assert str(err).splitlines()[0] == f"{message} (column {column})"
    assert_caret(err, text, column)
    assert isinstance(err, ValueError) and isinstance(err, MorphcError)


# --- lowering -----------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def _line_of(fn: object, snippet: str) -> int:
    lines, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    return first + next(i for i, line in enumerate(lines) if snippet in line)


def test_data_dependent_branch_names_the_line_and_a_fix() -> None:
    with pytest.raises(LoweringError) as info:
        morphc.lower({"gate": DataDependent().eval()}, torch.randn(2, 3))
    message = str(info.value)
    assert message.startswith("torch.export could not capture model 'gate'")
    assert f"{Path(__file__).name}:{_line_of(DataDependent.forward, 'if x.sum() > 0')}" in message
    assert "if x.sum() > 0" in message
    assert "torch.where" in message and "torch.cond" in message


class UsesCond(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))


def test_higher_order_operator_is_refused_clearly() -> None:
    """Regression: torch.cond lowered into a graph reading a missing subgraph (an AttributeError)."""
    with pytest.raises(LoweringError, match=r"model 'model' calls 'cond'.*cannot lower") as info:
        morphc.lower(UsesCond().eval(), torch.randn(3))
    assert "torch.where" in str(info.value)


def test_training_mode_model() -> None:
    with pytest.raises(LoweringError, match=r"model 'model' is in training mode; call \.eval\(\)"):
        morphc.lower(Small(), torch.randn(2, 4))
    with pytest.raises(LoweringError, match="model 'b' is in training mode"):
        morphc.lower({"a": Small().eval(), "b": Small()}, torch.randn(2, 4))


class UpdatesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return x + self.count


def test_state_mutation_is_refused() -> None:
    """Regression: torch.export's training IR keeps `self.count += 1` as an in-place op instead of
    a mutation output; the lowered Program used to update its own buffer on every call."""
    with pytest.raises(LoweringError, match=r"model 'model' mutates state in forward\(\) \(count\)"):
        morphc.lower(UpdatesBuffer().eval(), torch.randn(2))


def test_submodule_left_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model[1].train()  # running statistics would be updated: a state mutation
    with pytest.raises(LoweringError, match=r"submodule '1' of model 'model' is in training mode; call \.eval\(\)"):
        morphc.lower(model, torch.randn(3, 4))


class UpdatesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[0] = 1.0
        return x * 2


def test_input_mutation_is_refused() -> None:
    with pytest.raises(LoweringError, match=r"model 'model' mutates state in forward\(\) \(input 'x'\)"):
        morphc.lower(UpdatesInput().eval(), torch.randn(3))


@pytest.mark.parametrize(("models", "inputs", "message"), [
    ({}, torch.randn(2, 4), "needs at least one model"),
    ({"my-task": Small().eval()}, torch.randn(2, 4), "task name 'my-task' must be an identifier"),
    ({"a": "not a module"}, torch.randn(2, 4), "task 'a' is a str, not a torch.nn.Module"),
    (Small().eval(), (torch.randn(2, 4), 3), "example input #1 is a int"),
])
def test_bad_lower_arguments(models: object, inputs: object, message: str) -> None:
    with pytest.raises(LoweringError, match=message):
        morphc.lower(models, inputs)  # type: ignore[arg-type]


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def test_tasks_with_different_signatures() -> None:
    with pytest.raises(LoweringError):
        morphc.lower({"one": Small().eval(), "two": TwoInputs().eval()}, torch.randn(2, 4))


# --- inputs at call time ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randn(3, 4),), "input 'x' (#0) expects f32[2, 4], got f32[3, 4] (programs are lowered for static shapes"),
    ((torch.randn(2, 4, dtype=torch.float64),), "input 'x' (#0) expects f32[2, 4], got f64[2, 4]"),
    ((torch.randn(2, 4), torch.randn(2, 4)), "expected 1 input(s) (x: f32[2, 4]), got 2"),
    ((), "expected 1 input(s) (x: f32[2, 4]), got 0"),
    (([[1.0] * 4] * 2,), "input 'x' (#0) must be a tensor x: f32[2, 4], got list"),
])
def test_input_mismatch_names_the_input(program: Program, args: tuple, message: str) -> None:
    with pytest.raises(InputMismatchError) as info:
        program(*args)
    assert str(info.value).startswith(message)
    exe = morphc.compile_program(program)
    with pytest.raises(InputMismatchError) as info:
        exe(*args)
    assert str(info.value).startswith(message)


def test_input_mismatch_names_the_second_input() -> None:
    program = morphc.lower(TwoInputs().eval(), (torch.randn(2), torch.randn(2)))
    with pytest.raises(InputMismatchError, match=r"input 'y' \(#1\) expects f32\[2\], got f32\[5\]"):
        program(torch.randn(2), torch.randn(5))


# --- saved files ----------------------------------------------------------------------------------


@pytest.fixture
def saved(program: Program, tmp_path: Path) -> Path:
    return morphc.save(program, tmp_path / "program.safetensors")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="no saved program at"):
        morphc.load(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(SerializationError, match="is not a readable safetensors file"):
        morphc.load(path)


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(SerializationError, match="is not a readable safetensors file"):
        morphc.load(saved)


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(SerializationError, match=r"is not a saved morphc program \(format=None\)"):
        morphc.load(path)


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)` (metadata lives in __metadata__)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_other_format_version(saved: Path) -> None:
    _rewrite_header(saved, lambda h: h["__metadata__"].update(version="99"))
    with pytest.raises(SerializationError, match="was saved in format version 99; this morphc reads version 1"):
        morphc.load(saved)


def test_incomplete_program_description(saved: Path) -> None:
    _rewrite_header(saved, lambda h: h["__metadata__"].pop("program"))
    with pytest.raises(SerializationError, match="holds an incomplete program description"):
        morphc.load(saved)


def test_missing_tensor(saved: Path) -> None:
    def drop_weight(header: dict) -> None:
        doc = json.loads(header["__metadata__"]["program"])
        for node in doc["nodes"]:
            if node["op"] == "get_attr":
                node["target"] = "renamed_weight"
                break
        header["__metadata__"]["program"] = json.dumps(doc)

    _rewrite_header(saved, drop_weight)
    with pytest.raises(SerializationError, match="lacks tensor 'param/renamed_weight' read by node %lin_weight"):
        morphc.load(saved)


def test_unknown_operator(saved: Path) -> None:
    def rename_op(header: dict) -> None:
        doc = json.loads(header["__metadata__"]["program"])
        for node in doc["nodes"]:
            if node["op"] == "call_function":
                node["target"] = "aten::no_such_op.default"
        header["__metadata__"]["program"] = json.dumps(doc)

    _rewrite_header(saved, rename_op)
    with pytest.raises(SerializationError, match=r"unknown operator 'aten::no_such_op\.default'"):
        morphc.load(saved)


def test_unknown_annotation_kind(saved: Path) -> None:
    def add_annotation(header: dict) -> None:
        doc = json.loads(header["__metadata__"]["program"])
        doc["annotations"].append({"kind": "shared-bye", "tasks": []})
        header["__metadata__"]["program"] = json.dumps(doc)

    _rewrite_header(saved, add_annotation)
    with pytest.raises(SerializationError, match="unknown annotation kind 'shared-bye'; did you mean 'shared-by'"):
        morphc.load(saved)


def test_tensor_of_the_wrong_shape(saved: Path, tmp_path: Path) -> None:
    """A file whose weights do not fit its graph is refused at load, not at the first call."""
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["param/lin_weight"] = torch.ones(5, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(SerializationError, match=r"does not run on its own example inputs .*: mat1 and mat2 shapes"):
        morphc.load(bad)


def test_load_executable_errors(tmp_path: Path, program: Program) -> None:
    with pytest.raises(SerializationError, match="is not a saved morphc executable"):
        morphc.load_executable(tmp_path)
    exe_dir = morphc.compile_program(program).save(tmp_path / "exe")
    (exe_dir / "executable.json").write_text("{not json")
    with pytest.raises(SerializationError, match="is corrupt"):
        morphc.load_executable(exe_dir)


# --- compile targets ----------------------------------------------------------------------------


def test_unknown_compile_target(program: Program) -> None:
    with pytest.raises(CompileError) as info:
        morphc.compile_program(program, "eagr")
    assert str(info.value).startswith("unknown compile target 'eagr'; did you mean 'eager'?; available targets: ")
    assert "eager" in str(info.value).split("available targets: ")[1]


def test_unknown_compile_target_in_pipeline_text() -> None:
    with pytest.raises(PipelineSyntaxError, match=r"option 'target' of pass 'compile' must be one of .*eager.*; "
                                                  "got 'openvino'"):
        morphc.Pipeline.parse("cse,compile{target=openvino}")
