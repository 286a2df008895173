"""Trainer-bound wire structs (contract.md section 6).

Each struct is a positional msgpack array in exactly the contract's field order,
byte-compatible with the prime-rl v1 raw image offload transport. Readers decode
by position: never reorder fields, and only ever append new ones with defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TypeVar

import msgspec

from mmoffload.errors import BadInputError, UsageError, Where

T = TypeVar("T")

# Every integer on the wire fits int64 (the trainer's tensors); decoding refuses anything larger.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Wire(msgspec.Struct, array_like=True, gc=False):
    """Common options: positional arrays with every field written, ``None`` as nil."""


class MMImageRef(_Wire):
    item: dict[str, Any]
    hash: str
    uri: str
    offset: Int64
    length: Int64


class MMRefs(_Wire):
    images: list[MMImageRef]


class EncodedTensor(_Wire):
    dtype: str
    shape: list[Int64]
    data: bytes


class RoutedExperts(_Wire):
    data: bytes
    shape: list[Int64]
    dtype: str


class TrainingSample(_Wire):
    token_ids: list[Int64]
    mask: list[bool]
    logprobs: list[float]
    temperatures: list[float]
    env_name: str
    ref_logprobs: list[float] | None = None
    mm_kwargs: dict[str, EncodedTensor] | None = None
    mm_refs: MMRefs | None = None
    routed_experts: RoutedExperts | None = None
    mm_token_type_ids: list[Int64] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    advantages: list[float] | None = None


class TrainingBatch(_Wire):
    examples: list[TrainingSample]
    step: Int64
    run_idx: Int64 | None = None


class MicroBatch(_Wire):
    input_ids: list[Int64]
    loss_mask: list[bool]
    advantages: list[float]
    inference_logprobs: list[float]
    position_ids: list[Int64]
    sequence_lengths: list[Int64]
    temperatures: list[float]
    env_names: list[str]
    seq_lens: list[Int64]
    ref_logprobs: list[float] | None = None
    lora_num_tokens: list[Int64] | None = None
    routed_experts: RoutedExperts | None = None
    mm_kwargs: dict[str, EncodedTensor] | None = None
    mm_refs: MMRefs | None = None
    mm_token_type_ids: list[Int64] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    run_id: str | None = None
    run_step: Int64 | None = None


# Fields holding one value per token (their length must equal the token count).
SAMPLE_PER_TOKEN_FIELDS = (
    "mask",
    "logprobs",
    "temperatures",
    "ref_logprobs",
    "mm_token_type_ids",
    "rl_weights",
    "ce_weights",
    "ref_kl_weights",
    "advantages",
)
MICRO_BATCH_PER_TOKEN_FIELDS = (
    "loss_mask",
    "advantages",
    "inference_logprobs",
    "position_ids",
    "temperatures",
    "env_names",
    "ref_logprobs",
    "mm_token_type_ids",
    "rl_weights",
    "ce_weights",
    "ref_kl_weights",
)
# Fields of a micro batch whose entries sum to its token count.
# The optional per-token loss weights a micro batch may carry (filled with 1.0 where absent).
WEIGHT_STREAMS = ("rl_weights", "ce_weights", "ref_kl_weights")
MICRO_BATCH_TOTAL_FIELDS = ("sequence_lengths", "seq_lens", "lora_num_tokens")

# Typed codecs, built once and reused (decoding validates types at the edge).
ENCODER = msgspec.msgpack.Encoder()
TRAINING_BATCH_DECODER = msgspec.msgpack.Decoder(TrainingBatch)
RANK_FILE_DECODER = msgspec.msgpack.Decoder(list[MicroBatch])
MICRO_BATCH_DECODER = msgspec.msgpack.Decoder(MicroBatch)
_RAW_DECODER = msgspec.msgpack.Decoder(msgspec.Raw)


def encode(value: object) -> bytes:
    """Encode a wire struct (or a list of them) to msgpack."""
    return ENCODER.encode(value)


def read_training_batch(path: str | os.PathLike[str]) -> TrainingBatch:
    """Read and decode a step's ``train_rollouts.bin``.

    Raises:
        UsageError: the file cannot be read.
        BadInputError: it is not a msgpack ``TrainingBatch``.
    """
    return _read(path, TRAINING_BATCH_DECODER, "TrainingBatch")


def read_rank_file(path: str | os.PathLike[str]) -> list[MicroBatch]:
    """Read and decode a ``rank_<R>.bin`` file.

    Raises:
        UsageError: the file cannot be read.
        BadInputError: it is not a msgpack list of ``MicroBatch``.
    """
    return _read(path, RANK_FILE_DECODER, "list of MicroBatch")


def iter_rank_file(path: str | os.PathLike[str]) -> Iterator[MicroBatch]:
    """Decode a ``rank_<R>.bin`` file one micro batch at a time: memory bounded by one, not the file.

    Raises:
        OSError: the file cannot be read.
        msgspec.DecodeError: it is not a msgpack list of ``MicroBatch`` (after the micro batches
            before the fault were yielded).
    """
    with open(path, "rb") as handle:
        for item in iter_msgpack_array(handle):
            yield MICRO_BATCH_DECODER.decode(item)


# The first items of an array are read this many bytes at a time (then twice the largest item).
_FIRST_WINDOW = 1 << 20
# msgspec's message when a buffer holds more than one value: where the first one ends.
_TRAILING = re.compile(r"trailing characters \(byte (\d+)\)")


def iter_msgpack_array(handle: BinaryIO) -> Iterator[bytes]:
    """Yield the encoded items of the msgpack array a file holds, one at a time.

    msgspec decodes whole buffers only: each item's end is found by decoding a window
    of the file that holds it as a ``Raw`` (a scan, no objects), so at most about two
    items' bytes are held, whatever the file's size.

    Raises:
        msgspec.DecodeError: the file holds no msgpack array, or an item is malformed or cut short.
    """
    count = _array_length(handle)
    buffer, window, ended = bytearray(), _FIRST_WINDOW, False
    for _ in range(count):
        while True:
            if len(buffer) < window and not ended:
                chunk = handle.read(window - len(buffer))
                buffer += chunk
                ended = not chunk
            end = _first_value_end(buffer)
            if end is not None:
                break
            if ended:
                raise msgspec.DecodeError("Input data was truncated")
            window *= 2
        window = max(window, 2 * end)
        yield bytes(buffer[:end])
        del buffer[:end]
    if buffer or handle.read(1):
        raise msgspec.DecodeError("MessagePack data is malformed: trailing characters after the array")


def _array_length(handle: BinaryIO) -> int:
    """Read a msgpack array header (fixarray, array 16 or array 32); return its length."""
    first = handle.read(1)
    if first and 0x90 <= first[0] <= 0x9F:
        return first[0] & 0x0F
    size = {b"\xdc": 2, b"\xdd": 4}.get(first)
    length = handle.read(size) if size else b""
    if not size or len(length) != size:
        raise msgspec.DecodeError("Expected `array`" + ("" if first else ", got an empty file"))
    return int.from_bytes(length, "big")


def _first_value_end(buffer: bytearray) -> int | None:
    """Return where the first msgpack value in ``buffer`` ends, or None when it is cut short there."""
    with memoryview(buffer) as view:
        try:
            _RAW_DECODER.decode(view)
        except msgspec.DecodeError as exc:
            if str(exc) == "Input data was truncated":
                return None
            trailing = _TRAILING.search(str(exc))
            if trailing is None:
                raise
            return int(trailing.group(1))
    return len(buffer)


def _read(path: str | os.PathLike[str], decoder: msgspec.msgpack.Decoder[T], what: str) -> T:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {what} file: {exc.strerror}", Where(file=str(path))) from exc
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadInputError(f"Expected a msgpack {what}: {exc}", Where(file=str(path))) from exc
