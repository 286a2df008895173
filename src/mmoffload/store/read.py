"""The guarded read of a referenced image: allowed roots, regular files only, a byte bound,
and the content hash checked against the name."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from mmoffload.contract.addresses import is_object_uri, verify_hash
from mmoffload.errors import BadInputError, IntegrityError, MissingImageError, Where
from mmoffload.limits import MAX_IMAGE_BYTES_ENV_VAR, max_image_bytes
from mmoffload.store.backend import asset_size, read_asset

# Where refs may point: directories, and object-store prefixes kept as URL strings (``s3://bucket/prefix``;
# a Path would drop a slash); None allows any regular file.
AllowedRoots: TypeAlias = Sequence[Path | str] | None


def read_verified(
    path: Path | str,
    expected_hash: str | None,
    where: Where | None = None,
    *,
    allowed_roots: AllowedRoots = None,
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
        allowed_roots: directories file refs may point into, and object-store prefixes object refs may
            (``check_allowed_location``); None allows any regular file and any object.
        max_bytes: the most bytes read (default ``max_image_bytes()``).

    Raises:
        BadInputError: it is outside the allowed roots, not a regular file, or too large.
        MissingImageError: there is no such file or object.
        IntegrityError: it is unreadable, or its content hashes to something else.
    """
    limit = max_image_bytes() if max_bytes is None else max_bytes
    if isinstance(path, Path):
        data = _read_file(path, limit, where, allowed_roots)
    else:
        data = _read_object(check_object_allowed(path, allowed_roots, where), limit, where)
    if expected_hash is not None:
        verify_hash(data, expected_hash, path, where, show_actual=allowed_roots is not None)
    return data


def _read_file(path: Path, limit: int, where: Where | None, allowed_roots: AllowedRoots) -> bytes:
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


def check_allowed_location(
    location: Path | str, allowed_roots: AllowedRoots, where: Where | None = None
) -> Path | str:
    """Return a ref's location checked against the allowed roots, nothing read: a file under a
    directory root (resolved, ``check_allowed``), an object under an object-store prefix
    (``check_object_allowed``).

    Raises:
        BadInputError: no allowed root holds it.
    """
    if isinstance(location, Path):
        return check_allowed(location, allowed_roots, where)
    return check_object_allowed(location, allowed_roots, where)


def check_allowed(path: Path, allowed_roots: AllowedRoots, where: Where | None = None) -> Path:
    """Return ``path`` resolved (links, ``..``), checking that it lies under an allowed root.

    Object-store prefixes among the roots (see ``check_object_allowed``) allow no file.

    Raises:
        BadInputError: it lies outside every root (the file is not opened).
    """
    resolved = Path(os.path.realpath(path))
    if allowed_roots is not None and not any(
        resolved.is_relative_to(os.path.realpath(root)) for root in allowed_roots if not _is_prefix(root)
    ):
        raise BadInputError(
            f"Image file `{path}` is outside the allowed roots "
            f"({', '.join(f'`{root}`' for root in allowed_roots)}); allow its directory to read it",
            where,
        )
    return resolved


def check_object_allowed(url: str, allowed_roots: AllowedRoots, where: Where | None = None) -> str:
    """Return an object URL, checking that it lies under an allowed object-store prefix (nothing is read).

    A root given as an object-store URL string (``s3://bucket/prefix``) allows the
    objects under it, of the same scheme; a URL with an empty, ``.`` or ``..`` key
    segment is refused, as a client or store might resolve it elsewhere.

    Raises:
        BadInputError: no allowed prefix holds it.
    """
    if allowed_roots is None:
        return url
    scheme, _, rest = url.partition("://")
    segments = rest.split("/")
    for root in allowed_roots:
        if not _is_prefix(root):
            continue
        root_scheme, _, root_rest = str(root).partition("://")
        if (
            scheme.lower() == root_scheme.lower()
            and rest.startswith(root_rest.rstrip("/") + "/")
            and not any(segment in ("", ".", "..") for segment in segments)
        ):
            return url
    raise BadInputError(
        f"Image object `{url[:200]}` is outside the allowed roots "
        f"({', '.join(f'`{root}`' for root in allowed_roots)}); allow its prefix "
        "(`--allow-root s3://bucket/prefix`) to read it",
        where,
    )


def _is_prefix(root: Path | str) -> bool:
    """True for an allowed root that is an object-store prefix (kept as a string, as ``Path`` drops a slash)."""
    return isinstance(root, str) and is_object_uri(root)
