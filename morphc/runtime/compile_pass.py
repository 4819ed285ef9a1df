"""`compile{target=...}`: the terminal pass that turns a Program into an Executable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from morphc.errors import PassOptionError
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.manager import PassContext
from morphc.runtime.executable import compile_program, target_class, targets


@register_pass
@dataclass(frozen=True)
class Compile(Pass):
    """Compile the program for a target; outputs are checked against eager on the example inputs."""

    name: ClassVar[str] = "compile"
    terminal: ClassVar[bool] = True
    target: str = option("eager", "compile target (see `morphc passes`: eager and any installed backends)")
    verify: bool = option(True, "compare against eager torch on the example inputs and refuse mismatches")
    atol: float = option(1e-4, "absolute tolerance of that comparison")
    rtol: float = option(1e-4, "relative tolerance (times the largest reference magnitude)")

    def __post_init__(self) -> None:
        if self.target not in targets():
            raise PassOptionError(f"option 'target' of pass 'compile' must be one of {', '.join(targets())}; "
                                  f"got '{self.target}'")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        options = dict(ctx.options.get(self.target, {}))
        if target_class(self.target).uses_records and ctx.records is not None:
            options.setdefault("records", ctx.records)  # e.g. TVM tuning logs live in the records database
        exe = compile_program(program, self.target, verify=self.verify, atol=self.atol, rtol=self.rtol,
                              options=options)
        return PassResult(program, modified=False, artifact=exe)
