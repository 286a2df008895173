"""fsspec URLs as inputs and outputs, against a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import json

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.contract.addresses import content_hash
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from tests import test_objectstore

# The S3 server on loopback and a fresh bucket per test, as the object-store tests have them.
s3_endpoint, bucket = test_objectstore.s3_endpoint, test_objectstore.bucket

PNG = image_bytes(seed=21)
runner = CliRunner()


def put(url: str, data: bytes) -> None:
    import fsspec

    fsspec.filesystem("s3").pipe_file(url, data)


def cat(url: str) -> bytes:
    import fsspec

    return fsspec.filesystem("s3").cat_file(url)


def record(seed: int = 21) -> bytes:
    part = {"type": "image_url", "image_url": {"url": data_url(image_bytes(seed=seed))}}
    return msgspec.json.encode({"messages": [{"role": "user", "content": [part]}]}) + b"\n"


def test_offload_reads_and_writes_s3_urls_without_mangling_them(tmp_path, bucket, monkeypatch):
    put(f"{bucket}/in/rollouts.jsonl", record())
    monkeypatch.chdir(tmp_path)  # a URL taken for a path would land here, as `s3:/...`

    result = runner.invoke(
        app,
        [
            "offload",
            f"{bucket}/in/rollouts.jsonl",
            "-o",
            f"{bucket}/out/rollouts.jsonl",
            "--assets",
            str(tmp_path / "a"),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"] == [f"{bucket}/out/rollouts.jsonl"]
    written = json.loads(cat(f"{bucket}/out/rollouts.jsonl"))
    url = written["messages"][0]["content"][0]["image_url"]["url"]
    assert url == (tmp_path / "a" / f"{content_hash(PNG)}.png").as_uri()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a"]


def test_an_s3_prefix_is_expanded_and_mirrored_under_an_output_prefix(tmp_path, bucket):
    put(f"{bucket}/in/a/one.jsonl", record(1))
    put(f"{bucket}/in/b/two.jsonl.gz", __import__("gzip").compress(record(2)))
    put(f"{bucket}/in/notes.txt", b"not an input")

    result = runner.invoke(
        app, ["offload", f"{bucket}/in/", "-o", f"{bucket}/out/", "--assets", str(tmp_path / "a")]
    )

    assert result.exit_code == 0, result.output
    assert b"file://" in cat(f"{bucket}/out/a/one.jsonl")
    assert b"file://" in __import__("gzip").decompress(cat(f"{bucket}/out/b/two.jsonl.gz"))
    assert len(list((tmp_path / "a").iterdir())) == 2


def test_a_parquet_file_on_s3_is_offloaded_and_inlined_back(tmp_path, bucket):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"image": [{"bytes": PNG, "path": None}], "answer": ["a"]})
    pq.write_table(table, tmp_path / "t.parquet")
    put(f"{bucket}/t.parquet", (tmp_path / "t.parquet").read_bytes())
    assets = str(tmp_path / "a")

    offloaded = runner.invoke(
        app, ["offload", f"{bucket}/t.parquet", "-o", f"{bucket}/o.parquet", "--assets", assets]
    )
    inlined = runner.invoke(app, ["inline", f"{bucket}/o.parquet", "-o", str(tmp_path / "back.parquet")])
    inlined_to_s3 = runner.invoke(app, ["inline", f"{bucket}/o.parquet", "-o", f"{bucket}/back.parquet"])

    assert (offloaded.exit_code, inlined.exit_code) == (0, 0), offloaded.output + inlined.output
    assert pq.read_table(tmp_path / "back.parquet").to_pylist() == table.to_pylist()
    assert inlined_to_s3.exit_code == 0, inlined_to_s3.output
    assert cat(f"{bucket}/back.parquet") == (tmp_path / "back.parquet").read_bytes()


def test_a_missing_s3_input_is_named_before_any_work(tmp_path, bucket):
    result = runner.invoke(
        app, ["offload", f"{bucket}/nope.jsonl", "-o", str(tmp_path / "o.jsonl"), "--assets", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert f"{bucket}/nope.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()
