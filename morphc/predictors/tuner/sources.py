"""Model sources the tuner can lower at any batch size (the batch knob needs one Program per batch).

A source is `zoo:NAME` (optionally with builder overrides: `zoo:bert-small?hidden_size=256,seq_len=64`)
or `twin` (the zoo's two task models lowered together into one fused multi-task Program).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from morphc.errors import MorphcError
from morphc.ir.program import Program


class SourceError(MorphcError, ValueError):
    """A model source text that names no zoo model or has malformed overrides."""


@dataclass(frozen=True)
class ModelSource:
    """Something that can be lowered at any batch: a zoo entry with overrides, or the twin-task program."""

    text: str

    def parts(self) -> tuple[str, dict[str, Any]]:
        if self.text == "twin":
            return "twin", {}
        if not self.text.startswith("zoo:"):
            raise SourceError(f"model source '{self.text}' must be 'zoo:NAME', 'zoo:NAME?key=value,...' or 'twin'")
        name, _, query = self.text.removeprefix("zoo:").partition("?")
        kwargs: dict[str, Any] = {}
        for item in filter(None, query.split(",")):
            key, sep, raw = item.partition("=")
            if not sep:
                raise SourceError(f"override '{item}' in '{self.text}' must be key=value")
            try:
                kwargs[key] = int(raw)
            except ValueError:
                try:
                    kwargs[key] = float(raw)
                except ValueError:
                    kwargs[key] = raw
        return name, kwargs

    def program(self, batch: int) -> Program:
        """The source lowered with example inputs of this batch (cached per process)."""
        return _lower(self.text, batch)


@lru_cache(maxsize=64)
def _lower(text: str, batch: int) -> Program:
    from morphc import zoo
    from morphc.ir.lowering import lower

    name, kwargs = ModelSource(text).parts()
    if name == "twin":
        models, inputs = zoo.twin_tasks(batch_size=batch)
        return lower(models, inputs)
    try:
        built = zoo.build(name, batch_size=batch, **kwargs)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    return lower(built.model, built.example_inputs)
