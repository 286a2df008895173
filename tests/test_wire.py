"""The wire structs keep the contract's field order: hand-written positional arrays round-trip exactly."""

from __future__ import annotations

import msgspec
import pytest

from mmoffload.contract import wire

DESCRIPTOR = {
    "kind": "prime_raw_mm_item",
    "family": "qwen_vl",
    "raw_image_uri": "file:///r/assets/images/" + "a" * 32 + ".png",
    "payload": {"image_grid_thw": [[1, 4, 4]]},
}
REF = [DESCRIPTOR, "a" * 32, DESCRIPTOR["raw_image_uri"], 1, 4]
TENSOR = ["float32", [2], b"\x00" * 8]
EXPERTS = [b"\x01\x02", [1, 2], "uint8"]
# Every field written out, in the contract's order: a positional reader sees exactly these slots.
SAMPLE = [
    [1, 151655, 151655, 151655, 151655, 2],  # token_ids
    [False, False, False, False, False, True],  # mask
    [0.0, 0.0, 0.0, 0.0, 0.0, -0.5],  # logprobs
    [1.0] * 6,  # temperatures
    "mini-browse",  # env_name
    [0.0] * 6,  # ref_logprobs
    {"pixel_values": TENSOR},  # mm_kwargs
    [[REF]],  # mm_refs
    EXPERTS,  # routed_experts
    [0, 1, 1, 1, 1, 0],  # mm_token_type_ids
    [1.0] * 6,  # rl_weights
    [0.0] * 6,  # ce_weights
    [0.0] * 6,  # ref_kl_weights
    [0.25] * 6,  # advantages
]
MICRO_BATCH = [
    [1, 2, 3],  # input_ids
    [False, True, True],  # loss_mask
    [0.0, 0.5, 0.5],  # advantages
    [0.0, -0.1, -0.2],  # inference_logprobs
    [0, 1, 0],  # position_ids
    [2, 1],  # sequence_lengths
    [1.0, 1.0, 0.7],  # temperatures
    ["env", "env", "env"],  # env_names
    [2, 1],  # seq_lens
    [0.0, 0.0, 0.0],  # ref_logprobs
    [3],  # lora_num_tokens
    EXPERTS,  # routed_experts
    {"pixel_values": TENSOR},  # mm_kwargs
    [[REF]],  # mm_refs
    [0, 1, 0],  # mm_token_type_ids
    [1.0, 1.0, 1.0],  # rl_weights
    [0.0, 0.0, 0.0],  # ce_weights
    [0.0, 0.0, 0.0],  # ref_kl_weights
    "run-a",  # run_id
    7,  # run_step
]

CASES = [
    (wire.MMImageRef, REF),
    (wire.MMRefs, [[REF, REF]]),
    (wire.EncodedTensor, TENSOR),
    (wire.RoutedExperts, EXPERTS),
    (wire.TrainingSample, SAMPLE),
    (wire.TrainingBatch, [[SAMPLE], 3, 0]),
    (wire.MicroBatch, MICRO_BATCH),
]


@pytest.mark.parametrize(("struct", "array"), CASES, ids=[c[0].__name__ for c in CASES])
def test_positional_array_decodes_and_reencodes_byte_for_byte(struct: type, array: list) -> None:
    written = msgspec.msgpack.encode(array)
    decoded = msgspec.msgpack.decode(written, type=struct)
    assert wire.encode(decoded) == written


def test_fields_land_in_contract_order() -> None:
    sample = msgspec.msgpack.decode(msgspec.msgpack.encode(SAMPLE), type=wire.TrainingSample)
    assert sample.env_name == "mini-browse"
    assert sample.mm_refs is not None and sample.mm_refs.images[0].offset == 1
    assert sample.mm_token_type_ids == [0, 1, 1, 1, 1, 0]
    assert sample.advantages == [0.25] * 6
    batch = msgspec.msgpack.decode(msgspec.msgpack.encode(MICRO_BATCH), type=wire.MicroBatch)
    assert batch.seq_lens == [2, 1] and batch.run_id == "run-a" and batch.run_step == 7


def test_missing_trailing_fields_decode_as_defaults_and_are_written_as_nil() -> None:
    required_only = SAMPLE[:5]
    sample = msgspec.msgpack.decode(msgspec.msgpack.encode(required_only), type=wire.TrainingSample)
    assert sample.mm_refs is None and sample.advantages is None
    assert wire.encode(sample) == msgspec.msgpack.encode(required_only + [None] * 9)


def test_a_reordered_field_is_refused_by_the_typed_decoder() -> None:
    swapped = [SAMPLE[1], SAMPLE[0], *SAMPLE[2:]]
    with pytest.raises(msgspec.ValidationError, match=r"\$\[0\]\[0\]"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(swapped), type=wire.TrainingSample)
