"""Hugging Face chat-template image parts and datasets images are offloaded like the OpenAI shapes."""

import base64
from pathlib import Path

import msgspec
import pytest

from mmoffload.audit import audit
from mmoffload.contract.addresses import content_hash, file_uri
from mmoffload.contract.imageparts import find_parts
from mmoffload.errors import BadInputError, Where
from mmoffload.offload import Offloader, offload_record
from mmoffload.store.local import AssetStore
from tests.builders import data_url, image_bytes

PNG = image_bytes(seed=11)
B64 = base64.b64encode(PNG).decode()


def shapes(image_path: Path) -> list[dict]:
    """One record per accepted shape, each holding PNG."""
    return [
        {"type": "image", "url": data_url(PNG)},
        {"type": "image", "base64": B64},
        {"type": "image", "base64": data_url(PNG)},
        {"type": "image", "path": str(image_path)},
        {"type": "image", "image": {"bytes": B64, "path": None}},
        {"type": "image", "image": {"bytes": None, "path": str(image_path)}},
    ]


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    return path


def test_every_chat_template_shape_becomes_the_openai_part_of_the_stored_file(tmp_path, image_path):
    for part in shapes(image_path):
        record = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}
        counts = offload_record(record, tmp_path / "assets", None)
        (image, text) = record["messages"][0]["content"]
        assert text == {"type": "text", "text": "hi"}
        uri = image["image_url"]["url"]
        assert image == {"type": "image_url", "image_url": {"url": uri}}, part
        stored = uri if uri.startswith("file:") and "assets" in uri else None
        if stored is None:  # a path stays the file it names (not adopted)
            assert uri == file_uri(image_path)
        else:
            assert content_hash(PNG)[:32] in stored
        assert (counts.image_parts, counts.records_rewritten, counts.reshaped) == (1, 1, 1)


def test_a_datasets_image_column_is_offloaded_in_its_own_shape(tmp_path, image_path):
    record = {"image": {"bytes": B64, "path": "photo.png"}, "question": "what is it?"}
    offload_record(record, tmp_path / "assets")

    uri = record["image"]["path"]
    assert record == {"image": {"bytes": None, "path": uri}, "question": "what is it?"}
    assert uri.startswith("file://") and content_hash(PNG)[:32] in uri
    # Its own output: nothing to change.
    assert offload_record(record, tmp_path / "assets").records_rewritten == 0


def test_a_datasets_image_with_a_relative_path_points_at_its_absolute_file(tmp_path, image_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = {"image": {"bytes": None, "path": "photo.png"}}
    counts = offload_record(record, tmp_path / "assets")

    assert record == {"image": {"bytes": None, "path": file_uri(image_path)}}
    assert (counts.already_file, counts.reshaped) == (1, 1)


def test_an_hf_part_without_a_source_names_the_keys_it_reads(tmp_path):
    with pytest.raises(BadInputError, match="one of `image`, `url`, `path`, `base64`") as error:
        offload_record({"p": [{"type": "image", "image": None}]}, tmp_path, None)
    assert "$.p[0]" in str(error.value)


def test_other_dicts_with_a_path_are_not_images(tmp_path):
    record = {"tool": {"path": "/etc/hosts"}, "file": {"bytes": 12, "path": "a", "mode": "r"}}
    assert find_parts(record) == []


@pytest.mark.parametrize("index", range(6))
def test_the_spliced_line_gives_the_bytes_of_the_decoded_line(tmp_path, image_path, index):
    part = shapes(image_path)[index]
    line = msgspec.json.encode({"messages": [{"content": [part, {"type": "image", "url": data_url(PNG)}]}]})
    record = msgspec.json.decode(line)
    offload_record(record, tmp_path / "reference")
    expected = msgspec.json.encode(record) + b"\n"
    offloader = Offloader(AssetStore(tmp_path / "reference"))
    with offloader.store.syncing():
        written, counts = offloader.line(line + b"\n", Where(file="in.jsonl", line=1))
    assert written == expected
    assert counts.records_rewritten == 1


def test_audit_counts_the_new_shapes_as_inline_images(tmp_path, image_path):
    lines = [msgspec.json.encode({"content": [part]}) for part in shapes(image_path)]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    report = audit([path])

    # The four inline ones are what offload would store; the two paths are files already.
    assert report.data_uris == 4
    assert sorted(v.kind for v in report.violations) == ["data_uri"] * 4
