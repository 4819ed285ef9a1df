"""The PassManager: instruments, verify_each, reproducers, terminal passes, analyses."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import count_ops, temporary_pass
from torch import nn

import morphc
from morphc import PassFailure, PassOptionError, VerificationError
from morphc.ir.program import Program
from morphc.passes import DumpIR, PassContext, PassManager, PassResult, PassTiming, PrintIR


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + torch.relu(self.a(x)))  # a repeated subexpression for cse


@pytest.fixture(scope="module")
def program() -> Program:
    torch.manual_seed(0)
    return morphc.lower(Small().eval(), torch.randn(2, 4))


# --- test-only passes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CallsTorchFunction(morphc.Pass):
    """Broken on purpose: inserts a call to a Python function (not an ATen operator)."""

    name: ClassVar[str] = "test-pm-non-aten"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        out = program.output_node
        leaf = out.args[0][0]
        with program.graph.inserting_before(out):
            new = program.graph.call_function(torch.sigmoid, (leaf,))
        out.args = ((new, *out.args[0][1:]),)
        return PassResult(program, modified=True)


@dataclass(frozen=True)
class Explodes(morphc.Pass):
    """Broken on purpose: raises."""

    name: ClassVar[str] = "test-pm-explodes"
    message: str = morphc.option("kaboom", "what to raise")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise RuntimeError(self.message)


@dataclass(frozen=True)
class Noop(morphc.Pass):
    name: ClassVar[str] = "test-pm-noop"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        return PassResult(program, modified=False, statistics={"looked-at": len(program.graph.nodes)})


@pytest.fixture
def broken_pass():
    with temporary_pass(CallsTorchFunction) as cls:
        yield cls


@pytest.fixture
def exploding_pass():
    with temporary_pass(Explodes) as cls:
        yield cls


def test_temporary_pass_is_unregistered_afterwards() -> None:
    with temporary_pass(Noop):
        assert morphc.registered_passes()["test-pm-noop"] is Noop
        morphc.Pipeline.parse("test-pm-noop")
    assert "test-pm-noop" not in morphc.registered_passes()
    with pytest.raises(morphc.PipelineSyntaxError, match="unknown pass 'test-pm-noop'"):
        morphc.Pipeline.parse("test-pm-noop")


# --- instruments ---------------------------------------------------------------------------------


def test_pass_timing_records_and_report(program: Program) -> None:
    timing = PassTiming()
    morphc.Pipeline.parse("cse,dce,fold-constants{max-mb=1.0}").run(program, PassContext(instruments=[timing]))
    texts = [r.pass_text for r in timing.records]
    assert texts == ["cse", "dce", "fold-constants{max-mb=1.0}"]
    cse, dce, _ = timing.records
    assert cse.modified and cse.nodes_after < cse.nodes_before
    assert dce.nodes_before == cse.nodes_after
    assert cse.statistics["ops-merged"] == 2  # the second linear and relu
    assert all(r.seconds >= 0 for r in timing.records)
    assert timing.total_seconds() == pytest.approx(sum(r.seconds for r in timing.records))

    lines = timing.report().splitlines()
    assert lines[0].split() == ["pass", "ms", "%", "nodes"]
    assert set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == [*texts, "total"]
    cse_row = lines[2].split()
    assert f"{cse.nodes_before}->{cse.nodes_after}" in cse_row
    assert "ops-merged=2" in cse_row
    assert float(cse_row[1]) == pytest.approx(cse.seconds * 1e3, abs=0.01)


def test_print_ir_after_every_pass(program: Program) -> None:
    stream = io.StringIO()
    result = morphc.Pipeline.parse("cse,dce").run(program, PassContext(instruments=[PrintIR(stream=stream)]))
    text = stream.getvalue()
    assert text.count("// ----- IR after ") == 2
    assert "// ----- IR after cse -----\nprogram tasks=[model]" in text
    assert text.endswith("// ----- IR after dce -----\n" + morphc.print_program(result))
    assert "IR before" not in text


def test_print_ir_before_selected_passes(program: Program) -> None:
    stream = io.StringIO()
    instrument = PrintIR(before=frozenset({"dce"}), after=False, stream=stream)
    morphc.Pipeline.parse("cse,dce").run(program, PassContext(instruments=[instrument]))
    text = stream.getvalue()
    assert text.count("// -----") == 1 and text.startswith("// ----- IR before dce -----\n")
    assert count_ops(program, "linear") == 3  # printed after cse: one linear merged
    assert text.count("aten.linear") == 2


def test_dump_ir_writes_one_file_per_step(program: Program, tmp_path: Path) -> None:
    dump = DumpIR(tmp_path / "dump")
    result = morphc.Pipeline.parse("cse,dce").run(program, PassContext(instruments=[dump]))
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["00-input.txt", "01-cse.txt", "02-dce.txt"]
    assert dump.written == [tmp_path / "dump" / n for n in names]
    first = (tmp_path / "dump" / "00-input.txt").read_text()
    assert first.startswith("// pipeline: cse,dce\n")
    assert first.count("aten.linear") == 3
    last = (tmp_path / "dump" / "02-dce.txt").read_text()
    assert last.startswith("// after dce (") and last.endswith(morphc.print_program(result))


def test_instrument_hooks_are_called_in_order(program: Program) -> None:
    calls: list[str] = []

    class Recorder(morphc.PassInstrument):
        def enter_pipeline(self, text, program, ctx):
            calls.append(f"enter {text}")

        def before_pass(self, p, program, ctx):
            calls.append(f"before {p.name}")

        def after_pass(self, p, result, ctx, seconds):
            calls.append(f"after {p.name} modified={result.modified}")

        def exit_pipeline(self, program, ctx):
            calls.append("exit")

    with temporary_pass(Noop):
        morphc.Pipeline.parse("cse,test-pm-noop").run(program, PassContext(instruments=[Recorder()]))
    assert calls == ["enter cse,test-pm-noop", "before cse", "after cse modified=True", "before test-pm-noop",
                     "after test-pm-noop modified=False", "exit"]


# --- verify_each, reproducers ---------------------------------------------------------------------


def test_verify_each_names_the_pass_that_broke_the_ir(program: Program, broken_pass, tmp_path: Path) -> None:
    ctx = PassContext(verify_each=True, reproducer_dir=tmp_path)
    with pytest.raises(VerificationError) as info:
        morphc.Pipeline.parse("cse,test-pm-non-aten,dce").run(program, ctx)
    err = info.value
    assert err.after_pass == "test-pm-non-aten"
    assert "IR verification failed after pass 'test-pm-non-aten'" in str(err)
    (problem,) = err.problems
    assert problem.startswith("node %sigmoid (call_function sigmoid)") and "only ATen operators" in problem
    assert "reproducer: " in str(err)


def test_without_verify_each_the_broken_ir_goes_through(program: Program, broken_pass) -> None:
    result = morphc.Pipeline.parse("test-pm-non-aten").run(program, PassContext(reproducer_dir=None))
    with pytest.raises(VerificationError):
        morphc.verify(result)


def test_reproducer_replays_a_verification_failure(program: Program, broken_pass, tmp_path: Path) -> None:
    ctx = PassContext(verify_each=True, reproducer_dir=tmp_path)
    with pytest.raises(VerificationError) as info:
        morphc.Pipeline.parse("cse,test-pm-non-aten,dce").run(program, ctx)
    (directory,) = tmp_path.iterdir()
    assert str(directory) in str(info.value)
    assert sorted(p.name for p in directory.iterdir()) == ["error.txt", "full-pipeline.txt", "input.safetensors",
                                                           "pipeline.txt"]
    assert (directory / "pipeline.txt").read_text() == "test-pm-non-aten\n"
    assert (directory / "full-pipeline.txt").read_text() == "cse,test-pm-non-aten,dce\n"
    assert "VerificationError" in (directory / "error.txt").read_text()
    # the saved input is the program just before the failing pass: after cse
    saved = morphc.load(directory / "input.safetensors")
    assert count_ops(saved, "linear") == 2
    morphc.verify(saved)
    replay = morphc.Pipeline.parse((directory / "pipeline.txt").read_text().strip())
    with pytest.raises(VerificationError, match="after pass 'test-pm-non-aten'"):
        replay.run(saved, PassContext(verify_each=True, reproducer_dir=None))


def test_pass_failure_writes_a_reproducer(program: Program, exploding_pass, tmp_path: Path) -> None:
    ctx = PassContext(reproducer_dir=tmp_path)
    with pytest.raises(PassFailure) as info:
        morphc.Pipeline.parse('dce,test-pm-explodes{message="bad thing"}').run(program, ctx)
    err = info.value
    assert err.pass_text == 'test-pm-explodes{message="bad thing"}'
    assert str(err).startswith("pass 'test-pm-explodes{message=\"bad thing\"}' failed: RuntimeError: bad thing")
    assert isinstance(err.__cause__, RuntimeError)
    directory = Path(err.reproducer)
    assert directory.parent == tmp_path and f"reproducer written to {directory}" in str(err)
    assert (directory / "pipeline.txt").read_text() == 'test-pm-explodes{message="bad thing"}\n'
    error_text = (directory / "error.txt").read_text()
    assert "RuntimeError: bad thing" in error_text and "Traceback" in error_text
    saved = morphc.load(directory / "input.safetensors")
    assert str(saved).splitlines()[2:] == str(morphc.Pipeline.parse("dce").run(program)).splitlines()[2:]
    with pytest.raises(PassFailure, match="bad thing"):
        morphc.Pipeline.parse((directory / "pipeline.txt").read_text()).run(saved, PassContext(reproducer_dir=None))


def test_no_reproducer_when_disabled(program: Program, exploding_pass) -> None:
    with pytest.raises(PassFailure) as info:
        morphc.Pipeline.parse("test-pm-explodes").run(program, PassContext(reproducer_dir=None))
    assert info.value.reproducer is None
    assert "reproducer" not in str(info.value)


def test_unwritable_reproducer_dir_does_not_hide_the_failure(program: Program, exploding_pass,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PassFailure, match="kaboom") as info:
        morphc.Pipeline.parse("test-pm-explodes").run(program, PassContext(reproducer_dir=blocker))
    assert info.value.reproducer is None


def test_verify_each_checks_the_input_too(program: Program) -> None:
    broken = program.clone()
    del broken.node("relu").meta["morphc"]
    with pytest.raises(VerificationError, match="%relu"):
        morphc.Pipeline.parse("dce").run(broken, PassContext(verify_each=True, reproducer_dir=None))


# --- pipelines and terminal passes ---------------------------------------------------------------


def test_terminal_pass_must_be_last() -> None:
    with pytest.raises(PassOptionError, match=r"pass 'compile' produces an executable and must end the pipeline "
                                              r"\(found at position 1 of 2\)"):
        morphc.Pipeline.parse("compile,cse")
    compile_cls = morphc.registered_passes()["compile"]
    with pytest.raises(PassOptionError, match="position 2 of 3"):
        PassManager([morphc.registered_passes()["dce"](), compile_cls(), compile_cls()])


def test_terminal_pass_returns_its_artifact(program: Program) -> None:
    exe = morphc.Pipeline.parse("cse,compile").run(program)
    assert isinstance(exe, morphc.Executable)
    x = torch.randn(2, 4)
    assert torch.allclose(exe(x)["model"], program(x)["model"], atol=1e-6)


def test_pipeline_rejects_non_passes() -> None:
    with pytest.raises(TypeError, match="pipeline element #1 is a str, not a Pass"):
        morphc.Pipeline([morphc.registered_passes()["cse"](), "dce"])  # type: ignore[list-item]


def test_pass_manager_accepts_text_objects_and_pipelines(program: Program) -> None:
    cse = morphc.registered_passes()["cse"]()
    texts = {str(PassManager(x).pipeline) for x in ("cse", [cse], morphc.Pipeline([cse]))}
    assert texts == {"cse"}


# --- analyses -----------------------------------------------------------------------------------


def test_analysis_cache_invalidated_by_modifying_passes(program: Program) -> None:
    calls: list[int] = []

    def count_nodes(p: Program) -> int:
        calls.append(p.generation)
        return len(p.graph.nodes)

    ctx = PassContext()
    work = program.clone()
    assert ctx.analysis(count_nodes, work) == len(work.graph.nodes)
    assert ctx.analysis(count_nodes, work) == len(work.graph.nodes)
    assert len(calls) == 1
    work.mark_modified()
    ctx.analysis(count_nodes, work)
    assert len(calls) == 2
    ctx.invalidate(work)
    ctx.analysis(count_nodes, work)
    assert len(calls) == 3
