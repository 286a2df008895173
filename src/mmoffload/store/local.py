"""The content-addressed image store in a local directory.

Durability: an image is written to a temporary in the store, fsynced, and only
then renamed to its name, so no reader ever sees a name whose bytes are not on
disk. Inside ``AssetStore.syncing()`` the fsync and rename run on a few threads
(concurrent fsyncs share journal commits, and the caller goes on parsing); the
block ends only when every image is renamed and the directory itself is synced.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mmoffload.contract.addresses import (
    content_hash,
    describe_bytes,
    file_uri,
    is_object_uri,
    sniff_extension,
    uri_to_path,
)
from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.io.outputs import atomic_write

ASSETS_ENV_VAR = "VF_RENDERER_IMAGE_OFFLOAD_DIR"


# Threads that write, fsync and rename images inside `AssetStore.syncing()`: on ext4, 4-8 concurrent fsyncs
# cut the wall time of 240 image syncs about 4x against one at a time; more add nothing.
SYNC_THREADS = 8


# Bytes of images handed to the sync threads and not yet durable, at most: how far parsing runs ahead.
SYNC_PENDING_BYTES = 64 << 20


def default_allowed_roots(run_dir: Path | None) -> list[Path | str] | None:
    """Return the directories (and object-store prefixes) refs may point into when the user named none.

    The run's asset directory (``RUN/assets/images``, when it exists) and the store
    ``$VF_RENDERER_IMAGE_OFFLOAD_DIR`` names (when set; see ``directory_or_prefix``);
    None (any regular file) when neither is known.

    Raises:
        BadInputError: the variable holds a ``file://`` URL that names no local path.
    """
    roots = [directory_or_prefix(env)] if (env := os.environ.get(ASSETS_ENV_VAR)) else []
    if run_dir is not None and (run_dir / "assets" / "images").is_dir():
        roots.append(run_dir / "assets" / "images")
    return roots or None


def directory_or_prefix(text: str) -> Path | str:
    """Return the directory or object-store prefix a command-line or environment value names.

    An object-store URL (``s3://bucket/prefix``) is kept as a string (a Path would drop
    a slash of ``s3://``), a ``file://`` URL becomes its path, anything else is a directory.

    Raises:
        BadInputError: a ``file://`` URL that names no local path.
    """
    if is_object_uri(text):
        return text.rstrip("/")
    return uri_to_path(text) if text.startswith("file:") else Path(text)


def resolve_assets_dir(
    explicit: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str] | None
) -> Path | str:
    """Pick the asset store: explicit, else ``$VF_RENDERER_IMAGE_OFFLOAD_DIR``, else RUN's.

    A string is read by ``directory_or_prefix``.

    Raises:
        UsageError: none is given, the variable is unset and there is no run directory.
        BadInputError: a ``file://`` URL that names no local path.
    """
    if explicit is None:
        explicit = os.environ.get(ASSETS_ENV_VAR) or None
    if isinstance(explicit, str):
        return directory_or_prefix(explicit)
    if explicit is not None:
        return Path(explicit)
    if run_dir is not None:
        return Path(run_dir) / "assets" / "images"
    raise UsageError(f"No asset directory: pass `--assets DIR` or set ${ASSETS_ENV_VAR}")


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image in the store; ``written`` is False when it was already there (a dedup hit)."""

    hash: str
    path: Path
    written: bool

    @property
    def uri(self) -> str:
        return file_uri(self.path)


class AssetStore:
    """A directory of content-addressed images, safe for concurrent writers."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._syncer: ThreadPoolExecutor | None = None
        # Each image on the sync threads -> its write and its size.
        self._pending: collections.OrderedDict[Path, tuple[Future[None], int]] = collections.OrderedDict()
        self._pending_bytes = 0
        self._directory_synced = True

    def __getstate__(self) -> dict[str, object]:
        # A copy in another process starts with nothing pending (sync threads do not travel).
        fresh = {"_syncer": None, "_pending": collections.OrderedDict(), "_pending_bytes": 0}
        return {**self.__dict__, **fresh, "_directory_synced": True}

    def put(self, data: bytes, where: Where | None = None) -> StoredImage:
        """Store ``data`` once, atomically; return where it lives.

        Outside ``syncing()`` the image is durable under its name on return; inside,
        once the block ends.

        Raises:
            BadInputError: the bytes are no image format.
        """
        extension = sniff_extension(data)
        if extension is None:
            raise BadInputError(f"Expected image bytes, got {describe_bytes(data)}", where)
        digest = content_hash(data)
        path = self.root / f"{digest}{extension}"
        if path in self._pending or path.exists():
            return StoredImage(digest, path, written=False)
        # Two writers of the same bytes both rename identical content into place: harmless.
        if self._syncer is None:
            atomic_write(path, data)
        else:
            self._write_deferred(path, data)
        return StoredImage(digest, path, written=True)

    @contextlib.contextmanager
    def syncing(self) -> Iterator[None]:
        """Within the block, ``put`` leaves the fsync and rename of each new image to threads.

        When the block ends (normally or not) every image put in it is synced,
        renamed into place and the directory synced: durable under its name.

        Raises:
            UsageError: an image could not be written, synced or renamed (the first such error,
                naming the image's path).
        """
        if self._syncer is not None:
            yield
            return
        self._syncer = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mmoffload-sync")
        try:
            yield
        finally:
            try:
                self.flush()
            finally:
                self._syncer.shutdown()
                self._syncer = None

    def flush(self) -> None:
        """Wait until every image put so far is durable under its name.

        Raises:
            UsageError: an image could not be written, synced or renamed (the first such error,
                naming the image's path).
        """
        pending, self._pending, self._pending_bytes = self._pending, collections.OrderedDict(), 0
        errors = [error for future, _ in pending.values() if (error := future.exception()) is not None]
        if errors:
            raise errors[0]
        if self._directory_synced:
            return
        # The renames are durable only once the directory entries are.
        self._directory_synced = True
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _write_deferred(self, path: Path, data: bytes) -> None:
        """Leave the atomic write of ``data`` to ``path`` (temporary, fsync, rename) to a sync thread.

        The thread runs the same ``atomic_write`` as an image put outside ``syncing()``,
        so there is one way an image gets its name.
        """
        assert self._syncer is not None
        while self._pending and self._pending_bytes + len(data) > SYNC_PENDING_BYTES:
            _, (oldest, size) = self._pending.popitem(last=False)
            self._pending_bytes -= size
            oldest.result()
        if self._directory_synced:
            self.root.mkdir(parents=True, exist_ok=True)
            self._directory_synced = False
        self._pending[path] = (self._syncer.submit(atomic_write, path, data), len(data))
        self._pending_bytes += len(data)
