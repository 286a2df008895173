"""Content addresses and image URIs (contract.md sections 1 and 2).

An image is named ``<h32>.<ext>``: the first 32 hex digits of the SHA-256 of its
exact bytes, and the format sniffed from those bytes (never from a claimed
media type). Refs carry ``file://`` URIs, or object-store URLs where asked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, Where

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


# The media type of each sniffed format, for data URLs made from stored bytes.
MEDIA_TYPES = {".jpg": "image/jpeg", **{ext: f"image/{ext[1:]}" for ext in IMAGE_EXTENSIONS if ext != ".jpg"}}


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


def address_hash(location: str | Path) -> str | None:
    """Return the content hash a stored name claims (``<h32>.<ext>``), or None for any other name.

    ``location`` is a path or an object-store URL: its last segment is the name.
    """
    name = location.name if isinstance(location, Path) else urlsplit(location).path.rpartition("/")[2]
    stem, dot, extension = name.partition(".")
    if len(stem) == HASH_HEX_DIGITS and f"{dot}{extension}" in IMAGE_EXTENSIONS and _is_lower_hex(stem):
        return stem
    return None


def _is_lower_hex(text: str) -> bool:
    return all(char in "0123456789abcdef" for char in text)


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


def describe_bytes(data: bytes) -> str:
    """Describe bytes that are no image, for an error message: what they are not, never what they hold.

    A refused file may be a secret (``--adopt-files /etc/shadow``): none of its bytes are shown.
    """
    if not data:
        return "0 bytes"
    return f"{len(data):,} bytes in no image format (PNG, JPEG, WebP, GIF, BMP, TIFF)"


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
