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

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mmoffload.errors import MMOffloadError, UsageError
from mmoffload.io.inputs import Input, is_stdio, iter_lines, open_input
from mmoffload.io.outputs import (
    TEMP_PREFIX,
    atomic_writer,
    check_distinct,
    check_output_path,
    check_writable_dir,
    open_output,
    remove_own_temps,
)
from mmoffload.io.rejects import rejected_line
from mmoffload.offload.records import OffloadOptions, OffloadTask
from mmoffload.offload.report import OffloadReport, default_rejects
from mmoffload.runners import line_runner
from mmoffload.store.backend import open_store
from mmoffload.store.local import AssetStore

if TYPE_CHECKING:
    from mmoffload.runners.ray import RayOptions
    from mmoffload.store.objects import ObjectStore


# An image write takes milliseconds; a temp this old in the asset directory is a killed run's.
STALE_TEMP_SECONDS = 3600


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


def sweep_stale_temps(directory: Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temporary files of killed runs older than ``older_than`` seconds; return how many."""
    removed = 0
    cutoff = time.time() - older_than
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
    return removed


def offload_files(
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    assets: str | os.PathLike[str] | AssetStore | ObjectStore,
    *,
    options: OffloadOptions | None = None,
    skip_invalid: bool = False,
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
        skip_invalid: keep going past bad lines, writing each whole, with its reason,
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
    if skip_invalid and rejects is None and any(is_stdio(target) for target in outputs):
        raise UsageError("Expected `--rejects PATH` for bad lines when the output is stdout (`-`)")
    options = options or OffloadOptions()
    inputs, outputs = [Path(path) for path in inputs], [Path(path) for path in outputs]
    rejects = Path(rejects) if rejects is not None else None
    rejects_paths = [rejects or default_rejects(target) for target in outputs] if skip_invalid else []
    store = open_store(assets)
    _check_paths(inputs, outputs, rejects_paths, store)
    report = OffloadReport(inputs=len(inputs), assets=str(store.root))
    temp_dirs = {path.parent for path in [*outputs, *rejects_paths] if not is_stdio(path)}
    if isinstance(store, AssetStore):
        store.root.mkdir(parents=True, exist_ok=True)
        report.stale_temps_removed = sweep_stale_temps(store.root)
        temp_dirs.add(store.root)
    try:
        _offload_all(inputs, outputs, store, options, skip_invalid, rejects, workers, ray, advance, report)
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
    skip_invalid: bool,
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
            rejects_path = rejects or default_rejects(target)
            for where, line, result in results(iter_lines(source)):
                advance(len(line))
                report.jsonl_bytes_in += len(line)
                if isinstance(result, MMOffloadError):
                    if not skip_invalid:
                        raise result
                    if rejects_path not in reject_files:
                        reject_files[rejects_path] = commits.enter_context(atomic_writer(rejects_path))
                    reject_files[rejects_path].write(rejected_line(where, line, result))
                    report.rejected_lines += 1
                    continue
                written, counts = result
                out.write(written)
                report.jsonl_bytes_out += len(written)
                report.add(counts)
            report.outputs.append("<stdout>" if is_stdio(target) else str(target))
        report.rejects = [str(path) for path in reject_files]


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
