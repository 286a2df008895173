"""The content-addressed image store and ``file://`` URIs (contract.md sections 1 and 2).

An image is stored once under ``<h32>.<ext>``: the first 32 hex digits of the
SHA-256 of its exact bytes, and the format sniffed from those bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, Where
from mmoffload.io import atomic_write

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


def resolve_assets_dir(explicit: Path | str | None, run_dir: Path | None) -> Path | str:
    """Pick the asset store: explicit, else ``$VF_RENDERER_IMAGE_OFFLOAD_DIR``, else RUN's.

    An object-store URL (``s3://bucket/prefix``) is kept as a string, a ``file://``
    URL becomes its path, anything else is a directory.
    """
    if explicit is None:
        explicit = os.environ.get(ASSETS_ENV_VAR) or None
    if isinstance(explicit, str):
        if is_object_uri(explicit):
            return explicit.rstrip("/")
        return uri_to_path(explicit) if explicit.startswith("file:") else Path(explicit)
    if explicit is not None:
        return explicit
    if run_dir is not None:
        return run_dir / "assets" / "images"
    raise BadInputError(f"No asset directory: pass one, set ${ASSETS_ENV_VAR}, or give a run directory")


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

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

    def put(self, data: bytes, where: Where | None = None) -> StoredImage:
        """Store ``data`` once, atomically; return where it lives.

        Raises:
            BadInputError: the bytes are no image format.
        """
        extension = sniff_extension(data)
        if extension is None:
            raise BadInputError(f"Expected image bytes, got {_describe_bytes(data)}", where)
        digest = content_hash(data)
        path = self.root / f"{digest}{extension}"
        if path.exists():
            return StoredImage(digest, path, written=False)
        # Two writers of the same bytes both rename identical content into place: harmless.
        atomic_write(path, data)
        return StoredImage(digest, path, written=True)


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
