"""The content-addressed image store and ``file://`` URIs (contract.md sections 1 and 2).

An image is stored once under ``<h32>.<ext>``: the first 32 hex digits of the
SHA-256 of its exact bytes, and the format sniffed from those bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mmoffload.errors import BadInputError, IntegrityError, UsageError, Where
from mmoffload.io import atomic_write

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


def resolve_assets_dir(explicit: Path | None, run_dir: Path | None) -> Path:
    """Pick the asset directory: explicit, else ``$VF_RENDERER_IMAGE_OFFLOAD_DIR``, else RUN's."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(ASSETS_ENV_VAR):
        return Path(env)
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


def read_verified(
    path: Path,
    expected_hash: str | None,
    where: Where | None = None,
    *,
    allowed_roots: Sequence[Path] | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Read a referenced image file, safely, checking its content hash when one is expected.

    The one reader of referenced image bytes: the file must lie under one of
    ``allowed_roots`` (after resolving links and ``..``) when they are given, must
    be a regular file (never a device, FIFO or ``/proc`` stream), and at most
    ``max_bytes`` long. A refused file is never read, and no error echoes its
    content or hash.

    Args:
        path: the file a ref names.
        expected_hash: the ref's ``mm_hash``; None to skip the check.
        where: the ref's location, for errors.
        allowed_roots: directories refs may point into; None allows any regular file.
        max_bytes: the most bytes read (default ``max_image_bytes()``).

    Raises:
        BadInputError: the file is outside the allowed roots, not a regular file, or too large.
        IntegrityError: the file is missing or unreadable, or its content hashes to something else.
    """
    limit = max_image_bytes() if max_bytes is None else max_bytes
    resolved = check_allowed(path, allowed_roots, where)
    try:
        # Non-blocking, so a FIFO that never answers cannot hang the open.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise IntegrityError(f"Missing image file `{path}`", where) from exc
    except OSError as exc:
        raise IntegrityError(f"Cannot read image file `{path}`: {exc.strerror}", where) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(f"Expected a regular image file, got a special file `{path}`", where)
        if info.st_size > limit:
            raise BadInputError(
                f"Image file `{path}` is {info.st_size:,} bytes, over the {limit:,}-byte limit "
                f"(${MAX_IMAGE_BYTES_ENV_VAR})",
                where,
            )
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise IntegrityError(f"Cannot read image file `{path}`: {exc.strerror}", where) from exc
    if len(data) > limit:  # Grew since the stat.
        raise BadInputError(f"Image file `{path}` is over the {limit:,}-byte limit", where)
    if expected_hash is not None:
        verify_hash(data, expected_hash, path, where, show_actual=allowed_roots is not None)
    return data


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
    data: bytes, expected_hash: str, path: Path, where: Where | None = None, *, show_actual: bool = False
) -> None:
    """Check that the bytes read from ``path`` hash to ``expected_hash``.

    The actual hash is shown only with ``show_actual`` (a file inside the allowed
    roots): of any other file it would leak a fingerprint of whatever a ref names.

    Raises:
        IntegrityError: the content hashes to something else.
    """
    if (actual := content_hash(data)) != expected_hash:
        found = f"got `{actual}`" if show_actual else "the file holds other content"
        raise IntegrityError(
            f"Content hash mismatch for `{file_uri(path)}`: expected `{expected_hash}`, {found}", where
        )


def _describe_bytes(data: bytes) -> str:
    if not data:
        return "0 bytes"
    head = data[:8]
    return f"{len(data)} bytes starting {head!r}, which is no image format"
