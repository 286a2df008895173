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
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, MissingImageError, UsageError, Where
from mmoffload.io import atomic_write

if TYPE_CHECKING:
    from mmoffload.objectstore import ObjectStore

ASSETS_ENV_VAR = "VF_RENDERER_IMAGE_OFFLOAD_DIR"
HASH_HEX_DIGITS = 32
# The most bytes read for one referenced image (a 4K screenshot PNG is about 10 MB).
MAX_IMAGE_BYTES_ENV_VAR = "MMOFFLOAD_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 128 << 20

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
# Threads that write, fsync and rename images inside `AssetStore.syncing()`: on ext4, 4-8 concurrent fsyncs
# cut the wall time of 240 image syncs about 4x against one at a time; more add nothing.
SYNC_THREADS = 8
# Bytes of images handed to the sync threads and not yet durable, at most: how far parsing runs ahead.
SYNC_PENDING_BYTES = 64 << 20


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
        BadInputError: the URI is not a local ``file://`` URI, or names a NUL byte.
    """
    if not is_local_file_uri(uri):
        raise BadInputError(f"Expected a local `file://` URI, got `{uri[:80]}`", where)
    path = unquote(urlsplit(uri).path)
    if "\0" in path:
        raise BadInputError(f"Expected a `file://` URI without NUL bytes, got `{uri[:80]}`", where)
    return Path(path)


def max_image_bytes() -> int:
    """Return the most bytes read for one image: ``$MMOFFLOAD_MAX_IMAGE_BYTES``, else 128 MiB.

    Raises:
        UsageError: the variable is not a whole number > 0.
    """
    return env_limit(MAX_IMAGE_BYTES_ENV_VAR, DEFAULT_MAX_IMAGE_BYTES)


def env_limit(name: str, default: int) -> int:
    """Return a positive whole-number limit from the environment variable ``name``, else ``default``.

    Raises:
        UsageError: the variable is set but is not a whole number > 0.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise UsageError(f"Expected ${name} as a whole number > 0, got `{raw[:40]}`")
    return int(raw)


def default_allowed_roots(run_dir: Path | None) -> list[Path] | None:
    """Return the directories refs may point into when the user named none.

    The run's asset directory (``RUN/assets/images``, when it exists) and
    ``$VF_RENDERER_IMAGE_OFFLOAD_DIR`` (when set); None (any regular file) when
    neither is known.
    """
    roots = [Path(env)] if (env := os.environ.get(ASSETS_ENV_VAR)) else []
    if run_dir is not None and (run_dir / "assets" / "images").is_dir():
        roots.append(run_dir / "assets" / "images")
    return roots or None


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
        # Each image on the sync threads -> its write and its size.
        self._pending: collections.OrderedDict[Path, tuple[Future[None], int]] = collections.OrderedDict()
        self._pending_bytes = 0
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


def read_verified(
    path: Path | str,
    expected_hash: str | None,
    where: Where | None = None,
    *,
    allowed_roots: Sequence[Path] | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Read a referenced image file (or object, see ``asset_location``), checking its hash when expected.

    The one reader of referenced image bytes: a file must lie under one of
    ``allowed_roots`` (after resolving links and ``..``) when they are given, must
    be a regular file (never a device, FIFO or ``/proc`` stream), and at most
    ``max_bytes`` long; an object is bounded the same way. A refused file is never
    read, and no error echoes its content or hash.

    Args:
        path: the file (or object URL) a ref names.
        expected_hash: the ref's ``mm_hash``; None to skip the check.
        where: the ref's location, for errors.
        allowed_roots: directories file refs may point into; None allows any regular file.
        max_bytes: the most bytes read (default ``max_image_bytes()``).

    Raises:
        BadInputError: the file is outside the allowed roots, not a regular file, or too large.
        MissingImageError: there is no such file or object.
        IntegrityError: it is unreadable, or its content hashes to something else.
    """
    limit = max_image_bytes() if max_bytes is None else max_bytes
    if isinstance(path, Path):
        data = _read_file(path, limit, where, allowed_roots)
    else:
        data = _read_object(path, limit, where)
    if expected_hash is not None:
        verify_hash(data, expected_hash, path, where, show_actual=allowed_roots is not None)
    return data


def _read_file(path: Path, limit: int, where: Where | None, allowed_roots: Sequence[Path] | None) -> bytes:
    resolved = check_allowed(path, allowed_roots, where)
    try:
        # Non-blocking, so a FIFO that never answers cannot hang the open.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise MissingImageError(f"Missing image file `{path}`", where) from exc
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{path}`: {exc.strerror}", where) from exc
    # The descriptor is closed on every path out: a leaked one per refused request is a denial of service.
    try:
        # Checked on the descriptor before any file object wraps it (`fdopen` refuses a directory).
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a special file"
            raise BadInputError(f"Expected a regular image file, got {kind} `{path}`", where)
        _check_size(path, info.st_size, limit, where)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{path}`: {exc.strerror}", where) from exc
    finally:
        os.close(fd)
    if len(data) > limit:  # Grew since the stat.
        raise BadInputError(f"Image file `{path}` is over the {limit:,}-byte limit", where)
    return data


def _read_object(url: str, limit: int, where: Where | None) -> bytes:
    try:
        _check_size(url, asset_size(url), limit, where)
        return read_asset(url)
    except FileNotFoundError as exc:
        raise MissingImageError(f"Missing image file `{url}`", where) from exc
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{url}`: {exc.strerror or exc}", where) from exc


def _check_size(path: Path | str, size: int, limit: int, where: Where | None) -> None:
    if size > limit:
        raise BadInputError(
            f"Image file `{path}` is {size:,} bytes, over the {limit:,}-byte limit (${MAX_IMAGE_BYTES_ENV_VAR})",
            where,
        )


def check_allowed(path: Path, allowed_roots: Sequence[Path] | None, where: Where | None = None) -> Path:
    """Return ``path`` resolved (links, ``..``), checking that it lies under an allowed root.

    Raises:
        BadInputError: it lies outside every root (the file is not opened).
    """
    resolved = Path(os.path.realpath(path))
    if allowed_roots is not None and not any(
        resolved.is_relative_to(os.path.realpath(root)) for root in allowed_roots
    ):
        raise BadInputError(
            f"Image file `{path}` is outside the allowed roots "
            f"({', '.join(f'`{root}`' for root in allowed_roots)}); allow its directory to read it",
            where,
        )
    return resolved


def verify_hash(
    data: bytes,
    expected_hash: str,
    path: Path | str,
    where: Where | None = None,
    *,
    show_actual: bool = False,
) -> None:
    """Check that the bytes read from ``path`` (or an object-store URL) hash to ``expected_hash``.

    A file's actual hash is shown only with ``show_actual`` (a file inside the allowed
    roots): of any other file it would leak a fingerprint of whatever a ref names.

    Raises:
        IntegrityError: the content hashes to something else.
    """
    if (actual := content_hash(data)) != expected_hash:
        is_file = isinstance(path, Path)
        shown = file_uri(path) if is_file else path
        # An object lies in the store the ref names, so its hash leaks nothing.
        found = f"got `{actual}`" if show_actual or not is_file else "the file holds other content"
        raise IntegrityError(
            f"Content hash mismatch for `{shown}`: expected `{expected_hash}`, {found}", where
        )


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "0 bytes"
    head = data[:8]
    return f"{len(data)} bytes starting {head!r}, which is no image format"
