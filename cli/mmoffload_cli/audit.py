"""``mmoffload audit``: are a run's artifacts fit for the trainer?"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mmoffload.audit import AuditReport, Expectation
from mmoffload.audit import audit as audit_paths
from mmoffload.families import resolve_model_dir
from mmoffload.io.inputs import expand_inputs
from mmoffload.runners.ray import RayOptions
from mmoffload.store.local import default_allowed_roots
from mmoffload.store.remap import Remap
from mmoffload_cli import options, sink

SHOWN_VIOLATIONS = 10

Inputs = Annotated[
    list[Path],
    typer.Argument(
        metavar="PATH",
        help="Run directories (or directories of runs), .bin artifacts (rank_<R>.bin or a "
        "TrainingBatch), JSONL files (.gz/.zst too, - for stdin) and quoted globs.",
        show_default=False,
    ),
]
HtmlOut = Annotated[
    Path | None,
    typer.Option(
        "--html",
        metavar="OUT.html",
        help="Also write a page: figures, distinct images, per-rank plots (needs the html extra).",
    ),
]
VerifyHashes = Annotated[
    bool, typer.Option("--verify-hashes", help="Also re-hash every referenced file (each once).")
]


def audit(
    inputs: Inputs,
    verify_hashes: VerifyHashes = False,
    model: options.Model = None,
    allow_root: options.AllowRoot = None,
    expect: options.Expect = None,
    html_out: HtmlOut = None,
    remap: options.Remap = None,
    ray: options.Ray = False,
    ray_address: options.RayAddress = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Check runs and JSONL files and report every figure.

    Reads each run's TrainingBatch and rank files, .bin artifacts and JSONL.

    Exit 0 when there is no violation and every --expect holds, 1 when not,
    2 when the inputs cannot be read or the arguments are unusable.

    Examples:

    \b
        mmoffload audit RUN
        mmoffload audit RUN --verify-hashes --json
        mmoffload audit RUN --expect 'examples>=4' --expect data_uris=0
        mmoffload audit offloaded.jsonl.gz
        mmoffload audit DEMO_DIR --json | jq '.runs[] | {run, examples, ok}'
        mmoffload audit RUN --html audit.html
        mmoffload audit RUN --verify-hashes --remap /mnt/a=/data/a
        mmoffload audit dumps/*.jsonl --ray --ray-address ray://head:10001
    """
    with sink.errors_to_exit(as_json):
        model_dir = resolve_model_dir(model) if model is not None else None
        paths = [item.path for item in expand_inputs(inputs, directories=False)]
        # Hashing is the long part: the bar's total is the image bytes, known once the artifacts are read.
        with sink.progress_bar("audit", None, enabled=verify_hashes and not quiet) as advance:
            report = audit_paths(
                paths,
                verify_hashes=verify_hashes,
                model_dir=model_dir,
                expect=expect or (),
                remap=Remap.parse(remap or []),
                ray=RayOptions(address=ray_address) if ray or ray_address else None,
                allowed_roots=allow_root or default_roots(inputs),
                advance=advance,
                add_total=advance.add_total,
            )
        if html_out is not None:
            from mmoffload.io.outputs import atomic_write
            from mmoffload.views.audit_html import audit_page  # Only --html needs the page and its plots.

            atomic_write(html_out, audit_page(paths, report).encode())
    sink.emit_report(report, "audit", as_json=as_json, quiet=quiet)
    if not (as_json or quiet):
        sink.stdout.print(violations_table(report, None if verbose else SHOWN_VIOLATIONS))
    print_failed([e for e in report.expectations if not e.holds])
    if not report.ok:
        raise typer.Exit(sink.EXIT_PROBLEMS)


def default_roots(inputs: list[Path]) -> list[Path | str] | None:
    """Return the asset directories of the runs among ``inputs`` (see ``default_allowed_roots``).

    A directory of runs (the demo's output) contributes each run's asset directory.
    """
    directories = [path for path in inputs if path.is_dir()]
    runs = [*directories, *(child for path in directories for child in path.iterdir() if child.is_dir())]
    runs = runs or [None]
    roots = [root for run in runs for root in default_allowed_roots(run) or []]
    return list(dict.fromkeys(roots)) or None


def violations_table(report: AuditReport, shown: int | None = SHOWN_VIOLATIONS) -> Table | str:
    """Render the first ``shown`` violations (all for None), then how many more there are."""
    if report.ok:
        return "audit: ok, no violations"
    # Grouped by kind (in order of first appearance), each kind's count in the title.
    kinds = Counter(violation.kind for violation in report.violations)
    order = {kind: rank for rank, kind in enumerate(kinds)}
    grouped = sorted(report.violations, key=lambda violation: order[violation.kind])
    # One kind's count is the total: listed only when there are several.
    counts = ": " + ", ".join(f"{k} {n:,}" for k, n in kinds.items()) if len(kinds) > 1 else ""
    table = Table(
        title=f"{len(report.violations):,} violation(s){counts}", title_justify="left", box=box.SIMPLE
    )
    # Names and numbers never wrap; the reason takes the width left and wraps between words.
    table.add_column("kind", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("index", no_wrap=True, justify="right")
    table.add_column("image", no_wrap=True, justify="right")
    table.add_column("reason", overflow="fold")
    for violation in grouped[:shown]:
        table.add_row(
            violation.kind,
            sink.cell(short_path(violation.file)),
            sink.format_value(violation.index) if violation.index is not None else "",
            str(violation.image) if violation.image is not None else "",
            sink.cell(violation.reason + (f" at `{violation.path}`" if violation.path else "")),
        )
    if shown is not None and (more := len(report.violations) - shown) > 0:
        table.caption = f"and {more:,} more (-v or --json lists them all)"
        table.caption_justify = "left"
    return table


def short_path(file: str, keep: int = 3) -> str:
    """Shorten a path for the table to its last ``keep`` parts (JSON output keeps it whole)."""
    parts = Path(file).parts
    return file if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])


def print_failed(failed: Sequence[Expectation]) -> None:
    """Print each failed expectation with the figure's actual value, on stderr."""
    for expectation in failed:
        sink.stderr.print(
            f"expectation failed: {expectation.name}{expectation.op}{sink.format_value(expectation.expected)}, "
            f"actual {sink.format_value(expectation.actual)}",
            markup=False,
        )
