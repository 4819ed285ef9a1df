"""The eager torch target: runs the Program's GraphModule as it is (the reference every other
target is checked against, and the fallback for what they cannot take)."""

from __future__ import annotations

from typing import Any

import torch

from morphc.ir.program import Program
from morphc.runtime.executable import CompileReport, Executable, register_target


@register_target
class EagerExecutable(Executable):
    """Runs the ATen graph with torch, under no_grad."""

    target = "eager"

    @classmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> EagerExecutable:
        return cls(program, CompileReport(target=cls.target))

    @torch.no_grad()
    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.program.graph_module(*args)
        return dict(zip((o.name for o in self.program.outputs), flat))
