"""Streaming line input: the one opener of every JSONL input.

``open_input`` reads ``-`` as stdin, and gzip or zstd content is decompressed
whatever the file is called (by its magic bytes); compressed input cut short or
corrupt is an error, never a shorter input. ``iter_lines`` holds one line at a
time, at most ``$MMOFFLOAD_MAX_LINE_BYTES``. ``expand_inputs`` turns directories
and quoted globs into files, each with the relative path its output mirrors.
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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec

from mmoffload.contract.addresses import uri_to_path
from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.io.zstd_frames import WholeFramesReader, ZstdFrames, zstandard_module
from mmoffload.limits import MAX_LINE_BYTES_ENV_VAR, max_line_bytes

STDIO = "-"


STDIN_NAME = "<stdin>"


JSONL_SUFFIXES = (".jsonl", ".ndjson")


COMPRESSION_SUFFIXES = (".gz", ".zst")


PARQUET_SUFFIXES = (".parquet", ".pq")


PARQUET_MAGIC = b"PAR1"


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


InputFormat = Literal["auto", "jsonl", "parquet"]


def reads_parquet(path: str | os.PathLike[str], input_format: InputFormat = "auto") -> bool:
    """Whether an input is read as Parquet: said by ``input_format``, else told by ``is_parquet``.

    Raises:
        UsageError: Parquet is said for stdin, which cannot be read by its footer.
    """
    if input_format == "parquet" and is_stdio(path):
        raise UsageError("Expected a Parquet file, got stdin (`-`): Parquet is read by its footer")
    return input_format == "parquet" or (input_format == "auto" and is_parquet(path))


def is_parquet(path: str | os.PathLike[str]) -> bool:
    """Whether an input is Parquet: by its name (``.parquet``, ``.pq``), else by its magic bytes."""
    if is_stdio(path):
        return False
    if os.fspath(path).lower().endswith(PARQUET_SUFFIXES):
        return True
    # The raw bytes, never decompressed ones: a corrupt gzip or zstd input is the reader's to report.
    try:
        if isinstance(source := location(path), str):
            from mmoffload.io.remote import open_url

            with open_url(source) as handle:
                return handle.read(4) == PARQUET_MAGIC
        with open(source, "rb") as handle:
            return handle.read(4) == PARQUET_MAGIC
    except (OSError, UsageError):
        return False


def location(path: str | os.PathLike[str]) -> Path | str:
    """Return where an input or output lives: a URL (``s3://``, ``hf://`` ...) as it is, else a local path.

    A ``file://`` URL is its local path; a ``Path`` never holds a URL (it would fold ``//``).
    """
    text = os.fspath(path)
    if text.lower().startswith("file://"):
        return uri_to_path(text)
    from mmoffload.io.remote import is_url

    return text if is_url(text) else Path(path)


@contextlib.contextmanager
def open_input(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open an input for binary reading: ``-`` is stdin; gzip and zstd are decompressed.

    Compression is told by the content's magic bytes, not the name.

    Raises:
        UsageError: the input cannot be opened.
    """
    name = input_name(path)
    try:
        if isinstance(source := location(path), str):
            from mmoffload.io.remote import open_url  # Only URL inputs import fsspec.

            raw: BinaryIO = open_url(source)
        else:
            raw = sys.stdin.buffer if is_stdio(path) else open(source, "rb", buffering=READ_BUFFER)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"Cannot read input: {exc.strerror}", Where(file=name)) from exc
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    try:
        magic = buffered.peek(4)[:4]
        if magic.startswith(_GZIP_MAGIC):
            yield gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[misc]
        elif magic == _ZSTD_MAGIC:
            zstandard = zstandard_module()
            # zstandard reads a stream cut inside a frame as if it ended there: the frames are followed.
            frames = ZstdFrames(buffered)
            reader = zstandard.ZstdDecompressor().stream_reader(frames, read_across_frames=True)
            yield io.BufferedReader(WholeFramesReader(reader, frames))
        else:
            yield buffered
    finally:
        if not is_stdio(path):
            buffered.close()


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[Where, bytes]]:
    """Stream a JSONL input (see ``open_input``) as ``(where, line)`` pairs, skipping blank lines.

    Memory stays bounded by the longest line, not the file size (an uncompressed
    regular file is memory-mapped: its pages are the page cache's, not the process's),
    and a line is at most ``max_line_bytes()`` long.

    Raises:
        UsageError: the input cannot be opened.
        BadInputError: its compressed content is corrupt or cut short, a line is over the
            limit, or a line does not fit in memory.
    """
    name = input_name(path)
    limit = max_line_bytes()
    number = 0
    with open_input(path) as handle:
        # Only a file opened here and read as it is can be mapped (not stdin, not decompressed bytes).
        plain = isinstance(getattr(handle, "raw", None), io.FileIO)
        mapped = plain and not is_stdio(path)
        try:
            for line in _mapped_lines(handle, limit) if mapped else _read_lines(handle, limit):
                number += 1
                if not line.isspace():
                    yield Where(file=name, line=number), line
        except LineTooLong:
            raise BadInputError(
                f"Expected lines of at most {limit:,} bytes, got a longer one (${MAX_LINE_BYTES_ENV_VAR} "
                "raises the limit)",
                Where(file=name, line=number + 1),
            ) from None
        except MemoryError:
            raise BadInputError(
                "Out of memory reading the line (each line is held whole in memory)",
                Where(file=name, line=number + 1),
            ) from None
        except Exception as exc:
            if not is_read_error(exc):
                raise
            what = "read" if plain else "decompress"
            raise BadInputError(
                f"Cannot {what} input after line {number:,}: {exc}", Where(file=name, line=number + 1)
            ) from exc


class LineTooLong(Exception):
    """A line runs past the line limit (``iter_lines`` names the file, line and limit)."""


def is_read_error(exc: BaseException) -> bool:
    """Whether ``exc`` is what reading or decompressing an input raises on cut-short or corrupt content.

    gzip raises ``OSError`` (``BadGzipFile``), ``EOFError`` or ``zlib.error``, zstandard its
    ``ZstdError`` (and ``ZstdFrames`` an ``EOFError``); the OS an ``OSError``.
    """
    zstd_error = getattr(sys.modules.get("zstandard"), "ZstdError", ())
    return isinstance(exc, (OSError, EOFError, zlib.error, zstd_error))


def _read_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """Yield the lines of a stream, each with its line break, none over ``limit`` bytes."""
    while line := handle.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            raise LineTooLong
        yield line


def _mapped_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """Yield the lines of an open file, each with its line break, from a mapping when it can be mapped."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        yield from _read_lines(handle, limit)
        return
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start, size = 0, len(mapped)
        while start < size:
            end = mapped.find(b"\n", start, start + limit + 1) + 1
            if not end:
                if size - start > limit:
                    raise LineTooLong
                end = size
            yield mapped[start:end]
            start = end


@dataclass(frozen=True, slots=True)
class Input:
    """One input file and the relative path its output mirrors under an output directory."""

    path: Path | str  # A URL stays a string.
    relative: Path


def expand_inputs(
    paths: Sequence[str | os.PathLike[str]],
    *,
    directories: bool = True,
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> list[Input]:
    """Expand directories (their JSONL files, recursively) and glob patterns into input files.

    A glob (``runs/*/rollouts.jsonl``, quoted so that the shell leaves it) is expanded
    here, as CI YAML writes it; a file or ``-`` stays itself. Each input keeps the path
    relative to the directory or the glob's fixed prefix, so that outputs can mirror it.
    A symlink to nothing found there is an error, as a missing file named is.

    Args:
        paths: files, ``-``, directories and glob patterns, in the order given.
        directories: expand a directory into its JSONL files (else keep it as it is).
        exclude: the command's own outputs (files or directories): what a directory or a glob
            finds under them is no input, so that a second run does not read the first one's output.

    Raises:
        UsageError: a path that does not exist, a dangling symlink found in a directory or by a
            glob, or a pattern or directory that matches nothing.
    """
    excluded = [Path(os.path.abspath(path)) for path in exclude if not is_stdio(path)]

    def wanted(path: Path) -> bool:
        absolute = Path(os.path.abspath(path))
        return not any(absolute == out or out in absolute.parents for out in excluded)

    found: list[Input] = []
    for raw in paths:
        if isinstance(url := location(raw), str):
            from mmoffload.io.remote import expand_url

            found.extend(Input(match, Path(relative)) for match, relative in expand_url(url, _is_input_name))
            continue
        path = url
        if is_stdio(raw) or path.is_file() or (path.is_dir() and not directories):
            found.append(Input(path, Path(path.name or STDIO)))
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if (is_jsonl_name(p) or p.suffix in PARQUET_SUFFIXES) and _is_file(p) and wanted(p)
            )
            if not files:
                raise UsageError(
                    "Expected JSONL or Parquet files (.jsonl, .ndjson, .gz, .zst, .parquet) in the directory, "
                    "found none",
                    Where(file=str(path)),
                )
            found.extend(Input(p, p.relative_to(path)) for p in files)
        elif _GLOB_CHARS & set(os.fspath(raw)):
            base = _glob_base(path)
            matches = sorted(Path(m) for m in glob.glob(os.fspath(raw), recursive=True))
            matches = [m for m in matches if wanted(m) and ((m.is_dir() and not directories) or _is_file(m))]
            if not matches:
                raise UsageError("No file matches the pattern", Where(file=os.fspath(raw)))
            found.extend(Input(m, m.relative_to(base)) for m in matches)
        else:
            raise UsageError("No such file or directory", Where(file=os.fspath(raw)))
    return found


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file (or a symlink to one) to read.

    Raises:
        UsageError: ``path`` is a symlink to nothing: a missing input, never skipped in silence.
    """
    if path.is_file():
        return True
    if path.is_symlink() and not path.exists():
        raise UsageError("Expected an input file, found a symlink to nothing", Where(file=str(path)))
    return False


def _is_input_name(name: str) -> bool:
    """Whether a file name found under a URL prefix names an input (JSONL or Parquet)."""
    return is_jsonl_name(name) or name.endswith(PARQUET_SUFFIXES)


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
