"""Parquet in and out: datasets' and verl's image columns offloaded, everything else kept, datasets decodes it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mmoffload.contract.addresses import content_hash  # noqa: E402
from mmoffload_cli.app import app  # noqa: E402
from tests.builders import data_url, image_bytes  # noqa: E402

RED, BLUE = image_bytes(seed=1), image_bytes(40, 30, seed=2)
runner = CliRunner()


def offload(source: Path, out: Path, assets: Path, *extra: str):
    return runner.invoke(
        app, ["offload", str(source), "-o", str(out), "--assets", str(assets), "--json", *extra]
    )


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def verl_process_image(image: dict) -> Image.Image:
    """The steps verl's `process_image` takes on a datasets image dict (verl is not imported)."""
    if image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    return Image.open(image["path"]).convert("RGB")


def test_a_datasets_parquet_file_comes_back_decodable_by_datasets_with_equal_pixels(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "answer": datasets.Value("string")})
    rows = {
        "image": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": "blue.png"}],
        "answer": ["a", "b"],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))

    result = offload(tmp_path / "train.parquet", tmp_path / "out.parquet", tmp_path / "assets")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["records"], report["offloaded"], report["unique_images_written"]) == (2, 2, 2)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("answer").to_pylist() == ["a", "b"]
    assert table.column("image").to_pylist() == [
        {"bytes": None, "path": str(tmp_path / "assets" / f"{content_hash(data)}.png")}
        for data in (RED, BLUE)
    ]
    assert table.schema.metadata == pq.read_schema(tmp_path / "train.parquet").metadata
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out.parquet"), split="train")
    assert loaded.features["image"] == datasets.Image()
    assert [pixels(row["image"]) for row in loaded] == [
        pixels(Image.open(io.BytesIO(d))) for d in (RED, BLUE)
    ]


def test_a_verl_row_opens_its_images_the_way_verl_does_after_offload(tmp_path):
    prompt = [{"role": "user", "content": "<image><image>What differs?"}]
    images = [[{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}]]
    pq.write_table(
        pa.table({"prompt": [prompt], "images": images, "data_source": ["geo3k"]}), tmp_path / "v.parquet"
    )

    assert offload(tmp_path / "v.parquet", tmp_path / "out.parquet", tmp_path / "assets").exit_code == 0

    row = pq.read_table(tmp_path / "out.parquet").to_pylist()[0]
    assert (row["prompt"], row["data_source"]) == (prompt, "geo3k")
    opened = [verl_process_image(image) for image in row["images"]]
    assert [pixels(image) for image in opened] == [pixels(Image.open(io.BytesIO(d))) for d in (RED, BLUE)]


def test_binary_data_url_and_chat_columns_are_offloaded_and_the_schema_says_image(tmp_path):
    messages = [
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url(RED)}, "text": None}],
            }
        ]
    ]
    features = {"info": {"features": {"png": {"dtype": "binary", "_type": "Value"}}}}
    table = pa.table({"png": [BLUE], "thumb": [data_url(RED)], "messages": messages, "n": [7]})
    pq.write_table(
        table.replace_schema_metadata({"huggingface": json.dumps(features)}), tmp_path / "t.parquet"
    )

    result = offload(tmp_path / "t.parquet", tmp_path / "out.parquet", tmp_path / "assets")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dedup_hits"] == 1  # RED twice, stored once
    out = pq.read_table(tmp_path / "out.parquet")
    red, blue = (str(tmp_path / "assets" / f"{content_hash(d)}.png") for d in (RED, BLUE))
    row = out.to_pylist()[0]
    assert row["png"] == {"bytes": None, "path": blue}
    assert row["thumb"] == red
    assert row["messages"][0]["content"][0]["image_url"]["url"] == Path(red).as_uri()
    assert row["n"] == 7
    assert json.loads(out.schema.metadata[b"huggingface"])["info"]["features"]["png"] == {"_type": "Image"}


def test_each_row_group_stays_a_row_group(tmp_path):
    table = pa.table({"image": [{"bytes": image_bytes(seed=i), "path": None} for i in range(6)]})
    pq.write_table(table, tmp_path / "in.pq", row_group_size=2)

    assert offload(tmp_path / "in.pq", tmp_path / "out.pq", tmp_path / "assets").exit_code == 0

    out = pq.ParquetFile(tmp_path / "out.pq")
    assert out.metadata.num_row_groups == 3
    assert len(list((tmp_path / "assets").iterdir())) == 6


def test_a_parquet_file_is_told_by_its_magic_bytes_whatever_its_name(tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": RED, "path": None}]}), tmp_path / "data.bin")

    result = offload(tmp_path / "data.bin", tmp_path / "out.bin", tmp_path / "assets")

    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "out.bin").column("image")[0]["bytes"].as_py() is None


def test_a_cell_that_is_no_image_names_its_file_row_and_column(tmp_path):
    images = [
        [{"bytes": RED, "path": None}],
        [{"bytes": RED, "path": None}, {"bytes": b"not an image", "path": None}],
    ]
    pq.write_table(pa.table({"images": images}), tmp_path / "bad.parquet")

    result = offload(tmp_path / "bad.parquet", tmp_path / "out.parquet", tmp_path / "assets")

    assert result.exit_code == 2
    assert "Expected image bytes" in result.stderr
    assert "bad.parquet` index 1 `$.images[1]`" in result.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_offload_table_takes_a_datasets_dataset_and_gives_one_back(tmp_path):
    datasets = pytest.importorskip("datasets")
    from mmoffload.offload.parquet import offload_table

    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": RED, "path": None}]}, features=datasets.Features({"image": datasets.Image()})
    )

    out = offload_table(dataset, tmp_path / "assets")

    assert isinstance(out, datasets.Dataset)
    assert out.features["image"] == datasets.Image()
    assert pixels(out[0]["image"]) == pixels(Image.open(io.BytesIO(RED)))
    assert out.data.table.column("image")[0]["bytes"].as_py() is None
