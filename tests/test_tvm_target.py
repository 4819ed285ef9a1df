"""The TVM target: every small zoo model matches eager on llvm, CUDA builds give CUDA source without
a GPU, save/load works without the model code, and tuning records are stored and replayed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_loads_without_model_code, assert_outputs_close

import morphc
from morphc import zoo
from morphc.predictors.records import RecordsDB
from morphc.runtime import CompileError, compile_program, load_executable, targets
from morphc.runtime.tvm_target import TUNING_KIND, TvmExecutable

pytest.importorskip("tvm", reason="the tvm target is an optional dependency (morphc[tvm])")


def _program(name: str, batch_size: int = 2) -> tuple[morphc.Program, zoo.ZooModel]:
    z = zoo.build(name, batch_size=batch_size)
    return morphc.lower(z.model, z.example_inputs), z


def test_target_is_registered() -> None:
    assert targets()["tvm"] is TvmExecutable


@pytest.mark.parametrize("name", zoo.names(size="small"))
def test_every_small_zoo_model_matches_eager_on_llvm(name: str) -> None:
    program, z = _program(name)
    exe = compile_program(program, "tvm", options={"threads": 1})
    assert isinstance(exe, TvmExecutable) and not exe.report.fallbacks
    with torch.no_grad():
        expected = {"model": z.model(*z.example_inputs)}
    assert_outputs_close(exe(*z.example_inputs), expected, rtol=1e-4, atol=1e-5)
    assert_outputs_close(exe(*z.example_inputs), expected, rtol=1e-4, atol=1e-5)  # buffers are not reused wrongly


def test_pipeline_text_compiles_for_tvm() -> None:
    program, _ = _program("resnet_block_cnn")
    exe = morphc.Pipeline.parse("fold-batchnorm,cse,dce,compile{target=tvm}").run(program)
    assert exe.target == "tvm" and exe.report.max_abs_error is not None and exe.report.max_abs_error < 1e-4


def test_torch_compile_backend_with_tvm_target() -> None:
    torch._dynamo.reset()
    z = zoo.build("resnet_block_cnn", batch_size=2)
    compiled = torch.compile(z.model, backend="morphc", dynamic=False, options={"target": "tvm", "strict": True})
    with torch.no_grad():
        got, expected = compiled(*z.example_inputs), z.model(*z.example_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_compile_pass_hands_records_to_tvm(tmp_path: Path) -> None:
    program, _ = _program("tiny_mlp")
    records = RecordsDB(tmp_path / "records.sqlite")
    ctx = morphc.PassContext(records=records, options={"tvm": {"threads": 1}})
    exe = morphc.PassManager(morphc.Pipeline.parse("compile{target=tvm}")).run(program, ctx)
    assert exe.tuning["tasks"] >= 2 and exe.tuning["records_replayed"] == 0  # looked up, nothing stored yet


@pytest.mark.parametrize("name", ["resnet_block_cnn", "bert-small"])
def test_cuda_build_produces_cuda_source_without_a_gpu(name: str, tmp_path: Path) -> None:
    program, _ = _program(name, batch_size=1)
    exe = compile_program(program, "tvm", verify=False, options={"target": "cuda", "arch": "sm_80"})
    source = exe.cuda_source()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    assert len(kernels) >= 3, "expected one CUDA kernel per fused operator"
    saved = exe.save(tmp_path / "cuda.exe")
    assert (saved / "model.cu").read_text() == source
    if shutil.which("nvcc"):  # the machine's CUDA toolkit turns the source into PTX without a GPU
        (tmp_path / "k.cu").write_text(source)
        subprocess.run(["nvcc", "-ptx", "-arch=sm_80", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.ptx")],
                       check=True, capture_output=True, timeout=300)
        assert (tmp_path / "k.ptx").read_text().count(".entry") == len(kernels)
    if not torch.cuda.is_available():
        with pytest.raises(CompileError, match="needs a GPU"):
            exe(*program.example_inputs)


def test_save_and_load_without_the_model_code(tmp_path: Path) -> None:
    program, z = _program("bert-small")
    exe = compile_program(program, "tvm", options={"threads": 1})
    saved = exe.save(tmp_path / "bert.exe")
    assert (saved / "model.so").stat().st_size > 0
    expected = exe(*z.example_inputs)["model"]
    assert_loads_without_model_code(saved, z.example_inputs, expected, "tvm")
    assert torch.equal(load_executable(saved)(*z.example_inputs)["model"], expected)


def test_tuning_records_are_stored_and_replayed(tmp_path: Path) -> None:
    program, z = _program("tiny_mlp")
    records = RecordsDB(tmp_path / "records.sqlite")
    opts = {"threads": 1, "trials": 3, "trials_per_task": 1, "records": records}
    first = compile_program(program, "tvm", options=opts)
    assert first.tuning["trials_run"] == 3 and first.tuning["tasks"] >= 2
    stored = list(records.query(kind=TUNING_KIND))
    assert len(stored) == 1 and stored[0].stats["trials"] == 3 and stored[0].stats["tuning_records"]
    again = compile_program(program, "tvm", options=opts)  # same model: no tuning, records applied
    assert again.tuning["trials_run"] == 0 and again.tuning["records_replayed"] >= 1
    assert again.tuning["workload"] == first.tuning["workload"]
    assert "replayed" in again.report.notes[-1]
    assert len(list(records.query(kind=TUNING_KIND))) == 1
    with torch.no_grad():
        expected = {"model": z.model(*z.example_inputs)}
    assert_outputs_close(again(*z.example_inputs), expected, rtol=1e-4, atol=1e-5)
    other, _ = _program("tiny_mlp", batch_size=5)  # other shapes: another workload, nothing to replay
    untuned = compile_program(other, "tvm", options={**opts, "trials": 0})
    assert untuned.tuning["records_replayed"] == 0 and untuned.tuning["workload"] != first.tuning["workload"]


@pytest.mark.parametrize(("options", "message"), [
    ({"trails": 3}, r"no option\(s\) \['trails'\]; did you mean 'trials'"),
    ({"target": "vulkan"}, "must be 'llvm', 'cuda' or a JSON-dict TVM target; got 'vulkan'"),
    ({"target": {"kind": "metal"}}, "needs kind 'llvm' or 'cuda'"),
    ({"trials": -1}, "option 'trials' of target 'tvm' must be >= 0"),
])
def test_bad_options_are_named(options: dict, message: str) -> None:
    program, _ = _program("tiny_mlp")
    with pytest.raises(CompileError, match=message):
        compile_program(program, "tvm", options=options)


def test_missing_tvm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    program, _ = _program("tiny_mlp")
    monkeypatch.setitem(sys.modules, "tvm", None)
    with pytest.raises(CompileError, match=r"needs apache-tvm: pip install 'morphc\[tvm\]'"):
        compile_program(program, "tvm")


def test_tuning_leaves_gathers_alone_and_still_matches(tmp_path: Path) -> None:
    """Candidates are measured in this process on random inputs: random gather indices would be out of
    bounds (TVM's fast `take` segfaults), so tasks with integer index inputs are not tuned."""
    program, z = _program("bert-small")
    opts = {"threads": 1, "trials": 4, "trials_per_task": 1, "records": RecordsDB(tmp_path / "records.sqlite")}
    exe = compile_program(program, "tvm", options=opts)
    assert exe.tuning["trials_run"] == 4 and exe.tuning["untuned_gathers"]
    assert any("not tuned (integer index inputs" in n for n in exe.report.notes)
    with torch.no_grad():
        expected = {"model": z.model(*z.example_inputs)}
    assert_outputs_close(exe(*z.example_inputs), expected, rtol=1e-4, atol=1e-4)
