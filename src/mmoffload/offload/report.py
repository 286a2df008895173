"""The offload report, and rejected lines kept whole with their reason."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mmoffload.errors import MMOffloadError, Where
from mmoffload.offload.records import RecordCounts, line_ending

if TYPE_CHECKING:
    pass


REJECTS_SUFFIX = ".rejects.jsonl"


class OffloadReport(RecordCounts):
    """Figures of one offload run (stable names: the keys of ``--json``).

    ``unique_images_written + dedup_hits == offloaded + adopted``: every stored
    image part either wrote a new file or found its image already stored.
    """

    inputs: int = 0
    jsonl_bytes_in: int = 0
    jsonl_bytes_out: int = 0
    rejected_lines: int = 0
    stale_temps_removed: int = 0
    seconds: float = 0.0
    assets: str = ""
    outputs: list[str] = msgspec.field(default_factory=list)
    rejects: list[str] = msgspec.field(default_factory=list)


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


def default_rejects(target: Path) -> Path:
    return target.with_name(target.name + REJECTS_SUFFIX)


def reject(where: Where, line: bytes, error: MMOffloadError) -> bytes:
    # The exact line, less its line break.
    text = line.removesuffix(line_ending(line))
    try:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text=text.decode())
    except UnicodeDecodeError:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text_base64=text)
    return msgspec.json.encode(entry) + b"\n"
