"""Crash-safe file output and streaming line input.

Outputs go to a unique temporary file in the destination directory and are
renamed into place, so a reader (or a run killed at any moment) never sees a
partial file. File locks are not used: they silently do nothing on some
network file systems, while a same-directory rename is atomic everywhere.

Only a regular file is replaced that way: a device or FIFO (``/dev/null``,
``/dev/stdout``) is written straight through, and a symlink is resolved so its
target is replaced, never the link itself.

Every JSONL input is opened in one place, ``open_input``: ``-`` is stdin, and
gzip or zstd content is decompressed whatever the file is called (by its magic
bytes). ``expand_inputs`` turns directories and quoted globs into files, each
with the relative path its output mirrors. ``open_output`` writes ``-`` to
stdout and compresses an output named ``.gz`` or ``.zst``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import gzip
import io
import mmap
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from mmoffload.errors import BadInputError, UsageError, Where

TEMP_PREFIX = ".mmoffload-tmp-"
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
# A directory being rewritten as a unit is staged under this name beside it; the name is the lock.
STAGING_PREFIX = ".mmoffload-writing-"
_OWNER_FILE = "owner"
# Errors of a device that took no more bytes: reported with the path and how much was written.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_target(path: Path) -> Path:
    """Return the path an output really replaces: a symlink's final target, else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def is_special(path: Path) -> bool:
    """True when ``path`` exists and is neither a regular file nor a directory (a device, FIFO, socket)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block succeeds.

    On any exception the temporary file is removed and ``path`` is untouched. A
    device or FIFO is written straight through; a symlink's target is replaced.

    Raises:
        UsageError: the file cannot be written (naming it), or the disk (or quota)
            is full (naming it and the bytes written).
    """
    target = write_target(path)
    if is_special(target):
        with write_errors(target):
            out = open(target, "wb")  # noqa: SIM115 - closed just below
        with out, write_errors(target, out, any_error=False):
            yield out
        return
    # A stop signal handled just as the temporary is created would leave it unnamed, so never removed:
    # held until the `finally` that removes it is in place.
    held = _hold_stop_signals()
    tmp_name: str | None = None
    try:
        with write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=own_temp_prefix(), dir=target.parent)
        tmp = os.fdopen(fd, "wb")
        _release(held)
        try:
            with write_errors(target, tmp, any_error=False):
                yield tmp
            with write_errors(target, tmp):
                tmp.flush()
                os.fsync(tmp.fileno())
        finally:
            # After a failed write, closing flushes the rest again and fails again: the file goes anyway.
            with contextlib.suppress(OSError):
                tmp.close()
        with write_errors(target):
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, target)
    finally:
        _release(held)
        if tmp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


_temp_owner: int | None = None


def own_temp_prefix() -> str:
    """Return the name prefix of this process's temporaries (the pid tells a run its own apart)."""
    return f"{TEMP_PREFIX}{_temp_owner or os.getpid()}-"


def adopt_temp_owner(pid: int) -> None:
    """Name this process's temporaries as process ``pid``'s: a pool worker's are its run's.

    The run stops its workers with SIGTERM, which kills them at once (a Python
    handler can be missed by a worker blocked in a lock), then removes every
    temporary of its own name, the workers' included.
    """
    global _temp_owner
    _temp_owner = pid


def remove_own_temps(directory: Path) -> None:
    """Remove this process's temporary files from ``directory`` (a stopped run's last resort).

    Another process's temporaries are never touched: it may still be writing them.
    """
    prefix = own_temp_prefix()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _hold_stop_signals() -> set[signal.Signals] | None:
    """Block Ctrl-C and SIGTERM for this thread; return the mask to restore (None where unsupported)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _release(held: set[signal.Signals] | None) -> None:
    """Restore the signal mask; a signal that arrived meanwhile is handled now."""
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def write_errors(
    target: Path, handle: BinaryIO | int | None = None, *, any_error: bool = True
) -> Iterator[None]:
    """Turn an OS error writing ``target`` into a ``UsageError`` naming it (and the bytes written).

    With ``any_error`` False only a full disk or quota is turned: other OS errors
    inside a caller's block belong to the caller (reading an input, say).
    """
    try:
        yield
    except OSError as exc:
        if not (any_error or exc.errno in _FULL_ERRNOS):
            raise
        written = f" after {_position(handle):,} bytes" if handle is not None else ""
        raise UsageError(
            f"Cannot write output: {exc.strerror or exc}{written}", Where(file=str(target))
        ) from exc


def _position(handle: BinaryIO | int) -> int:
    # Bytes handed to the file (or file descriptor) so far; a pipe has no position.
    try:
        return os.lseek(handle, 0, os.SEEK_CUR) if isinstance(handle, int) else handle.tell()
    except (OSError, ValueError):
        return 0


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as out:
        out.write(data)


def check_output_path(path: Path, what: str = "output") -> None:
    """Check, before any work, that ``path`` can be written as a file.

    A device or FIFO is fine (written through); otherwise the nearest existing
    ancestor must be a writable directory and ``path`` must not be one.

    Raises:
        UsageError: naming the path and what is wrong with it.
    """
    target = write_target(path)
    if is_special(target):
        return
    if target.is_dir():
        raise UsageError(f"Expected a file as {what}, got a directory", Where(file=str(path)))
    check_writable_dir(target.parent, what, named=path)


def check_writable_dir(path: Path, what: str = "output directory", *, named: Path | None = None) -> None:
    """Check, before any work, that ``path`` is (or can be made) a writable directory.

    Args:
        path: the directory.
        what: its role, for the message.
        named: the path the user gave, when ``path`` was derived from it (an output's parent).

    Raises:
        UsageError: an ancestor is a file, or the directory is read-only.
    """
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    where = Where(file=str(named or path))
    if not existing.is_dir():
        raise UsageError(f"Cannot use as {what}: `{existing}` is not a directory", where)
    # access() also reports a read-only mount (EROFS) to root.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write {what}: `{existing}` is read-only", where)


def check_distinct(inputs: Sequence[Path], outputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse, before any work, an output that is an input or another output (after links).

    Devices and FIFOs are exempt: several outputs may go to ``/dev/null``.

    Args:
        inputs: files only read.
        outputs: ``(role, path)`` of each file written, e.g. ``("rejects file", path)``.

    Raises:
        UsageError: naming both roles and the path.
    """
    seen: dict[tuple[Any, ...], str] = {}
    for path in inputs:
        seen.setdefault(_identity(path), "input")
    for role, path in outputs:
        if is_special(write_target(path)):
            continue
        key = _identity(path)
        if key in seen:
            raise UsageError(
                f"The {role} is the same file as the {seen[key]}; it would be overwritten",
                Where(file=str(path)),
            )
        seen[key] = role


def _identity(path: Path) -> tuple[Any, ...]:
    # An existing file is known by device and inode (hard links too); a new one by its resolved path.
    try:
        info = path.stat()
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", info.st_dev, info.st_ino)


@contextlib.contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """Yield a staging copy of ``directory`` that replaces it as a unit when the block succeeds.

    The copy starts as hard links to the current files, so writers change it
    with ``atomic_write`` (a new file, never an in-place edit) and may delete
    from it. On success the copy and ``directory`` are swapped atomically
    (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames with a brief
    window where ``directory`` is absent), so a reader, or a run killed at any
    moment, sees either every old file or every new one. On any exception the
    copy is removed and ``directory`` is untouched.

    The staging directory's fixed name is also the lock: a second writer of the
    same directory is refused while the first one lives; a killed writer's
    staging is taken over.

    Raises:
        UsageError: another live process is writing ``directory``.
    """
    lock = _take_staging(directory)
    try:
        staged = lock / directory.name
        if directory.is_dir():
            shutil.copytree(directory, staged, symlinks=True, copy_function=_link_or_copy)
        else:
            staged.mkdir()
        yield staged
        _exchange(staged, directory)
    finally:
        _remove_tree(lock)


def _take_staging(directory: Path) -> Path:
    """Create the staging directory (the lock) for ``directory``, taking over a dead writer's."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    lock = parent / f"{STAGING_PREFIX}{directory.name}"
    fresh = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
    (fresh / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    for _attempt in range(2):
        try:
            # Renaming onto a non-empty directory fails: the first writer wins, atomically.
            os.rename(fresh, lock)
            return lock
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                _remove_tree(fresh)
                raise
        owner = _live_owner(lock)
        if owner is not None:
            _remove_tree(fresh)
            raise UsageError(
                f"Another mmoffload process ({owner}) is writing `{directory}`; wait for it to finish "
                f"(or remove `{lock}` if no such process runs)",
                Where(file=str(directory)),
            )
        _remove_tree(lock)  # A killed writer's staging: nothing in it was ever visible.
    _remove_tree(fresh)
    raise UsageError(f"Cannot take over the staging directory `{lock}`", Where(file=str(directory)))


def _live_owner(lock: Path) -> str | None:
    """Return ``host pid`` of the writer holding ``lock`` when it may still run, else None."""
    try:
        host, pid = (lock / _OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        return None  # Half created or half removed: its writer is gone.
    if host != socket.gethostname():
        return f"pid {pid} on {host}"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # Alive, owned by another user.
    return f"pid {pid}"


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)  # A file system without hard links.


def _exchange(staged: Path, directory: Path) -> None:
    """Swap ``staged`` into ``directory``'s place atomically; ``staged`` then holds the old tree."""
    if not directory.exists():
        os.rename(staged, directory)
        return
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(staged), -100, os.fsencode(directory), 2) == 0:  # AT_FDCWD, EXCHANGE
            return
        import ctypes

        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(directory))
    old = staged.with_name(f"{staged.name}.old")
    os.rename(directory, old)
    os.rename(staged, directory)
    os.rename(old, staged)


def _remove_tree(path: Path) -> None:
    """Remove a tree, first renaming it to a unique name so no other writer ever sees it half gone."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    try:
        os.replace(path, trash)  # Onto the empty directory just made.
    except OSError:
        trash.rmdir()
        shutil.rmtree(path, ignore_errors=True)
        return
    shutil.rmtree(trash, ignore_errors=True)


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, or None; loaded on first use: ctypes is a share of every command's start-up."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return function


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
            zstandard = _zstandard()
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


def _zstandard() -> Any:
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


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary output: ``-`` is stdout, else an ``atomic_writer`` compressing ``.gz``/``.zst``."""
    if is_stdio(path):
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(path)
    with atomic_writer(path) as raw:
        if path.suffix == ".gz":
            # mtime 0: the same records make the same bytes.
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
                yield compressed  # type: ignore[misc]
        elif path.suffix == ".zst":
            with _zstandard().ZstdCompressor().stream_writer(raw, closefd=False) as compressed:
                yield compressed  # type: ignore[misc]
        else:
            yield raw


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
