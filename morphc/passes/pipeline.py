"""Pipeline text <-> Pipeline objects, round-tripping (MLIR's textual pass pipelines).

Grammar:  pipeline := pass ("," pass)*      pass := NAME ("{" opt ("," opt)* "}")?
          opt := KEY "=" VALUE               VALUE := bare token | "double-quoted string"
Whitespace between tokens is ignored. `str(Pipeline.parse(t)) == t` for canonical text (default
options omitted), and `Pipeline.parse(str(p)) == p` for every pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from morphc.errors import PassOptionError, PipelineSyntaxError, UnknownPassError
from morphc.passes.base import BARE_VALUE, Pass, get_pass

if TYPE_CHECKING:
    from morphc.ir.program import Program
    from morphc.passes.manager import PassContext

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]*")



class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def error(self, message: str, pos: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, (self.pos if pos is None else pos) + 1)

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str, context: str) -> None:
        if self.peek() != ch:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected '{ch}' {context}, found {found}")
        self.pos += 1

    def name(self, what: str) -> tuple[str, int]:
        self.skip_ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(), m.start()

    def value(self, key: str) -> str:
        self.skip_ws()
        if self.peek() == '"':
            start = self.pos
            out = []
            self.pos += 1
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error(f"unterminated string value of option '{key}'", start)
            self.pos += 1
            return "".join(out)
        m = BARE_VALUE.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a value for option '{key}'")
        self.pos = m.end()
        return m.group()


def _parse_pass(sc: _Scanner) -> Pass:
    name, start = sc.name("a pass name")
    try:
        cls = get_pass(name)
    except UnknownPassError as exc:
        raise PipelineSyntaxError(str(exc), sc.text, start + 1) from None
    values: dict[str, str] = {}
    positions: dict[str, tuple[int, int]] = {}  # option key -> (key column, value column), 0-based
    if sc.peek() == "{":
        sc.pos += 1
        if sc.peek() != "}":
            while True:
                key, key_start = sc.name(f"an option name of pass '{name}'")
                if key in values:
                    raise sc.error(f"option '{key}' of pass '{name}' is given twice", key_start)
                sc.expect("=", f"after option name '{key}'")
                sc.skip_ws()
                positions[key] = (key_start, sc.pos)
                values[key] = sc.value(key)
                if sc.peek() == ",":
                    sc.pos += 1
                    continue
                break
        sc.expect("}", f"to close the options of pass '{name}'")
    infos = {o.key: o for o in cls.options()}
    for key, (key_pos, value_pos) in positions.items():  # point at the offending option or value
        try:
            if key not in infos:
                cls.from_options({key: values[key]})  # raises, listing the valid options
            infos[key].parse(name, values[key])
        except PassOptionError as exc:
            raise PipelineSyntaxError(str(exc), sc.text, (value_pos if key in infos else key_pos) + 1) from None
    try:
        return cls.from_options(values)
    except PassOptionError as exc:
        raise PipelineSyntaxError(str(exc), sc.text, start + 1) from None


@dataclass(frozen=True)
class Pipeline:
    """An ordered sequence of passes; text and object forms are interchangeable."""

    passes: tuple[Pass, ...]

    def __init__(self, passes: Sequence[Pass] | str) -> None:
        parsed = Pipeline.parse(passes).passes if isinstance(passes, str) else tuple(passes)
        for i, p in enumerate(parsed):
            if not isinstance(p, Pass):
                raise TypeError(f"pipeline element #{i} is a {type(p).__name__}, not a Pass")
            if p.terminal and i != len(parsed) - 1:
                raise PassOptionError(f"pass '{p.name}' produces an executable and must end the pipeline "
                                      f"(found at position {i + 1} of {len(parsed)})")
        object.__setattr__(self, "passes", parsed)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        sc = _Scanner(text)
        passes: list[Pass] = []
        if sc.peek() == "":
            return cls(())
        while True:
            passes.append(_parse_pass(sc))
            nxt = sc.peek()
            if nxt == "":
                break
            if nxt != ",":
                raise sc.error(f"expected ',' between passes, found {nxt!r}")
            sc.pos += 1
        return cls(passes)

    def __str__(self) -> str:
        return ",".join(p.to_text() for p in self.passes)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def run(self, program: Program, ctx: PassContext | None = None) -> Any:
        """Run on a copy of `program`: returns the new Program, or the artifact of a terminal pass."""
        from morphc.passes.manager import PassManager

        return PassManager(self).run(program, ctx)

