"""Assets on object storage, end to end, against a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmoffload.audit import audit
from mmoffload.contract.addresses import content_hash
from mmoffload.demo import fixtures_dir
from mmoffload.errors import BadInputError, IntegrityError, UsageError
from mmoffload.materialize import MissingImagePolicy, materialize_run
from mmoffload.offload import offload_files
from mmoffload.pack import PackOptions, pack_run
from mmoffload.refs import RefsOptions, build_refs
from mmoffload.store.local import resolve_assets_dir
from mmoffload.store.remap import Remap
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from mmoffload.store.objects import ObjectStore  # noqa: E402  (needs fsspec's s3 client)

QWEN_TRACES = fixtures_dir() / "traces" / "qwen_vl.jsonl"
QWEN_MODEL = fixtures_dir() / "models" / "qwen3_vl"
runner = CliRunner()
_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback with fake credentials, for this test session only."""
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URL."""
    import fsspec

    name = f"mmoffload-test-{next(_bucket_numbers)}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


def run_to_rank_files(traces: Path, run_dir: Path, assets: str | Path, **refs: object) -> None:
    offload_files([traces], [run_dir / "offloaded.jsonl"], assets)
    build_refs([run_dir / "offloaded.jsonl"], run_dir, RefsOptions(model_dir=QWEN_MODEL, **refs))
    pack_run(run_dir, PackOptions(seq_len=4096))


def test_an_object_store_run_goes_through_refs_pack_audit_and_materialize(tmp_path, bucket):
    local, remote = tmp_path / "local", tmp_path / "remote"
    run_to_rank_files(QWEN_TRACES, local, local / "assets")
    run_to_rank_files(QWEN_TRACES, remote, f"{bucket}/run/images")

    offloaded = (remote / "offloaded.jsonl").read_text()
    assert f"{bucket}/run/images/" in offloaded and "file://" not in offloaded and "data:" not in offloaded
    assert offloaded == (local / "offloaded.jsonl").read_text().replace(
        (local / "assets").absolute().as_uri(), f"{bucket}/run/images"
    )
    report = audit([remote], verify_hashes=True)
    assert report.ok, report.violations
    jsonl_report = audit([remote / "offloaded.jsonl"], verify_hashes=True)
    assert jsonl_report.ok and jsonl_report.unique_images == report.unique_images
    assert (report.object_uris, report.file_uris, report.missing_files) == (report.descriptors, 0, 0)
    assert report.unique_images == audit([local], verify_hashes=True).unique_images > 0

    from_store = materialize_run(remote, model=QWEN_MODEL, missing_image_policy=MissingImagePolicy.ERROR)
    from_disk = materialize_run(local, model=QWEN_MODEL, missing_image_policy=MissingImagePolicy.ERROR)
    assert (from_store.images, from_store.pixel_bytes) == (from_disk.images, from_disk.pixel_bytes)
    assert from_store.images_placeholdered == 0


def test_the_cli_offloads_into_an_object_store_url(tmp_path, bucket):
    result = runner.invoke(
        app,
        [
            "offload",
            str(QWEN_TRACES),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--assets",
            f"{bucket}/a/",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["assets"] == f"{bucket}/a"
    assert report["unique_images_written"] > 0

    again = runner.invoke(
        app, ["offload", str(QWEN_TRACES), "-o", str(tmp_path / "again.jsonl"), "--assets", f"{bucket}/a"]
    )
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


def test_offloading_its_own_output_writes_nothing_and_keeps_the_bytes(tmp_path, bucket):
    first = offload_files([QWEN_TRACES], [tmp_path / "once.jsonl"], f"{bucket}/p")
    second = offload_files([tmp_path / "once.jsonl"], [tmp_path / "twice.jsonl"], f"{bucket}/p")
    assert first.unique_images_written > 0
    assert (second.unique_images_written, second.records_rewritten) == (0, 0)
    assert second.already_file == first.offloaded
    assert (tmp_path / "twice.jsonl").read_bytes() == (tmp_path / "once.jsonl").read_bytes()


def test_concurrent_writers_of_one_image_create_it_exactly_once(bucket):
    data = image_bytes(seed=11)
    writers = 8
    barrier = threading.Barrier(writers)
    results = []

    def write() -> None:
        store = ObjectStore(f"{bucket}/shared")
        barrier.wait()
        results.append(store.put(data))

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(result.written for result in results) == [False] * (writers - 1) + [True]
    assert {result.uri for result in results} == {f"{bucket}/shared/{content_hash(data)}.png"}
    assert ObjectStore(f"{bucket}/shared").fs.cat_file(results[0].uri) == data


def test_an_existing_object_with_other_content_is_detected_not_rewritten(tmp_path, bucket):
    data = image_bytes(seed=12)
    store = ObjectStore(f"{bucket}/corrupt")
    uri = f"{store.root}/{content_hash(data)}.png"
    store.fs.pipe_file(uri, b"not the image")

    with pytest.raises(IntegrityError, match="Content hash mismatch for `s3://"):
        store.put(data)
    assert store.fs.cat_file(uri) == b"not the image"

    source = tmp_path / "in.jsonl"
    part = {"type": "image_url", "image_url": {"url": data_url(data)}}
    source.write_text(json.dumps({"messages": [{"role": "user", "content": [part]}]}) + "\n")
    result = runner.invoke(
        app, ["offload", str(source), "-o", str(tmp_path / "out.jsonl"), "--assets", store.root]
    )
    assert result.exit_code == 2
    assert "Content hash mismatch" in result.stderr and "in.jsonl:1" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_bucket_that_does_not_exist_stops_the_run_with_exit_2(tmp_path, s3_endpoint):
    result = runner.invoke(
        app,
        ["offload", str(QWEN_TRACES), "-o", str(tmp_path / "out.jsonl"), "--assets", "s3://no-such-bucket/p"],
    )
    assert result.exit_code == 2
    assert "Cannot write `s3://no-such-bucket/p/" in result.stderr and "qwen_vl.jsonl:1" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unreachable_endpoint_is_one_clear_error(tmp_path, s3_endpoint, monkeypatch):
    import fsspec

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    store = ObjectStore("s3://bucket-x/p")
    # A client of its own that gives up fast (the default one retries for seconds).
    store.fs = fsspec.filesystem(
        "s3", skip_instance_cache=True, retries=1, config_kwargs={"retries": {"max_attempts": 1}}
    )
    with pytest.raises(UsageError, match="Cannot reach `s3://bucket-x/p/"):
        store.put(image_bytes())


def test_a_corrupt_object_is_a_hash_mismatch_in_audit(tmp_path, bucket):
    run_to_rank_files(QWEN_TRACES, tmp_path, f"{bucket}/r")
    store = ObjectStore(f"{bucket}/r")
    victim = sorted(store.fs.ls(store.root))[0]
    store.fs.rm(victim)
    store.fs.pipe_file(victim, b"other bytes")

    report = audit([tmp_path], verify_hashes=True)
    assert report.hash_mismatches == 1
    assert [v.kind for v in report.violations] == ["hash_mismatch"]
    assert "s3://" in report.violations[0].reason


def test_a_missing_object_is_reported_like_a_missing_file(tmp_path, bucket):
    run_to_rank_files(QWEN_TRACES, tmp_path, f"{bucket}/m")
    store = ObjectStore(f"{bucket}/m")
    victim = sorted(store.fs.ls(store.root))[0]
    store.fs.rm(victim)

    report = audit([tmp_path])
    assert report.missing_files == 1
    assert report.violations[0].kind == "missing_file"
    assert report.violations[0].reason == f"Missing image file: `s3://{victim}`"

    with pytest.raises(IntegrityError, match=f"Missing image file `s3://{victim}`"):
        build_refs([tmp_path / "offloaded.jsonl"], tmp_path / "again", RefsOptions(model_dir=QWEN_MODEL))

    materialized = materialize_run(tmp_path, model=QWEN_MODEL)
    assert materialized.images_placeholdered >= 1


def test_a_run_copied_to_another_mount_is_read_through_remap(tmp_path):
    rollout, trainer = tmp_path / "rollout-node", tmp_path / "trainer-node"
    run_to_rank_files(QWEN_TRACES, rollout / "run", rollout / "assets")
    shutil.copytree(rollout, trainer)
    shutil.rmtree(rollout / "assets")
    remap = ["--remap", f"{rollout}={trainer}"]

    unmapped = runner.invoke(app, ["audit", str(trainer / "run"), "--json"])
    assert json.loads(unmapped.stdout)["missing_files"] > 0

    audited = runner.invoke(app, ["audit", str(trainer / "run"), "--verify-hashes", "--json", *remap])
    assert audited.exit_code == 0, audited.stdout
    assert json.loads(audited.stdout)["missing_files"] == 0

    materialized = runner.invoke(
        app, ["materialize", str(trainer / "run"), "--model", str(QWEN_MODEL), "--json", *remap]
    )
    assert materialized.exit_code == 0, materialized.stderr
    assert json.loads(materialized.stdout)["images_placeholdered"] == 0

    refs = runner.invoke(
        app,
        ["refs", str(trainer / "run" / "offloaded.jsonl"), "--run-dir", str(tmp_path / "new"), "--model",
         str(QWEN_MODEL), *remap],
    )  # fmt: skip
    assert refs.exit_code == 0, refs.stderr
    written = (tmp_path / "new" / "rollouts" / "step_0" / "train_rollouts.bin").read_bytes()
    assert trainer.as_uri().encode() in written and rollout.as_uri().encode() + b"/" not in written


def test_remap_from_an_object_store_to_a_local_mirror(tmp_path, bucket):
    run_to_rank_files(QWEN_TRACES, tmp_path / "run", f"{bucket}/mirror")
    store = ObjectStore(f"{bucket}/mirror")
    store.fs.get(f"{store.root}/", str(tmp_path / "mirror"), recursive=True)
    store.fs.rm(store.root, recursive=True)

    remap = Remap.parse([f"{bucket}/mirror={tmp_path}/mirror"])
    report = audit([tmp_path / "run"], verify_hashes=True, remap=remap)
    assert report.ok, report.violations
    assert report.unique_images == len(list((tmp_path / "mirror").iterdir()))


def test_assets_given_as_a_file_url_are_a_directory(tmp_path):
    assert resolve_assets_dir((tmp_path / "a b").as_uri(), None) == tmp_path / "a b"
    report = offload_files([QWEN_TRACES], [tmp_path / "out.jsonl"], (tmp_path / "a b").as_uri())
    assert report.unique_images_written == len(list((tmp_path / "a b").iterdir()))
    assert (tmp_path / "a b").as_uri() + "/" in (tmp_path / "out.jsonl").read_text()


@pytest.mark.parametrize("store", ["file://", "object"])
def test_audit_verify_hashes_of_chat_jsonl_finds_an_overwritten_image(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    assets = str(tmp_path / "assets") if store == "file://" else f"{request.getfixturevalue('bucket')}/images"
    figure = "file_uris" if store == "file://" else "object_uris"
    raw = tmp_path / "chat.jsonl"
    raw.write_text("".join(json.dumps(chat_record(data_url(image_bytes(seed=n)))) + "\n" for n in (1, 2)))
    offloaded = tmp_path / "chat.offloaded.jsonl"
    offload_files([raw], [offloaded], assets)

    whole = runner.invoke(app, ["audit", str(offloaded), "--verify-hashes", "--json"])
    assert whole.exit_code == 0, whole.stdout
    assert json.loads(whole.stdout)[figure] == 2

    # The first image's stored name now holds other (valid image) bytes.
    first = json.loads(offloaded.read_text().splitlines()[0])["messages"][0]["content"][0]["image_url"]["url"]
    if store == "file://":
        Path(first.removeprefix("file://")).write_bytes(image_bytes(seed=9))
    else:
        import fsspec

        with fsspec.open(first, "wb") as out:
            out.write(image_bytes(seed=9))
    result = runner.invoke(app, ["audit", str(offloaded), "--verify-hashes", "--json"])

    assert result.exit_code == 1, result.stdout
    report = json.loads(result.stdout)
    assert (report[figure], report["hash_mismatches"], report["ok"]) == (2, 1, False)
    (violation,) = report["violations"]
    assert violation["kind"] == "hash_mismatch" and content_hash(image_bytes(seed=1)) in violation["reason"]


def chat_record(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [part]}]}


def test_allowed_object_prefixes_bound_object_refs_in_refs_audit_and_materialize(tmp_path, bucket):
    run_to_rank_files(QWEN_TRACES, tmp_path, f"{bucket}/run/images")
    inside, outside = [f"{bucket}/run/images"], [f"{bucket}/other", tmp_path]

    assert audit([tmp_path], verify_hashes=True, allowed_roots=inside).ok
    report = audit([tmp_path], allowed_roots=outside)
    assert report.violations and {v.kind for v in report.violations} == {"disallowed_file"}
    assert f"`{bucket}/other`" in report.violations[0].reason  # the prefix named whole
    with pytest.raises(BadInputError, match="outside the allowed roots"):
        build_refs(
            [tmp_path / "offloaded.jsonl"],
            tmp_path / "again",
            RefsOptions(model_dir=QWEN_MODEL, verify_hashes=True, allowed_roots=outside),
        )
    with pytest.raises(BadInputError, match="outside the allowed roots"):  # refused, not taken as missing
        materialize_run(tmp_path, model=QWEN_MODEL, allowed_roots=outside)
