"""Partitioning with fallback: ops a target cannot take run in torch, the rest is compiled, the report
says what fell back and why, saved partitioned executables load again, and wrong numbers are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_outputs_close
from torch import nn

import morphc
from morphc.runtime import CompileError, compile_program, load_executable
from morphc.runtime.partition import PartitionedExecutable, plan

pytest.importorskip("onnxruntime", reason="the onnxruntime target is an optional dependency (morphc[onnx])")
pytest.importorskip("tvm", reason="the tvm target is an optional dependency (morphc[tvm])")


@torch.library.custom_op("morphc_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A custom operator no backend knows: it must run in torch."""
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.ops.morphc_test.scaled_tanh(self.a(x), 2.0)
        return self.c(torch.relu(self.b(h)) + h)


class HypotModel(nn.Module):
    """aten.hypot: TVM's importer has no converter; torch.onnx decomposes it to prims.hypot, which it
    cannot export either (found only while exporting)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = torch.hypot(y, y.flip(1))
        return self.fc(y.mean((2, 3)))


def _lower(model: nn.Module, *shape: int) -> tuple[morphc.Program, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return morphc.lower(model.eval(), (x,)), x


@pytest.mark.parametrize("target", ["onnxruntime", "tvm"])
def test_custom_op_falls_back_and_matches_eager(target: str) -> None:
    model = CustomOpModel()
    program, x = _lower(model, 3, 8)
    exe = compile_program(program, target, options={"threads": 1})
    assert isinstance(exe, PartitionedExecutable) and len(exe.pieces) == 2
    assert [(f.node, f.op) for f in exe.report.fallbacks] == [("scaled_tanh", "scaled_tanh.default")]
    assert "morphc_test.scaled_tanh" in exe.report.fallbacks[0].reason
    assert all(p.target == target for p in exe.pieces)
    with torch.no_grad():
        assert_outputs_close(exe(x), {"model": model(x)})


def test_aten_op_a_target_lacks_falls_back() -> None:
    model = HypotModel()
    program, x = _lower(model, 2, 3, 8, 8)
    tvm_exe = compile_program(program, "tvm", options={"threads": 1})
    assert [f.op for f in tvm_exe.report.fallbacks] == ["hypot.default"]
    assert "no converter for aten.hypot.default" in tvm_exe.report.fallbacks[0].reason
    ort_exe = compile_program(program, "onnxruntime")
    assert [f.op for f in ort_exe.report.fallbacks] == ["hypot.default"]
    assert "prims.hypot" in ort_exe.report.fallbacks[0].reason
    with torch.no_grad():
        expected = {"model": model(x)}
    assert_outputs_close(tvm_exe(x), expected, rtol=1e-4)
    assert_outputs_close(ort_exe(x), expected, rtol=1e-4)


def test_fallback_false_refuses_naming_the_node() -> None:
    program, _ = _lower(CustomOpModel(), 3, 8)
    with pytest.raises(CompileError, match=r"cannot take 1 node\(s\) \(scaled_tanh: .*fallback=True"):
        compile_program(program, "onnxruntime", fallback=False)


def test_plan_groups_weights_with_their_piece() -> None:
    program, _ = _lower(CustomOpModel(), 3, 8)
    groups = plan(program, {"scaled_tanh": "test"})
    assert len(groups) == 2 and all("scaled_tanh" not in g for g in groups)
    weights = [n.name for n in program.graph.nodes if n.op == "get_attr"]
    assert sorted(w for g in groups for w in g if w in weights) == sorted(weights)


@pytest.mark.parametrize("target", ["onnxruntime", "tvm"])
def test_partitioned_executable_saves_and_loads(target: str, tmp_path: Path) -> None:
    model = CustomOpModel()
    program, x = _lower(model, 3, 8)
    exe = compile_program(program, target, options={"threads": 1})
    saved = exe.save(tmp_path / "part.exe")
    assert (saved / "partition.json").is_file() and (saved / "pieces" / "1" / "executable.json").is_file()
    loaded = load_executable(saved)
    assert isinstance(loaded, PartitionedExecutable) and loaded.inner == target
    assert [f.node for f in loaded.report.fallbacks] == ["scaled_tanh"]
    assert torch.equal(loaded(x)["model"], exe(x)["model"])


def test_wrong_numbers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from morphc.runtime.onnx_runtime import OnnxRuntimeExecutable

    program, _ = _lower(CustomOpModel(), 3, 8)
    real_run = OnnxRuntimeExecutable.run

    def off_by_a_bit(self: OnnxRuntimeExecutable, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v + 1e-2 for k, v in real_run(self, *args).items()}

    monkeypatch.setattr(OnnxRuntimeExecutable, "run", off_by_a_bit)
    with pytest.raises(CompileError, match=r"computes output 'model' off by 0.0\d+ from eager torch"):
        compile_program(program, "onnxruntime")
    exe = compile_program(program, "onnxruntime", atol=0.1)  # a looser tolerance is the caller's choice
    assert 5e-3 < exe.report.max_abs_error < 0.1
