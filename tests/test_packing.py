"""The pack stage: samples to per-rank micro batches (packing.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from mmoffload.contract.wire import (
    RANK_FILE_DECODER,
    MicroBatch,
    MMImageRef,
    MMRefs,
    RoutedExperts,
    TrainingBatch,
    TrainingSample,
)
from mmoffload.errors import BadInputError, IntegrityError, UsageError
from mmoffload.pack import PackOptions, pack_batch, pack_run, partition
from tests.builders import QWEN_IMAGE_PAD, QWEN_VISION_START, descriptor, qwen_sample, write_run

KIMI_PAD = 163605


def text_sample(n: int, first: int = 100, env_name: str = "chat") -> TrainingSample:
    """A text sample of ``n`` tokens ``first..first+n-1``, trainable on its last token."""
    return TrainingSample(
        token_ids=list(range(first, first + n)),
        mask=[False] * (n - 1) + [True],
        logprobs=[0.0] * (n - 1) + [-1.0],
        temperatures=[0.8] * n,
        env_name=env_name,
        advantages=[0.5] * n,
    )


def kimi_sample() -> TrainingSample:
    """A Kimi K2.5 sample: one image, one media pad at offset 3."""
    uri = "file:///assets/" + "a" * 32 + ".png"
    tokens = [5, 163602, 163603, KIMI_PAD, 163604, 6]
    ref = MMImageRef(descriptor(uri, [1, 4, 4], "kimi_k25"), "a" * 32, uri, 3, 1)
    return TrainingSample(
        token_ids=tokens,
        mask=[False] * 5 + [True],
        logprobs=[0.0] * 5 + [-0.2],
        temperatures=[1.0] * 6,
        env_name="kimi",
        mm_refs=MMRefs([ref]),
        mm_token_type_ids=[0, 0, 0, 1, 0, 0],
    )


def pack(samples: list[TrainingSample], **options: int) -> tuple[list[list[MicroBatch]], object]:
    return pack_batch(TrainingBatch(samples, 0), PackOptions(**options), step=0)


def spans(micro_batch: MicroBatch) -> list[tuple[int, int]]:
    return [(ref.offset, ref.length) for ref in micro_batch.mm_refs.images] if micro_batch.mm_refs else []


def test_a_sample_becomes_a_single_sample_micro_batch(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path, seeds=(0,))
    ((micro_batch,),), report = pack([sample], seq_len=64)

    n = len(sample.token_ids)
    assert micro_batch.input_ids == sample.token_ids
    assert micro_batch.loss_mask == sample.mask
    assert micro_batch.inference_logprobs == sample.logprobs
    assert micro_batch.advantages == [0.0] * n
    assert micro_batch.position_ids == list(range(n))
    assert micro_batch.sequence_lengths == micro_batch.seq_lens == micro_batch.lora_num_tokens == [n]
    assert micro_batch.env_names == ["browse"] * n
    assert micro_batch.mm_refs == sample.mm_refs
    assert micro_batch.mm_token_type_ids == sample.mm_token_type_ids
    assert micro_batch.ref_logprobs is None and micro_batch.rl_weights is None
    assert report.fill_ratio == n / 64


def test_truncation_never_splits_an_image(tmp_path: Path) -> None:
    # Tokens: 1 2 | start pad*4 end 3 | start pad*4 end 3 ; image 1 spans [10, 14).
    sample = qwen_sample(tmp_path, seeds=(0, 1))
    ((micro_batch,),), report = pack([sample], seq_len=12)

    assert micro_batch.input_ids == sample.token_ids[:10]
    assert spans(micro_batch) == [(3, 4)]
    assert micro_batch.mm_token_type_ids == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    # 16 tokens cut to 10: the second image and the only trainable (last) token are lost.
    figures = (report.samples_truncated, report.tokens_dropped, report.trainable_tokens_dropped)
    assert figures == (1, 6, 1)
    assert (report.images_dropped, report.trainable_tokens, report.trainable_fraction_dropped) == (1, 1, 1.0)


def test_truncation_keeps_an_image_that_ends_at_seq_len(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path, seeds=(0, 1))
    ((micro_batch,),), _ = pack([sample], seq_len=14)

    assert len(micro_batch.input_ids) == 14
    assert spans(micro_batch) == [(3, 4), (10, 4)]


def test_a_leading_image_that_does_not_fit_names_the_sample(tmp_path: Path) -> None:
    leading = qwen_sample(tmp_path, seeds=(0,))
    leading.token_ids = leading.token_ids[3:]  # starts with the 4 image pads
    for name in ("mask", "logprobs", "temperatures", "mm_token_type_ids"):
        setattr(leading, name, getattr(leading, name)[3:])
    leading.mm_refs.images[0].offset = 0
    with pytest.raises(
        BadInputError, match=r"first image to fit in seq_len 3, got image 0 at \[0, 4\)"
    ) as caught:
        pack([text_sample(2), leading], seq_len=3)
    assert "index 1" in str(caught.value)


def test_families_never_share_a_micro_batch(tmp_path: Path) -> None:
    ranks, _ = pack([qwen_sample(tmp_path, seeds=(0,)), kimi_sample()], seq_len=100)

    families = [{ref.item["family"] for ref in mb.mm_refs.images} for mb in ranks[0]]
    assert families == [{"qwen_vl"}, {"kimi_k25"}]


def test_text_packs_beside_images_and_refs_shift_by_the_sample_start(tmp_path: Path) -> None:
    image = qwen_sample(tmp_path, seeds=(0,))  # 9 tokens, image at [3, 7)
    ((micro_batch,),), _ = pack([image, text_sample(20)], seq_len=40)

    # Longest first: the text sample, then the image sample at 20.
    assert micro_batch.input_ids == list(range(100, 120)) + image.token_ids
    assert spans(micro_batch) == [(23, 4)]
    assert micro_batch.mm_token_type_ids == [0] * 20 + image.mm_token_type_ids
    assert micro_batch.position_ids == list(range(20)) + list(range(9))
    assert micro_batch.sequence_lengths == [20, 9]
    assert micro_batch.advantages == [0.5] * 20 + [0.0] * 9
    assert micro_batch.env_names == ["chat"] * 20 + ["browse"] * 9


def test_padding_extends_the_last_sequence(tmp_path: Path) -> None:
    image = qwen_sample(tmp_path, seeds=(0,))
    ((micro_batch,),), report = pack([image, text_sample(20)], seq_len=40, pad_multiple=8, pad_token_id=7)

    assert len(micro_batch.input_ids) == 32
    assert micro_batch.input_ids[29:] == [7, 7, 7]
    assert micro_batch.loss_mask[29:] == [False] * 3
    assert micro_batch.position_ids[29:] == [0, 1, 2]
    assert micro_batch.temperatures[29:] == [1.0] * 3
    assert micro_batch.env_names[29:] == [""] * 3
    assert micro_batch.mm_token_type_ids[29:] == [0] * 3
    assert micro_batch.sequence_lengths == micro_batch.seq_lens == [20, 12]
    assert micro_batch.lora_num_tokens == [32]
    assert spans(micro_batch) == [(23, 4)]
    assert report.padding_tokens == 3


def test_absent_streams_are_filled_when_one_sample_has_them() -> None:
    weighted = text_sample(3)
    weighted.rl_weights = [2.0, 2.0, 2.0]
    weighted.ref_logprobs = [-1.0, -1.0, -1.0]
    ((micro_batch,),), _ = pack([weighted, text_sample(2, first=200)], seq_len=10, pad_multiple=3)

    assert micro_batch.rl_weights == [2.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    assert micro_batch.ref_logprobs == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0]
    assert micro_batch.ce_weights is None and micro_batch.ref_kl_weights is None


def test_routed_experts_are_never_mixed_with_samples_without_them() -> None:
    routed = text_sample(2)
    routed.routed_experts = RoutedExperts(bytes(range(8)), [2, 2, 2], "uint8")
    ranks, _ = pack([routed, text_sample(2, first=200)], seq_len=10, pad_multiple=4)

    first, second = ranks[0]
    assert first.routed_experts == RoutedExperts(bytes(range(8)) + bytes(8), [4, 2, 2], "uint8")
    assert second.routed_experts is None


def test_dummies_keep_their_refs_and_train_nothing(tmp_path: Path) -> None:
    sample = qwen_sample(tmp_path, seeds=(0,))
    sample.rl_weights = [1.0] * len(sample.token_ids)
    sample.advantages = [0.3] * len(sample.token_ids)
    (rank0, rank1), report = pack([sample], seq_len=64, world_size=2)

    # Equal costs: Karmarkar-Karp puts the higher index (the dummy) on rank 0.
    (dummy,), (real,) = rank0, rank1
    assert dummy.mm_refs == real.mm_refs and dummy.input_ids == real.input_ids
    assert not any(dummy.loss_mask) and set(dummy.advantages) == {0.0}
    assert dummy.rl_weights is None and real.rl_weights is not None
    assert (report.dummies, report.micro_batches_per_rank) == (1, 1)


def test_the_kth_micro_batch_has_the_same_modality_on_every_rank(tmp_path: Path) -> None:
    images = [qwen_sample(tmp_path, seeds=(seed,)) for seed in range(3)]  # 9 tokens each
    texts = [text_sample(8, first=100 * k) for k in range(1, 3)]
    ranks, report = pack([*texts, *images], seq_len=9, world_size=2)

    assert [len(rank) for rank in ranks] == [3, 3]
    for k in range(3):
        assert len({mb.mm_refs is not None for mb in (ranks[0][k], ranks[1][k])}) == 1
    assert [mb.mm_refs is not None for mb in ranks[0]] == [True, True, False]
    assert report.dummies == 1


def test_text_bins_split_so_every_rank_gets_a_real_one() -> None:
    ranks, report = pack(
        [text_sample(5), text_sample(4, first=200), text_sample(3, first=300)], seq_len=100, world_size=2
    )

    assert [[len(mb.input_ids) for mb in rank] for rank in ranks] in ([[5], [7]], [[7], [5]])
    assert report.dummies == 0


def test_ranks_are_balanced_by_cost() -> None:
    samples = [text_sample(n, first=100 * n) for n in (10, 9, 2, 1)]
    ranks, _ = pack(samples, seq_len=10, world_size=2)

    assert sorted(sum(len(mb.input_ids) for mb in rank) for rank in ranks) == [11, 11]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: setattr(s, "mm_token_type_ids", None),
            "Expected `mm_token_type_ids` on a sample with `mm_refs`",
        ),
        (lambda s: s.mm_token_type_ids.pop(), "Expected `mm_token_type_ids` with one value per token"),
        (lambda s: setattr(s, "mm_kwargs", {}), "Expected no `mm_kwargs`"),
    ],
)
def test_a_sample_that_cannot_be_packed_is_named(
    tmp_path: Path, change: Callable[[TrainingSample], object], message: str
) -> None:
    sample = qwen_sample(tmp_path, seeds=(0,))
    change(sample)
    with pytest.raises(BadInputError, match=message) as caught:
        pack([text_sample(3), sample], seq_len=64)
    assert "index 1" in str(caught.value)


def test_pack_run_writes_one_file_per_rank_and_removes_stale_ranks(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [qwen_sample(tmp_path / "assets", seeds=(0,)), text_sample(4)])
    pack_run(run, PackOptions(seq_len=9, world_size=3))
    report = pack_run(run, PackOptions(seq_len=9, world_size=2))

    step = run / "rollouts" / "step_0"
    assert sorted(p.name for p in step.glob("rank_*.bin")) == ["rank_0.bin", "rank_1.bin"]
    ranks = [RANK_FILE_DECODER.decode((step / f"rank_{r}.bin").read_bytes()) for r in range(2)]
    assert [mb.mm_refs is not None for mb in ranks[0]] == [True, False]
    assert msgspec.structs.asdict(report.steps[0])["micro_batches_per_rank"] == 2


def test_pack_run_without_steps_says_to_run_refs_first(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="run `mmoffload refs` first"):
        pack_run(tmp_path, PackOptions(seq_len=8))


def test_image_tokens_are_what_the_refs_say() -> None:
    # A ref on text tokens is caught before writing (the sample lies about its spans).
    sample = text_sample(6)
    uri = "file:///x/" + "b" * 32 + ".png"
    sample.mm_refs = MMRefs([MMImageRef(descriptor(uri, [1, 2, 2]), "b" * 32, uri, 2, 1)])
    sample.mm_token_type_ids = [0, 0, 0, 0, 0, 0]
    with pytest.raises(IntegrityError, match="not all image tokens"):
        pack([sample], seq_len=8)


def test_a_sample_whose_images_were_all_cut_off_packs_as_text(tmp_path: Path) -> None:
    # packing.md 1, minimal case: 10 Qwen-VL tokens with the only image at [6, 10), seq_len 8.
    image = qwen_sample(tmp_path, seeds=(0,))  # 1 2 start pad*4 end 3: image at [3, 7)
    image.token_ids = [4, 5, 6, 1, 2, QWEN_VISION_START, *[QWEN_IMAGE_PAD] * 4]
    image.mm_refs.images[0].offset = 6
    image.mm_token_type_ids = [0] * 6 + [1] * 4
    image.mask = [False, True, True, False, True, True, False, False, False, False]
    image.logprobs = [0.0, -0.1, -0.2, 0.0, -0.3, -0.4, 0.0, 0.0, 0.0, 0.0]
    image.temperatures = [1.0] * 10
    (rank0, rank1), report = pack([image, text_sample(2, first=900)], seq_len=8, world_size=2)

    # Both are text now: one bin of 8, split for the two ranks; two real micro batches, no dummy.
    assert [mb.input_ids for mb in rank0] == [[4, 5, 6, 1, 2, QWEN_VISION_START]]
    assert [mb.input_ids for mb in rank1] == [[900, 901]]
    (cut,) = rank0
    assert cut.mm_refs is None and cut.mm_token_type_ids == [0] * 6
    assert cut.loss_mask == [False, True, True, False, True, True]
    assert cut.sequence_lengths == cut.seq_lens == cut.lora_num_tokens == [6]
    assert rank1[0].loss_mask == [False, True]
    assert (report.dummies, report.micro_batches_with_refs) == (0, 0)
    figures = (report.samples_truncated, report.tokens_dropped, report.trainable_tokens_dropped)
    assert figures == (1, 4, 0) and report.images_dropped == 1


def test_ranks_follow_karmarkar_karp_with_prime_rl_tie_breaks() -> None:
    # packing.md 5, minimal case: six 4-token samples, seq_len 8, world size 4.
    samples = [text_sample(4, first=100 * k) for k in range(1, 7)]
    ranks, report = pack(samples, seq_len=8, world_size=4)

    # First fit gives bins [1 2] [3 4] [5 6]; the highest-index bin of equal cost is split
    # into [5] and [6]; the partition of costs [8, 8, 4, 4] puts bins 1, 0, 3, 2 on ranks 0-3.
    first_tokens = [[mb.input_ids[::4] for mb in rank] for rank in ranks]
    assert first_tokens == [[[300, 400]], [[100, 200]], [[600]], [[500]]]
    assert [[mb.sequence_lengths for mb in rank] for rank in ranks] == [[[4, 4]], [[4, 4]], [[4]], [[4]]]
    assert report.dummies == 0


def test_swapped_micro_batches_keep_their_places_as_prime_rl_does() -> None:
    # packing.md 5, step 4: a swap puts the incoming item at the outgoing one's position and
    # nothing re-sorts, so rank 0 trains [15], [7], [6] in that order, as prime-rl's packer does.
    samples = [text_sample(n, first=100 * k) for k, n in enumerate((15, 10, 10, 8, 7, 6), start=1)]
    ranks, _ = pack(samples, seq_len=15, world_size=2, pad_multiple=1)

    assert [mb.sequence_lengths for mb in ranks[0]] == [[15], [7], [6]]


def test_balance_best_keeps_a_lighter_busiest_rank_when_there_is_one() -> None:
    weights = [4, 2, 4, 3, 1, 6, 4, 7, 2]  # total 33 over 3 ranks of 3
    exact = partition(weights, 3)
    best = partition(weights, 3, "best")

    assert exact == [[0, 1, 5], [3, 4, 7], [2, 6, 8]]  # loads 12, 11, 10
    # Greedy deals [7, 3, 8], [5, 6, 4], [0, 2, 1]; one swap (3 <-> 1) keeps each in its place.
    assert best == [[7, 1, 8], [5, 6, 4], [0, 2, 3]]  # loads 11, 11, 11
    assert partition([5, 5, 4, 4], 2, "best") == partition([5, 5, 4, 4], 2)  # ties go to the exact one
