"""The content-addressed image store and ``file://`` URIs (contract.md sections 1 and 2).

An image is stored once under ``<h32>.<ext>``: the first 32 hex digits of the
SHA-256 of its exact bytes, and the format sniffed from those bytes.

Durability: an image is written to a temporary in the store, fsynced, and only
then renamed to its name, so no reader ever sees a name whose bytes are not on
disk. Inside ``AssetStore.syncing()`` the fsync and rename run on a few threads
(concurrent fsyncs share journal commits, and the caller goes on parsing); the
block ends only when every image is renamed and the directory itself is synced.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.io import TEMP_PREFIX, atomic_write

if TYPE_CHECKING:
    from mmoffload.objectstore import ObjectStore

ASSETS_ENV_VAR = "VF_RENDERER_IMAGE_OFFLOAD_DIR"
HASH_HEX_DIGITS = 32

# Magic numbers, checked against the bytes, never against a claimed media type.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tiff"),
    (b"MM\x00*", ".tiff"),
)
# URL schemes read as object-store assets (docs/scale.md); ``http(s)`` stays a remote source.
OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".webp", ".gif", ".bmp", ".tiff"})
# Threads that fsync and rename inside `AssetStore.syncing()`: on ext4, 4-8 concurrent fsyncs
# cut the wall time of 240 image syncs about 4x against one at a time; more add nothing.
SYNC_THREADS = 8
# Images written but not yet synced and renamed, at most (each holds an open file).
SYNC_PENDING = 64


def content_hash(data: bytes) -> str:
    """Return the image's ``mm_hash``: 32 lowercase hex digits of SHA-256."""
    return hashlib.sha256(data).hexdigest()[:HASH_HEX_DIGITS]


def sniff_extension(data: bytes) -> str | None:
    """Return the file extension of the image format in ``data``, or None if it is none."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    return None


def file_uri(path: Path) -> str:
    """Return the ``file://`` URI of ``path``: absolute and percent-encoded."""
    return path.absolute().as_uri()


def is_local_file_uri(uri: str) -> bool:
    """True for ``file://`` URIs whose host is empty or ``localhost``."""
    if not uri.startswith("file:"):
        return False
    return urlsplit(uri).netloc in ("", "localhost")


def is_object_uri(uri: str) -> bool:
    """True for an object-store URL such as ``s3://bucket/key``."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


def asset_location(uri: str, where: Where | None = None) -> Path | str:
    """Return where a ref's image lives: a ``file://`` URI's local path, or an object-store URL as is.

    Raises:
        BadInputError: the URI is neither.
    """
    return uri if is_object_uri(uri) else uri_to_path(uri, where)


def uri_to_path(uri: str, where: Where | None = None) -> Path:
    """Return the local path a ``file://`` URI names.

    Raises:
        BadInputError: the URI is not a local ``file://`` URI.
    """
    if not is_local_file_uri(uri):
        raise BadInputError(f"Expected a local `file://` URI, got `{uri[:80]}`", where)
    return Path(unquote(urlsplit(uri).path))


def resolve_assets_dir(
    explicit: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str] | None
) -> Path | str:
    """Pick the asset store: explicit, else ``$VF_RENDERER_IMAGE_OFFLOAD_DIR``, else RUN's.

    An object-store URL (``s3://bucket/prefix``) is kept as a string, a ``file://``
    URL becomes its path, anything else is a directory.

    Raises:
        UsageError: none is given, the variable is unset and there is no run directory.
    """
    if explicit is None:
        explicit = os.environ.get(ASSETS_ENV_VAR) or None
    if isinstance(explicit, str):
        if is_object_uri(explicit):
            return explicit.rstrip("/")
        return uri_to_path(explicit) if explicit.startswith("file:") else Path(explicit)
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
        self._pending: collections.OrderedDict[Path, Future[None]] = collections.OrderedDict()
        self._directory_synced = True

    def put(self, data: bytes, where: Where | None = None) -> StoredImage:
        """Store ``data`` once, atomically; return where it lives.

        Outside ``syncing()`` the image is durable under its name on return; inside,
        once the block ends.

        Raises:
            BadInputError: the bytes are no image format.
        """
        extension = sniff_extension(data)
        if extension is None:
            raise BadInputError(f"Expected image bytes, got {_describe_bytes(data)}", where)
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
            OSError: an image could not be synced or renamed (the first such error).
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
            OSError: an image could not be synced or renamed (the first such error).
        """
        pending, self._pending = self._pending, collections.OrderedDict()
        errors = [error for future in pending.values() if (error := future.exception()) is not None]
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
        """Write ``data`` to a temporary now; fsync and rename it to ``path`` on a sync thread."""
        assert self._syncer is not None
        while len(self._pending) >= SYNC_PENDING:
            _, oldest = self._pending.popitem(last=False)
            oldest.result()
        if self._directory_synced:
            self.root.mkdir(parents=True, exist_ok=True)
            self._directory_synced = False
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.root)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            os.unlink(tmp_name)
            raise
        self._pending[path] = self._syncer.submit(_sync_and_rename, fd, tmp_name, path)


def _sync_and_rename(fd: int, tmp_name: str, path: Path) -> None:
    """Make a written temporary durable, then give it its name (the only way a name appears)."""
    try:
        os.fsync(fd)
        os.fchmod(fd, 0o644)
    except BaseException:
        os.close(fd)
        os.unlink(tmp_name)
        raise
    os.close(fd)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def open_store(location: Path | str | AssetStore | ObjectStore) -> AssetStore | ObjectStore:
    """Open the asset store at a directory, a ``file://`` URL or an object-store URL (``s3://b/p``).

    A store passed in is returned as it is.
    """
    if not isinstance(location, Path | str):
        return location
    if isinstance(location, str):
        location = resolve_assets_dir(location, None)
    if isinstance(location, str):
        from mmoffload.objectstore import ObjectStore  # Only object-store runs import fsspec's clients.

        return ObjectStore(location)
    return AssetStore(location)


def read_asset(location: Path | str) -> bytes:
    """Return the bytes of an image file, or of an object-store object (see ``asset_location``).

    Raises:
        FileNotFoundError: there is no such file or object.
        OSError: it cannot be read.
    """
    if isinstance(location, Path):
        return location.read_bytes()
    from mmoffload.objectstore import cat_object

    return cat_object(location)


def asset_size(location: Path | str) -> int:
    """Return the size in bytes of an image file or object.

    Raises:
        FileNotFoundError: there is no such file or object.
        OSError: it cannot be read.
    """
    if isinstance(location, Path):
        return location.stat().st_size
    from mmoffload.objectstore import object_size

    return object_size(location)


def read_verified(path: Path | str, expected_hash: str | None, where: Where | None = None) -> bytes:
    """Read an image file (or object, see ``asset_location``), checking its content hash when expected.

    Raises:
        IntegrityError: the file is missing or its content hashes to something else.
    """
    try:
        data = read_asset(path)
    except FileNotFoundError as exc:
        raise IntegrityError(f"Missing image file `{path}`", where) from exc
    if expected_hash is not None:
        verify_hash(data, expected_hash, path, where)
    return data


def verify_hash(data: bytes, expected_hash: str, path: Path | str, where: Where | None = None) -> None:
    """Check that the bytes read from ``path`` (or an object-store URL) hash to ``expected_hash``.

    Raises:
        IntegrityError: the content hashes to something else.
    """
    if (actual := content_hash(data)) != expected_hash:
        shown = file_uri(path) if isinstance(path, Path) else path
        raise IntegrityError(
            f"Content hash mismatch for `{shown}`: expected `{expected_hash}`, got `{actual}`",
            where,
        )


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "0 bytes"
    head = data[:8]
    return f"{len(data)} bytes starting {head!r}, which is no image format"
