"""Streaming line input: the one opener of every JSONL input.

``open_input`` reads ``-`` as stdin, and gzip or zstd content is decompressed
whatever the file is called (by its magic bytes). ``expand_inputs`` turns
directories and quoted globs into files, each with the relative path its output
mirrors.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import mmap
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from mmoffload.errors import BadInputError, UsageError, Where

STDIO = "-"


STDIN_NAME = "<stdin>"


JSONL_SUFFIXES = (".jsonl", ".ndjson")


COMPRESSION_SUFFIXES = (".gz", ".zst")


_GZIP_MAGIC = b"\x1f\x8b"


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


_GLOB_CHARS = frozenset("*?[")


# JSONL lines with inline images run to megabytes: a large buffer reads them about 3x faster than
# the default one (pipes and devices), and a regular file is mapped, which is faster again.
READ_BUFFER = 8 << 20


def is_stdio(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``-``: stdin as an input, stdout as an output."""
    return os.fspath(path) == STDIO


def input_name(path: str | os.PathLike[str]) -> str:
    """The name errors give an input: its path, or ``<stdin>``."""
    return STDIN_NAME if is_stdio(path) else os.fspath(path)


def is_jsonl_name(path: str | os.PathLike[str]) -> bool:
    """Whether a file name says JSONL (``.jsonl``, ``.ndjson``, either compressed)."""
    name = Path(path).name
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(JSONL_SUFFIXES)


@contextlib.contextmanager
def open_input(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open an input for binary reading: ``-`` is stdin; gzip and zstd are decompressed.

    Compression is told by the content's magic bytes, not the name.

    Raises:
        UsageError: the input cannot be opened.
    """
    name = input_name(path)
    try:
        raw: BinaryIO = sys.stdin.buffer if is_stdio(path) else open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=name)) from exc
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    try:
        magic = buffered.peek(4)[:4]
        if magic.startswith(_GZIP_MAGIC):
            yield gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[misc]
        elif magic == _ZSTD_MAGIC:
            zstandard = zstandard_module()
            reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
            yield io.BufferedReader(reader)  # type: ignore[arg-type]
        else:
            yield buffered
    finally:
        if not is_stdio(path):
            buffered.close()


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[Where, bytes]]:
    """Stream a JSONL input (see ``open_input``) as ``(where, line)`` pairs, skipping blank lines.

    Memory stays bounded by the longest line, not the file size (an uncompressed
    regular file is memory-mapped: its pages are the page cache's, not the process's).

    Raises:
        UsageError: the input cannot be opened.
        BadInputError: its compressed content is corrupt or cut short.
    """
    name = input_name(path)
    number = 0
    with open_input(path) as handle:
        # Only a file opened here and read as it is can be mapped (not stdin, not decompressed bytes).
        plain = not is_stdio(path) and isinstance(getattr(handle, "raw", None), io.FileIO)
        try:
            for line in _lines(handle) if plain else handle:
                number += 1
                if not line.isspace():
                    yield Where(file=name, line=number), line
        except Exception as exc:  # gzip raises OSError or EOFError, zstandard its ZstdError.
            if not isinstance(exc, OSError | EOFError) and type(exc).__name__ != "ZstdError":
                raise
            raise BadInputError(f"Cannot decompress input: {exc}", Where(file=name, line=number + 1)) from exc


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


@dataclass(frozen=True, slots=True)
class Input:
    """One input file and the relative path its output mirrors under an output directory."""

    path: Path
    relative: Path


def expand_inputs(paths: Sequence[str | os.PathLike[str]], *, directories: bool = True) -> list[Input]:
    """Expand directories (their JSONL files, recursively) and glob patterns into input files.

    A glob (``runs/*/rollouts.jsonl``, quoted so that the shell leaves it) is expanded
    here, as CI YAML writes it; a file or ``-`` stays itself. Each input keeps the path
    relative to the directory or the glob's fixed prefix, so that outputs can mirror it.

    Args:
        paths: files, ``-``, directories and glob patterns, in the order given.
        directories: expand a directory into its JSONL files (else keep it as it is).

    Raises:
        UsageError: a path that does not exist, or a pattern or directory that matches nothing.
    """
    found: list[Input] = []
    for raw in paths:
        path = Path(raw)
        if is_stdio(raw) or path.is_file() or (path.is_dir() and not directories):
            found.append(Input(path, Path(path.name or STDIO)))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_jsonl_name(p))
            if not files:
                raise UsageError(
                    "Expected JSONL files (.jsonl, .ndjson, .gz, .zst) in the directory, found none",
                    Where(file=str(path)),
                )
            found.extend(Input(p, p.relative_to(path)) for p in files)
        elif _GLOB_CHARS & set(os.fspath(raw)):
            base = _glob_base(path)
            matches = sorted(Path(m) for m in glob.glob(os.fspath(raw), recursive=True))
            matches = [m for m in matches if m.is_file() or (m.is_dir() and not directories)]
            if not matches:
                raise UsageError("No file matches the pattern", Where(file=os.fspath(raw)))
            found.extend(Input(m, m.relative_to(base)) for m in matches)
        else:
            raise UsageError("No such file or directory", Where(file=os.fspath(raw)))
    return found


def zstandard_module() -> Any:
    """Import zstandard only for zstd content: most runs never need it."""
    import zstandard

    return zstandard


def _glob_base(pattern: Path) -> Path:
    """Return the leading part of a glob pattern without wildcards (what matches are relative to)."""
    fixed = []
    for part in pattern.parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


_JSON_DECODER = msgspec.json.Decoder()


def decode_json_line(line: bytes, where: Where) -> Any:
    """Decode one JSONL line, naming the file and line when it is not JSON.

    Raises:
        BadInputError: the line is not valid JSON, or nests too deep to decode.
    """
    try:
        return _JSON_DECODER.decode(line)
    except msgspec.DecodeError as exc:
        raise BadInputError(f"Invalid JSON: {exc}", where) from exc
    except RecursionError as exc:
        raise too_deep(where) from exc


def too_deep(where: Where) -> BadInputError:
    """Return the error for a JSON value nested deeper than Python can walk."""
    return BadInputError("Expected JSON nested at most a few hundred levels deep, got deeper", where)
