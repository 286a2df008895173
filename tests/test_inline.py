"""`inline`: stored refs back to data: URLs; offload then inline gives back the original records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmoffload.contract.addresses import content_hash
from mmoffload.inline import Inliner
from mmoffload.offload import offload_record
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

runner = CliRunner()
IMAGES = [
    data_url(image_bytes(seed=1)),
    data_url(image_bytes(32, 16, fmt="JPEG", seed=2), "image/jpeg"),
    data_url(image_bytes(8, 8, fmt="GIF", seed=3), "image/gif"),
]


def part(shape: str, url: str) -> dict:
    """An image part in a canonical shape (what offload keeps the shape of)."""
    if shape == "openai":
        return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}
    if shape == "responses":
        return {"type": "input_image", "image_url": url}
    if shape == "descriptor":
        return {
            "kind": "prime_raw_mm_item",
            "raw_image_data": url,
            "payload": {"image_grid_thw": [[1, 2, 2]]},
        }
    return {"bytes": url, "path": None}


parts = st.builds(
    part, st.sampled_from(["openai", "responses", "descriptor", "datasets"]), st.sampled_from(IMAGES)
)
texts = st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=8))
records = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": st.lists(parts | texts)}
    ),
    max_size=4,
).map(lambda messages: {"messages": messages, "id": 7})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=records)
def test_offload_then_inline_gives_back_the_original_record(tmp_path, record):
    original = copy.deepcopy(record)
    offload_record(record, tmp_path / "assets")
    assert "data:" not in json.dumps(record)

    Inliner().record(record)

    assert record == original


def test_the_inline_command_writes_data_urls_whose_bytes_and_type_are_the_stored_ones(tmp_path):
    jpeg = image_bytes(fmt="JPEG", seed=4)
    lines = [
        {"messages": [{"role": "user", "content": [part("openai", data_url(jpeg, "image/jpeg"))]}]},
        {"n": 1},
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(msgspec.json.encode(line) + b"\n" for line in lines))
    assets = tmp_path / "assets"
    assert (
        runner.invoke(
            app, ["offload", str(source), "-o", str(tmp_path / "off.jsonl"), "--assets", str(assets)]
        ).exit_code
        == 0
    )

    result = runner.invoke(
        app, ["inline", str(tmp_path / "off.jsonl"), "-o", str(tmp_path / "back.jsonl"), "--json"]
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inlined"] == 1
    assert [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()] == lines


def test_a_stored_image_whose_content_does_not_match_its_name_is_refused(tmp_path):
    png = image_bytes(seed=5)
    record = {"content": [part("openai", data_url(png))]}
    offload_record(record, tmp_path / "assets")
    stored = tmp_path / "assets" / f"{content_hash(png)}.png"
    stored.write_bytes(image_bytes(seed=6))
    source = tmp_path / "off.jsonl"
    source.write_bytes(msgspec.json.encode(record) + b"\n")

    result = runner.invoke(app, ["inline", str(source), "-o", str(tmp_path / "back.jsonl")])

    assert result.exit_code == 2
    assert "Content hash mismatch" in result.stderr and "off.jsonl:1" in result.stderr
    assert not (tmp_path / "back.jsonl").exists()


def test_offload_then_inline_gives_back_a_parquet_files_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    red, blue = image_bytes(seed=7), image_bytes(fmt="JPEG", seed=8)
    table = pa.table(
        {
            "image": [{"bytes": red, "path": None}, None],
            "images": [[{"bytes": blue, "path": None}], []],
            "thumb": [IMAGES[0], "plain text"],
            "answer": ["a", "b"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    offloaded, back = tmp_path / "off.parquet", tmp_path / "back.parquet"
    assets = str(tmp_path / "assets")
    assert (
        runner.invoke(
            app, ["offload", str(tmp_path / "in.parquet"), "-o", str(offloaded), "--assets", assets]
        ).exit_code
        == 0
    )
    assert pq.read_table(offloaded).column("image")[0]["bytes"].as_py() is None

    result = runner.invoke(app, ["inline", str(offloaded), "-o", str(back), "--allow-root", assets])

    assert result.exit_code == 0, result.output
    assert pq.read_table(back).to_pylist() == table.to_pylist()


def test_inline_needs_an_output(tmp_path: Path):
    result = runner.invoke(app, ["inline", str(tmp_path)])

    assert result.exit_code == 2
    assert "Expected an output" in result.stderr
