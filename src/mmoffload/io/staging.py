"""Directories replaced as a unit: a staging copy swapped in atomically (the staging name is the lock)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmoffload.contract.rundir import ROLLOUTS
from mmoffload.errors import UsageError, Where
from mmoffload.io.outputs import own_temp_prefix, pid_alive, remove_stale_temps

# A directory being rewritten as a unit is staged under this name beside it; the name is the lock.
STAGING_PREFIX = ".mmoffload-writing-"


_OWNER_FILE = "owner"


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
    fresh = Path(tempfile.mkdtemp(prefix=own_temp_prefix(), dir=parent))
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
    return f"pid {pid}" if pid_alive(int(pid)) else None


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
    trash = Path(tempfile.mkdtemp(prefix=own_temp_prefix(), dir=path.parent))
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


@contextlib.contextmanager
def staged_run(run_dir: Path) -> Iterator[Path]:
    """Yield a run directory to write steps into; its ``rollouts`` replace the run's as a unit.

    Every step written (and every file removed) in one block appears in
    ``RUN/rollouts`` at once when the block succeeds, and not at all when it
    fails or the process is killed: a step's rank files always come from one
    pack, and a refs run's steps from one run. One writer per run at a time.

    Raises:
        UsageError: another live process is writing the run.
    """
    remove_dead_temps(run_dir)
    with staged_directory(run_dir / ROLLOUTS) as staged:
        yield staged.parent


def remove_dead_temps(run_dir: str | os.PathLike[str]) -> int:
    """Remove the temporaries killed processes left in a run; return how many.

    Every command on a run calls this first (readers too), so a killed ``refs`` or
    ``pack`` costs no disk after the next command. A live writer's files are never
    touched. A dead writer's staging directory is left to the next writer, which
    takes it over: a reader removing it could race a writer taking it over.
    """
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / ROLLOUTS)
