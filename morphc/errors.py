"""Errors morphc raises on bad input: each names what is wrong and what would be valid.

A leaf module (imports nothing from morphc) so every layer can raise them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MorphcError(Exception):
    """Base of every error morphc raises on purpose."""


class LoweringError(MorphcError):
    """A model could not be captured into a Program."""


class VerificationError(MorphcError):
    """A Program breaks an IR invariant; `problems` lists every one found."""

    def __init__(self, problems: list[str], *, after_pass: str | None = None) -> None:
        self.problems = list(problems)
        self.after_pass = after_pass
        head = f"IR verification failed after pass '{after_pass}'" if after_pass else "IR verification failed"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n{body}")


class InputMismatchError(MorphcError, ValueError):
    """Inputs given at call time do not match the Program's input specs."""


class PipelineSyntaxError(MorphcError, ValueError):
    """Malformed pipeline text; the message points at the column."""

    def __init__(self, message: str, text: str, column: int) -> None:
        self.column = column  # 1-based
        self.text = text
        caret = " " * (column - 1) + "^"
        super().__init__(f"{message} (column {column})\n  {text}\n  {caret}")


class UnknownPassError(MorphcError, KeyError):
    """A pass name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PassOptionError(MorphcError, ValueError):
    """An option a pass does not have, or a value of the wrong type."""


class PassFailure(MorphcError):
    """A pass raised; the reproducer (if written) replays it."""

    def __init__(self, pass_text: str, cause: BaseException, reproducer: str | None) -> None:
        self.pass_text = pass_text
        self.reproducer = reproducer
        where = f"; reproducer written to {reproducer}" if reproducer else ""
        super().__init__(f"pass '{pass_text}' failed: {type(cause).__name__}: {cause}{where}")


class SerializationError(MorphcError):
    """A saved Program or Executable is corrupt, from another format version, or incomplete."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' did you mean ...?' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
