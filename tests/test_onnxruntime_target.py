"""The ONNX Runtime target: zoo models and random programs match eager, save/load without model
code, options are applied, and missing pieces give clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_loads_without_model_code, assert_outputs_close
from hypothesis import given, settings
from strategies import build_models, examples, make_input, multi_task_specs, reference_outputs

import morphc
from morphc import zoo
from morphc.runtime import CompileError, compile_program, load_executable, targets
from morphc.runtime.dynamo import DEFAULT_PIPELINE

pytest.importorskip("onnxruntime", reason="the onnxruntime target is an optional dependency (morphc[onnx])")

PIPELINE = f"{DEFAULT_PIPELINE},compile{{target=onnxruntime}}"


def _exe(name: str, batch_size: int = 2) -> tuple[morphc.Executable, zoo.ZooModel]:
    z = zoo.build(name, batch_size=batch_size)
    program = morphc.lower(z.model, z.example_inputs)
    return morphc.Pipeline.parse(PIPELINE).run(program), z


def test_target_is_registered() -> None:
    assert "onnxruntime" in targets()


@pytest.mark.parametrize("name", zoo.names(size="small"))
def test_every_small_zoo_model_matches_eager(name: str) -> None:
    exe, z = _exe(name)
    assert exe.target == "onnxruntime"
    with torch.no_grad():
        expected = {"model": z.model(*z.example_inputs)}
    assert_outputs_close(exe(*z.example_inputs), expected, rtol=1e-4, atol=1e-5)
    assert exe.report.max_abs_error is not None and exe.report.max_abs_error < 1e-3


def test_multi_task_program_keeps_output_names() -> None:
    models, inputs = zoo.twin_tasks(batch_size=2)
    program = morphc.lower(models, inputs)
    exe = morphc.Pipeline.parse(PIPELINE).run(program)
    out = exe(*inputs)
    assert list(out) == ["classify", "regress"]
    with torch.no_grad():
        assert_outputs_close(out, {k: m(*inputs) for k, m in models.items()}, rtol=1e-4, atol=1e-5)


@settings(max_examples=examples(10))
@given(spec=multi_task_specs(max_tasks=2, max_ops=5))
def test_random_programs_match_eager(spec) -> None:
    models = build_models(spec)
    x = make_input(spec)
    exe = compile_program(morphc.lower(models, x), "onnxruntime", options={"threads": 1})
    assert_outputs_close(exe(x), reference_outputs(models, x), rtol=1e-4, atol=1e-5)


def test_save_and_load_without_the_model_code(tmp_path: Path) -> None:
    exe, z = _exe("bert-small")
    saved = exe.save(tmp_path / "bert.exe")
    assert (saved / "model.onnx").stat().st_size > 0
    expected = exe(*z.example_inputs)["model"]
    assert_loads_without_model_code(saved, z.example_inputs, expected, "onnxruntime", timeout=120)
    again = load_executable(saved)
    assert torch.equal(again(*z.example_inputs)["model"], expected)


def test_threads_and_optimization_options_are_applied() -> None:
    z = zoo.build("tiny_mlp")
    program = morphc.lower(z.model, z.example_inputs)
    exe = compile_program(program, "onnxruntime", options={"threads": 1, "optimization": "basic"})
    opts = exe.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert "basic" in str(opts.graph_optimization_level).lower()


@pytest.mark.parametrize(("options", "message"), [
    ({"thread": 2}, r"has no option\(s\) \['thread'\]; valid options: threads, optimization, providers"),
    ({"optimization": "max"}, "must be one of disable, basic, extended, all; got 'max'"),
    ({"threads": 0}, "must be >= 1"),
    ({"providers": ["NoSuchExecutionProvider"]}, r"provider\(s\) \['NoSuchExecutionProvider'\] are not available"),
])
def test_bad_options_are_named(options: dict, message: str) -> None:
    z = zoo.build("tiny_mlp")
    with pytest.raises(CompileError, match=message):
        compile_program(morphc.lower(z.model, z.example_inputs), "onnxruntime", options=options)


def test_missing_onnxruntime_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    z = zoo.build("tiny_mlp")
    program = morphc.lower(z.model, z.example_inputs)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(CompileError, match=r"needs onnxruntime.*pip install 'morphc\[onnx\]'"):
        compile_program(program, "onnxruntime")


def test_export_failure_is_a_compile_error(monkeypatch: pytest.MonkeyPatch) -> None:
    z = zoo.build("tiny_mlp")
    program = morphc.lower(z.model, z.example_inputs)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported FX nodes: {'call_function': ['aten.some_op.default']}")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(CompileError, match=r"torch.onnx could not export .*aten.some_op.default"):
        compile_program(program, "onnxruntime")


def test_torch_compile_backend_with_onnxruntime_target() -> None:
    torch._dynamo.reset()
    z = zoo.build("resnet_block_cnn", batch_size=2)
    compiled = torch.compile(z.model, backend="morphc", dynamic=False, options={"target": "onnxruntime"})
    with torch.no_grad():
        got, expected = compiled(*z.example_inputs), z.model(*z.example_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
