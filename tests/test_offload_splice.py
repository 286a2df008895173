"""Offloading from a line's bytes (data URLs spliced out) gives what decoding the whole line gives."""

import msgspec
import pytest

from mmoffload.contract.addresses import content_hash
from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.io.outputs import TEMP_PREFIX
from mmoffload.offload import Offloader, offload_record
from mmoffload.store.local import AssetStore
from tests.builders import data_url, image_bytes

PNG, JPEG = image_bytes(seed=7), image_bytes(fmt="JPEG", seed=8)
URL = data_url(PNG)
ESCAPED_URL = URL.replace("/", "\\/")
STAND_IN = "data:mmoffload stand-in 0"
TRICKY_LINES = [
    # a data URL as a key, twice: duplicate keys must merge exactly as when decoding the line
    f'{{"{URL}": 1, "{URL}": 2, "p": {{"type": "image_url", "image_url": {{"url": "{URL}"}}}}}}',
    # the stand-in text itself in the line, plainly and spelled with an escape
    f'{{"t": "{STAND_IN}", "p": {{"type": "image", "image": "{URL}"}}}}',
    f'{{"t": "data:mmoffload\\u0020stand-in 0", "p": {{"type": "image", "image": "{URL}"}}}}',
    # a data URL as text beside the same one as an image part, and inside other text
    f'{{"text": "{URL}", "note": "see \\"{URL}\\"", "p": [{{"type": "image_url", "image_url": "{URL}"}}]}}',
    # a literal that is not plain (escaped slash, whitespace) stays in the line and is decoded
    f'{{"p": {{"type": "image_url", "image_url": {{"url": "{ESCAPED_URL}"}}}}}}',
    # the same literal in one line twice, and a second image
    f'{{"a": [{{"type": "image", "image": "{URL}"}}, {{"type": "image", "image": "{URL}"}}], '
    f'"b": {{"raw_image_data": "{data_url(JPEG)}", "raw_uri": "file:///x.png"}}}}',
]


@pytest.mark.parametrize("text", TRICKY_LINES)
def test_a_spliced_line_is_offloaded_as_the_decoded_line_is(tmp_path, text):
    line = text.encode() + b"\n"
    record = msgspec.json.decode(line)
    offload_record(record, tmp_path / "reference")
    expected = msgspec.json.encode(record) + b"\n"
    offloader = Offloader(AssetStore(tmp_path / "reference"))
    with offloader.store.syncing():
        written, counts = offloader.line(line, Where(file="in.jsonl", line=1))
        again, _ = offloader.line(line, Where(file="in.jsonl", line=2))
    assert written == again == expected
    assert counts.records_rewritten == 1


@pytest.mark.parametrize(
    "text",
    [
        f'{{"p": {{"type": "image_url", "image_url": {{"url": "{URL}\t"}}}}}}',  # raw tab: not JSON
        f'{{"p": {{"type": "image_url", "image_url": {{"url": "{URL}"}}}}',  # unclosed object
        f'{{"p": {{"type": "image_url", "image_url": {{"url": "{URL[:-8]}*"}}}}}}',  # bad base64
    ],
)
def test_a_bad_line_fails_with_the_message_of_the_line_itself(tmp_path, text):
    line = text.encode() + b"\n"
    where = Where(file="in.jsonl", line=3)
    with pytest.raises(BadInputError) as plain:
        try:
            offload_record(msgspec.json.decode(line), tmp_path)
        except msgspec.DecodeError as exc:
            raise BadInputError(f"Invalid JSON: {exc}", where) from exc
    with pytest.raises(BadInputError) as spliced:
        Offloader(AssetStore(tmp_path)).line(line, where)
    assert str(spliced.value).split(" - at ")[0] == str(plain.value).split(" - at ")[0]


def test_images_put_while_syncing_are_named_only_once_synced(tmp_path):
    store = AssetStore(tmp_path)
    with store.syncing():
        first, second = store.put(PNG), store.put(PNG)
        assert (first.written, second.written) == (True, False)
    assert [p.name for p in tmp_path.iterdir()] == [f"{content_hash(PNG)}.png"]
    assert first.path.read_bytes() == PNG


def test_an_image_that_cannot_be_synced_never_gets_its_name(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(5, "Input/output error")

    store = AssetStore(tmp_path)
    with pytest.raises(UsageError, match="Cannot write output: Input/output error"), store.syncing():
        monkeypatch.setattr("mmoffload.store.local.os.fsync", fail)
        store.put(PNG)
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())
