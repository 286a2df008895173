"""``content_parts`` with ``s3://`` URLs on ``mmoffload serve``, against moto's S3 server on loopback.

Two engines for the module, as in ``test_vllm_content_parts``: ``mmoffload serve``
allowed to read ``s3://served/images`` (the endpoint and fake credentials reach it
through its environment), and stock vLLM reading the same images as local files,
the reference for the numbers. Skipped without vLLM, s3fs or moto.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mmoffload.contract.addresses import content_hash
from tests.builders import QWEN_IMAGE_PAD, QWEN_VISION_END, QWEN_VISION_START, image_bytes, store_image
from tests.test_vllm_content_parts import GREEDY, VLLM_ARGS, answer
from tests.vllm_helpers import Server, running_servers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import fsspec  # noqa: E402

from mmoffload.store.objects import ObjectStore  # noqa: E402  (needs fsspec's s3 client)

ALLOWED = "s3://served/images"
ELSEWHERE = "s3://elsewhere/images"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """Moto's S3 server on loopback, this module's own; returns the environment that reaches it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    # fsspec keeps one s3 client per process: drop any made for another module's endpoint.
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        for bucket in (ALLOWED, ELSEWHERE):
            fsspec.filesystem("s3").mkdir(bucket.removeprefix("s3://").split("/")[0])
        yield env
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]
) -> Iterator[tuple[Server, Server]]:
    ours, stock = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("stock")
    specs = [
        (ours, ("--allow-root", ALLOWED), VLLM_ARGS, s3_env, False),
        (stock, (), VLLM_ARGS, None, True),
    ]
    with running_servers(specs) as started:
        yield started[0], started[1]


def request(urls_and_uuids: list[tuple[str | None, str]]) -> dict[str, Any]:
    """Return a content_parts request, one pad and one part per (url, uuid); a None url sends the uuid alone."""
    tokens, parts = [72, 105], []
    for url, uuid in urls_and_uuids:
        tokens += [QWEN_VISION_START, QWEN_IMAGE_PAD, QWEN_VISION_END, 32]
        parts.append({"type": "image_url", "uuid": uuid} | ({"url": url} if url else {}))
    return {"token_ids": tokens, "sampling_params": GREEDY, "content_parts": parts, "return_token_ids": True}


def in_both(stock: Server, seed: int, prefix: str = ALLOWED) -> tuple[str, str, str]:
    """Store one image in the bucket (as `offload --assets s3://...` does) and as stock's file.

    Returns its s3 URL, file URL and content hash.
    """
    data = image_bytes(200, 120, seed=seed)
    stored = ObjectStore(prefix).put(data)
    local = store_image(stock.assets, data)
    assert stored.hash == local.hash
    return stored.uri, local.uri, stored.hash


def refusal(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, answered = server.post(body)
    assert status == 400 and answered["error"]["type"] == "invalid_mm_image_ref", answered
    return answered["error"]


def test_s3_urls_give_what_stock_vllm_gives_for_the_same_files(servers: tuple[Server, Server]) -> None:
    ours, stock = servers
    (s3_a, file_a, hash_a), (s3_b, file_b, hash_b) = in_both(stock, 1), in_both(stock, 2)
    status, mine = ours.post(request([(s3_a, hash_a), (s3_b, hash_b)]))
    assert status == 200, mine
    status, theirs = stock.post(request([(file_a, hash_a), (file_b, hash_b)]))
    assert status == 200, theirs
    assert answer(mine) == answer(theirs)


def test_uuids_alone_after_an_s3_read_are_served_from_the_verified_cache(
    servers: tuple[Server, Server],
) -> None:
    ours, stock = servers
    (s3_a, file_a, hash_a), (s3_b, file_b, hash_b) = in_both(stock, 3), in_both(stock, 4)
    assert ours.post(request([(s3_a, hash_a), (s3_b, hash_b)]))[0] == 200
    before = ours.get("/mmoffload/v1/stats")[1]
    status, mine = ours.post(request([(None, hash_a), (None, hash_b)]))
    assert status == 200, mine
    assert ours.get("/mmoffload/v1/stats")[1]["images_materialized"] == before["images_materialized"]
    assert answer(mine) == answer(stock.post(request([(file_a, hash_a), (file_b, hash_b)]))[1])


def test_a_uuid_that_is_not_the_objects_hash_is_refused_naming_the_part(
    servers: tuple[Server, Server],
) -> None:
    ours, stock = servers
    (s3_a, _, hash_a), (s3_b, _, _) = in_both(stock, 5), in_both(stock, 6)
    never_stored = content_hash(image_bytes(200, 120, seed=99))
    error = refusal(ours, request([(s3_a, hash_a), (s3_b, never_stored)]))
    assert error["param"] == "content_parts[1]" and "Content hash mismatch" in error["message"], error


def test_an_object_overwritten_before_its_first_read_is_refused(servers: tuple[Server, Server]) -> None:
    ours, stock = servers
    s3_a, _, hash_a = in_both(stock, 7)
    fsspec.filesystem("s3").pipe_file(s3_a, image_bytes(200, 120, seed=8))
    error = refusal(ours, request([(s3_a, hash_a)]))
    assert error["param"] == "content_parts[0]" and "Content hash mismatch" in error["message"], error


def test_an_object_overwritten_after_its_read_is_served_from_the_verified_cache(
    servers: tuple[Server, Server],
) -> None:
    # The uuid names the pixels: the verified ones, never the new object's.
    ours, stock = servers
    s3_a, file_a, hash_a = in_both(stock, 9)
    status, first = ours.post(request([(s3_a, hash_a)]))
    assert status == 200, first
    fsspec.filesystem("s3").pipe_file(s3_a, image_bytes(200, 120, seed=10))
    status, again = ours.post(request([(s3_a, hash_a)]))
    assert status == 200, again
    assert answer(again) == answer(first) == answer(stock.post(request([(file_a, hash_a)]))[1])


def test_an_object_outside_the_allowed_prefix_is_refused_before_any_read(
    servers: tuple[Server, Server],
) -> None:
    # The object is there with the right bytes: only the prefix check can refuse it.
    ours, stock = servers
    s3_a, _, hash_a = in_both(stock, 11, prefix=ELSEWHERE)
    error = refusal(ours, request([(s3_a, hash_a)]))
    assert error["param"] == "content_parts[0]" and "outside the allowed roots" in error["message"], error
