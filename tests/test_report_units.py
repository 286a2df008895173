"""Reports give byte counts in human units beside the exact number; JSON keeps the integers."""

from __future__ import annotations

import json

import msgspec
from typer.testing import CliRunner

from mmoffload_cli.app import app
from mmoffload_cli.sink import format_figure
from tests.builders import data_url, image_bytes

runner = CliRunner()


def test_a_byte_count_reads_in_binary_units_beside_its_exact_number() -> None:
    assert format_figure("pixel_bytes", 172_490_752) == "164.5 MiB (172,490,752)"
    assert format_figure("jsonl_bytes_in", 1000) == "1,000"
    assert format_figure("records", 172_490_752) == "172,490,752"


def test_the_offload_table_shows_units_and_its_json_keeps_integers(tmp_path) -> None:
    record = {"content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes(400, 300))}}]}
    (tmp_path / "in.jsonl").write_bytes(msgspec.json.encode(record) + b"\n")
    args = [
        "offload",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "o.jsonl"),
        "--assets",
        str(tmp_path / "a"),
    ]

    table = runner.invoke(app, args)
    as_json = runner.invoke(app, [*args, "--json"])

    written = json.loads(as_json.stdout)["jsonl_bytes_in"]
    assert isinstance(written, int) and written > 1024
    line = next(line for line in table.stdout.splitlines() if "jsonl_bytes_in" in line)
    assert "KiB (" in line


def test_audit_of_offloaded_chat_jsonl_counts_its_image_refs_by_scheme(tmp_path) -> None:
    part = {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}
    lines = [msgspec.json.encode({"messages": [{"role": "user", "content": [part, part]}]}), b'{"n": 1}']
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    offloaded = str(tmp_path / "o.jsonl")
    assert (
        runner.invoke(
            app, ["offload", str(tmp_path / "in.jsonl"), "-o", offloaded, "--assets", str(tmp_path / "a")]
        ).exit_code
        == 0
    )

    result = runner.invoke(
        app, ["audit", offloaded, "--json", "--expect", "images>=1", "--expect", "data_uris=0"]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["images_by_scheme"], report["unique_images"]) == (2, {"file": 2}, 1)


def test_the_violations_table_groups_by_kind_with_counts() -> None:
    from rich.console import Console

    from mmoffload.audit.report import AuditReport, Violation
    from mmoffload_cli.audit import violations_table

    kinds = ["data_uri", "missing_file", "data_uri"]
    report = AuditReport(
        ok=False,
        violations=[Violation("a.jsonl", i, "why", kind) for i, kind in enumerate(kinds)],
    )
    console = Console(width=100, record=True)

    console.print(violations_table(report))

    text = console.export_text()
    assert "3 violation(s): data_uri 2, missing_file 1" in text
    rows = [
        line.split()[0] for line in text.splitlines() if line.strip().startswith(("data_uri", "missing_file"))
    ]
    assert rows == ["data_uri", "data_uri", "missing_file"]
