"""Partitioning with per-op fallback: what a target cannot take runs in torch, the rest is compiled.

A target says which nodes it cannot take (`Executable.unsupported_nodes`, with a reason each).
The Program's graph is split with torch.fx's fuser (`fuse_by_partitions`) into maximal groups of
supported nodes, each becoming a sub-Program compiled for the target; the top-level graph keeps
the unsupported nodes and calls the compiled pieces, so those ops run in eager torch. The compile
report lists every fallback node and why. Saving writes each piece as a saved executable plus the
node groups; loading rebuilds the same split from the saved Program without the model code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from morphc.ir.program import OutputSpec, Program, TensorSpec
from morphc.runtime.executable import CompileReport, Executable, Fallback

PARTITION_FILE = "partition.json"
PIECES_DIR = "pieces"
PREFIX = "morphc_piece_"


class _Supported(OperatorSupportBase):
    def __init__(self, unsupported: dict[str, str]) -> None:
        self.unsupported = unsupported

    def is_node_supported(self, submodules: Any, node: fx.Node) -> bool:
        return node.op == "call_function" and node.name not in self.unsupported


def plan(program: Program, unsupported: dict[str, str]) -> list[list[str]]:
    """Node-name groups to compile: maximal connected groups of supported call_function nodes
    (cycle-free, as torch's CapabilityBasedPartitioner forms them), plus the weights only they read."""
    gm = program.graph_module
    partitioner = CapabilityBasedPartitioner(gm, _Supported(unsupported), allows_single_node_partition=True)
    groups = []
    for part in partitioner.propose_partitions():
        names = {n.name for n in part.nodes}
        if names:
            groups.append(names)
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:  # weights read only inside one group travel with it (constants there)
        if node.op == "get_attr" and node.users:
            owners = [g for g in groups if all(u.name in g for u in node.users)]
            if owners:
                owners[0].add(node.name)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ordered = sorted((sorted(g, key=order.__getitem__) for g in groups), key=lambda g: order[g[0]])
    return [g for g in ordered if any(by_name[n].op == "call_function" for n in g)]


def split(program: Program, groups: list[list[str]]) -> fx.GraphModule:
    """A copy of the program's graph where each group is one submodule `morphc_piece_<i>`."""
    clone = program.clone()
    gm = clone.graph_module
    by_name = {n.name: n for n in gm.graph.nodes}
    partitions = [{by_name[name]: None for name in group} for group in groups]
    return fuse_by_partitions(gm, partitions, prefix=PREFIX, always_return_tuple=True)


def _piece_programs(top: fx.GraphModule, program: Program, count: int) -> list[Program]:
    """Each piece as a Program whose example inputs are what it receives on the program's examples."""
    captured: dict[int, tuple[torch.Tensor, ...]] = {}
    hooks = []
    for i in range(count):
        def hook(module: Any, args: tuple[Any, ...], i: int = i) -> None:
            captured[i] = tuple(a.detach().clone() for a in args)
        hooks.append(getattr(top, f"{PREFIX}{i}").register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            top(*program.example_inputs)
    finally:
        for h in hooks:
            h.remove()
    pieces = []
    for i in range(count):
        sub: fx.GraphModule = getattr(top, f"{PREFIX}{i}")
        sub.eval()
        args = captured[i]
        placeholders = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            outs = sub(*args)
        inputs = [TensorSpec(name, tuple(a.shape), a.dtype) for name, a in zip(placeholders, args)]
        outputs = [OutputSpec(f"out{k}", tuple(o.shape), o.dtype, task=f"piece{i}") for k, o in enumerate(outs)]
        pieces.append(Program(sub, inputs, outputs, args))
    return pieces


class _Call(torch.nn.Module):
    """Stands in for a fused submodule: runs the compiled piece, returns its outputs as a tuple."""

    def __init__(self, exe: Executable) -> None:
        super().__init__()
        self.exe = exe

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.exe.run(*args)
        return tuple(out[o.name] for o in self.exe.program.outputs)


class PartitionedExecutable(Executable):
    """Compiled pieces for one target, glued by a torch graph that runs the unsupported ops."""

    target = "partitioned"

    def __init__(self, program: Program, report: CompileReport, inner: str, groups: list[list[str]],
                 pieces: list[Executable]) -> None:
        super().__init__(program, report)
        self.inner = inner
        self.groups = groups
        self.pieces = pieces
        self.top = split(program, groups)
        for i, exe in enumerate(pieces):
            setattr(self.top, f"{PREFIX}{i}", _Call(exe))

    @classmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> PartitionedExecutable:
        raise NotImplementedError("use build(program, target, options, unsupported)")

    @classmethod
    def build(cls, program: Program, target_cls: type[Executable], options: dict[str, Any],
              unsupported: dict[str, str]) -> PartitionedExecutable:
        """Compile the supported groups for `target_cls`; unsupported nodes run in torch."""
        groups = plan(program, unsupported)
        top = split(program, groups)
        pieces = [target_cls.compile(p, options) for p in _piece_programs(top, program, len(groups))]
        by_name = {n.name: n for n in program.graph.nodes}
        report = CompileReport(target=target_cls.target, fallbacks=[
            Fallback(node=name, op=_op_name(by_name[name]), reason=reason) for name, reason in unsupported.items()])
        report.notes.append(f"partitioned: {len(pieces)} piece(s) compiled for '{target_cls.target}', "
                            f"{len(unsupported)} node(s) run in torch")
        for piece in pieces:
            report.notes.extend(piece.report.notes)
        return cls(program, report, target_cls.target, groups, pieces)

    @torch.no_grad()
    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.top(*args)
        return dict(zip((o.name for o in self.program.outputs), flat))

    def save_artifacts(self, directory: Path) -> None:
        (directory / PARTITION_FILE).write_text(json.dumps({"target": self.inner, "groups": self.groups}, indent=2))
        for i, piece in enumerate(self.pieces):
            piece.save(directory / PIECES_DIR / str(i))

    @classmethod
    def load_from(cls, directory: Path, program: Program, report: CompileReport) -> PartitionedExecutable:
        from morphc.runtime.executable import load_executable

        spec = json.loads((directory / PARTITION_FILE).read_text())
        pieces = [load_executable(directory / PIECES_DIR / str(i)) for i in range(len(spec["groups"]))]
        return cls(program, report, spec["target"], spec["groups"], pieces)


def _op_name(node: fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op
