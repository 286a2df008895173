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
from mmoffload.io.inputs import InputFormat, is_stdio, iter_lines, location, open_input, reads_parquet
from mmoffload.io.outputs import (  # noqa: F401 - plan_outputs: offload's public name too
    atomic_writer,
    check_distinct,
    check_output_path,
    check_writable_dir,
    open_output,
    plan_outputs,
    remove_own_temps,
    remove_stale_temps,
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
    input_format: InputFormat = "auto",
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
        input_format: ``auto`` tells Parquet by its name or magic bytes; ``jsonl`` or ``parquet``
            says. A Parquet input is written as Parquet, one row group at a time, in this process
            (``workers`` and ``ray`` apply to JSONL; bad rows stop the run).

    Returns:
        The run's figures.

    Raises:
        BadInputError: the first bad line (file, line, JSON path), unless skipping them.
        IntegrityError: a missing ``file://`` source (when checked or adopted).
        UsageError: an unreadable input, an output that is an input or another output,
            or an output or asset directory that cannot be written (all checked before any work).
    """
    started = time.perf_counter()
    inputs, outputs = [location(path) for path in inputs], [location(path) for path in outputs]
    if skip_invalid and rejects is None and any(is_stdio(t) or isinstance(t, str) for t in outputs):
        raise UsageError("Expected `--rejects PATH` for bad lines when the output is stdout (`-`) or a URL")
    options = options or OffloadOptions()
    rejects = Path(rejects) if rejects is not None else None
    rejects_paths = [rejects or default_rejects(target) for target in outputs] if skip_invalid else []  # type: ignore[arg-type]
    store = open_store(assets)
    _check_paths(inputs, outputs, rejects_paths, store)
    report = OffloadReport(inputs=len(inputs), assets=str(store.root))
    temp_dirs = {
        path.parent for path in [*outputs, *rejects_paths] if isinstance(path, Path) and not is_stdio(path)
    }
    if isinstance(store, AssetStore):
        store.root.mkdir(parents=True, exist_ok=True)
        temp_dirs.add(store.root)
    # Killed runs' temporaries (dead owners) go from the store and the output directories.
    report.stale_temps_removed = sum(remove_stale_temps(directory) for directory in temp_dirs)
    try:
        _offload_all(
            inputs,
            outputs,
            store,
            options,
            skip_invalid,
            rejects,
            workers,
            ray,
            advance,
            report,
            input_format,
        )
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
    input_format: InputFormat = "auto",
) -> None:
    """Stream every input through the offloader into its output, committing all outputs at the end."""
    task = OffloadTask(store, options)
    # Here, one syncing block covers the run (the task's own per batch is then a no-op); a worker
    # process makes each batch's images durable before its results go back.
    with contextlib.ExitStack() as commits, store.syncing(), line_runner(task, workers, ray) as results:
        reject_files: dict[Path, BinaryIO] = {}
        for source, target in zip(inputs, outputs, strict=True):
            if reads_parquet(source, input_format):
                _offload_parquet(source, target, task, commits, advance, report)
                continue
            out = commits.enter_context(open_output(target))
            for where, line, result in results(iter_lines(source)):
                advance(len(line))
                report.jsonl_bytes_in += len(line)
                if isinstance(result, MMOffloadError):
                    if not skip_invalid:
                        raise result
                    rejects_path = rejects or default_rejects(target)  # type: ignore[arg-type]
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


def _offload_parquet(
    source: Path,
    target: Path,
    task: OffloadTask,
    commits: contextlib.ExitStack,
    advance: Callable[[int], None],
    report: OffloadReport,
) -> None:
    """Offload one Parquet input into its output (committed with the others at the end)."""
    # Only a Parquet run imports pyarrow (the `parquet` extra).
    from mmoffload.offload.parquet import offload_parquet

    out = commits.enter_context(open_output(target, compress=False))
    report.add(offload_parquet(source, out, task.offloader(), advance))
    report.outputs.append("<stdout>" if is_stdio(target) else str(target))


def _check_paths(
    inputs: list[Path], outputs: list[Path], rejects: list[Path], store: AssetStore | ObjectStore
) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or cannot be written.

    Stdin and stdout (``-``) are streams: nothing to check, nothing to collide with.
    """
    for path in inputs:
        if not is_stdio(path):
            with open_input(path):  # An unreadable input fails here, before any work.
                pass
    # URLs are objects in a store: written whole at the end, nothing on this disk to check.
    inputs = [path for path in inputs if isinstance(path, Path) and not is_stdio(path)]
    named = [
        ("output", path)
        for path in outputs
        if isinstance(path, Path) and path not in inputs and not is_stdio(path)
    ]
    named += [("rejects file", path) for path in dict.fromkeys(rejects)]
    check_distinct(inputs, named)
    for role, path in named:
        check_output_path(path, role)
    if isinstance(store, AssetStore):
        check_writable_dir(store.root, "asset directory")
