"""Offload one record: every inline image stored once, its part rewritten to a ref (the per-line work)."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from mmoffload.contract.addresses import is_object_uri, uri_to_path
from mmoffload.contract.imageparts import (
    ImagePart,
    decode_data_url,
    describe_source,
    find_parts,
    needs_reshape,
    rewrite_part,
)
from mmoffload.errors import BadInputError, IntegrityError, MMOffloadError, Where
from mmoffload.io.inputs import decode_json_line, too_deep
from mmoffload.io.rejects import line_ending
from mmoffload.store.backend import open_store
from mmoffload.store.local import AssetStore, StoredImage
from mmoffload.store.read import read_verified

if TYPE_CHECKING:
    from mmoffload.store.objects import ObjectStore, StoredObject


# Data URLs remembered per process (bytes of their text), so history repeated every turn is stored once.
CACHE_BYTES = 64 << 20


_LINE_ERRORS = (BadInputError, IntegrityError)


# Every image part shape needs one of these in the line's text (or a \u escape spelling it).
_IMAGE_MARKERS = (b"image", b"raw_uri", b"bytes", b"\\u")


# A data URL literal is spliced out of a line only when its bytes are exactly its string: no
# escapes, no spaces, nothing JSON would reject; then the decoded record holds a stand-in instead.
_LITERAL_START = b'"data:'


_PLAIN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=;:,._-"


# Stand-ins hold a space, so no spliced literal is one; `_spliced_line` checks for any other.
_STAND_IN = "data:mmoffload stand-in "


_STAND_IN_BYTES = _STAND_IN.encode()


# Bytes of a data URL's end (where PNG and JPEG streams differ) and middle that key the cache.
_FINGERPRINT_BYTES = 32


@dataclass(slots=True)
class _DataUrl:
    """A data URL seen in this process: its text, whether it can be spliced, and its stored image."""

    text: bytes
    plain: bool
    stored: StoredImage | StoredObject | None = None


class _SpliceMismatch(Exception):
    """A decoded line holds a stand-in string that no splice put there (spelled with escapes)."""


class OffloadOptions(msgspec.Struct, frozen=True):
    """What to do with sources that are not ``data:`` URLs.

    Attributes:
        allow_remote: keep ``http(s)`` and other non-local sources as they are instead of failing.
        check_files: fail when a ``file://`` source names no existing file.
        adopt_files: copy ``file://`` sources outside the store into it and point at the copy.
    """

    allow_remote: bool = False
    check_files: bool = False
    adopt_files: bool = False


class RecordCounts(msgspec.Struct):
    """What offloading one record (or many, summed) did."""

    records: int = 0
    records_rewritten: int = 0
    image_parts: int = 0
    offloaded: int = 0
    already_file: int = 0
    adopted: int = 0
    remote_kept: int = 0
    reshaped: int = 0
    unique_images_written: int = 0
    dedup_hits: int = 0
    image_bytes_written: int = 0

    def add(self, other: RecordCounts) -> None:
        """Add ``other``'s figures to these."""
        for name in RecordCounts.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Offloader:
    """Rewrites records against one asset store, remembering recent data URLs (per process)."""

    def __init__(self, store: AssetStore | ObjectStore, options: OffloadOptions | None = None) -> None:
        self.store = store
        self.options = options or OffloadOptions()
        self._cache: collections.OrderedDict[tuple[int, bytes, bytes], _DataUrl] = collections.OrderedDict()
        self._cache_bytes = 0
        # The stand-ins of the line being offloaded.
        self._stand_ins: dict[str, _DataUrl] = {}

    def record(self, record: Any, where: Where | None = None) -> RecordCounts:
        """Offload every image part of ``record`` in place and return what was done.

        Every image it stores is durable under its name when it returns (or, inside
        the store's ``syncing()`` block, when that block ends).

        Raises:
            BadInputError: an undecodable data URL, bytes that are no image, a remote
                source (unless allowed), or an image part of unknown shape.
            IntegrityError: a ``file://`` source that does not exist (when checked or adopted).
        """
        with self.store.syncing():
            return self._record(record, where or Where())

    def line(self, line: bytes, where: Where) -> tuple[bytes, RecordCounts]:
        """Offload one JSONL line; a line that needs no change comes back as the same bytes.

        Images it stores are durable once the store's ``syncing()`` block ends.
        """
        skeleton, occurrences = self._splice(line)
        if occurrences:
            try:
                return self._spliced_line(line, skeleton, occurrences, where)
            except (*_LINE_ERRORS, _SpliceMismatch):
                # The plain path below raises the error the line itself gives (positions, sources).
                pass
            finally:
                self._stand_ins = {}
        record = decode_json_line(line, where)
        if not any(marker in line for marker in _IMAGE_MARKERS):
            return line, RecordCounts(records=1)
        counts = self._record(record, where)
        if not counts.records_rewritten:
            return line, counts
        return msgspec.json.encode(record) + line_ending(line), counts

    def _splice(self, line: bytes) -> tuple[bytes, dict[str, int]]:
        """Return the line with each plain data URL literal replaced by a stand-in, and their counts.

        Sets the stand-ins of the line (one per distinct literal, as duplicate keys
        must stay duplicates). A literal whose opening quote follows a backslash,
        that holds escapes, or that is not plain, stays in the line.
        """
        pieces: list[bytes] = []
        stand_in_of: dict[int, str] = {}
        occurrences: dict[str, int] = {}
        copied = 0
        start = line.find(_LITERAL_START)
        while start != -1:
            end = line.find(b'"', start + 1)
            if end == -1:
                break
            if line[start - 1] != 0x5C and line.find(b"\\", start, end) == -1:  # 0x5C: backslash
                data_url = self._lookup(line, start + 1, end)
                if data_url.plain:
                    if (stand_in := stand_in_of.get(id(data_url))) is None:
                        stand_in = stand_in_of[id(data_url)] = f"{_STAND_IN}{len(stand_in_of)}"
                        self._stand_ins[stand_in] = data_url
                    occurrences[stand_in] = occurrences.get(stand_in, 0) + 1
                    pieces += (line[copied : start + 1], stand_in.encode())
                    copied = end
            start = line.find(_LITERAL_START, end + 1)
        if not occurrences:
            return line, occurrences
        pieces.append(line[copied:])
        return b"".join(pieces), occurrences

    def _spliced_line(
        self, line: bytes, skeleton: bytes, occurrences: dict[str, int], where: Where
    ) -> tuple[bytes, RecordCounts]:
        """Offload a line from its spliced skeleton: the same result as decoding the line itself.

        Raises:
            BadInputError: the line is bad (the caller reruns it plainly for the exact message).
            _SpliceMismatch: the decoded skeleton holds stand-ins other than the splices made
                (a stand-in in the line already, spelled with escapes, or duplicate keys merged).
        """
        if skeleton.count(_STAND_IN_BYTES) != sum(occurrences.values()):
            raise _SpliceMismatch
        record = decode_json_line(skeleton, where)
        decoded = msgspec.json.encode(record)
        for stand_in, count in occurrences.items():
            if decoded.count(b'"%s"' % stand_in.encode()) != count:
                raise _SpliceMismatch
        counts = self._record(record, where)
        if not counts.records_rewritten:
            return line, counts
        out = msgspec.json.encode(record)
        if _STAND_IN_BYTES in out:
            # Stand-ins not used by an image part (a data URL as text, say) get their literal back.
            for stand_in, data_url in self._stand_ins.items():
                out = out.replace(b'"%s"' % stand_in.encode(), b'"%s"' % data_url.text)
        return out + line_ending(line), counts

    def _lookup(self, text: bytes, start: int, end: int) -> _DataUrl:
        """Return the remembered data URL ``text[start:end]``, remembering it when new."""
        middle = (start + end) // 2
        key = (end - start, text[max(start, end - _FINGERPRINT_BYTES) : end], text[middle : middle + 8])
        known = self._cache.get(key)
        # Same length by the key, so a prefix match compares the whole text without a copy.
        if known is not None and text.startswith(known.text, start):
            self._cache.move_to_end(key)
            return known
        data_url = _DataUrl(exact := text[start:end], not exact.translate(None, _PLAIN_BYTES))
        if known is not None:
            self._cache_bytes -= len(known.text)
        self._cache[key] = data_url
        self._cache_bytes += len(data_url.text)
        while self._cache_bytes > CACHE_BYTES:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= len(evicted.text)
        return data_url

    def _record(self, record: Any, where: Where) -> RecordCounts:
        counts = RecordCounts(records=1)
        changed = False
        for part in find_parts(record, where):
            counts.image_parts += 1
            uri = self._resolve(part, where.at(path=part.path), counts)
            if needs_reshape(part):
                counts.reshaped += 1
            changed |= rewrite_part(part, uri)
        counts.records_rewritten = int(changed)
        return counts

    def _resolve(self, part: ImagePart, where: Where, counts: RecordCounts) -> str:
        """Return the URI the part should point at, storing its image when needed."""
        kind = part.kind
        if kind == "data":
            counts.offloaded += 1
            if (data_url := self._stand_ins.get(part.source)) is None:
                encoded = part.source.encode()
                data_url = self._lookup(encoded, 0, len(encoded))
            return self._store_data_url(data_url, where, counts).uri
        if kind == "file":
            return self._file(part.source, where, counts)
        if not self.options.allow_remote:
            raise BadInputError(
                f"Expected a `data:` URL or a local `file://` URI, got {describe_source(part.source)} "
                "(remote sources pass through only when allowed)",
                where,
            )
        counts.remote_kept += 1
        return part.source

    def _store_data_url(
        self, data_url: _DataUrl, where: Where, counts: RecordCounts
    ) -> StoredImage | StoredObject:
        if data_url.stored is not None:
            counts.dedup_hits += 1
            return data_url.stored
        data_url.stored = self._put(decode_data_url(data_url.text.decode(), where), where, counts)
        return data_url.stored

    def _file(self, uri: str, where: Where, counts: RecordCounts) -> str:
        opts = self.options
        # An object-store ref is stored already; refs and audit check the object itself.
        if not (opts.check_files or opts.adopt_files) or is_object_uri(uri):
            counts.already_file += 1
            return uri
        path = uri_to_path(uri, where)
        if not path.is_file():
            raise IntegrityError(f"Missing image file `{path}`", where)
        if not opts.adopt_files or path.parent == self.store.root:
            counts.already_file += 1
            return uri
        counts.adopted += 1
        return self._put(read_verified(path, None, where), where, counts).uri

    def _put(self, data: bytes, where: Where, counts: RecordCounts) -> StoredImage | StoredObject:
        stored = self.store.put(data, where)
        if stored.written:
            counts.unique_images_written += 1
            counts.image_bytes_written += len(data)
        else:
            counts.dedup_hits += 1
        return stored


def offload_record(
    record: Any,
    assets: str | os.PathLike[str] | AssetStore | ObjectStore,
    options: OffloadOptions | None = None,
) -> RecordCounts:
    """Offload the images of one request body or rollout record, in place.

    Every inline image goes into the asset store once and its part points at
    the stored ``file://`` URI, in canonical shape; nothing else changes.

    Args:
        record: a JSON value (an OpenAI chat request, a rollout record, ...); mutated.
        assets: the asset directory or object-store URL (``s3://bucket/prefix``), or a store on it.
        options: what to do with ``file://`` and remote sources.

    Returns:
        The counts of image parts found, offloaded, kept, and images written.

    Raises:
        BadInputError: a bad image part or source, naming its JSON path.
        IntegrityError: a missing ``file://`` source (when checked or adopted).
    """
    store = open_store(assets)
    return Offloader(store, options).record(record)


LineResult = tuple[bytes, RecordCounts] | MMOffloadError


class OffloadTask:
    """Offload a batch of lines (a runner's task); each process keeps one offloader per store and options.

    The batch's images are durable before its results return (inside a caller's
    ``store.syncing()`` block, when that block ends). Errors of a line are its result.
    """

    # This process's offloaders (their data-URL caches live on across batches and tasks).
    _offloaders: ClassVar[dict[tuple[str, OffloadOptions], Offloader]] = {}

    def __init__(self, store: AssetStore | ObjectStore, options: OffloadOptions) -> None:
        self.store = store
        self.options = options

    def offloader(self) -> Offloader:
        """Return this process's offloader for the task's store and options."""
        key = (str(self.store.root), self.options)
        if key not in self._offloaders:
            self._offloaders[key] = Offloader(self.store, self.options)
        return self._offloaders[key]

    def __call__(self, batch: list[tuple[Where, bytes]]) -> list[LineResult]:
        offloader = self.offloader()
        with offloader.store.syncing():
            return [offload_line_result(offloader, where, line) for where, line in batch]


def offload_line_result(offloader: Offloader, where: Where, line: bytes) -> LineResult:
    """Offload one line; an error of the line is returned, not raised."""
    try:
        return offloader.line(line, where)
    except _LINE_ERRORS as exc:
        return exc
    except RecursionError:
        return too_deep(where)
