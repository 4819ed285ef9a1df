"""PassContext and PassManager: run a pipeline with instruments, verification and reproducers.

As MLIR's pass manager: `verify_each` checks the IR after every pass and names the pass that broke
it; when a pass raises, a reproducer (the failing pass's pipeline text, the program just before it,
the error) is written so `morphc opt <dir>/input.safetensors -p "$(cat <dir>/pipeline.txt)"` replays it.
As TVM's PassContext: an opt level, disabled passes, instruments, and a cache of analyses.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from morphc.errors import PassFailure, VerificationError
from morphc.ir import serialization
from morphc.ir.annotations import PipelineHistory
from morphc.ir.program import Program
from morphc.ir.verifier import verify
from morphc.passes.base import Pass, PassResult
from morphc.passes.instruments import PassInstrument
from morphc.passes.pipeline import Pipeline

T = TypeVar("T")

DEFAULT_REPRODUCER_DIR = Path(tempfile.gettempdir()) / "morphc-reproducers"


@dataclass
class PassContext:
    """Everything a pass may consult besides the program: device, options, instruments, analyses.

    Later capabilities (cost model, records database, executor, calibration data) are fields here,
    so passes reach predictors only through the context.
    """

    device: str = "cpu"
    opt_level: int = 2
    verify_each: bool = False
    instruments: list[PassInstrument] = field(default_factory=list)
    disabled_passes: frozenset[str] = frozenset()
    reproducer_dir: Path | None = DEFAULT_REPRODUCER_DIR
    calibration: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    # Predictors and services passes consult (set by the caller; passes never import predictors):
    cost_model: Any = None  # object with predict(program, config) -> seconds (morphc.predictors.cost_model)
    records: Any = None  # a RecordsDB or a path to one: profiles, tuning logs, search state
    executor: str = "local"  # where long searches run trials: "local" (process pool) or "ray"
    _analyses: dict[tuple[str, int, int], Any] = field(default_factory=dict, repr=False)

    def analysis(self, compute: Callable[[Program], T], program: Program) -> T:
        """`compute(program)`, cached until a pass changes the program (its generation moves)."""
        key = (f"{compute.__module__}.{compute.__qualname__}", id(program), program.generation)
        if key not in self._analyses:
            self._analyses[key] = compute(program)
        return self._analyses[key]

    def invalidate(self, program: Program) -> None:
        for key in [k for k in self._analyses if k[1] == id(program)]:
            del self._analyses[key]


class PassManager:
    """Runs a Pipeline on a copy of a program; see the module docstring."""

    def __init__(self, pipeline: Pipeline | str | Sequence[Pass]) -> None:
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)

    def run(self, program: Program, ctx: PassContext | None = None) -> Any:
        """Returns the transformed Program, or the artifact of the pipeline's terminal pass."""
        ctx = ctx or PassContext()
        text = str(self.pipeline)
        current = program.clone()
        history = current.annotation(PipelineHistory)
        current.annotate(PipelineHistory((history.pipelines if history else ()) + (text,)))
        if ctx.verify_each:
            verify(current)
        for inst in ctx.instruments:
            inst.enter_pipeline(text, current, ctx)
        artifact = None
        for p in self.pipeline:
            if p.name in ctx.disabled_passes or (p.opt_level > ctx.opt_level and not p.terminal):
                continue
            result = self._run_one(p, current, ctx)
            current = result.program
            artifact = result.artifact
        for inst in ctx.instruments:
            inst.exit_pipeline(current, ctx)
        return artifact if artifact is not None else current

    def _run_one(self, p: Pass, program: Program, ctx: PassContext) -> PassResult:
        snapshot = program.clone() if ctx.reproducer_dir is not None else None
        for inst in ctx.instruments:
            inst.before_pass(p, program, ctx)
        start = time.perf_counter()
        try:
            result = p.run(program, ctx)
            if result.modified:
                result.program.mark_modified()
                ctx.invalidate(program)
            if ctx.verify_each:
                verify(result.program, after_pass=p.to_text())
        except Exception as exc:
            path = _write_reproducer(ctx.reproducer_dir, p, snapshot, exc, self.pipeline) if snapshot else None
            if isinstance(exc, VerificationError):
                exc.args = (f"{exc}\n  reproducer: {path}",) if path else exc.args
                raise
            raise PassFailure(p.to_text(), exc, str(path) if path else None) from exc
        seconds = time.perf_counter() - start
        for inst in ctx.instruments:
            inst.after_pass(p, result, ctx, seconds)
        return result


def _write_reproducer(root: Path, p: Pass, program: Program, exc: BaseException, pipeline: Pipeline) -> Path | None:
    """Save what replays a failure: the pass, the IR before it, the error. Never raises."""
    try:
        directory = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{p.name}-{id(exc):x}"
        directory.mkdir(parents=True, exist_ok=True)
        serialization.save(program, directory / "input.safetensors")
        (directory / "pipeline.txt").write_text(p.to_text() + "\n")
        (directory / "full-pipeline.txt").write_text(str(pipeline) + "\n")
        (directory / "error.txt").write_text("".join(traceback.format_exception(exc)))
        return directory
    except Exception:  # a reproducer must never hide the real failure
        return None
