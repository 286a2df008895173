"""The inline stage: every stored image ref back to a ``data:`` URL, for JSONL and Parquet.

For trainers and tools that take only inline images (``data:`` URLs). Each image is
read through the guarded reader and checked against its content-addressed name; the
data URL's media type is sniffed from the bytes. ``offload`` then ``inline`` gives back
the original records (canonical shapes), image bytes identical.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from mmoffload.inline.records import InlineCounts, Inliner
from mmoffload.io.inputs import InputFormat, is_stdio, iter_lines, location, open_input, reads_parquet
from mmoffload.io.outputs import check_distinct, check_output_path, open_output
from mmoffload.store.read import AllowedRoots


class InlineReport(InlineCounts):
    """Figures of one inline run (stable names: the keys of ``--json``)."""

    inputs: int = 0
    seconds: float = 0.0
    outputs: list[str] = msgspec.field(default_factory=list)


def inline_files(
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    *,
    allowed_roots: AllowedRoots = None,
    input_format: InputFormat = "auto",
    advance: Callable[[int], None] = lambda _n: None,
) -> InlineReport:
    """Inline every stored image ref of JSONL or Parquet ``inputs`` into ``outputs``.

    Outputs are written to temporaries and renamed into place only once every input
    went through: a failed run leaves none.

    Args:
        inputs: JSONL (``-`` for stdin, gzip or zstd) or Parquet files.
        outputs: one path per input (see ``plan_outputs``); ``-`` is stdout.
        allowed_roots: directories refs may point into; None allows any regular file.
        input_format: ``auto`` tells Parquet by its name or magic bytes.
        advance: called with the bytes of each line or row group done (progress).

    Raises:
        BadInputError: a bad line or cell (file, line or row, JSON path).
        MissingImageError: a ref to no file or object.
        IntegrityError: an image whose content does not match its name.
        UsageError: an unreadable input, or an output that is an input or cannot be written.
    """
    started = time.perf_counter()
    inputs, outputs = [location(path) for path in inputs], [location(path) for path in outputs]
    for path in inputs:
        if not is_stdio(path):
            with open_input(path):  # An unreadable input fails here, before any work.
                pass
    # URLs are objects in a store: written whole at the end, nothing on this disk to check.
    files = [path for path in inputs if isinstance(path, Path) and not is_stdio(path)]
    named = [("output", path) for path in outputs if isinstance(path, Path) and not is_stdio(path)]
    check_distinct(files, named)
    for role, path in named:
        check_output_path(path, role)
    report = InlineReport(inputs=len(inputs))
    inliner = Inliner(allowed_roots)
    with contextlib.ExitStack() as commits:
        for source, target in zip(inputs, outputs, strict=True):
            if reads_parquet(source, input_format):
                from mmoffload.inline.parquet import inline_parquet  # Only Parquet runs import pyarrow.

                out = commits.enter_context(open_output(target, compress=False))
                report.add(inline_parquet(source, out, inliner, advance))
            else:
                out = commits.enter_context(open_output(target))
                for where, line in iter_lines(source):
                    advance(len(line))
                    written, counts = inliner.line(line, where)
                    out.write(written)
                    report.add(counts)
            report.outputs.append("<stdout>" if is_stdio(target) else str(target))
    report.seconds = round(time.perf_counter() - started, 3)
    return report
