"""The rejects file every command writes for records skipped on request: one format, nothing lost.

Each entry is one JSON line ``{"file", "line", "reason", "text"}``: ``text`` is the
rejected line exactly as read, less its line break; a line that is not UTF-8 is
kept in ``text_base64`` instead.
"""

from __future__ import annotations

import msgspec

from mmoffload.errors import MMOffloadError, Where


class RejectedLine(msgspec.Struct, omit_defaults=True):
    """One line of a rejects file: the bad line whole, and why it was rejected.

    ``text`` is the exact line without its line break; a line that is not UTF-8
    is kept in ``text_base64`` instead.
    """

    file: str
    line: int
    reason: str
    text: str | None = None
    text_base64: bytes | None = None


def line_ending(line: bytes) -> bytes:
    """Return the line's break (checked at the end only: lines can be megabytes)."""
    return b"\r\n" if line.endswith(b"\r\n") else b"\n"


def rejected_line(where: Where, line: bytes, error: MMOffloadError) -> bytes:
    """Return the rejects-file entry of a line: the line whole (exact bytes) and why it was rejected."""
    # The exact line, less its line break.
    text = line.removesuffix(line_ending(line))
    try:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text=text.decode())
    except UnicodeDecodeError:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text_base64=text)
    return msgspec.json.encode(entry) + b"\n"
