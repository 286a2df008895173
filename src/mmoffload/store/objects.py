"""Assets on object storage (``s3://``, ``gs://``, ``az://`` ...) through fsspec.

The contract's refs are ``file://`` URIs; this module is the extension for runs
whose rollout workers and trainer share no file system (docs/scale.md). Every
object-store read and write in mmoffload goes through here, on fsspec: the
store's protocol package (``s3fs``, ``gcsfs``, ``adlfs``) brings the client.

A put is a conditional create (``If-None-Match: *`` on S3): of concurrent writers
of one image exactly one creates the object, and no writer ever replaces one.
An object that is already there is read back and its hash checked, never
rewritten, so a corrupt object is reported instead of silently kept or hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from mmoffload.contract.addresses import (
    OBJECT_SCHEMES,
    content_hash,
    describe_bytes,
    is_object_uri,
    sniff_extension,
    verify_hash,
)
from mmoffload.errors import BadInputError, UsageError, Where


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An image in an object store; ``written`` is False when it was already there."""

    hash: str
    uri: str
    written: bool


class ObjectStore:
    """A prefix of an object store holding content-addressed images, write-once.

    Picklable (fsspec file systems are), so worker processes and Ray tasks get their own.
    """

    def __init__(self, url: str) -> None:
        if not is_object_uri(url):
            raise UsageError(
                f"Expected an object-store URL ({', '.join(sorted(OBJECT_SCHEMES))}), got `{url}`"
            )
        self.root = url.rstrip("/")
        self.fs = _filesystem(self.root)

    @contextlib.contextmanager
    def syncing(self) -> Iterator[None]:
        """Match ``AssetStore.syncing``: an object is durable once its put returns, nothing to defer."""
        yield

    def put(self, data: bytes, where: Where | None = None) -> StoredObject:
        """Create the image's object unless it exists; verify an existing one.

        Raises:
            BadInputError: the bytes are no image format.
            IntegrityError: the object exists with other content (a corrupt store).
        """
        extension = sniff_extension(data)
        if extension is None:
            raise BadInputError(f"Expected image bytes, got {describe_bytes(data)}", where)
        digest = content_hash(data)
        uri = f"{self.root}/{digest}{extension}"
        try:
            with _reaching(uri):
                self.fs.pipe_file(uri, data, mode="create")
        except FileExistsError:
            # Same name, so the same bytes must be there already: checked, never trusted.
            verify_hash(cat_object(uri), digest, uri, where)
            return StoredObject(digest, uri, written=False)
        except OSError as exc:  # A missing bucket, no permission: the run cannot go on.
            raise UsageError(f"Cannot write `{uri}`: {exc.strerror or exc}", where) from exc
        return StoredObject(digest, uri, written=True)


def cat_object(uri: str) -> bytes:
    """Return an object's bytes (``store.read.read_verified`` is the reader that checks them).

    Raises:
        FileNotFoundError: there is no such object.
        OSError: it cannot be read.
        UsageError: the store cannot be reached.
    """
    with _reaching(uri):
        return bytes(_filesystem(uri).cat_file(uri))


def object_size(uri: str) -> int:
    """Return an object's size in bytes.

    Raises:
        FileNotFoundError: there is no such object.
        UsageError: the store cannot be reached.
    """
    with _reaching(uri):
        return int(_filesystem(uri).size(uri))


@contextlib.contextmanager
def _reaching(uri: str) -> Iterator[None]:
    """Turn a client's own errors (no endpoint, bad credentials) into one clear error; OSErrors pass."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:  # botocore and its peers raise their own classes, not OSError.
        raise UsageError(f"Cannot reach `{uri}`: {exc}") from exc


def _filesystem(url: str) -> Any:
    """Return the fsspec file system of ``url`` (fsspec keeps one instance per protocol and process).

    Credentials and endpoints come from the environment and the client's own
    configuration (``AWS_ENDPOINT_URL``, ``~/.aws``, ...), as every tool on the node reads them.

    Raises:
        UsageError: the protocol's fsspec package is not installed.
    """
    protocol = url.partition("://")[0].lower()
    try:
        return fsspec.filesystem(protocol)
    except ImportError as exc:
        raise UsageError(f"`{protocol}://` needs its fsspec package (s3fs, gcsfs or adlfs): {exc}") from exc
