"""One sample or micro batch as a self-contained HTML page: every image on its token span.

The page (docs/inspect.md) needs no network and no script: images are inlined
as small JPEG thumbnails, styles are inline. It shows the token stream (decoded
when a tokenizer is known, else ids) with colour bands for the loss mask,
sequence boundaries, padding, dummy micro batches and image-typed tokens; each
image as a card at its span, with what the family expects there; and every
problem ``audit`` reports for the record, marked where it is.

Stable hooks for tools and tests: ``figure.image-span[data-image]`` per image
(``data-offset``, ``data-length``), ``.t[data-pos]`` per token run
(``data-count`` tokens), ``.problem[data-problem]`` on what a problem points
at, and ``li.problem-item`` (``data-kind``, ``data-position``, ``data-image``)
in the list of problems.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import msgspec

from mmoffload.audit import Violation, audit_record
from mmoffload.contract.spans import IMAGE_TYPE
from mmoffload.families import Families
from mmoffload.views.page_parts import facts, page, read_image
from mmoffload.views.show import Selected
from mmoffload.views.token_stream import Tokens, TokenText, legend, selected_tokens, stream


class InspectReport(msgspec.Struct):
    """What an inspect page shows: the record, its size, and every problem marked on it."""

    file: str
    type: str
    index: int
    step: int | None
    rank: int | None
    tokens: int
    images: int
    problem_count: int
    problems: list[Violation]
    ok: bool


def inspect_page(
    selected: Selected, families: Families, text: TokenText | None = None
) -> tuple[str, InspectReport]:
    """Return the HTML page of one sample or micro batch, and what it shows.

    Args:
        selected: The record and where it came from (``show.select``).
        families: The families that give each image's expected placeholder length and input size.
        text: Display text of tokens (default: the families' special-token names, else ids).

    Returns:
        The page (one self-contained HTML document) and its report.
    """
    text = text or TokenText.for_model(families)
    tokens = selected_tokens(selected)
    violations = audit_record(
        str(selected.file), selected.index, selected.record, families=families
    ).violations
    images = [read_image(ref.uri) for ref in tokens.refs]
    problems = list(violations)
    for number, image in enumerate(images):
        # Audit stats and hashes the file; a page also needs it to decode.
        if image.problem and image.stored_bytes is not None:
            problems.append(
                Violation(
                    str(selected.file), selected.index, image.problem, "undecodable_image", image=number
                )
            )
    image_marks: dict[int, list[int]] = {}
    for number, problem in enumerate(problems):
        if problem.position is not None and 0 <= problem.position < len(tokens.ids):
            tokens.marks.setdefault(problem.position, []).append(number)
        if problem.image is not None:
            image_marks.setdefault(problem.image, []).append(number)
    title = _title(selected)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<div class='where'>{html.escape(str(selected.file))}</div>",
        _summary(tokens, text),
    ]
    if tokens.dummy:
        body.append(
            "<div class='banner dummy'>Dummy micro batch: the loss mask is all false, it trains nothing.</div>"
        )
    body.append(_problem_list(problems))
    body.append(legend())
    body.append("<h2>Tokens</h2>")
    body.append(
        f"<div class='tokens' id='tokens'>{stream(tokens, images, image_marks, families, text)}</div>"
    )
    report = InspectReport(
        file=str(selected.file),
        type=selected.kind,
        index=selected.index,
        step=selected.step,
        rank=selected.rank,
        tokens=len(tokens.ids),
        images=len(tokens.refs),
        problem_count=len(problems),
        problems=problems,
        ok=not problems,
    )
    return page(title, "\n".join(body)), report


def _title(selected: Selected) -> str:
    parts = [f"{selected.kind} {selected.index}"]
    if selected.rank is not None:
        parts.append(f"rank {selected.rank}")
    if selected.step is not None:
        parts.append(f"step {selected.step}")
    return " · ".join(parts)


def _summary(tokens: Tokens, text: TokenText) -> str:
    image_tokens = sum(1 for kind in tokens.types if kind == IMAGE_TYPE)
    return facts(
        [
            ("tokens", f"{len(tokens.ids):,}"),
            ("trained (loss mask)", f"{sum(tokens.mask):,}"),
            ("sequences", len(tokens.sequence_starts)),
            ("padding", f"{sum(tokens.padding):,}"),
            ("images", len(tokens.refs)),
            ("image-typed tokens", f"{image_tokens:,}"),
            (
                "token text",
                "decoded with the model's tokenizer" if text.decodes else "ids (special tokens named)",
            ),
        ]
    )


def _problem_list(problems: Sequence[Violation]) -> str:
    if not problems:
        return "<h2 class='ok' id='problems'>No problems</h2>"
    items = []
    for number, problem in enumerate(problems):
        if problem.position is not None:
            target, where = f"#tok-{problem.position}", f"token {problem.position}"
        elif problem.image is not None:
            target, where = f"#img-{problem.image}", f"image {problem.image}"
        else:
            target, where = "#tokens", "record"
        data = f" data-kind='{problem.kind}' data-problem='{number}'"
        if problem.position is not None:
            data += f" data-position='{problem.position}'"
        if problem.image is not None:
            data += f" data-image='{problem.image}'"
        items.append(
            f"<li class='problem-item'{data}><a href='{target}'><code>{html.escape(problem.kind)}</code> "
            f"at {where}</a>: {html.escape(problem.reason)}</li>"
        )
    count = len(problems)
    return f"<h2 class='bad' id='problems'>{count} problem{'s' * (count != 1)}</h2><ol class='problems'>{''.join(items)}</ol>"
