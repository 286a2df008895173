"""``mmoffload demo``: the whole pipeline on the bundled fixtures, ending with the audit."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from mmoffload.audit import AuditReport
from mmoffload.demo import fixtures_dir, run_demo
from mmoffload_cli import options, sink
from mmoffload_cli.audit import violations_table

DemoRunDir = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        metavar="DIR",
        help="Demo root: one run per family in DIR/qwen_vl and DIR/kimi_k25 "
        "(default: a fresh temporary directory, kept; its path printed last, alone on stdout with -q).",
    ),
]


def next_steps(root: Path) -> str:
    """The closing lines of a demo: where its runs are kept, and commands to try on them."""
    run = root / "qwen_vl"
    return "\n".join(
        [
            f"demo: runs kept in {root}",
            "next, try:",
            f"  mmoffload show {run} --sample 0",
            f"  mmoffload inspect {run} --sample 0 --html sample.html",
            f"  mmoffload audit {root} --verify-hashes --expect missing_files=0",
            f"  mmoffload materialize {run} --model qwen3_vl",
            f"  mmoffload inline {run}/offloaded -o inline/",
        ]
    )


def demo(
    run_dir: DemoRunDir = None,
    as_json: options.Json = False,
    quiet: options.Quiet = False,
    verbose: options.Verbose = False,
) -> None:
    """Run offload, refs, pack and audit on the bundled fixtures.

    Runs them on the Qwen-VL and Kimi K2.5 fixtures; then the chat-rollout path: offload, render, refs, pack
    and audit on the fixtures' chat rollouts (with the materialize extra).
    Shows each stage's report, then the audit of both runs; exits with the audit's
    code (0 when ok, 1 on violations).

    Examples:

    \b
        mmoffload demo
        mmoffload demo --run-dir /tmp/mmoffload-demo --json
    """
    with sink.errors_to_exit(as_json):
        fixtures = fixtures_dir()
    root = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="mmoffload-demo-"))
    if not (as_json or quiet):
        sink.stderr.print(f"demo: run directories under {root}", markup=False)

    def show(family: str, stage: str, report: msgspec.Struct) -> None:
        if as_json or quiet:
            return
        if isinstance(report, AuditReport):
            sink.emit_report(
                report, f"audit ({'chat-rollout runs' if family == 'chat' else 'all runs'})", as_json=False
            )
            sink.stdout.print(violations_table(report))
        else:
            sink.emit_report(report, f"{stage} ({family})", as_json=False)
            sink.stdout.print()

    with sink.errors_to_exit(as_json):
        report = run_demo(root, fixtures=fixtures, on_stage=show)
    if as_json:
        sink.emit_report(report, "demo", as_json=True)
    if report.chat_skipped and not (as_json or quiet):
        sink.stderr.print(f"demo: {report.chat_skipped}", markup=False)
    if quiet and run_dir is None:
        # The run is kept: its path is the one thing a quiet run prints (stdout, for scripts).
        sink.stdout.print(str(root), markup=False, soft_wrap=True)
    elif not (as_json or quiet):
        for line in next_steps(root).splitlines():  # One line at a time: a print escapes line breaks.
            sink.stderr.print(line, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(sink.EXIT_PROBLEMS)
