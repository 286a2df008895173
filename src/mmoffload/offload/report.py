"""The offload report, and rejected lines kept whole with their reason."""

from __future__ import annotations

from pathlib import Path

import msgspec

from mmoffload.offload.records import RecordCounts

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


def default_rejects(target: Path) -> Path:
    return target.with_name(target.name + REJECTS_SUFFIX)
