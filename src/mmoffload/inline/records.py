"""Inline one record: every stored image ref back to a ``data:`` URL (the reverse of offload)."""

from __future__ import annotations

import base64
import collections
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.contract.addresses import MEDIA_TYPES, address_hash, asset_location, sniff_extension
from mmoffload.contract.imageparts import find_parts, inline_part
from mmoffload.errors import BadInputError, Where
from mmoffload.io.inputs import decode_json_line
from mmoffload.store.read import AllowedRoots, read_verified

# Data URLs remembered (bytes of their text), so history repeated every turn is read once.
CACHE_BYTES = 64 << 20


class InlineCounts(msgspec.Struct):
    """What inlining one record (or many, summed) did."""

    records: int = 0
    records_rewritten: int = 0
    image_parts: int = 0
    inlined: int = 0
    image_bytes_read: int = 0

    def add(self, other: InlineCounts) -> None:
        """Add ``other``'s figures to these."""
        for name in InlineCounts.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def data_url(data: bytes) -> str:
    """Return the ``data:`` URL of image bytes, its media type sniffed from the bytes."""
    extension = sniff_extension(data)
    media_type = MEDIA_TYPES.get(extension or "", "image/*")
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class Inliner:
    """Reads stored images back into records, verifying each against its content-addressed name."""

    def __init__(self, allowed_roots: AllowedRoots = None) -> None:
        self.allowed_roots = allowed_roots
        self._cache: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
        self._cache_bytes = 0

    def image(self, uri: str, where: Where, counts: InlineCounts) -> tuple[bytes, str]:
        """Return the bytes and ``data:`` URL of a stored image (``file://`` URI, path or object URL).

        Raises:
            MissingImageError: no such file or object.
            IntegrityError: unreadable, or its content does not hash to its name.
            BadInputError: outside the allowed roots, not a regular file, or too large.
        """
        counts.image_parts += 1
        counts.inlined += 1
        if (known := self._cache.get(uri)) is not None:
            self._cache.move_to_end(uri)
            return known
        location = asset_location(uri if "://" in uri else Path(uri).absolute().as_uri(), where)
        data = read_verified(location, address_hash(location), where, allowed_roots=self.allowed_roots)
        if sniff_extension(data) is None:
            raise BadInputError(f"Expected image bytes at `{uri[:200]}`, got no image format", where)
        counts.image_bytes_read += len(data)
        self._cache[uri] = known = (data, data_url(data))
        self._cache_bytes += len(known[1])
        while self._cache_bytes > CACHE_BYTES:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cache_bytes -= len(evicted)
        return known

    def record(self, record: Any, where: Where | None = None, *, reshape: bool = True) -> InlineCounts:
        """Point every stored image part of ``record`` back at its image inline, in place.

        Parts with a ``data:`` URL or a remote URL stay as they are. With ``reshape``
        False no key is renamed (a table row keeps its schema; see ``inline_part``).

        Raises:
            BadInputError: an image part of unknown shape, or a refused image file.
            IntegrityError: a missing image, or one whose content does not match its name.
        """
        counts = InlineCounts(records=1)
        where = where or Where()
        for part in find_parts(record, where):
            if part.kind != "file":
                counts.image_parts += 1
                continue
            data, url = self.image(part.source, where.at(path=part.path), counts)
            inline_part(part, data, url, reshape=reshape)
            counts.records_rewritten = 1
        return counts

    def line(self, line: bytes, where: Where) -> tuple[bytes, InlineCounts]:
        """Inline one JSONL line; a line with no stored image comes back as the same bytes."""
        record = decode_json_line(line, where)
        counts = self.record(record, where)
        if not counts.records_rewritten:
            return line, counts
        ending = b"\r\n" if line.endswith(b"\r\n") else b"\n"
        return msgspec.json.encode(record) + ending, counts
