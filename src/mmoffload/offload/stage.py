"""The offload stage: inline images out of chat JSON, into the content-addressed store.

``offload_record`` rewrites one request body or rollout record in place (what a
training client does before sending a request); ``offload_files`` streams JSONL
files through the same rewrite and writes each output atomically at the end.

A line without images is written back byte for byte; a line whose image parts
change is re-encoded (same keys, same order, same values). Running the stage on
its own output therefore rewrites nothing and writes no image.

Lines are megabytes of base64 around a little JSON, so each plain data URL
literal is spliced out of the line's bytes before decoding (a short stand-in
takes its place) and is looked up by a fingerprint of its bytes: history
repeated every turn is neither decoded as JSON, nor base64-decoded, nor hashed
again. The output is the same bytes the plain decode-rewrite-encode gives.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

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
from mmoffload.errors import BadInputError, IntegrityError, MMOffloadError, UsageError, Where
from mmoffload.io.inputs import Input, decode_json_line, is_stdio, iter_lines, open_input, too_deep
from mmoffload.io.outputs import (
    atomic_writer,
    check_distinct,
    check_output_path,
    check_writable_dir,
    open_output,
    remove_own_temps,
    remove_stale_temps,
)
from mmoffload.runners import line_runner
from mmoffload.store.backend import open_store
from mmoffload.store.local import AssetStore, StoredImage
from mmoffload.store.read import read_verified

if TYPE_CHECKING:
    from mmoffload.runners.ray import RayOptions
    from mmoffload.store.objects import ObjectStore, StoredObject

REJECTS_SUFFIX = ".rejects.jsonl"
# An image write takes milliseconds; a temp this old in the asset directory is a killed run's.
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


class OffloadReport(RecordCounts):
    """Figures of one offload run (stable names: the keys of ``--json``).

    ``unique_images_written + dedup_hits == offloaded + adopted``: every stored
    image part either wrote a new file or found its image already stored.
    """

    inputs: int = 0
    jsonl_bytes_in: int = 0
    jsonl_bytes_out: int = 0
    rejected_lines: int = 0
    stale_temps_removed: int = 0
    seconds: float = 0.0
    assets: str = ""
    outputs: list[str] = msgspec.field(default_factory=list)
    rejects: list[str] = msgspec.field(default_factory=list)


class RejectedLine(msgspec.Struct, omit_defaults=True):
    """One line of a rejects file: the bad line whole, and why it was rejected.

    ``text`` is the exact line without its line break; a line that is not UTF-8
    is kept in ``text_base64`` instead.
    """

    file: str
    line: int
    reason: str
    text: str | None = None
    text_base64: bytes | None = None


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
        return msgspec.json.encode(record) + _line_ending(line), counts

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
        return out + _line_ending(line), counts

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


def plan_outputs(
    inputs: Sequence[str | os.PathLike[str] | Input], output: str | os.PathLike[str] | None, in_place: bool
) -> list[Path]:
    """Return the output path of each input.

    One input: ``output`` is the file to write (or a directory to write it into).
    Several inputs, or inputs from a directory or a glob (see ``expand_inputs``):
    ``output`` is a directory and each output mirrors its input's relative path.
    ``output`` ``-`` is stdout for every input, in order. ``in_place``: each input
    is its own output.

    Raises:
        UsageError: neither or both of ``output`` and ``in_place``, an output that is
            an input (without ``in_place``), stdin rewritten in place, or two inputs
            with the same output (naming both).
    """
    if not inputs:
        raise UsageError("Expected at least one input file")
    if in_place == (output is not None):
        raise UsageError("Expected exactly one of an output (`-o`) or in-place rewriting (`--in-place`)")
    items = [item if isinstance(item, Input) else Input(Path(item), Path(Path(item).name)) for item in inputs]
    if in_place:
        if any(is_stdio(item.path) for item in items):
            raise UsageError("Expected a file to rewrite in place, got stdin (`-`)")
        return [item.path for item in items]
    output = Path(output)  # type: ignore[arg-type]
    if is_stdio(output):
        return [output] * len(items)
    mirrored = len(items) > 1 or items[0].relative != Path(items[0].path.name)
    if not mirrored and not output.is_dir():
        outputs = [output]
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"Expected a directory as output for {len(items)} inputs, got file `{output}`")
        outputs = [output / item.relative for item in items]
    claimed: dict[Path, Path] = {}
    for item, target in zip(items, outputs, strict=True):
        resolved = target.resolve()
        if resolved in claimed:
            raise UsageError(
                f"Inputs `{claimed[resolved]}` and `{item.path}` would both write `{target}`; "
                "give a directory or a glob so that outputs mirror their relative paths"
            )
        claimed[resolved] = item.path
        if not is_stdio(item.path) and item.path.resolve() == resolved:
            raise UsageError(f"Output `{resolved}` is the input; use in-place rewriting to replace it")
    return outputs


def offload_files(
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    assets: str | os.PathLike[str] | AssetStore | ObjectStore,
    *,
    options: OffloadOptions | None = None,
    skip_bad_lines: bool = False,
    rejects: str | os.PathLike[str] | None = None,
    workers: int = 1,
    ray: RayOptions | None = None,
    advance: Callable[[int], None] = lambda _n: None,
) -> OffloadReport:
    """Offload every image in JSONL ``inputs`` into ``assets``, writing ``outputs``.

    Outputs (and rejects files) are written to temporaries and renamed into place
    only once every input went through, so a failed or killed run leaves no
    output. Images stored before a failure stay: they are content addressed.

    Args:
        inputs: JSONL files, one record per line, ``-`` for stdin, gzip or zstd compressed or
            not; never modified (unless an output is its input).
        outputs: one path per input (see ``plan_outputs``); ``-`` is stdout, a name ending
            in ``.gz`` or ``.zst`` is written compressed.
        assets: the image asset directory or object-store URL, or a store on it.
        options: what to do with ``file://`` and remote sources.
        skip_bad_lines: keep going past bad lines, writing each whole, with its reason,
            to a rejects file (``rejects``, else ``<output>.rejects.jsonl``).
        rejects: one rejects file for the whole run.
        workers: processes for decode, hash and write; output order is kept.
        ray: run the per-line work as tasks on a Ray cluster instead (``ray_backend``).
        advance: called with the byte count of each line processed (progress).

    Returns:
        The run's figures.

    Raises:
        BadInputError: the first bad line (file, line, JSON path), unless skipping them.
        IntegrityError: a missing ``file://`` source (when checked or adopted).
        UsageError: an unreadable input, an output that is an input or another output,
            or an output or asset directory that cannot be written (all checked before any work).
    """
    started = time.perf_counter()
    if skip_bad_lines and rejects is None and any(is_stdio(target) for target in outputs):
        raise UsageError("Expected `--rejects PATH` for bad lines when the output is stdout (`-`)")
    options = options or OffloadOptions()
    inputs, outputs = [Path(path) for path in inputs], [Path(path) for path in outputs]
    rejects = Path(rejects) if rejects is not None else None
    rejects_paths = [rejects or _default_rejects(target) for target in outputs] if skip_bad_lines else []
    store = open_store(assets)
    _check_paths(inputs, outputs, rejects_paths, store)
    report = OffloadReport(inputs=len(inputs), assets=str(store.root))
    temp_dirs = {path.parent for path in [*outputs, *rejects_paths] if not is_stdio(path)}
    if isinstance(store, AssetStore):
        store.root.mkdir(parents=True, exist_ok=True)
        temp_dirs.add(store.root)
    # Killed runs' temporaries (dead owners) go from the store and the output directories.
    report.stale_temps_removed = sum(remove_stale_temps(directory) for directory in temp_dirs)
    try:
        _offload_all(inputs, outputs, store, options, skip_bad_lines, rejects, workers, ray, advance, report)
    except BaseException:
        # A stop (Ctrl-C, SIGTERM) can land just as a temporary is made; none may stay behind.
        for directory in temp_dirs:
            remove_own_temps(directory)
        raise
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _offload_all(
    inputs: list[Path],
    outputs: list[Path],
    store: AssetStore | ObjectStore,
    options: OffloadOptions,
    skip_bad_lines: bool,
    rejects: Path | None,
    workers: int,
    ray: RayOptions | None,
    advance: Callable[[int], None],
    report: OffloadReport,
) -> None:
    """Stream every input through the offloader into its output, committing all outputs at the end."""
    task = OffloadTask(store, options)
    # Here, one syncing block covers the run (the task's own per batch is then a no-op); a worker
    # process makes each batch's images durable before its results go back.
    with contextlib.ExitStack() as commits, store.syncing(), line_runner(task, workers, ray) as results:
        reject_files: dict[Path, BinaryIO] = {}
        for source, target in zip(inputs, outputs, strict=True):
            out = commits.enter_context(open_output(target))
            rejects_path = rejects or _default_rejects(target)
            for where, line, result in results(iter_lines(source)):
                advance(len(line))
                report.jsonl_bytes_in += len(line)
                if isinstance(result, MMOffloadError):
                    if not skip_bad_lines:
                        raise result
                    if rejects_path not in reject_files:
                        reject_files[rejects_path] = commits.enter_context(atomic_writer(rejects_path))
                    reject_files[rejects_path].write(_reject(where, line, result))
                    report.rejected_lines += 1
                    continue
                written, counts = result
                out.write(written)
                report.jsonl_bytes_out += len(written)
                report.add(counts)
            report.outputs.append("<stdout>" if is_stdio(target) else str(target))
        report.rejects = [str(path) for path in reject_files]


def _default_rejects(target: Path) -> Path:
    return target.with_name(target.name + REJECTS_SUFFIX)


def _check_paths(
    inputs: list[Path], outputs: list[Path], rejects: list[Path], store: AssetStore | ObjectStore
) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or cannot be written.

    Stdin and stdout (``-``) are streams: nothing to check, nothing to collide with.
    """
    inputs = [path for path in inputs if not is_stdio(path)]
    for path in inputs:
        with open_input(path):  # An unreadable input fails here, before any work.
            pass
    named = [("output", path) for path in outputs if path not in inputs and not is_stdio(path)]
    named += [("rejects file", path) for path in dict.fromkeys(rejects)]
    check_distinct(inputs, named)
    for role, path in named:
        check_output_path(path, role)
    if isinstance(store, AssetStore):
        check_writable_dir(store.root, "asset directory")


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


def _line_ending(line: bytes) -> bytes:
    """Return the line's break (checked at the end only: lines can be megabytes)."""
    return b"\r\n" if line.endswith(b"\r\n") else b"\n"


def _reject(where: Where, line: bytes, error: MMOffloadError) -> bytes:
    # The exact line, less its line break.
    text = line.removesuffix(_line_ending(line))
    try:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text=text.decode())
    except UnicodeDecodeError:
        entry = RejectedLine(str(where.file), where.line or 0, str(error), text_base64=text)
    return msgspec.json.encode(entry) + b"\n"
