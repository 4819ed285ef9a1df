"""The Pass: a frozen dataclass whose fields are its pipeline options (as in xDSL), returning a
PassResult (as torch.fx's pass infra), registered by its kebab-case name.

    @register_pass
    @dataclass(frozen=True)
    class FoldConstants(Pass):
        "Precompute subgraphs that read only parameters."
        name: ClassVar[str] = "fold-constants"
        max_mb: float = option(64.0, "largest folded tensor to materialize, in MB")
        def run(self, program, ctx) -> PassResult: ...

The registry is also fed by the `morphc.passes` entry-point group, so other packages can add
passes that pipeline text, the CLI and the property tests then see like built-in ones.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, get_args, get_origin

from morphc.errors import PassOptionError, UnknownPassError, did_you_mean
from morphc.ir.program import Program

if TYPE_CHECKING:
    from morphc.passes.manager import PassContext


BARE_VALUE = re.compile(r"[^,{}=\s\"]+")  # option values that need no quotes in pipeline text


def _quote(text: str) -> str:
    return text if BARE_VALUE.fullmatch(text) else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly rewritten) program and whether it changed.

    `statistics` are counters the pass wants reported (nodes merged, bytes folded, ...).
    `artifact` is set only by terminal passes (e.g. `compile` returns an Executable).
    """

    program: Program
    modified: bool
    statistics: Mapping[str, float] = field(default_factory=dict)
    artifact: Any = None


def option(default: Any, help: str) -> Any:
    """Declare a pass option: a dataclass field with a default and a one-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class OptionInfo:
    """One pipeline option of a pass, as shown by `morphc passes` and used by the parser."""

    key: str  # kebab-case, as written in pipeline text
    field_name: str
    type: Any
    default: Any
    help: str

    def type_name(self) -> str:
        if get_origin(self.type) is Literal:
            return "|".join(str(a) for a in get_args(self.type))
        return getattr(self.type, "__name__", str(self.type))

    def parse(self, pass_name: str, text: str) -> Any:
        """Convert option text to the field's type; PassOptionError naming the pass and option."""
        def bad(expected: str) -> PassOptionError:
            return PassOptionError(f"option '{self.key}' of pass '{pass_name}' expects {expected}, got {text!r}")

        if get_origin(self.type) is Literal:
            choices = get_args(self.type)
            for c in choices:
                if str(c) == text:
                    return c
            raise bad(f"one of {', '.join(map(str, choices))}")
        if self.type is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise bad("true or false")
        if self.type is int:
            try:
                return int(text)
            except ValueError:
                raise bad("an integer") from None
        if self.type is float:
            try:
                return float(text)
            except ValueError:
                raise bad("a number") from None
        if self.type is str:
            return text
        raise bad(f"a value of type {self.type_name()}")

    def format(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Pass(ABC):
    """Base of every pass. Subclasses are frozen dataclasses; their fields are the options."""

    name: ClassVar[str]
    preserves_semantics: ClassVar[bool] = True  # outputs equal the input program's (property-tested)
    terminal: ClassVar[bool] = False  # produces an artifact instead of a program; ends a pipeline
    opt_level: ClassVar[int] = 1  # runs only when PassContext.opt_level >= this
    # What the pass needs from the PassContext beyond the program (e.g. "calibration", "options['tuner']");
    # without it the pass must refuse with an error naming the need. Generic property tests skip such passes'
    # rewrites (each has its own tests) and check that refusal instead.
    context_needs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        """Rewrite `program` in place (the PassManager hands each pass its own copy)."""

    @classmethod
    def options(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(OptionInfo(f.name.replace("_", "-"), f.name, hints[f.name], default, f.metadata.get("help", "")))
        return out

    @classmethod
    def from_options(cls, values: Mapping[str, str]) -> Pass:
        """Build the pass from pipeline-text options; unknown keys list the valid ones."""
        infos = {o.key: o for o in cls.options()}
        kwargs = {}
        for key, text in values.items():
            if key not in infos:
                valid = ", ".join(f"{o.key} ({o.type_name()}, default {o.format(o.default)})" for o in infos.values())
                raise PassOptionError(f"pass '{cls.name}' has no option '{key}'{did_you_mean(key, infos)}; "
                                      f"valid options: {valid or 'none'}")
            kwargs[infos[key].field_name] = infos[key].parse(cls.name, text)
        return cls(**kwargs)

    def to_text(self) -> str:
        """Pipeline text of this pass: its name, plus the options that differ from their defaults."""
        opts = [f"{o.key}={_quote(o.format(getattr(self, o.field_name)))}" for o in self.options()
                if getattr(self, o.field_name) != o.default]
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name



P = TypeVar("P", bound=type[Pass])
_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False


def register_pass(cls: P) -> P:
    """Class decorator: make `cls` available to pipeline text under `cls.name`."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} needs a ClassVar 'name' to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass name '{name}' is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="morphc.passes"):
        ep.load()  # importing the module runs its @register_pass decorators


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-ins, runtime passes and entry-point plugins)."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise UnknownPassError(f"unknown pass '{name}'{did_you_mean(name, passes)}; "
                               f"registered passes: {', '.join(passes)}")
    return passes[name]
