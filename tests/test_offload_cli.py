import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
from PIL import Image
from typer.testing import CliRunner

from mmoffload.contract.addresses import IMAGE_EXTENSIONS, content_hash
from mmoffload.io.outputs import TEMP_PREFIX
from mmoffload_cli.app import app
from tests.builders import data_url, image_bytes

PNG = image_bytes(seed=3)
runner = CliRunner()


def record(url: str, turn: int = 0) -> dict:
    return {
        "turn": turn,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    return path


def invoke(*args: str | Path, env: dict | None = None):
    return runner.invoke(app, ["offload", *map(str, args)], env=env)


def test_offload_prints_its_report_as_json(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [record(data_url(PNG)), record(data_url(PNG), 1)])
    result = invoke(source, "-o", tmp_path / "out.jsonl", "--assets", tmp_path / "assets", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (
        report["records"],
        report["offloaded"],
        report["unique_images_written"],
        report["dedup_hits"],
    ) == (2, 2, 1, 1)
    assert report["outputs"] == [str(tmp_path / "out.jsonl")]
    assert f"{content_hash(PNG)}.png" in (tmp_path / "out.jsonl").read_text()


def test_the_asset_directory_comes_from_the_environment_when_not_given(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [record(data_url(PNG))])
    env = {"VF_RENDERER_IMAGE_OFFLOAD_DIR": str(tmp_path / "env-assets")}
    result = invoke(source, "-o", tmp_path / "out.jsonl", "-q", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert [p.name for p in (tmp_path / "env-assets").iterdir()] == [f"{content_hash(PNG)}.png"]


def test_a_bad_line_exits_2_naming_file_line_and_path_and_writes_no_output(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [record(data_url(PNG)), record("http://x.org/a.png")])
    result = invoke(source, "-o", tmp_path / "out.jsonl", "--assets", tmp_path / "assets", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert (error["line"], error["path"], error["kind"]) == (
        2,
        "$.messages[0].content[0].image_url.url",
        "BadInputError",
    )
    assert "in.jsonl:2` `$.messages[0].content[0].image_url.url`" in result.stderr
    assert "remote `http:` URL" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_skipped_bad_lines_exit_1_and_land_in_the_rejects_file(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(msgspec.json.encode(record(data_url(PNG))) + b"\nnot json\n")
    result = invoke(
        source, "-o", tmp_path / "out.jsonl", "--assets", tmp_path / "a", "--skip-invalid",
        "--rejects", tmp_path / "bad.jsonl", "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["records"], report["rejected_lines"], report["rejects"]) == (
        1,
        1,
        [str(tmp_path / "bad.jsonl")],
    )
    (reject,) = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert (reject["line"], reject["text"]) == (2, "not json")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_in_place_rewrites_every_input(tmp_path):
    inputs = [write_jsonl(tmp_path / f"{name}.jsonl", [record(data_url(PNG))]) for name in "ab"]
    result = invoke(*inputs, "--in-place", "--assets", tmp_path / "assets", "--json")
    assert result.exit_code == 0, result.stderr
    for path in inputs:
        assert "data:" not in path.read_text()
        assert "file://" in path.read_text()


def test_several_inputs_need_an_output_directory(tmp_path):
    inputs = [write_jsonl(tmp_path / f"{name}.jsonl", [record(data_url(PNG))]) for name in "ab"]
    result = invoke(*inputs, "-o", tmp_path / "out", "--assets", tmp_path / "assets", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl", "b.jsonl"]


def test_neither_output_nor_in_place_is_a_usage_error(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [record(data_url(PNG))])
    result = invoke(source, "--assets", tmp_path / "assets")
    assert result.exit_code == 2
    assert "exactly one of an output" in result.stderr


def test_workers_give_the_same_output_as_one(tmp_path):
    urls = [data_url(image_bytes(seed=seed)) for seed in range(5)]
    source = write_jsonl(tmp_path / "in.jsonl", [record(urls[i % 5], i) for i in range(200)])
    for workers in ("1", "2"):
        result = invoke(
            source, "-o", tmp_path / f"out{workers}.jsonl", "--assets", tmp_path / "a", "--workers", workers
        )
        assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out1.jsonl").read_bytes() == (tmp_path / "out2.jsonl").read_bytes()


def noisy_pngs(count: int) -> list[bytes]:
    """Distinct incompressible PNGs (a few KiB each), so a run takes a while."""
    base = Image.frombytes("RGB", (48, 48), os.urandom(48 * 48 * 3))
    images = []
    for seed in range(count):
        base.putpixel((seed % 48, seed // 48 % 48), (seed % 256, 0, 0))
        out = io.BytesIO()
        base.save(out, format="PNG", compress_level=0)
        images.append(out.getvalue())
    return images


def test_a_run_killed_mid_way_leaves_no_output_and_only_intact_images(tmp_path):
    source = write_jsonl(
        tmp_path / "in.jsonl", [record(data_url(png), i) for i, png in enumerate(noisy_pngs(2000))]
    )
    assets, output = tmp_path / "assets", tmp_path / "out.jsonl"
    command = [sys.executable, "-c", "from mmoffload_cli.app import main; main()", "offload", str(source)]
    process = subprocess.Popen([*command, "-o", str(output), "--assets", str(assets), "-q"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if assets.is_dir() and sum(not n.startswith(TEMP_PREFIX) for n in os.listdir(assets)) >= 100:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed; make the input bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()
    images = [path for path in assets.iterdir() if path.suffix in IMAGE_EXTENSIONS]
    assert len(images) >= 100
    assert all(p in images or p.name.startswith(TEMP_PREFIX) for p in assets.iterdir())
    for path in images:
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest()[:32] == path.stem
        Image.open(io.BytesIO(data)).load()


def test_ray_without_the_ray_extra_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it fails
    source = write_jsonl(tmp_path / "in.jsonl", [record(data_url(PNG))])
    result = invoke(source, "-o", tmp_path / "out.jsonl", "--assets", tmp_path / "assets", "--ray")
    assert result.exit_code == 2
    assert "needs the `ray` extra" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_stdout_closed_early_stops_quietly_as_unix_tools_do(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"n": n, "text": "x" * 1000}) + "\n" for n in range(2000)))
    command = [sys.executable, "-c", "from mmoffload_cli.app import main; main()", "offload", str(source)]
    process = subprocess.Popen(
        [*command, "-o", "-", "--assets", str(tmp_path / "assets"), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(100).startswith(b'{"n": 0')  # Lines without images: copied as they are.
    process.stdout.close()  # As `| head -c 100` does.
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == b""
