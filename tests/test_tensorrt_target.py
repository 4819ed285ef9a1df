"""The TensorRT target up to the engine: the ONNX model it gets is checked and matches eager in ONNX
Runtime, engine cache keys separate models/shapes/precisions, and a missing TensorRT is a clear
error. Engine building and running are tested only where `import tensorrt` works (with a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
import torch
from helpers import assert_outputs_close

import morphc
from morphc import zoo
from morphc.runtime import CompileError, compile_program, load_executable, targets
from morphc.runtime.onnx_runtime import export_onnx
from morphc.runtime.tensorrt_target import TensorRTExecutable, TensorRTMissingError, engine_key

pytest.importorskip("onnxruntime", reason="the tensorrt target checks its ONNX model in onnxruntime (morphc[onnx])")
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _program(name: str, batch_size: int = 2) -> tuple[morphc.Program, zoo.ZooModel]:
    z = zoo.build(name, batch_size=batch_size)
    return morphc.lower(z.model, z.example_inputs), z


def test_target_is_registered() -> None:
    assert targets()["tensorrt"] is TensorRTExecutable


@pytest.mark.skipif(HAVE_TRT, reason="checks the message given where TensorRT is missing")
@pytest.mark.parametrize("name", ["resnet_block_cnn", "bert-small"])
def test_without_tensorrt_the_checked_onnx_model_is_written(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    program, z = _program(name)
    with pytest.raises(TensorRTMissingError, match=r"needs NVIDIA TensorRT.*checked ONNX model .* is at (\S+\.onnx)") \
            as info:
        compile_program(program, "tensorrt", options={"cache_dir": str(tmp_path)})
    path = Path(str(info.value).split(" is at ")[1].split(" (")[0])
    assert path.parent == tmp_path and path.is_file()
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), z.example_inputs)})[0]
    with torch.no_grad():
        assert_outputs_close({"model": torch.from_numpy(got)}, {"model": z.model(*z.example_inputs)}, rtol=1e-4)


def test_a_wrong_onnx_model_is_refused_before_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    program, _ = _program("tiny_mlp")
    other, _ = _program("tiny_mlp")
    with torch.no_grad():
        for p in other.graph_module.parameters():
            p.mul_(0.5)
        for buf in other.graph_module.buffers():
            buf.mul_(0.5)
    wrong = export_onnx(other)
    monkeypatch.setattr("morphc.runtime.tensorrt_target.export_onnx", lambda program, target: wrong)
    with pytest.raises(CompileError, match=r"the ONNX model for TensorRT computes output 'model' off by"):
        compile_program(program, "tensorrt", options={"cache_dir": str(tmp_path)})


def test_engine_cache_key_depends_on_model_shapes_and_precision() -> None:
    small, _ = _program("resnet_block_cnn", batch_size=1)
    large, _ = _program("resnet_block_cnn", batch_size=4)
    a, b = export_onnx(small), export_onnx(large)
    assert engine_key(a, "fp32") == engine_key(a, "fp32")
    assert len({engine_key(a, "fp32"), engine_key(a, "fp16"), engine_key(b, "fp32")}) == 3


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "int8"}, "must be one of fp32, fp16; got 'int8'"),
    ({"presicion": "fp16"}, r"no option\(s\) \['presicion'\]; did you mean 'precision'"),
    ({"workspace_mb": 0}, "must be >= 1"),
])
def test_bad_options_are_named(options: dict, message: str) -> None:
    program, _ = _program("tiny_mlp")
    with pytest.raises(CompileError, match=message):
        compile_program(program, "tensorrt", options=options)


def test_missing_tensorrt_message_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    program, _ = _program("tiny_mlp")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTMissingError, match=r"pip install tensorrt .*trtexec --onnx="):
        compile_program(program, "tensorrt", options={"cache_dir": str(tmp_path)})


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT and a CUDA GPU are not available here: engines cannot be built")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_runs_caches_and_round_trips(precision: str, tmp_path: Path) -> None:
    program, z = _program("resnet_block_cnn")
    tol = 1e-3 if precision == "fp32" else 5e-2
    exe = compile_program(program, "tensorrt", atol=tol, rtol=tol,
                          options={"precision": precision, "cache_dir": str(tmp_path / "cache")})
    assert any("engine built" in n for n in exe.report.notes)
    again = compile_program(program, "tensorrt", atol=tol, rtol=tol,
                            options={"precision": precision, "cache_dir": str(tmp_path / "cache")})
    assert any("loaded from cache" in n for n in again.report.notes)
    saved = exe.save(tmp_path / "trt.exe")
    torch.testing.assert_close(load_executable(saved)(*z.example_inputs)["model"], exe(*z.example_inputs)["model"])
