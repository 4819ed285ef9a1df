"""Typed, frozen annotations attached to nodes or to a whole Program.

An annotation kind is a frozen dataclass registered under a stable `kind` string, so it can be
saved with the Program and validated by the verifier. Fields hold JSON values (str, int, float,
bool, None) and tuples of them; lists read back from JSON become tuples again.

Later capabilities (load plans, serving configs, fusion provenance, cost estimates) add their own
kinds with `@annotation(...)` without touching the IR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from morphc.errors import SerializationError, did_you_mean

if TYPE_CHECKING:
    import torch.fx as fx

    from morphc.ir.program import Program

ANNOTATIONS_KEY = "morphc.annotations"  # node.meta[ANNOTATIONS_KEY] -> dict[kind, Annotation]
Scope = Literal["node", "program"]


class Annotation:
    """Base of every annotation kind. Subclasses are created with the `@annotation` decorator."""

    kind: ClassVar[str]
    scope: ClassVar[Scope]

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        """Problems with this annotation in its place (empty when valid). Override to add checks."""
        return []

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


_REGISTRY: dict[str, type[Annotation]] = {}
A = TypeVar("A", bound=type[Annotation])


def annotation(kind: str, *, scope: Scope) -> Callable[[A], A]:
    """Make a class a frozen dataclass annotation registered under `kind`."""

    def wrap(cls: A) -> A:
        if kind in _REGISTRY and _REGISTRY[kind].__qualname__ != cls.__qualname__:
            raise ValueError(f"annotation kind '{kind}' is already registered by {_REGISTRY[kind].__qualname__}")
        cls.kind = kind
        cls.scope = scope
        dc = dataclasses.dataclass(frozen=True)(cls)
        _REGISTRY[kind] = dc
        return dc

    return wrap


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def annotation_from_json(data: dict[str, Any]) -> Annotation:
    """Rebuild an annotation saved with `to_json`; clear error for unknown kinds or fields."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _REGISTRY:
        raise SerializationError(
            f"unknown annotation kind {kind!r}{did_you_mean(str(kind), _REGISTRY)}; "
            f"known kinds: {', '.join(sorted(_REGISTRY))} (was the module defining it imported?)"
        )
    cls = _REGISTRY[kind]
    try:
        return cls(**{k: _tuplify(v) for k, v in data.items()})
    except TypeError as exc:
        raise SerializationError(f"annotation '{kind}' cannot be rebuilt from {data}: {exc}") from exc


# --- annotation kinds the core itself writes -------------------------------------------------


@annotation("shared-by", scope="node")
class SharedBy(Annotation):
    """This node computes a value several task models used to compute separately (set by `cse`)."""

    tasks: tuple[str, ...]

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        unknown = [t for t in self.tasks if t not in program.tasks]
        return [f"shared-by names unknown task(s) {unknown}; tasks are {list(program.tasks)}"] if unknown else []


@annotation("pipeline-history", scope="program")
class PipelineHistory(Annotation):
    """The pipeline texts applied to this Program, oldest first (written by the PassManager)."""

    pipelines: tuple[str, ...]
