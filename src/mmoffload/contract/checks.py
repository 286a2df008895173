"""Checks of the contract written once: each returns its problems as data, in one wording.

A stage raises the first problem (refs, pack, materialize) or counts them all
(audit); the message is the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmoffload.contract.descriptors import HASH_PATTERN, descriptor_uri
from mmoffload.contract.spans import order_problem, span_problems
from mmoffload.contract.wire import MICRO_BATCH_PER_TOKEN_FIELDS, MICRO_BATCH_TOTAL_FIELDS, MicroBatch
from mmoffload.errors import IntegrityError, Where


def per_token_problem(name: str, values: Sequence[object] | None, num_tokens: int) -> str | None:
    """Return why a per-token stream does not have one value per token, if it does not."""
    if values is not None and len(values) != num_tokens:
        return f"Expected `{name}` with one value per token ({num_tokens}), got {len(values)}"
    return None


def total_problem(name: str, values: Sequence[int] | None, num_tokens: int) -> str | None:
    """Return why per-sequence lengths do not add up to the tokens, if they do not."""
    if values is not None and sum(values) != num_tokens:
        return f"Expected sum(`{name}`) == {num_tokens} tokens, got {sum(values)}"
    return None


def length_problems(
    num_tokens: int,
    per_token: Mapping[str, Sequence[object] | None],
    totals: Mapping[str, Sequence[int] | None] | None = None,
) -> list[str]:
    """Return every per-token stream and every total that disagrees with the token count."""
    problems = [per_token_problem(name, values, num_tokens) for name, values in per_token.items()]
    problems += [total_problem(name, values, num_tokens) for name, values in (totals or {}).items()]
    return [problem for problem in problems if problem is not None]


def ref_problems(item: dict[str, Any], digest: str, uri: str, offset: int, previous_end: int) -> list[str]:
    """Return what is wrong with a ref itself (its fields against each other and the previous ref)."""
    problems: list[str] = []
    if descriptor_uri(item) != uri:
        problems.append("Expected the ref's `uri` to equal its descriptor's `raw_image_uri`")
    if not HASH_PATTERN.fullmatch(digest):
        problems.append(f"Expected the ref's `hash` as 32 lowercase hex digits, got `{digest[:40]}`")
    if problem := order_problem(offset, previous_end):
        problems.append(problem)
    return problems


def check_micro_batch(
    micro_batch: MicroBatch, where: Where | None = None, token_names: Mapping[int, str] | None = None
) -> None:
    """Check packing.md section 3's invariants on a micro batch.

    Args:
        micro_batch: the micro batch.
        where: where it is (file, index), for the error.
        token_names: token id to name, for the token window of a span problem.

    Raises:
        IntegrityError: a per-token array of the wrong length, lengths that do not sum
            to the tokens, or a ref outside the micro batch or on non-image tokens.
    """
    n = len(micro_batch.input_ids)
    problems = length_problems(
        n,
        {name: getattr(micro_batch, name) for name in MICRO_BATCH_PER_TOKEN_FIELDS},
        {name: getattr(micro_batch, name) for name in MICRO_BATCH_TOTAL_FIELDS},
    )
    if problems:
        raise IntegrityError(problems[0], where)
    if micro_batch.mm_refs is None:
        return
    if micro_batch.mm_token_type_ids is None:
        raise IntegrityError("Expected `mm_token_type_ids` in a micro batch with refs, got none", where)
    spans = [(ref.offset, ref.length) for ref in micro_batch.mm_refs.images]
    span_problem = next(
        iter(span_problems(micro_batch.mm_token_type_ids, spans, micro_batch.input_ids, token_names)), None
    )
    if span_problem is not None:
        at = where.at(image=span_problem.image) if where else Where(image=span_problem.image)
        raise IntegrityError(f"Expected image refs on image-typed tokens: {span_problem.message}", at)
