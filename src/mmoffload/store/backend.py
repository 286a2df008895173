"""The one place that chooses a local directory or an object store for a location."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmoffload.store.local import AssetStore, resolve_assets_dir

if TYPE_CHECKING:
    from mmoffload.store.objects import ObjectStore  # Only object-store runs import fsspec's clients.


def open_store(location: Path | str | AssetStore | ObjectStore) -> AssetStore | ObjectStore:
    """Open the asset store at a directory, a ``file://`` URL or an object-store URL (``s3://b/p``).

    A store passed in is returned as it is.
    """
    if not isinstance(location, Path | str):
        return location
    if isinstance(location, str):
        location = resolve_assets_dir(location, None)
    if isinstance(location, str):
        from mmoffload.store.objects import ObjectStore  # Only object-store runs import fsspec's clients.

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
    from mmoffload.store.objects import cat_object

    return cat_object(location)


def asset_size(location: Path | str) -> int:
    """Return the size in bytes of an image file or object.

    Raises:
        FileNotFoundError: there is no such file or object.
        OSError: it cannot be read.
    """
    if isinstance(location, Path):
        return location.stat().st_size
    from mmoffload.store.objects import object_size

    return object_size(location)
