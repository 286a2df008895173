"""``mmoffload serve`` on a real vLLM engine with a tiny random-weight Qwen2-VL (skipped without vLLM).

One engine for the whole module: started once on a loopback port, as users start it,
through the CLI. Its images live in a per-session asset directory.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from scripts.as_context import as_context
from typer.testing import CliRunner

from mmoffload.contract.wire import MicroBatch, MMImageRef, encode, read_rank_file
from mmoffload.inference.client import InferenceClient, InferenceServerError, parse_completion
from mmoffload.inference.refs import decode_ref, encode_ref
from mmoffload.store.local import StoredImage
from mmoffload_cli.app import app
from tests.builders import (
    QWEN_IMAGE_PAD,
    QWEN_VISION_END,
    QWEN_VISION_START,
    descriptor,
    image_bytes,
    store_image,
)
from tests.vllm_helpers import REPO, Server, raw_ref_request, running_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

GREEDY = {"max_tokens": 6, "temperature": 0.0, "logprobs": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("vllm")
    # Images under this directory get pixels normalized twice (the shims explain it).
    env = {"MMOFFLOAD_TEST_NORMALIZE_TWICE_DIR": str(root / "normalized-twice")}
    # The tests' own temporary directories hold images too: all of them under the session's base.
    serve_args = ["--allow-root", str(tmp_path_factory.getbasetemp())]
    # float32 as parity's end-to-end test compares with the Hugging Face model in float32.
    vllm_args = [
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
        "--limit-mm-per-prompt",
        '{"image": 3, "video": 0}',
    ]
    with running_server(root, serve_args, vllm_args, env) as server:
        yield server


def image_prompt(
    server: Server,
    seeds: tuple[int, ...],
    size: tuple[int, int] = (200, 120),
    assets: Path | None = None,
    compact_refs: bool = True,
) -> dict[str, Any]:
    """Return a raw-ref request with one stored image per seed, text around each."""
    return raw_ref_request(server, seeds, GREEDY, size, assets, compact_refs=compact_refs)


def vllm_own_request(
    server: Server, seeds: tuple[int, ...], size: tuple[int, int] = (200, 120)
) -> dict[str, Any]:
    """The same prompt as stock vLLM takes it: one image pad per image, the PNGs as data URLs.

    This server answers it on its own content_parts path; test_vllm_content_parts.py holds
    that path against stock vLLM's processing.
    """
    tokens, parts = [72, 105], []
    for seed in seeds:
        data = image_bytes(*size, seed=seed)
        tokens += [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, 32]
        parts.append({"type": "image_url", "url": "data:image/png;base64," + base64.b64encode(data).decode()})
    return {"token_ids": tokens, "sampling_params": GREEDY, "content_parts": parts}


def choice(body: dict[str, Any]) -> tuple[list[int], list[float]]:
    completion = parse_completion(body)
    return completion.token_ids, completion.logprobs


def assert_refused(server: Server, body: dict[str, Any], image: int, words: str) -> None:
    status, answer = server.post(body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_mm_image_ref"
    assert f"image {image}" in answer["error"]["message"] and words in answer["error"]["message"]
    # The engine keeps serving.
    status, answer = server.post(image_prompt(server, (0,)))
    assert status == 200 and len(answer["choices"][0]["token_ids"]) == GREEDY["max_tokens"]


def test_health_and_models_are_vllms(server: Server) -> None:
    assert server.get("/health")[0] == 200
    status, models = server.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == str(server.model_dir)


def test_good_two_image_request_returns_tokens_and_logprobs(server: Server) -> None:
    status, body = server.post(image_prompt(server, (1, 2)))
    assert status == 200, body
    tokens, logprobs = choice(body)
    assert len(tokens) == len(logprobs) == GREEDY["max_tokens"]
    assert all(lp <= 0.0 for lp in logprobs)


@pytest.mark.parametrize("seeds", [(3,), (4, 5)])
@pytest.mark.parametrize("compact_refs", [True, False], ids=["compact", "full"])
def test_raw_refs_equal_content_parts(server: Server, seeds: tuple[int, ...], compact_refs: bool) -> None:
    status, ours = server.post(image_prompt(server, seeds, compact_refs=compact_refs))
    assert status == 200, ours
    status, theirs = server.post(vllm_own_request(server, seeds))
    assert status == 200, theirs
    assert choice(ours) == choice(theirs)


def test_prior_turn_image_plus_a_new_one(server: Server) -> None:
    assert server.post(image_prompt(server, (6,)))[0] == 200
    status, body = server.post(image_prompt(server, (6, 7)))
    assert status == 200, body
    assert choice(body) == choice(server.post(vllm_own_request(server, (6, 7)))[1])


def test_concurrent_requests_for_one_image_materialize_it_once(server: Server) -> None:
    before = server.get("/mmoffload/v1/stats")[1]
    body = image_prompt(server, (8,), size=(640, 480))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: server.post(body), range(4)))
    assert [status for status, _ in answers] == [200] * 4
    after = server.get("/mmoffload/v1/stats")[1]
    assert after["images_materialized"] - before["images_materialized"] == 1
    assert after["images"] - before["images"] == 4


def test_wrong_placeholder_length_is_refused(server: Server) -> None:
    body = image_prompt(server, (0, 1))
    body["features"]["mm_placeholders"]["image"][1]["length"] -= 4
    assert_refused(server, body, 1, "Expected placeholder length")


def test_tampered_file_is_refused(server: Server) -> None:
    body = image_prompt(server, (10,))
    uri = decode_ref(body["features"]["kwargs_data"]["image"][0])["raw_image_uri"]
    Path(uri.removeprefix("file://")).write_bytes(image_bytes(200, 120, seed=11))
    assert_refused(server, body, 0, "Content hash mismatch")


def test_grid_mismatch_is_refused(server: Server) -> None:
    body = image_prompt(server, (0, 12))
    fields = decode_ref(body["features"]["kwargs_data"]["image"][1])
    item = {**descriptor(fields["raw_image_uri"], [1, 4, 24])}
    body["features"]["kwargs_data"]["image"][1] = encode_ref(item, body["features"]["mm_hashes"]["image"][1])
    assert_refused(server, body, 1, "Expected the descriptor's grid [1, 4, 24]")


def test_missing_file_is_refused(server: Server) -> None:
    body = image_prompt(server, (13,))
    uri = decode_ref(body["features"]["kwargs_data"]["image"][0])["raw_image_uri"]
    Path(uri.removeprefix("file://")).unlink()
    assert_refused(server, body, 0, "Missing image file")


def test_hash_mismatch_is_refused(server: Server) -> None:
    body = image_prompt(server, (0, 14), compact_refs=False)
    body["features"]["mm_hashes"]["image"][0] = "f" * 32
    assert_refused(server, body, 0, "to equal `mm_hashes[0]`")
    # A compact ref takes the outer hash as its own: the file's content then disagrees with it.
    body = image_prompt(server, (0, 14))
    body["features"]["mm_hashes"]["image"][0] = "f" * 32
    assert_refused(server, body, 0, "Content hash mismatch")


@pytest.mark.parametrize("item", [None, "AAAAbase64msgpack"])
def test_non_mmraw_item_is_refused(server: Server, item: str | None) -> None:
    body = image_prompt(server, (0,))
    body["features"]["kwargs_data"]["image"][0] = item
    assert_refused(server, body, 0, "Expected an `mmraw:` ref")


def test_mismatched_counts_are_refused(server: Server) -> None:
    body = image_prompt(server, (0, 1))
    body["features"]["mm_placeholders"]["image"].pop()
    status, answer = server.post(body)
    assert status == 400 and answer["error"]["type"] == "invalid_mm_image_ref"
    assert "2 refs and 1 placeholders" in answer["error"]["message"]
    assert server.post(image_prompt(server, (0,)))[0] == 200


def test_client_returns_the_completion_and_raises_on_refusal(server: Server) -> None:
    client = InferenceClient(server.url)
    body = image_prompt(server, (15,))
    completion = parse_completion(client.post(body))
    assert len(completion.token_ids) == GREEDY["max_tokens"] and completion.finish_reason == "length"
    body["features"]["mm_hashes"]["image"][0] = "0" * 32
    with pytest.raises(InferenceServerError) as info:
        client.post(body)
    assert info.value.status == 400 and info.value.body["error"]["type"] == "invalid_mm_image_ref"


def test_generate_command_writes_a_sampled_node(server: Server, tmp_path: Path) -> None:
    body = image_prompt(server, (16, 17), compact_refs=False)  # full refs carry whole descriptors
    tokens = body["token_ids"]
    features = body["features"]
    items = [decode_ref(ref) for ref in features["kwargs_data"]["image"]]
    for fields in items:
        fields["kind"] = "prime_raw_mm_item"
        del fields["mm_hash"]
    sidecar = {
        "mm_items": {"image": items},
        "mm_hashes": features["mm_hashes"],
        "mm_placeholders": features["mm_placeholders"],
    }
    trace = {
        "id": "t0",
        "nodes": [
            {"parent": None, "token_ids": tokens, "mask": [False] * len(tokens), "multi_modal_data": sidecar},
        ],
    }
    source, out = tmp_path / "traces.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(trace) + "\n")
    result = CliRunner().invoke(
        app, ["generate", str(source), "--server", server.url, "-o", str(out), "--max-tokens", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["traces_completed"], report["images_sent"], report["completion_tokens"]) == (1, 2, 5)
    node = json.loads(out.read_text())["nodes"][1]
    assert node["parent"] == 0 and node["sampled"] is True
    assert node["mask"] == [True] * 5 and len(node["token_ids"]) == len(node["logprobs"]) == 5


def test_generate_command_names_the_image_the_server_refused(server: Server, tmp_path: Path) -> None:
    stored: StoredImage = store_image(server.assets, image_bytes(200, 120, seed=18))
    tokens = [72, QWEN_VISION_START] + [QWEN_IMAGE_PAD] * 20 + [QWEN_VISION_END]
    sidecar = {
        "mm_items": {"image": [descriptor(stored.uri, [1, 8, 12])]},
        "mm_hashes": {"image": [stored.hash]},
        "mm_placeholders": {"image": [{"offset": 2, "length": 20}]},
    }
    trace = {"nodes": [{"token_ids": tokens, "mask": [False] * len(tokens), "multi_modal_data": sidecar}]}
    source, out = tmp_path / "traces.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(trace) + "\n")
    arguments = ["generate", str(source), "--server", server.url, "-o", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--protocol", "mmraw"])
    assert result.exit_code == 2
    assert "invalid_mm_image_ref" in result.stderr and "image 0" in result.stderr
    assert not out.exists()
    # With content_parts the server expands from the image itself; the client finds the disagreement.
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert "image 0" in result.stderr
    assert not out.exists()


def _context_only(source: Path, out: Path, twice: Path, twice_trace: str) -> None:
    """Write the offloaded fixture traces with every turn as context, ready for one sampled turn.

    The images of ``twice_trace`` are copied under ``twice``, where the server normalizes
    pixels twice (the shims), and its refs point there.
    """
    lines = []
    for line in source.read_text().splitlines():
        record = as_context(json.loads(line))
        if record["traces"][0]["id"] == twice_trace:
            for uri in set(re.findall(r"file://[^\"]+", line)):
                path = Path(uri.removeprefix("file://"))
                twice.mkdir(exist_ok=True)
                shutil.copy(path, twice / path.name)
            record = json.loads(
                json.dumps(record).replace(f"file://{source.parent}/assets", f"file://{twice}")
            )
        lines.append(json.dumps(record))
    out.write_text("\n".join(lines) + "\n")


def test_parity_end_to_end_flags_each_damaged_sample(server: Server, tmp_path: Path) -> None:
    # offload -> generate -> refs -> pack -> parity on the fixture traces (3 screenshots each), then
    # the run damaged: pixels normalized twice at inference, two samples' images swapped, a file gone.
    twice = server.assets.parent / "normalized-twice"
    run, assets = tmp_path / "run", tmp_path / "assets"
    model = str(server.model_dir)
    roots = ["--allow-root", str(assets), "--allow-root", str(twice)]
    steps = [
        ["offload", str(REPO / "fixtures" / "traces" / "qwen_vl.jsonl"), "--assets", str(assets),
         "-o", str(tmp_path / "offloaded.jsonl")],
        ["generate", str(tmp_path / "context.jsonl"), "--server", server.url, "-o", str(tmp_path / "gen.jsonl"),
         "--max-tokens", "8", "--temperature", "0"],
        ["refs", str(tmp_path / "gen.jsonl"), "--run-dir", str(run), "--model", model, *roots],
        ["pack", str(run), "--seq-len", "8192"],
    ]  # fmt: skip
    for number, args in enumerate(steps):
        if number == 1:
            _context_only(tmp_path / "offloaded.jsonl", tmp_path / "context.jsonl", twice, "trace-0003")
        result = CliRunner().invoke(app, [*args, "-q"])
        assert result.exit_code == 0, result.output

    def parity() -> tuple[int, dict[str, dict[str, Any]]]:
        result = CliRunner().invoke(app, ["parity", str(run), "--model", model, "--json", *roots])
        assert result.exit_code in (0, 1), result.output
        report = json.loads(result.stdout)
        return result.exit_code, {_sample_name(s): s for s in report["per_sample"]}

    code, samples = parity()
    damaged = [name for name, s in samples.items() if "normalized-twice" in s["images"][0]["uri"]]
    clean = sorted(set(samples) - set(damaged))
    assert code == 1 and len(samples) == 4 and len(damaged) == 1
    assert samples[damaged[0]]["status"] == "over_threshold"
    assert [samples[name]["status"] for name in clean] == ["ok"] * 3
    clean_kl = max(samples[name]["kl"] for name in clean)
    assert clean_kl < 1e-4

    rank_file = run / "rollouts" / "step_0" / "rank_0.bin"
    micro_batches = read_rank_file(rank_file)
    first, second = _same_grid_pair([samples[name] for name in clean])
    _swap(micro_batches, first, second)
    rank_file.write_bytes(encode(micro_batches))
    code, swapped = parity()
    assert code == 1
    pair = {_sample_name(first), _sample_name(second)}
    assert {name for name, s in swapped.items() if s["status"] != "ok"} == {damaged[0], *pair}

    last = next(name for name in clean if name not in pair)
    gone = samples[last]["images"][1]
    Path(gone["uri"].removeprefix("file://")).unlink()
    code, missing = parity()
    assert code == 1
    assert missing[last]["status"] == "missing_image" and missing[last]["kl"] is None
    kls = {name: samples[name]["kl"] for name in clean} | {"normalized_twice": samples[damaged[0]]["kl"]}
    kls |= {f"swapped_{name}": swapped[name]["kl"] for name in sorted(pair)}
    print("parity end to end:", json.dumps(kls))


def _sample_name(sample: dict[str, Any]) -> str:
    return f"r{sample['rank']}-mb{sample['micro_batch']}-s{sample['index']}"


def _same_grid_pair(samples: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return two samples, each with its image index to swap: other files, the same placeholder length."""
    for a in samples:
        for b in samples:
            for i, image in enumerate(a["images"]):
                for j, other in enumerate(b["images"]):
                    if a is not b and image["hash"] != other["hash"] and image["length"] == other["length"]:
                        return {**a, "swap": i}, {**b, "swap": j}
    raise AssertionError("no two images of one grid in different samples")


def _swap(micro_batches: list[MicroBatch], first: dict[str, Any], second: dict[str, Any]) -> None:
    """Give each sample's chosen image the other's file and hash: valid files, wrong pixels."""
    spans = [(s["micro_batch"], s["images"][s["swap"]]["offset"]) for s in (first, second)]
    found = []
    for number, offset in spans:
        images = micro_batches[number].mm_refs.images
        found.append((images, next(k for k, ref in enumerate(images) if ref.offset == offset)))
    (a_list, a), (b_list, b) = found
    ra, rb = a_list[a], b_list[b]
    a_list[a] = MMImageRef(rb.item, rb.hash, rb.uri, ra.offset, ra.length)
    b_list[b] = MMImageRef(ra.item, ra.hash, ra.uri, rb.offset, rb.length)
