"""Packing follows packing.md sections 1, 2, 4 and 5 exactly: checked against a plain reference.

The reference below is written from the spec text alone, as directly as it reads, with
none of the packer's helpers and no care for speed. Random batches of three families
(images straddling the cut, leading images longer than seq_len, optional streams,
routed experts) at world sizes 1-8 and pad multiples 1-4 must give rank files whose
layout (which samples, cut to what length, in which micro batch of which rank, padded
how, and where the dummies are) is the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmoffload.contract.wire import MicroBatch, MMRefs, RoutedExperts, TrainingBatch, TrainingSample
from mmoffload.errors import BadInputError
from mmoffload.pack import PackOptions, pack_batch, partition
from tests.builders import place_images

# --- The reference, from the spec text -------------------------------------------------------


def ref_cost(lengths: list[int], b: float) -> float:
    """Section 5: cost(lengths) = a * sum(n) + b * sum(n * n), a = 1."""
    if not b:
        return sum(lengths)
    return sum(lengths) + b * sum(n * n for n in lengths)


@dataclass
class RefPiece:
    index: int
    length: int
    family: str | None  # None: a text sample (no refs left after the cut)
    routed: bool


class RefError(Exception):
    """The sample cannot be packed (section 1: the cut would be 0)."""


def ref_truncate(index: int, sample: TrainingSample, seq_len: int) -> RefPiece:
    """Section 1: keep images ending by seq_len; cut at the first straddling image's offset."""
    n = len(sample.token_ids)
    refs = sorted(sample.mm_refs.images, key=lambda r: r.offset) if sample.mm_refs else []
    cut = n
    if n > seq_len:
        cut = seq_len
        for ref in refs:
            if ref.offset + ref.length > seq_len:
                if ref.offset < seq_len:
                    cut = ref.offset
                break
        if cut == 0:
            raise RefError
    kept = [ref for ref in refs if ref.offset + ref.length <= cut]
    family = kept[0].item["family"] if kept else None
    return RefPiece(index, cut, family, sample.routed_experts is not None)


def ref_bins(pieces: list[RefPiece], seq_len: int, world_size: int, b: float) -> list[list[RefPiece]]:
    """Section 2 and 5: first fit longest first (stable), then split for the ranks."""
    bins: list[list[RefPiece]] = []
    for piece in sorted(pieces, key=lambda p: -p.length):
        for members in bins:
            fits = sum(m.length for m in members) + piece.length <= seq_len
            same_routing = all(m.routed == piece.routed for m in members)
            bin_families = {m.family for m in members if m.family is not None}
            families_ok = not bin_families or piece.family is None or bin_families == {piece.family}
            if fits and same_routing and families_ok:
                members.append(piece)
                break
        else:
            bins.append([piece])
    if world_size > 1:
        target = max(-(-len(bins) // world_size) * world_size, world_size)
        while len(bins) < target:
            candidates = [
                (ref_cost([m.length for m in members], b), number)
                for number, members in enumerate(bins)
                if len(members) > 1 and all(m.family is None for m in members)
            ]
            if not candidates:
                break
            _, number = max(candidates)
            left: list[RefPiece] = []
            right: list[RefPiece] = []
            left_cost = right_cost = 0.0
            for piece in sorted(bins[number], key=lambda p: -ref_cost([p.length], b)):
                if left_cost <= right_cost:
                    left.append(piece)
                    left_cost += ref_cost([piece.length], b)
                else:
                    right.append(piece)
                    right_cost += ref_cost([piece.length], b)
            bins[number] = left
            bins.append(right)
    return bins


def ref_partition(w: list[float], world_size: int) -> list[list[int]]:
    """Section 5: Karmarkar-Karp over chunks of W, items ascending, then swaps in place (no re-sort)."""
    pairs = sorted((w[i], i) for i in range(len(w)))
    states = []
    for start in range(0, len(pairs), world_size):
        sets = [(weight, [i]) for weight, i in pairs[start : start + world_size]]
        states.append(sorted(sets, reverse=True))
    while len(states) > 1:
        states.sort(key=lambda sets: (sets[0][0] - sets[-1][0], sets[0]), reverse=True)
        first, second, rest = states[0], states[1], states[2:]
        merged = [
            (first[i][0] + second[world_size - 1 - i][0], first[i][1] + second[world_size - 1 - i][1])
            for i in range(world_size)
        ]
        states = [*rest, sorted(merged, reverse=True)]
    parts = [sorted(items) for _, items in states[0]]
    loads = [sum(w[i] for i in part) for part in parts]
    while True:
        best = None
        best_score = (max(loads), max(loads) - min(loads))
        for left in range(world_size):
            for right in range(left + 1, world_size):
                for a in range(len(parts[left])):
                    for c in range(len(parts[right])):
                        new = list(loads)
                        new[left] = loads[left] - w[parts[left][a]] + w[parts[right][c]]
                        new[right] = loads[right] - w[parts[right][c]] + w[parts[left][a]]
                        score = (max(new), max(new) - min(new))
                        if score < best_score:
                            best_score, best = score, (left, right, a, c, new)
        if best is None:
            return parts
        left, right, a, c, loads = best
        parts[left][a], parts[right][c] = parts[right][c], parts[left][a]


Layout = tuple[bool, tuple[tuple[int, int], ...], int]  # (dummy, ((sample, length), ...), tokens)


def ref_layout(
    batch: list[TrainingSample], seq_len: int, pad: int, world_size: int, b: float
) -> list[list[Layout]]:
    """Sections 3 and 4: pad each bin, group by modality, add dummies, partition each group."""
    pieces = [ref_truncate(i, sample, seq_len) for i, sample in enumerate(batch)]
    bins = ref_bins(pieces, seq_len, world_size, b)
    ranks: list[list[Layout]] = [[] for _ in range(world_size)]
    multimodal = [members for members in bins if any(m.family is not None for m in members)]
    text = [members for members in bins if all(m.family is None for m in members)]
    for group in (multimodal, text):
        if not group:
            continue
        layouts = []
        weights = []
        for members in group:
            lengths = [m.length for m in members]
            padding = -sum(lengths) % pad
            layouts.append((False, tuple((m.index, m.length) for m in members), sum(lengths) + padding))
            weights.append(ref_cost([*lengths[:-1], lengths[-1] + padding], b))
        missing = -len(group) % world_size
        layouts += [(True, *layouts[0][1:])] * missing
        weights += [weights[0]] * missing
        for rank, items in enumerate(ref_partition(weights, world_size)):
            ranks[rank] += [layouts[i] for i in items]
    return ranks


# --- What the packer wrote, read back --------------------------------------------------------


def layout(micro_batch: MicroBatch) -> Layout:
    """Read a micro batch back: samples by their (unique) env names, padding stripped."""
    padding = 0
    while padding < len(micro_batch.env_names) and micro_batch.env_names[-1 - padding] == "":
        padding += 1
    lengths = [*micro_batch.sequence_lengths[:-1], micro_batch.sequence_lengths[-1] - padding]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    segments = tuple((int(micro_batch.env_names[s][1:]), n) for s, n in zip(starts, lengths, strict=True))
    return (not any(micro_batch.loss_mask), segments, len(micro_batch.input_ids))


# --- Random batches ------------------------------------------------------------------------


@st.composite
def samples(draw: st.DrawFn, index: int, leading: bool) -> TrainingSample:
    """A sample of 1-40 tokens; its env name names it and its first token is trainable."""
    # Lengths from a few values half of the time, so that equal costs (the tie-breaks) are common.
    n = draw(st.sampled_from([2, 4, 8, 12]) | st.integers(1, 40))
    family = draw(st.sampled_from([None, None, "qwen_vl", "kimi_k25"]))
    tokens = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
    spans: list[tuple[int, int]] = []
    if family is not None:
        position = 0
        # 0: a leading image, maybe longer than seq_len (then the batch is an error).
        first_gap = draw(st.sampled_from([0, 1, 3] if leading else [1, 3]))
        for number, (gap, length) in enumerate(
            draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 12)), max_size=4))
        ):
            gap = first_gap if number == 0 else gap
            length = 1 if family == "kimi_k25" else length
            if position + gap + length > n:
                break
            spans.append((position + gap, length))
            position += gap + length
    type_ids, refs = place_images(tokens, spans, family, index) if family else ([0] * n, [])
    floats = st.lists(st.floats(-4, 4, width=32), min_size=n, max_size=n)
    routed = draw(st.booleans()) and draw(st.booleans())
    return TrainingSample(
        token_ids=tokens,
        mask=[True, *draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))],
        logprobs=draw(floats),
        temperatures=[1.0] * n,
        env_name=f"s{index}",
        ref_logprobs=draw(st.none() | floats),
        mm_refs=MMRefs(refs) if refs else None,
        mm_token_type_ids=type_ids if refs else None,
        rl_weights=draw(st.none() | floats),
        advantages=draw(st.none() | floats),
        routed_experts=RoutedExperts(bytes(range(n)), [n, 1, 1], "uint8") if routed else None,
    )


@st.composite
def batches(draw: st.DrawFn) -> list[TrainingSample]:
    leading = draw(st.integers(0, 4)) == 0  # most batches can be packed
    return [draw(samples(index, leading)) for index in range(draw(st.integers(0, 24)))]


@settings(max_examples=200, deadline=None)
@given(
    batch=batches(),
    seq_len=st.integers(4, 48),
    pad_multiple=st.integers(1, 4),
    world_size=st.integers(1, 8),
    attention_weight=st.sampled_from([0.0, 0.0, 0.01, 1.5]),
)
def test_rank_files_are_laid_out_as_the_spec_says(
    batch: list[TrainingSample], seq_len: int, pad_multiple: int, world_size: int, attention_weight: float
) -> None:
    options = PackOptions(
        seq_len=seq_len, pad_multiple=pad_multiple, world_size=world_size, attention_weight=attention_weight
    )
    try:
        expected = ref_layout(batch, seq_len, pad_multiple, world_size, attention_weight)
    except RefError:
        with pytest.raises(BadInputError, match="first image to fit"):
            pack_batch(TrainingBatch(batch, 0), options, step=0)
        return
    ranks, _ = pack_batch(TrainingBatch(batch, 0), options, step=0)

    assert [[layout(mb) for mb in rank] for rank in ranks] == expected


weights = st.lists(st.integers(1, 5000), min_size=1, max_size=64) | st.lists(
    st.floats(1, 1e6, allow_nan=False), min_size=1, max_size=64
)


@settings(max_examples=300, deadline=None)
@given(weights=weights, world_size=st.integers(1, 8))
def test_partition_is_the_reference_and_best_is_never_heavier(weights: list[float], world_size: int) -> None:
    weights = weights[: len(weights) // world_size * world_size] or weights[:1] * world_size
    exact = partition(weights, world_size)
    best = partition(weights, world_size, "best")

    assert exact == ref_partition(weights, world_size)
    heaviest = [max(sum(weights[i] for i in items) for items in ranks) for ranks in (exact, best)]
    assert heaviest[1] <= heaviest[0]
    assert sorted(i for items in best for i in items) == list(range(len(weights)))
    assert all(len(items) == len(weights) // world_size for items in best)
