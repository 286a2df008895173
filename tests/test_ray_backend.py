"""The Ray Data backend on a local cluster: same bytes as the local path, in order, failing clearly."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.audit import audit
from mmoffload.demo import fixtures_dir
from mmoffload.errors import MMOffloadError, Where
from mmoffload.io.outputs import TEMP_PREFIX
from mmoffload.offload import offload_files
from mmoffload.store.local import AssetStore, StoredImage
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from mmoffload.offload import offload_dataset  # noqa: E402
from mmoffload.runners.ray import RayOptions  # noqa: E402

FIXTURE_INPUTS = [
    fixtures_dir() / "traces" / "qwen_vl.jsonl",
    fixtures_dir() / "traces" / "kimi_k25.jsonl",
    fixtures_dir() / "rollouts" / "mini_browse.jsonl",
]
# Small windows and many of them: order must hold across Ray Dataset runs and blocks.
SMALL_WINDOWS = RayOptions(window_bytes=16 << 10)
runner = CliRunner()


@pytest.fixture(scope="session", autouse=True)
def local_cluster() -> Iterator[None]:
    """One local cluster for the session; only it is shut down (never `ray stop`)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray import cloudpickle

    # Tasks get this module's helpers by value: workers need not import the tests package.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def generated_inputs(directory: Path, files: int = 3, lines: int = 120) -> list[Path]:
    """JSONL files of numbered records: images shared across files, text-only lines, a CRLF line."""
    directory.mkdir(parents=True, exist_ok=True)
    images = [image_bytes(seed=seed, width=32 + seed, height=24) for seed in range(7)]
    paths = []
    for number in range(files):
        out = bytearray()
        for index in range(lines):
            content: list = [{"type": "text", "text": f"line {index}"}]
            if index % 3:
                content.append(part(data_url(images[(index * (number + 1)) % len(images)])))
            record = {"id": f"{number}-{index}", "messages": [{"role": "user", "content": content}]}
            out += msgspec.json.encode(record) + (b"\r\n" if index == 5 else b"\n")
        paths.append(directory / f"part-{number}.jsonl")
        paths[-1].write_bytes(bytes(out))
    return paths


def offload_both(inputs: list[Path], tmp_path: Path, ray_options: RayOptions = SMALL_WINDOWS, **kwargs):
    """Offload the same inputs locally and on Ray, into the same store; return both reports."""
    local = offload_files(
        inputs, [tmp_path / "local" / p.name for p in inputs], tmp_path / "assets", **kwargs
    )
    on_ray = offload_files(
        inputs, [tmp_path / "ray" / p.name for p in inputs], tmp_path / "assets", ray=ray_options, **kwargs
    )
    return local, on_ray


def assert_same_outputs(inputs: list[Path], tmp_path: Path) -> None:
    for path in inputs:
        assert (tmp_path / "ray" / path.name).read_bytes() == (tmp_path / "local" / path.name).read_bytes()


def test_the_demo_inputs_come_out_byte_for_byte_as_locally(tmp_path):
    local, on_ray = offload_both(FIXTURE_INPUTS, tmp_path)
    assert_same_outputs(FIXTURE_INPUTS, tmp_path)
    assert (on_ray.records, on_ray.offloaded, on_ray.jsonl_bytes_out) == (
        local.records,
        local.offloaded,
        local.jsonl_bytes_out,
    )


def test_a_generated_multi_file_input_comes_out_byte_for_byte_in_order(tmp_path):
    inputs = generated_inputs(tmp_path / "in")
    local, on_ray = offload_both(inputs, tmp_path)
    assert_same_outputs(inputs, tmp_path)
    ids = [json.loads(line)["id"] for line in (tmp_path / "ray" / "part-1.jsonl").read_text().splitlines()]
    assert ids == [f"1-{index}" for index in range(120)]
    assert on_ray.image_parts == local.image_parts == 3 * 80


def test_bad_lines_are_rejected_as_locally(tmp_path):
    source = tmp_path / "in.jsonl"
    good = msgspec.json.encode({"messages": [{"role": "user", "content": [part(data_url(image_bytes()))]}]})
    source.write_bytes(
        good + b"\n{not json\n" + good.replace(b"base64,", b"base64,!!") + b"\n" + good + b"\n"
    )
    local, on_ray = offload_both([source], tmp_path, skip_invalid=True, rejects=None)
    assert_same_outputs([source], tmp_path)
    assert on_ray.rejected_lines == local.rejected_lines == 2
    rejects = tmp_path / "ray" / "in.jsonl.rejects.jsonl"
    assert rejects.read_bytes() == (tmp_path / "local" / "in.jsonl.rejects.jsonl").read_bytes()


def test_a_bad_line_stops_the_run_naming_its_file_and_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"a": 1}\n{"b": \n')
    with pytest.raises(MMOffloadError, match="Invalid JSON") as caught:
        offload_files([source], [tmp_path / "out.jsonl"], tmp_path / "assets", ray=SMALL_WINDOWS)
    assert caught.value.where == Where(file=str(source), line=2)
    assert not (tmp_path / "out.jsonl").exists()


class DyingStore(AssetStore):
    """A store whose worker process dies on its first put (``always``: on every put)."""

    def __init__(self, root: Path, marker: Path, always: bool) -> None:
        super().__init__(root)
        self.marker, self.always = marker, always

    def put(self, data: bytes, where: Where | None = None) -> StoredImage:
        if self.always or not self.marker.exists():
            self.marker.touch()
            os._exit(1)  # A killed worker: no exception, no cleanup.
        return super().put(data, where)


def test_a_worker_killed_mid_run_is_retried_and_the_output_is_the_same(tmp_path):
    inputs = generated_inputs(tmp_path / "in", files=2, lines=30)
    offload_files(inputs, [tmp_path / "local" / p.name for p in inputs], tmp_path / "assets")
    store = DyingStore(tmp_path / "assets-ray", tmp_path / "died-once", always=False)
    offload_files(inputs, [tmp_path / "ray" / p.name for p in inputs], store, ray=SMALL_WINDOWS)
    assert (tmp_path / "died-once").exists()
    for path in inputs:
        assert (tmp_path / "ray" / path.name).read_bytes() == (
            tmp_path / "local" / path.name
        ).read_bytes().replace(b"/assets/", b"/assets-ray/")


def test_a_worker_that_keeps_dying_fails_the_run_clearly_and_leaves_no_output(tmp_path):
    inputs = generated_inputs(tmp_path / "in", files=2, lines=30)
    store = DyingStore(tmp_path / "assets", tmp_path / "died", always=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MMOffloadError, match=r"Ray task failed after up to 1 retries") as caught:
        offload_files(inputs, [out / p.name for p in inputs], store, ray=RayOptions(max_retries=1))
    assert caught.value.where is not None and caught.value.where.file == str(inputs[0])
    assert list(out.iterdir()) == []


def test_audit_on_ray_gives_the_local_report(tmp_path):
    inputs = generated_inputs(tmp_path / "in", files=2, lines=40)
    offload_files(inputs[:1], [tmp_path / "offloaded.jsonl"], tmp_path / "assets")
    (tmp_path / "assets" / sorted(os.listdir(tmp_path / "assets"))[0]).unlink()
    paths = [tmp_path / "offloaded.jsonl", inputs[1]]  # one offloaded with a missing file, one inline

    local = audit(paths, verify_hashes=True)
    on_ray = audit(paths, verify_hashes=True, ray=SMALL_WINDOWS)
    assert msgspec.json.encode(on_ray) == msgspec.json.encode(local)
    assert (local.missing_files, local.data_uris, local.jsonl_records) == (1, 26, 80)


def test_the_cli_offloads_and_audits_on_ray(tmp_path):
    inputs = generated_inputs(tmp_path / "in", files=2, lines=20)
    local = runner.invoke(app, ["offload", *map(str, inputs), "-o", str(tmp_path / "local"), "--assets",
                                str(tmp_path / "assets"), "-q"])  # fmt: skip
    on_ray = runner.invoke(app, ["offload", *map(str, inputs), "-o", str(tmp_path / "ray"), "--assets",
                                 str(tmp_path / "assets"), "--ray", "--json"])  # fmt: skip
    assert (local.exit_code, on_ray.exit_code) == (0, 0), on_ray.stderr
    assert json.loads(on_ray.stdout)["records"] == 40
    assert_same_outputs(inputs, tmp_path)

    audited = runner.invoke(
        app, ["audit", *(str(tmp_path / "ray" / p.name) for p in inputs), "--ray", "--json"]
    )
    assert audited.exit_code == 0, audited.stdout
    assert json.loads(audited.stdout)["jsonl_records"] == 40


def test_a_users_ray_dataset_maps_through_offload(tmp_path):
    source = generated_inputs(tmp_path / "in", files=1, lines=12)[0]
    offload_files([source], [tmp_path / "local.jsonl"], tmp_path / "assets")
    lines = source.read_bytes().decode().splitlines()
    dataset = ray.data.from_items([{"text": line, "n": n} for n, line in enumerate([*lines, "{bad"])])

    rows = sorted(offload_dataset(dataset, tmp_path / "assets").take_all(), key=lambda row: row["n"])

    expected = (tmp_path / "local.jsonl").read_text().splitlines()
    assert [row["text"] for row in rows[:-1]] == expected
    assert [row["offload_error"] for row in rows[:-1]] == [None] * len(expected)
    assert rows[-1]["text"] == "{bad" and "Invalid JSON" in rows[-1]["offload_error"]
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(tmp_path / "assets"))
