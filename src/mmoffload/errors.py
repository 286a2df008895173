"""The few error classes that cross the library boundary, and where they point.

Every error says what was expected, what was found and exactly where:
``Expected image bytes, got `text/plain` - at `rollouts.jsonl:17` `$.prompt[2].content[1]` ``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

PathPart = str | int

# User text quoted in a message (between backticks) is cut to this many characters; a whole message
# (or a report's reason) too, so that a 5 MB string in the data never becomes 5 MB of output.
QUOTE_CHARS, MESSAGE_CHARS = 200, 2000

_QUOTED = re.compile(f"`([^`]{{{QUOTE_CHARS + 1},}})`")


def shorten(text: str) -> str:
    """Cut each quoted span of user text to ``QUOTE_CHARS`` and the whole text to ``MESSAGE_CHARS``.

    The one cut every message, reason and printed line goes through, saying how long the text
    was; cutting again changes nothing (a message passes here as it is built and as it is printed).
    """
    text = _QUOTED.sub(lambda m: f"`{m.group(1)[: QUOTE_CHARS - 3]}...` ({len(m.group(1)):,} chars)", text)
    if len(text) <= MESSAGE_CHARS:
        return text
    said = f"... ({len(text):,} chars)"
    return text[: MESSAGE_CHARS - len(said)] + said


def json_path(parts: Sequence[PathPart]) -> str:
    """Render a JSON path the way msgspec does: ``$.prompt[2].content`` (each key at most ``QUOTE_CHARS``)."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(f".{part}" if len(part) <= QUOTE_CHARS else f".{part[:QUOTE_CHARS]}...")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Where:
    """A place in the inputs: file, line, JSON path, trace, image index, record index."""

    file: str | None = None
    line: int | None = None
    path: tuple[PathPart, ...] | None = None
    trace: str | None = None
    image: int | None = None
    index: int | None = None

    def at(self, **changes: object) -> Where:
        """Return a copy pointing somewhere more precise."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            parts.append(f"`{self.file}:{self.line}`" if self.line is not None else f"`{self.file}`")
        if self.index is not None:
            parts.append(f"index {self.index}")
        if self.trace is not None:
            parts.append(f"trace `{self.trace}`")
        if self.path is not None:
            parts.append(f"`{json_path(self.path)}`")
        if self.image is not None:
            parts.append(f"image {self.image}")
        return " ".join(parts)


class MMOffloadError(Exception):
    """Base of every error mmoffload raises on purpose."""

    def __init__(self, message: str, where: Where | None = None) -> None:
        self.message = message = shorten(message)
        self.where = where
        super().__init__(shorten(f"{message} - at {where}") if where and str(where) else message)

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt as it is, whatever a subclass's __init__ takes: errors cross process boundaries
        # (pool and Ray workers) as themselves.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[MMOffloadError], args: tuple[object, ...], state: dict[str, object]) -> MMOffloadError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class BadInputError(MMOffloadError):
    """The input is malformed or breaks the contract (a line, record, part or image)."""


class IntegrityError(MMOffloadError):
    """Stored data disagrees with what references it: missing file, wrong hash, wrong grid."""


class MissingImageError(IntegrityError):
    """A referenced image file or object does not exist (materialize may stand in placeholder pixels)."""


class UsageError(MMOffloadError):
    """The call itself cannot work: bad arguments, unreadable paths, unknown names."""
