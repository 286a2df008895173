"""Crash-safe file output and streaming line input.

Outputs go to a unique temporary file in the destination directory and are
renamed into place, so a reader (or a run killed at any moment) never sees a
partial file. File locks are not used: they silently do nothing on some
network file systems, while a same-directory rename is atomic everywhere.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from mmoffload.errors import BadInputError, UsageError, Where

TEMP_PREFIX = ".mmoffload-tmp-"
# JSONL lines with inline images run to megabytes: a large buffer reads them about 3x faster than
# the default one (pipes and devices), and a regular file is mapped, which is faster again.
READ_BUFFER = 8 << 20


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block succeeds.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as out:
        out.write(data)


def iter_lines(path: Path) -> Iterator[tuple[Where, bytes]]:
    """Stream a JSONL file as ``(where, line)`` pairs, skipping blank lines.

    Memory stays bounded by the longest line, not the file size (a regular file
    is memory-mapped: its pages are the page cache's, not the process's).
    """
    try:
        handle = path.open("rb", buffering=READ_BUFFER)
    except OSError as exc:
        raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=str(path))) from exc
    with handle:
        for number, line in enumerate(_lines(handle), start=1):
            if not line.isspace():
                yield Where(file=str(path), line=number), line


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    """Yield the lines of an open file, each with its line break, from a mapping when it can be mapped."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        yield from handle
        return
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start, size = 0, len(mapped)
        while start < size:
            end = mapped.find(b"\n", start) + 1 or size
            yield mapped[start:end]
            start = end


_JSON_DECODER = msgspec.json.Decoder()


def decode_json_line(line: bytes, where: Where) -> Any:
    """Decode one JSONL line, naming the file and line when it is not JSON.

    Raises:
        BadInputError: the line is not valid JSON.
    """
    try:
        return _JSON_DECODER.decode(line)
    except msgspec.DecodeError as exc:
        raise BadInputError(f"Invalid JSON: {exc}", where) from exc
