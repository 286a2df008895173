"""How a packed micro batch is laid out (packing.md section 4): its padding, and a step's fill ratio.

Padding extends the last sequence (``sequence_lengths`` counts it there) and its
positions start again at 0, so the padding of a micro batch is the run of tokens
after the last position reset inside its last sequence. The ``env_names`` of
padding are ``""``, but so are those of every sample ``refs`` gave no env name:
the layout, not the names, tells padding.
"""

from __future__ import annotations

from mmoffload.contract.wire import MicroBatch


def padding_tokens(micro_batch: MicroBatch) -> int:
    """Return how many tokens at the end of ``micro_batch`` are padding."""
    if not micro_batch.sequence_lengths:
        return 0
    start = len(micro_batch.input_ids) - micro_batch.sequence_lengths[-1]
    positions = micro_batch.position_ids[start:]
    for index in range(len(positions) - 1, 0, -1):
        if positions[index] == 0:
            return len(positions) - index
    return 0


def fill_ratio(real_tokens: int, micro_batches: int, seq_len: int) -> float:
    """Return the share of the trainer's token budget (``seq_len`` per micro batch, dummies included)
    that holds real tokens: the one definition `pack` reports and `audit --html` plots."""
    budget = micro_batches * seq_len
    return real_tokens / budget if budget else 0.0
