"""Image spans in token space: type ids, and the checks every stage shares.

The refs stage raises on the first problem, packing checks its output with the
same rules, and audit counts them all: one definition keeps them agreeing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Token type ids (contract.md section 6): text, image and video tokens.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2
# Runs of tokens shown on each side of the problem in a token window.
WINDOW_RUNS = 3


def order_problem(offset: int, previous_end: int) -> str | None:
    """Return why an image span starting at ``offset`` is out of token order or overlaps, if it does."""
    if offset < previous_end:
        return f"Expected placeholders in token order without overlap, got offset {offset} before the previous end {previous_end}"
    return None


def type_ids_from_tokens(token_ids: Sequence[int], token_types: dict[int, int]) -> list[int]:
    """Map each token through a family's token-type map (unknown tokens are text, 0)."""
    if not token_types:
        return [TEXT_TYPE] * len(token_ids)
    tokens = np.asarray(token_ids, dtype=np.int64)
    types = np.zeros(len(tokens), dtype=np.int64)
    for token_id, kind in token_types.items():
        types[tokens == token_id] = kind
    return types.tolist()


def type_ids_from_spans(num_tokens: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Derive type ids from placeholder spans alone, for when no token-type map is known."""
    types = [TEXT_TYPE] * num_tokens
    for offset, length in spans:
        types[offset : offset + length] = [IMAGE_TYPE] * length
    return types


@dataclass(frozen=True, slots=True)
class SpanProblem:
    """One disagreement between placeholder spans and type ids.

    ``kind`` is ``"placeholder"`` (a span that is not all image-typed, or lies
    outside the tokens) or ``"stray"`` (an image-typed token outside every span).
    ``message`` ends with ``window``, the tokens around the problem, when the
    tokens were given.
    """

    kind: str
    message: str
    image: int | None = None
    position: int | None = None
    window: str | None = None


def run_edges(streams: Sequence[Sequence[object] | np.ndarray], cuts: Iterable[int] = ()) -> list[int]:
    """Return where runs start, then the end: a run is a stretch equal in every stream.

    Args:
        streams: Equal-length per-token arrays (tokens, mask, type ids...).
        cuts: Positions where a run must start anyway (clamped into the tokens).

    Returns:
        Sorted positions ``[0, ..., n]``: run ``k`` is ``[edges[k], edges[k + 1])``.
    """
    n = len(streams[0])
    edges = {0, n, *(min(max(cut, 0), n) for cut in cuts)}
    for stream in streams:
        values = np.asarray(stream)
        edges |= set((np.flatnonzero(values[1:] != values[:-1]) + 1).tolist())
    return sorted(edges)


def token_window(
    token_ids: Sequence[int],
    position: int,
    span: tuple[int, int] | None = None,
    token_names: Mapping[int, str] | None = None,
    runs: int = WINDOW_RUNS,
) -> str:
    """Show the tokens around ``position`` as runs, so an off-by-one is visible in a message.

    Equal neighbours collapse to ``<|image_pad|> x879``; ``>>t<<`` marks the token at
    ``position``; ``[`` and ``]`` mark where ``span`` (offset, length) starts and ends;
    ``...`` stands for tokens left out. Tokens without a name print as their id.

    Args:
        token_ids: The sample's or micro batch's tokens.
        position: The token to centre on (clamped into the tokens).
        span: The placeholder span concerned, if any.
        token_names: Token id to name (default: none; callers pass `families.DEFAULT_TOKEN_NAMES`).
        runs: How many runs to show on each side of the marked token.

    Returns:
        One line, e.g. ``... <|vision_start|> [ <|image_pad|> x879 >><|vision_end|><< ] 10 ...``.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    if len(tokens) == 0:
        return "(no tokens)"
    names = token_names or {}
    position = min(max(position, 0), len(tokens) - 1)
    cuts = [position, position + 1]
    if span is not None:
        cuts += [span[0], span[0] + span[1]]
    edges = run_edges([tokens], cuts)
    starts = edges[:-1]
    centre = starts.index(position)
    first, last = max(centre - runs, 0), min(centre + runs, len(starts) - 1)
    words = ["..."] if first > 0 else []
    for index in range(first, last + 1):
        start, end = starts[index], edges[index + 1]
        if span is not None and start == span[0]:
            words.append("[")
        token = int(tokens[start])
        word = names.get(token, str(token))
        words.append(f">>{word}<<" if start == position else word)
        if end - start > 1:
            words.append(f"x{end - start}")
        if span is not None and end == span[0] + span[1]:
            words.append("]")
    if last < len(starts) - 1:
        words.append("...")
    return " ".join(words)


def span_problems(
    type_ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    token_ids: Sequence[int] | None = None,
    token_names: Mapping[int, str] | None = None,
) -> list[SpanProblem]:
    """Check that every span is image-typed and no image-typed token lies outside the spans.

    Args:
        type_ids: One type id per token.
        spans: The placeholder spans, (offset, length) per image.
        token_ids: The tokens; when given, each message ends with a window of them
            around the problem (see ``token_window``).
        token_names: Token names for the window (default: none).

    Returns:
        Every problem, spans first in image order, then stray image tokens.
    """

    def problem(
        kind: str,
        message: str,
        image: int | None,
        position: int | None,
        at: int,
        span: tuple[int, int] | None,
    ) -> SpanProblem:
        if token_ids is None:
            return SpanProblem(kind, message, image, position)
        window = token_window(token_ids, at, span, token_names)
        return SpanProblem(kind, f"{message}: {window}", image, position, window)

    types = np.asarray(type_ids, dtype=np.int64)
    covered = np.zeros(len(types), dtype=bool)
    problems: list[SpanProblem] = []
    for index, (offset, length) in enumerate(spans):
        end = offset + length
        if offset < 0 or end > len(types):
            message = f"span [{offset}, {end}) outside the {len(types)} tokens"
            problems.append(problem("placeholder", message, index, None, end - 1, (offset, length)))
            continue
        covered[offset:end] = True
        not_image = np.flatnonzero(types[offset:end] != IMAGE_TYPE)
        if len(not_image):
            position = offset + int(not_image[0])
            message = (
                f"span [{offset}, {end}) is not all image tokens: token {position} has type "
                f"{int(types[position])}"
            )
            problems.append(problem("placeholder", message, index, position, position, (offset, length)))
    stray = np.flatnonzero((types == IMAGE_TYPE) & ~covered).tolist()
    for number, position in enumerate(stray):
        message = f"image token at position {position} outside every placeholder"
        if number > 0:
            # Only the first gets a window: callers quote the first.
            problems.append(SpanProblem("stray", message, None, position))
            continue
        # The nearest span is shown with it, so a span shifted off its pads is visible.
        near = min(spans, key=lambda span: abs(span[0] - position), default=None)
        problems.append(problem("stray", message, None, position, position, near))
    return problems
