"""The content-addressed store and file URIs (contract.md sections 1 and 2)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mmoffload.contract.addresses import (
    content_hash,
    file_uri,
    is_local_file_uri,
    sniff_extension,
    uri_to_path,
)
from mmoffload.errors import BadInputError, IntegrityError
from mmoffload.store.local import AssetStore, default_allowed_roots, resolve_assets_dir
from mmoffload.store.read import read_verified
from tests.builders import image_bytes


@pytest.mark.parametrize(
    ("fmt", "extension"),
    [
        ("PNG", ".png"),
        ("JPEG", ".jpg"),
        ("WEBP", ".webp"),
        ("GIF", ".gif"),
        ("BMP", ".bmp"),
        ("TIFF", ".tiff"),
    ],
)
def test_the_extension_comes_from_the_bytes(fmt: str, extension: str) -> None:
    assert sniff_extension(image_bytes(fmt=fmt)) == extension


def test_bytes_that_are_no_image_have_no_extension() -> None:
    assert sniff_extension(b"<html>not an image</html>") is None
    assert sniff_extension(b"") is None


def test_the_content_hash_is_the_first_32_hex_digits_of_sha256() -> None:
    data = image_bytes()
    assert content_hash(data) == hashlib.sha256(data).hexdigest()[:32]


def test_file_uris_are_absolute_percent_encoded_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a dir" / "ü.png"
    uri = file_uri(path)
    assert uri.startswith("file:///") and "a%20dir" in uri
    assert uri_to_path(uri) == path
    assert uri_to_path(uri.replace("file://", "file://localhost")) == path


@pytest.mark.parametrize("uri", ["data:image/png;base64,AAAA", "https://x/y.png", "file://host/y.png"])
def test_only_local_file_uris_are_references(uri: str) -> None:
    assert not is_local_file_uri(uri)
    with pytest.raises(BadInputError, match="Expected a local `file://` URI"):
        uri_to_path(uri)


def test_an_image_is_stored_once_under_its_hash(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    data = image_bytes(fmt="JPEG")
    first, second = store.put(data), store.put(data)
    assert first.written and not second.written
    assert first.path == tmp_path / f"{content_hash(data)}.jpg"
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
    assert first.path.read_bytes() == data


def test_the_store_refuses_bytes_that_are_no_image(tmp_path: Path) -> None:
    with pytest.raises(
        BadInputError, match="Expected image bytes, got 5 bytes in no image format"
    ) as refused:
        AssetStore(tmp_path).put(b"hello")
    assert "hello" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_reading_checks_existence_and_content(tmp_path: Path) -> None:
    stored = AssetStore(tmp_path).put(image_bytes())
    assert read_verified(stored.path, stored.hash) == stored.path.read_bytes()
    stored.path.write_bytes(image_bytes(seed=9))
    with pytest.raises(IntegrityError, match=f"expected `{stored.hash}`, the file holds other content"):
        read_verified(stored.path, stored.hash)
    with pytest.raises(IntegrityError, match="Missing image file"):
        read_verified(tmp_path / "gone.png", None)


def test_a_directory_is_refused_and_its_descriptor_closed(tmp_path: Path) -> None:
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        with pytest.raises(BadInputError, match="got a directory"):
            read_verified(tmp_path, "0" * 32)
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_file_over_the_limit_is_refused_and_its_descriptor_closed(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(image_bytes())
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(BadInputError, match="over the 10-byte limit"):
            read_verified(path, None, max_bytes=10)
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_the_asset_directory_is_explicit_then_environment_then_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert resolve_assets_dir(None, run) == run / "assets" / "images"
    monkeypatch.setenv("VF_RENDERER_IMAGE_OFFLOAD_DIR", str(tmp_path / "env"))
    assert resolve_assets_dir(None, run) == tmp_path / "env"
    assert resolve_assets_dir(tmp_path / "x", run) == tmp_path / "x"


@pytest.mark.parametrize(
    ("environment", "root"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/data/assets", Path("/data/assets")),
        ("file:///data/assets", Path("/data/assets")),
    ],
)
def test_the_default_allowed_roots_are_the_environments_store_then_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment: str, root: Path | str
) -> None:
    run = tmp_path / "run"
    (run / "assets" / "images").mkdir(parents=True)
    assert default_allowed_roots(None) is None
    assert default_allowed_roots(run) == [run / "assets" / "images"]

    monkeypatch.setenv("VF_RENDERER_IMAGE_OFFLOAD_DIR", environment)

    assert default_allowed_roots(run) == [root, run / "assets" / "images"]
