"""Inputs and outputs at fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...).

The opener and the output writer call here only for a URL, so a local run never imports
fsspec. An output is written to a local temporary and put at its URL only when the run
succeeds: a failed run leaves no object, as a failed local run leaves no file.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from mmoffload.errors import UsageError, Where

# `scheme://` with a scheme of two letters or more (a Windows drive `C:` is one).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL string other than ``file://`` (that one is a local path)."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.lower().startswith("file://")


def filesystem(url: str) -> Any:
    """Return the fsspec file system of ``url``.

    Raises:
        UsageError: the protocol's fsspec package is not installed.
    """
    import fsspec

    protocol = url.partition("://")[0].lower()
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"`{protocol}://` needs its fsspec package (s3fs, gcsfs, huggingface_hub): {exc}"
        ) from exc


def _with_protocol(url: str, path: str) -> str:
    return path if "://" in path else f"{url.partition('://')[0]}://{path}"


def open_url(url: str) -> BinaryIO:
    """Open a URL for binary reading (seekable, as Parquet needs).

    Raises:
        UsageError: no such object, or the store cannot be reached.
    """
    try:
        return filesystem(url).open(url, "rb")  # type: ignore[no-any-return]
    except UsageError:
        raise
    except FileNotFoundError as exc:
        raise UsageError("No such file or object", Where(file=url)) from exc
    except Exception as exc:  # botocore and its peers raise their own classes, not OSError.
        raise UsageError(f"Cannot read input: {exc}", Where(file=url)) from exc


def expand_url(url: str, wanted: Any) -> list[tuple[str, str]]:
    """Return ``(url, relative)`` of the files a URL names: itself, a prefix's wanted files, or a glob's matches.

    Raises:
        UsageError: nothing matches.
    """
    fs = filesystem(url)
    try:
        if any(char in url for char in "*?["):
            base = re.split(r"[*?\[]", url, maxsplit=1)[0].rpartition("/")[0]
            found = [_with_protocol(url, path) for path in sorted(fs.glob(url))]
        elif fs.isdir(url):
            base = url.rstrip("/")
            found = [_with_protocol(url, path) for path in sorted(fs.find(url)) if wanted(path)]
        else:
            base, found = url.rpartition("/")[0], [url] if fs.exists(url) else []
    except Exception as exc:  # The store's own errors: no endpoint, no credentials.
        raise UsageError(f"Cannot list input: {exc}", Where(file=url)) from exc
    if not found:
        raise UsageError("No file or object matches", Where(file=url))
    return [
        (path, path[len(base) :].lstrip("/") if path.startswith(base) else path.rpartition("/")[2])
        for path in found
    ]


@contextlib.contextmanager
def url_writer(url: str) -> Iterator[BinaryIO]:
    """Yield a local temporary that is put at ``url`` when the block succeeds (and dropped when not).

    Raises:
        UsageError: the object cannot be written.
    """
    fs = filesystem(url)
    with tempfile.NamedTemporaryFile(prefix=".mmoffload-upload-") as tmp:
        yield tmp  # type: ignore[misc]
        tmp.flush()
        try:
            fs.put_file(tmp.name, url)
        except Exception as exc:  # OSError or the store's own classes.
            raise UsageError(f"Cannot write output: {exc}", Where(file=url)) from exc
