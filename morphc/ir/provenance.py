"""Fusion provenance: how a fused Program was derived from its original task models.

`fusion-provenance` (program) records the original program's digest and the mutation history (one
JSON record per mutation, oldest first), so any candidate is rebuilt by replaying the history on the
original Program (`morphc.passes.mutators.replay`), at any batch size. `fusion-adapter` (node) marks
the node that took the place of a task's own layer output in a merge, naming what it replaced.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from morphc.ir.annotations import Annotation, annotation

if TYPE_CHECKING:
    import torch.fx as fx

    from morphc.ir.program import Program


@annotation("fusion-provenance", scope="program")
class FusionProvenance(Annotation):
    """The original program (digest, tasks) and the mutations applied to it, oldest first."""

    original: str  # digest of the original program's structure and weights
    tasks: tuple[str, ...]
    mutations: tuple[str, ...]  # JSON objects {"mutator": name, "params": {...}, "choices": [...]}

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        problems = []
        if tuple(self.tasks) != tuple(program.tasks):
            problems.append(f"records tasks {list(self.tasks)} but the program has {list(program.tasks)}")
        for i, text in enumerate(self.mutations):
            try:
                record = json.loads(text)
            except (TypeError, json.JSONDecodeError) as exc:
                problems.append(f"mutation #{i} is not JSON: {exc}")
                continue
            if not isinstance(record, dict) or not {"mutator", "choices"} <= set(record):
                problems.append(f"mutation #{i} must be an object with 'mutator' and 'choices', got {text!r}")
        return problems


@annotation("fusion-adapter", scope="node")
class FusionAdapter(Annotation):
    """This node now feeds `task`'s layers in place of the task's own node `replaces` (a merge).

    `source` is the node of another task it reads; `params` the trainable tensors the merge added
    (empty for a merge without adapter).
    """

    task: str
    replaces: str
    source: str
    params: tuple[str, ...] = ()

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        problems = []
        if self.task not in program.tasks:
            problems.append(f"names unknown task '{self.task}'; tasks are {list(program.tasks)}")
        missing = [p for p in self.params if not hasattr(program.graph_module, p)]
        if missing:
            problems.append(f"adapter parameters {missing} are not tensors of the program")
        return problems
