"""Properties of packing for random samples: every invariant holds, and packing loses nothing."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from mmoffload.contract.wire import (
    MICRO_BATCH_PER_TOKEN_FIELDS,
    MicroBatch,
    MMRefs,
    TrainingBatch,
    TrainingSample,
)
from mmoffload.pack import PackOptions, pack_batch
from tests.builders import place_images

PER_TOKEN = MICRO_BATCH_PER_TOKEN_FIELDS


@st.composite
def samples(draw: st.DrawFn, index: int) -> TrainingSample:
    """A sample with a unique first token, a trainable first token, and maybe images of one family."""
    n = draw(st.integers(1, 40))
    family = draw(st.sampled_from([None, "qwen_vl", "kimi_k25"]))
    tokens = [10_000 + index, *draw(st.lists(st.integers(1, 999), min_size=n - 1, max_size=n - 1))]
    spans: list[tuple[int, int]] = []
    if family is not None:
        position = 0
        for gap, length in draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 8)), max_size=4)):
            length = 1 if family == "kimi_k25" else length
            if position + gap + length > n:
                break
            spans.append((position + gap, length))
            position += gap + length
    type_ids, refs = place_images(tokens, spans, family, index) if family else ([0] * n, [])
    mask = [True, *draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))]
    floats = st.lists(st.floats(-4, 4, width=32), min_size=n, max_size=n)
    return TrainingSample(
        token_ids=tokens,
        mask=mask,
        logprobs=draw(floats),
        temperatures=[draw(st.sampled_from([0.7, 1.0]))] * n,
        env_name=f"env{index % 3}",
        ref_logprobs=draw(st.none() | floats),
        mm_refs=MMRefs(refs) if refs else None,
        mm_token_type_ids=type_ids if refs else None,
        rl_weights=draw(st.none() | floats),
        advantages=draw(st.none() | floats),
    )


@st.composite
def batches(draw: st.DrawFn) -> list[TrainingSample]:
    count = draw(st.integers(0, 12))
    return [draw(samples(index)) for index in range(count)]


def truncated(
    sample: TrainingSample, seq_len: int
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[object, ...]]:
    """What packing.md section 1 keeps of a sample, written out independently of the library."""
    refs = sample.mm_refs.images if sample.mm_refs else []
    cut = len(sample.token_ids)
    if cut > seq_len:
        straddling = [ref.offset for ref in refs if ref.offset + ref.length > seq_len]
        cut = min([seq_len, *straddling])
    kept = tuple((ref.hash, ref.offset, ref.length) for ref in refs if ref.offset + ref.length <= cut)
    return tuple(sample.token_ids[:cut]), tuple(sample.mask[:cut]), kept


def segments(micro_batch: MicroBatch) -> list[tuple[tuple[int, ...], tuple[bool, ...], tuple[object, ...]]]:
    """Cut a micro batch back apart by ``seq_lens``, dropping the padding, refs shifted back."""
    padding = len(micro_batch.env_names) - len(micro_batch.env_names[: _real_end(micro_batch)])
    lengths = [*micro_batch.seq_lens[:-1], micro_batch.seq_lens[-1] - padding]
    refs = micro_batch.mm_refs.images if micro_batch.mm_refs else []
    out = []
    start = 0
    for length in lengths:
        end = start + length
        kept = tuple((r.hash, r.offset - start, r.length) for r in refs if start <= r.offset < end)
        out.append((tuple(micro_batch.input_ids[start:end]), tuple(micro_batch.loss_mask[start:end]), kept))
        start = end
    return out


def _real_end(micro_batch: MicroBatch) -> int:
    # Generated env names are never empty, so the padding is exactly the trailing "" names.
    end = len(micro_batch.env_names)
    while end and micro_batch.env_names[end - 1] == "":
        end -= 1
    return end


def assert_invariants(micro_batch: MicroBatch, seq_len: int, pad_multiple: int) -> None:
    n = len(micro_batch.input_ids)
    for name in PER_TOKEN:
        values = getattr(micro_batch, name)
        assert values is None or len(values) == n, name
    assert n % pad_multiple == 0 and n < seq_len + pad_multiple
    assert sum(micro_batch.sequence_lengths) == n and micro_batch.seq_lens == micro_batch.sequence_lengths
    assert micro_batch.lora_num_tokens == [n]
    expected_positions = [p for length in micro_batch.sequence_lengths for p in range(length)]
    real = sum(micro_batch.sequence_lengths[:-1])
    assert micro_batch.position_ids[:real] == expected_positions[:real]
    refs = micro_batch.mm_refs.images if micro_batch.mm_refs else []
    assert len({ref.item["family"] for ref in refs}) <= 1
    previous_end = 0
    for ref in refs:
        assert previous_end <= ref.offset and ref.offset + ref.length <= n
        assert micro_batch.mm_token_type_ids[ref.offset : ref.offset + ref.length] == [1] * ref.length
        previous_end = ref.offset + ref.length
    if refs:
        assert sum(micro_batch.mm_token_type_ids) == sum(ref.length for ref in refs)


@settings(max_examples=60, deadline=None)
@given(
    batch=batches(),
    seq_len=st.integers(9, 60),
    pad_multiple=st.sampled_from([1, 2, 4]),
    world_size=st.integers(1, 3),
)
def test_packing_keeps_every_invariant_and_loses_nothing(
    batch: list[TrainingSample], seq_len: int, pad_multiple: int, world_size: int
) -> None:
    options = PackOptions(seq_len=seq_len, pad_multiple=pad_multiple, world_size=world_size)
    ranks, report = pack_batch(TrainingBatch(batch, 0), options, step=0)

    assert len(ranks) == world_size and len({len(rank) for rank in ranks}) == 1
    for k in range(len(ranks[0])):
        assert len({rank[k].mm_refs is not None for rank in ranks}) == 1
    real = []
    for micro_batch in (mb for rank in ranks for mb in rank):
        assert_invariants(micro_batch, seq_len, pad_multiple)
        # Every real sample trains its first token, so the all-false micro batches are the dummies.
        if any(micro_batch.loss_mask):
            real += segments(micro_batch)
    assert Counter(real) == Counter(truncated(sample, seq_len) for sample in batch)
    assert sum(not any(mb.loss_mask) for rank in ranks for mb in rank) == report.dummies
