"""The content-addressed image store and ``file://`` URIs (contract.md sections 1 and 2).

An image is stored once under ``<h32>.<ext>``: the first 32 hex digits of the
SHA-256 of its exact bytes, and the format sniffed from those bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.io import atomic_write

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
) -> Path:
    """Pick the asset directory: explicit, else ``$VF_RENDERER_IMAGE_OFFLOAD_DIR``, else RUN's."""
    if explicit is not None:
        return Path(explicit)
    if env := os.environ.get(ASSETS_ENV_VAR):
        return Path(env)
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


def read_verified(path: Path, expected_hash: str | None, where: Where | None = None) -> bytes:
    """Read an image file, checking its content hash when one is expected.

    Raises:
        IntegrityError: the file is missing or its content hashes to something else.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IntegrityError(f"Missing image file `{path}`", where) from exc
    if expected_hash is not None:
        verify_hash(data, expected_hash, path, where)
    return data


def verify_hash(data: bytes, expected_hash: str, path: Path, where: Where | None = None) -> None:
    """Check that the bytes read from ``path`` hash to ``expected_hash``.

    Raises:
        IntegrityError: the content hashes to something else.
    """
    if (actual := content_hash(data)) != expected_hash:
        raise IntegrityError(
            f"Content hash mismatch for `{file_uri(path)}`: expected `{expected_hash}`, got `{actual}`",
            where,
        )


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "0 bytes"
    head = data[:8]
    return f"{len(data)} bytes starting {head!r}, which is no image format"
