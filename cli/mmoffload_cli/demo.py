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
        "(default: a fresh temporary directory, kept and printed).",
    ),
]


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
    if not report.ok:
        raise typer.Exit(sink.EXIT_PROBLEMS)
