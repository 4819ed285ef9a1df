"""Pass instruments (TVM's PassInstrument): hooks around every pass, for timing, statistics,
IR printing and dumping. Give them to `PassContext(instruments=[...])`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from morphc.ir.printer import print_program

if TYPE_CHECKING:
    from morphc.ir.program import Program
    from morphc.passes.base import Pass, PassResult
    from morphc.passes.manager import PassContext


class PassInstrument:
    """Hooks the PassManager calls; override the ones you need."""

    def enter_pipeline(self, pipeline_text: str, program: Program, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, program: Program, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, seconds: float) -> None: ...

    def exit_pipeline(self, program: Program, ctx: PassContext) -> None: ...


@dataclass
class PassRecord:
    """One pass execution as seen by Timing/Statistics."""

    pass_text: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    statistics: dict[str, float]


@dataclass
class PassTiming(PassInstrument):
    """Wall time, node counts and statistics of each pass (the metadata refresh after a change included)."""

    records: list[PassRecord] = field(default_factory=list)
    _nodes_before: int = 0

    def before_pass(self, p: Pass, program: Program, ctx: PassContext) -> None:
        self._nodes_before = len(program.graph.nodes)

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, seconds: float) -> None:
        self.records.append(PassRecord(p.to_text(), seconds, result.modified, self._nodes_before,
                                       len(result.program.graph.nodes), dict(result.statistics)))

    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def report(self) -> str:
        """A plain-text table: pass, time, share, nodes before -> after, statistics."""
        total = self.total_seconds() or 1e-12
        width = max([len(r.pass_text) for r in self.records] + [4])
        lines = [f"{'pass':<{width}}  {'ms':>9}  {'%':>5}  nodes", "-" * (width + 32)]
        for r in self.records:
            stats = " ".join(f"{k}={v:g}" for k, v in sorted(r.statistics.items()))
            lines.append(f"{r.pass_text:<{width}}  {r.seconds * 1e3:9.2f}  {100 * r.seconds / total:5.1f}  "
                         f"{r.nodes_before}->{r.nodes_after}  {stats}".rstrip())
        lines.append(f"{'total':<{width}}  {total * 1e3:9.2f}")
        return "\n".join(lines)


@dataclass
class PrintIR(PassInstrument):
    """Print the IR before and/or after passes (`--print-ir-after-all`, `--print-ir-after=cse`)."""

    before: frozenset[str] | bool = False  # True: every pass; a set: those pass names
    after: frozenset[str] | bool = True
    stream: TextIO = field(default_factory=lambda: sys.stderr)

    @staticmethod
    def _wants(selection: frozenset[str] | bool, p: Pass) -> bool:
        return selection is True or (isinstance(selection, frozenset) and p.name in selection)

    def before_pass(self, p: Pass, program: Program, ctx: PassContext) -> None:
        if self._wants(self.before, p):
            self.stream.write(f"// ----- IR before {p.to_text()} -----\n{print_program(program)}")

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, seconds: float) -> None:
        if self._wants(self.after, p):
            self.stream.write(f"// ----- IR after {p.to_text()} -----\n{print_program(result.program)}")


@dataclass
class DumpIR(PassInstrument):
    """Write the IR to `directory` before the pipeline and after each pass: 00-input.txt, 01-cse.txt, ..."""

    directory: Path
    written: list[Path] = field(default_factory=list)
    _index: int = 0

    def enter_pipeline(self, pipeline_text: str, program: Program, ctx: PassContext) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index = 0
        self._write("input", f"// pipeline: {pipeline_text}\n{print_program(program)}")

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, seconds: float) -> None:
        self._write(p.name, f"// after {p.to_text()} ({seconds * 1e3:.2f} ms)\n{print_program(result.program)}")

    def _write(self, label: str, text: str) -> None:
        path = self.directory / f"{self._index:02d}-{label}.txt"
        path.write_text(text)
        self.written.append(path)
        self._index += 1
