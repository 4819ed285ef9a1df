"""One Executable interface for every compile target, a registry of targets, and `compile_program`.

Whatever the target, compiling checks the executable against eager execution of the Program on
its example inputs and refuses (CompileError) when outputs differ beyond the tolerance: an
executable never returns wrong numbers silently.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from morphc.errors import MorphcError, SerializationError, did_you_mean
from morphc.ir import serialization
from morphc.ir.annotations import Annotation
from morphc.ir.program import Program

MANIFEST = "executable.json"
PROGRAM_FILE = "program.safetensors"


class CompileError(MorphcError):
    """A target could not compile a program, or compiled it to something that computes wrong values."""


class UnsupportedOpsError(CompileError):
    """Compiling found nodes the target cannot take (`nodes`: {node name: reason}); with fallback
    on, compile_program then runs those nodes in torch and compiles the rest."""

    def __init__(self, message: str, nodes: dict[str, str]) -> None:
        super().__init__(message)
        self.nodes = dict(nodes)


@dataclass
class Fallback:
    """A node the target could not take, which runs in torch instead."""

    node: str
    op: str
    reason: str


@dataclass
class CompileReport:
    """What compiling did: target, time, what fell back to torch, how closely outputs matched eager."""

    target: str
    compile_seconds: float = 0.0
    fallbacks: list[Fallback] = field(default_factory=list)
    max_abs_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompileReport:
        data = dict(data)
        data["fallbacks"] = [Fallback(**f) for f in data.get("fallbacks", [])]
        return cls(**data)


class Executable(ABC):
    """A compiled Program: call it like the Program ({output name: tensor}), save it, load it."""

    target: ClassVar[str]
    uses_records: ClassVar[bool] = False  # takes options["records"] (the compile pass passes PassContext.records)

    def __init__(self, program: Program, report: CompileReport) -> None:
        self.program = program
        self.report = report

    @classmethod
    @abstractmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> Executable:
        """Build the executable for `program` (options are target-specific)."""

    @classmethod
    def unsupported_nodes(cls, program: Program, options: dict[str, Any]) -> dict[str, str]:
        """{node name: reason} for nodes this target cannot take (they fall back to torch)."""
        return {}

    @abstractmethod
    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Execute on inputs already checked against the program's input specs."""

    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        self.program.check_inputs(args)
        return self.run(*args)

    @property
    def annotations(self) -> dict[str, Annotation]:
        return dict(self.program.annotations)

    def save(self, path: str | Path) -> Path:
        """Write a directory holding the manifest, the program, and target artifacts."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        serialization.save(self.program, path / PROGRAM_FILE)
        self.save_artifacts(path)
        manifest = {"format": "morphc.executable", "version": 1, "target": self.target,
                    "report": self.report.to_json()}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return path

    def save_artifacts(self, directory: Path) -> None:
        """Write target-specific files beside the program (none for eager)."""
        return None

    @classmethod
    def load_from(cls, directory: Path, program: Program, report: CompileReport) -> Executable:
        """Rebuild from a saved directory; targets with artifacts override this."""
        return cls(program, report)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, tasks={list(self.program.tasks)})"


E = TypeVar("E", bound=type[Executable])
_TARGETS: dict[str, type[Executable]] = {}


def register_target(cls: E) -> E:
    """Class decorator: make an Executable class the compile target named `cls.target`."""
    _TARGETS[cls.target] = cls
    return cls


def targets() -> dict[str, type[Executable]]:
    return dict(sorted(_TARGETS.items()))


def target_class(name: str) -> type[Executable]:
    if name not in _TARGETS:
        raise CompileError(f"unknown compile target '{name}'{did_you_mean(name, _TARGETS)}; "
                           f"available targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]


def check_target_option(target: str, name: str, value: Any, *, choices: Sequence[str] | None = None,
                        minimum: int | None = None) -> None:
    """Refuse a bad target option with the one message every target uses (option, target, what is valid)."""
    if choices is not None and value not in choices:
        raise CompileError(f"option '{name}' of target '{target}' must be one of {', '.join(choices)}; got {value!r}")
    if minimum is not None and value is not None and value < minimum:
        raise CompileError(f"option '{name}' of target '{target}' must be >= {minimum}, got {value}")


def nodes_rejected(program: Program, why: Callable[[torch._ops.OpOverload], str | None]) -> dict[str, str]:
    """Node name -> reason, for the operator calls (OpOverloads) that `why` rejects; other call targets
    (operator.getitem and friends) every target handles. What targets' `unsupported_nodes` build on."""
    out = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            reason = why(node.target)
            if reason is not None:
                out[node.name] = reason
    return out


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a - b| over all outputs, and the output where it occurs."""
    worst, where = 0.0, ""
    for name, ref in a.items():
        got = b[name]
        if got.shape != ref.shape:
            return float("inf"), name
        err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        if not err <= worst:  # also catches NaN
            worst, where = err, name
    return worst, where


def compile_program(program: Program, target: str = "eager", *, verify: bool = True, atol: float = 1e-4,
                    rtol: float = 1e-4, options: dict[str, Any] | None = None, fallback: bool = True) -> Executable:
    """Compile `program` for `target`; with `verify`, refuse results that differ from eager.

    Nodes the target cannot take run in torch (`fallback`, listed in the report's fallbacks) with
    the rest compiled in pieces; with fallback=False they make compiling fail instead.
    """
    cls = target_class(target)
    opts = dict(options or {})
    start = time.perf_counter()
    unsupported = cls.unsupported_nodes(program, opts)
    if unsupported and not fallback:
        listed = "; ".join(f"{name}: {why}" for name, why in unsupported.items())
        raise CompileError(f"target '{target}' cannot take {len(unsupported)} node(s) ({listed}); "
                           "compile with fallback=True to run them in torch")
    exe: Executable | None = None
    if not unsupported:
        try:
            exe = cls.compile(program, opts)
        except UnsupportedOpsError as err:  # found only while compiling (e.g. an op decomposing to one
            if not fallback:               # the exporter lacks): fall back for those nodes
                raise
            unsupported = err.nodes
    if exe is None:
        from morphc.runtime.partition import PartitionedExecutable

        exe = PartitionedExecutable.build(program, cls, opts, unsupported)
    exe.report.compile_seconds = time.perf_counter() - start
    if verify:
        expected = program(*program.example_inputs)
        got = exe(*program.example_inputs)
        err, where = max_abs_difference(expected, got)
        scale = max((v.abs().max().item() for v in expected.values() if v.numel()), default=0.0)
        exe.report.max_abs_error = err
        if not err <= atol + rtol * scale:
            raise CompileError(f"target '{target}' computes output '{where}' off by {err:.3g} from eager torch "
                               f"(allowed {atol:g} + {rtol:g} x {scale:.3g}); refusing to return a wrong executable")
    return exe


def load_executable(path: str | Path) -> Executable:
    """Load a directory written by `Executable.save`, without the original model code."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SerializationError(f"'{path}' is not a saved morphc executable (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise SerializationError(f"'{manifest_path}' is corrupt: {exc}") from exc
    if manifest.get("format") != "morphc.executable" or manifest.get("version") != 1:
        raise SerializationError(f"'{manifest_path}' has format {manifest.get('format')!r} "
                                 f"version {manifest.get('version')!r}; expected morphc.executable version 1")
    if manifest["target"] == "partitioned":
        from morphc.runtime.partition import PartitionedExecutable

        cls: type[Executable] = PartitionedExecutable
    else:
        cls = target_class(manifest["target"])
    program = serialization.load(path / PROGRAM_FILE)
    return cls.load_from(path, program, CompileReport.from_json(manifest["report"]))

