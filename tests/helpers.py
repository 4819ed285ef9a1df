"""Shared test helpers: output comparison, op counting, temporary pass registration."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.fx as fx

import morphc
from morphc.ir.metadata import op_name
from morphc.passes import base as pass_base

RTOL = 1e-5
ATOL = 1e-5


def assert_outputs_close(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                         rtol: float = RTOL, atol: float = ATOL, context: str = "") -> None:
    """Same output names, shapes and dtypes; values within atol/rtol scaled by the output's magnitude."""
    assert list(got) == list(expected), f"{context}output names {list(got)} != expected {list(expected)}"
    for name, ref in expected.items():
        out = got[name]
        assert out.shape == ref.shape, \
            f"{context}output '{name}' has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        assert out.dtype == ref.dtype, f"{context}output '{name}' has dtype {out.dtype}, expected {ref.dtype}"
        scale = max(1.0, float(ref.abs().max())) if ref.numel() and torch.isfinite(ref).all() else 1.0
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m, name=name: f"{context}output '{name}': {m}")


def count_ops(program: morphc.Program, name: str) -> int:
    """How many call_function nodes call the ATen operator `name` (e.g. "conv2d")."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and op_name(n.target) == name)


def call_nodes(program: morphc.Program) -> list[fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function"]


def node_names(program: morphc.Program) -> list[str]:
    return [n.name for n in program.graph.nodes]


@contextlib.contextmanager
def temporary_pass(cls: type[morphc.Pass]) -> Iterator[type[morphc.Pass]]:
    """Register a test-only pass for the duration of a `with` block, then remove it again."""
    assert cls.name not in pass_base._REGISTRY, f"pass name '{cls.name}' is already taken"
    morphc.register_pass(cls)
    try:
        yield cls
    finally:
        pass_base._REGISTRY.pop(cls.name, None)


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ATen operators actually executed (by bare name), to see what a program runs."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def assert_loads_without_model_code(saved: Path, inputs: tuple[torch.Tensor, ...], expected: torch.Tensor,
                                    target: str, *, timeout: float = 300) -> None:
    """A saved executable loads and runs in a fresh process that never imports transformers (so not
    the model's code), as `target`, and reproduces `expected` (output 'model')."""
    io = saved.parent / f"{saved.name}.io.pt"
    torch.save({"inputs": inputs, "expected": expected}, io)
    script = (
        "import sys, torch, morphc\n"
        f"exe = morphc.load_executable({str(saved)!r})\n"
        "assert 'transformers' not in sys.modules\n"
        f"io = torch.load({str(io)!r})\n"
        "got = exe(*io['inputs'])['model']\n"
        f"assert exe.target == {target!r}, exe.target\n"
        "assert torch.allclose(got, io['expected'], atol=1e-6), (got - io['expected']).abs().max()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=timeout)
