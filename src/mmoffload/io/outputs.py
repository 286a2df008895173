"""Crash-safe file output.

Outputs go to a unique temporary file in the destination directory and are
renamed into place, so a reader (or a run killed at any moment) never sees a
partial file. File locks are not used: they silently do nothing on some
network file systems, while a same-directory rename is atomic everywhere.

Only a regular file is replaced that way: a device or FIFO (``/dev/null``,
``/dev/stdout``) is written straight through, and a symlink is resolved so its
target is replaced, never the link itself. ``open_output`` writes ``-`` to
stdout and compresses an output named ``.gz`` or ``.zst``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from mmoffload.errors import UsageError, Where
from mmoffload.io.inputs import Input, is_stdio, location
from mmoffload.io.zstd_frames import zstandard_module

TEMP_PREFIX = ".mmoffload-tmp-"


# A temporary whose owner cannot be told (a name without one) is stale after this long.
STALE_TEMP_SECONDS = 3600


# This host in temporaries' names: a pid means nothing on another host sharing the directory (NFS).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNED_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)@([0-9a-f]{8})-")


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
    """Return the name prefix of this process's temporaries: its pid and host tell its own apart."""
    return f"{TEMP_PREFIX}{_temp_owner or os.getpid()}@{_HOST}-"


def is_stale_temp(name: str, mtime: float) -> bool:
    """Whether the temporary ``name`` belongs to no live process: its owner on this host is dead.

    A temporary of another host is never stale (its pid cannot be checked from here); one whose
    name carries no owner is stale once ``STALE_TEMP_SECONDS`` old.
    """
    owner = _OWNED_TEMP.match(name)
    if owner is None:
        return mtime < time.time() - STALE_TEMP_SECONDS
    return owner.group(2) == _HOST and not pid_alive(int(owner.group(1)))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temps(directory: Path) -> int:
    """Remove the temporaries (files and directories) of dead processes from ``directory``; return how many.

    A killed run (SIGKILL, a crash, a lost machine) leaves its temporaries: the next
    command on the same run or store removes them. A live process's are never touched.
    """
    removed = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            with contextlib.suppress(OSError):
                if not is_stale_temp(entry.name, entry.stat(follow_symlinks=False).st_mtime):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
    return removed


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
def open_output(path: str | os.PathLike[str], *, compress: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary output: ``-`` is stdout, a URL is put when the block succeeds, else an
    ``atomic_writer``; an output named ``.gz`` or ``.zst`` is compressed, unless ``compress`` is
    False (a format that compresses its own pages: Parquet)."""
    if is_stdio(path):
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = location(path)
    if isinstance(target, str):
        from mmoffload.io.remote import url_writer  # Only URL outputs import fsspec.

        writer = url_writer(target)
    else:
        writer = atomic_writer(target)
    with writer as raw, _compressed(raw, os.fspath(path)) if compress else contextlib.nullcontext(raw) as out:
        yield out


@contextlib.contextmanager
def _compressed(raw: BinaryIO, name: str) -> Iterator[BinaryIO]:
    """Yield ``raw``, compressing what is written when ``name`` ends ``.gz`` or ``.zst``."""
    if name.endswith(".gz"):
        # mtime 0: the same records make the same bytes.
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
            yield compressed  # type: ignore[misc]
    elif name.endswith(".zst"):
        with zstandard_module().ZstdCompressor().stream_writer(raw, closefd=False) as compressed:
            yield compressed  # type: ignore[misc]
    else:
        yield raw


def plan_outputs(
    inputs: Sequence[str | os.PathLike[str] | Input], output: str | os.PathLike[str] | None, in_place: bool
) -> list[Path | str]:
    """Return the output path (or URL) of each input.

    One input: ``output`` is the file to write (or a directory to write it into; an
    output URL ending ``/`` is a prefix).
    Several inputs, or inputs from a directory or a glob (see ``expand_inputs``):
    ``output`` is a directory and each output mirrors its input's relative path.
    ``output`` ``-`` is stdout for every input, in order. ``in_place``: each input
    is its own output.

    Raises:
        UsageError: neither or both of ``output`` and ``in_place``, an output that is
            an input (without ``in_place``), stdin rewritten in place, or two inputs
            with the same output (naming both).
    """
    if not inputs:
        raise UsageError("Expected at least one input file")
    if in_place == (output is not None):
        raise UsageError("Expected exactly one of an output (`-o`) or in-place rewriting (`--in-place`)")
    items = [item if isinstance(item, Input) else Input(location(item), Path(_name(item))) for item in inputs]
    if in_place:
        if any(is_stdio(item.path) for item in items):
            raise UsageError("Expected a file to rewrite in place, got stdin (`-`)")
        return [item.path for item in items]
    output = location(output)  # type: ignore[arg-type]
    if is_stdio(output):
        return [output] * len(items)
    mirrored = len(items) > 1 or items[0].relative != Path(_name(items[0].path))
    if isinstance(output, str):
        if not mirrored and not output.endswith("/"):
            return [output]
        return [f"{output.rstrip('/')}/{item.relative.as_posix()}" for item in items]
    if not mirrored and not output.is_dir():
        outputs = [output]
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"Expected a directory as output for {len(items)} inputs, got file `{output}`")
        outputs = [output / item.relative for item in items]
    claimed: dict[Path, Path] = {}
    for item, target in zip(items, outputs, strict=True):
        resolved = target.resolve()
        if resolved in claimed:
            raise UsageError(
                f"Inputs `{claimed[resolved]}` and `{item.path}` would both write `{target}`; "
                "give a directory or a glob so that outputs mirror their relative paths"
            )
        claimed[resolved] = item.path  # type: ignore[assignment]
        if isinstance(item.path, Path) and not is_stdio(item.path) and item.path.resolve() == resolved:
            raise UsageError(f"Output `{resolved}` is the input; use in-place rewriting to replace it")
    return outputs  # type: ignore[return-value]


def _name(path: str | os.PathLike[str]) -> str:
    """The last part of a path or URL."""
    return os.fspath(path).rstrip("/").rpartition("/")[2]
