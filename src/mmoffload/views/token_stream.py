"""A record's tokens drawn as text runs with each image on its span and every problem marked."""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmoffload.contract.spans import IMAGE_TYPE, VIDEO_TYPE, run_edges, type_ids_from_spans
from mmoffload.contract.wire import MicroBatch, MMImageRef
from mmoffload.errors import BadInputError
from mmoffload.extras import require
from mmoffload.families import DEFAULT_TOKEN_NAMES, Families
from mmoffload.families.base import read_added_tokens
from mmoffload.views.page_parts import COLLAPSE_FROM, ImageFile, facts, thumbnail_html
from mmoffload.views.show import Selected


class TokenText:
    """Turns token ids into display text: a tokenizer's when given, else names, else the id."""

    def __init__(self, names: dict[int, str], decode: Callable[[int], str] | None = None) -> None:
        self.names = names
        self.decode = decode
        self._cache: dict[int, str] = {}

    @classmethod
    def for_model(cls, families: Families) -> TokenText:
        """Names of the families' special tokens, and a model directory's tokenizer when it has one.

        The tokenizer is read offline from ``tokenizer.json`` (the ``tokenizers`` package, a
        dependency of transformers); ``tokenizer_config.json`` alone names the special tokens.
        """
        names = dict(DEFAULT_TOKEN_NAMES)
        model_dir = families.model_dir
        if model_dir is None:
            return cls(names)
        if families.model_family is not None:
            names.update(families.get(families.model_family).token_names)
        names.update({token_id: name for name, token_id in read_added_tokens(model_dir).items()})
        if not (model_dir / "tokenizer.json").is_file():
            return cls(names)
        # Only a model directory with a full tokenizer needs it: the light core says which extra does.
        tokenizers = require("tokenizers", "Showing a model's token text")
        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return cls(names, lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))

    @property
    def decodes(self) -> bool:
        """Whether ordinary tokens are decoded to text (else they show as ids)."""
        return self.decode is not None

    def __call__(self, token_id: int) -> str:
        if token_id in self.names:
            return self.names[token_id]
        if self.decode is None:
            return str(token_id)
        if token_id not in self._cache:
            self._cache[token_id] = self.decode(token_id).replace("\n", "\u21b5\n")
        return self._cache[token_id]


@dataclass(slots=True)
class Tokens:
    """The per-token views of a sample or micro batch that the page draws."""

    ids: list[int]
    mask: list[bool]
    types: list[int]
    padding: list[bool]
    sequence_starts: list[int]
    refs: list[MMImageRef]
    dummy: bool
    marks: dict[int, list[int]] = field(default_factory=dict)  # position -> problem numbers


def selected_tokens(selected: Selected) -> Tokens:
    record = selected.record
    refs = list(record.mm_refs.images) if record.mm_refs is not None else []
    if isinstance(record, MicroBatch):
        ids, mask = record.input_ids, record.loss_mask
        # Packing pads with env name "" (docs/pack.md); real samples carry their env's name.
        padding = [name == "" for name in record.env_names]
        lengths = record.sequence_lengths
        dummy = bool(ids) and not any(mask)
    else:
        ids, mask, dummy = record.token_ids, record.mask, False
        padding, lengths = [False] * len(ids), [len(ids)]
    n = len(ids)
    types = record.mm_token_type_ids
    if types is None or len(types) != n:
        types = type_ids_from_spans(
            n, [(ref.offset, ref.length) for ref in refs if ref.offset + ref.length <= n]
        )
    if len(mask) != n:
        mask = [False] * n
    if len(padding) != n:
        padding = [False] * n
    starts, position = [], 0
    for length in lengths:
        if position < n:
            starts.append(position)
        position += length
    return Tokens(list(ids), list(mask), list(types), padding, starts or [0], refs, dummy)


def legend() -> str:
    keys = [
        ("t m", "trained (loss mask)"),
        ("t img", "image-typed"),
        ("t pad", "padding"),
        ("t seq1", "every other sequence"),
        ("t problem", "problem"),
    ]
    spans = "".join(f"<span><span class='{cls}'>tok</span> {label}</span>" for cls, label in keys)
    return (
        f"<div class='legend'>{spans}<span><span class='seq-start'>seq 1</span> sequence start</span></div>"
    )


def stream(
    tokens: Tokens,
    images: Sequence[ImageFile],
    image_marks: dict[int, list[int]],
    families: Families,
    text: TokenText,
) -> str:
    """Draw the tokens in order, each image's span as a card holding its own tokens."""
    n = len(tokens.ids)
    spans: dict[int, int] = {}  # start -> ref index; overlapping or out-of-range refs get no card
    previous_end = 0
    for index, ref in enumerate(tokens.refs):
        if previous_end <= ref.offset < n and ref.length > 0:
            spans[ref.offset] = index
            previous_end = ref.offset + ref.length
    cuts = [*tokens.sequence_starts, *tokens.marks, *(p + 1 for p in tokens.marks)]
    for start, index in spans.items():
        cuts += [start, start + tokens.refs[index].length]
    edges = run_edges([tokens.ids, tokens.mask, tokens.types, tokens.padding], cuts)
    sequence_of = {start: number for number, start in enumerate(tokens.sequence_starts)}
    out: list[str] = []
    card_end, card_index, card_runs = -1, -1, []
    sequence = 0
    for start, end in itertools.pairwise(edges):
        if card_end >= 0 and start >= card_end:
            out.append(
                _card(card_index, tokens, images[card_index], image_marks, families, " ".join(card_runs))
            )
            card_end, card_runs = -1, []
        if start in sequence_of:
            sequence = sequence_of[start]
            if len(tokens.sequence_starts) > 1:
                out.append(f"<span class='seq-start' data-seq='{sequence}'>seq {sequence}</span>")
        if start in spans and card_end < 0:
            card_index = spans[start]
            card_end = min(start + tokens.refs[card_index].length, n)
        run = _run(start, end, sequence, tokens, text)
        (card_runs if card_end >= 0 else out).append(run)
    if card_end >= 0:
        out.append(_card(card_index, tokens, images[card_index], image_marks, families, " ".join(card_runs)))
    # Spaces between runs are where lines may break.
    return " ".join(out)


def _run(start: int, end: int, sequence: int, tokens: Tokens, text: TokenText) -> str:
    token, kind = tokens.ids[start], tokens.types[start]
    classes = ["t"]
    if tokens.mask[start]:
        classes.append("m")
    if kind == IMAGE_TYPE:
        classes.append("img")
    elif kind == VIDEO_TYPE:
        classes.append("vid")
    if tokens.padding[start]:
        classes.append("pad")
    if sequence % 2:
        classes.append("seq1")
    marks = tokens.marks.get(start)
    extra = ""
    if marks:
        classes.append("problem")
        extra = f" data-problem='{' '.join(map(str, marks))}'"
    count = end - start
    shown = html.escape(text(token))
    if count >= COLLAPSE_FROM:
        shown += f"<span class='n'>\u00d7{count}</span>"
    where = f"{start}" if count == 1 else f"{start}-{end - 1}"
    title = f"token {where}: id {token}, type {kind}, loss mask {str(tokens.mask[start]).lower()}"
    return (
        f"<span class='{' '.join(classes)}' id='tok-{start}' data-pos='{start}' data-count='{count}'"
        f"{extra} title='{html.escape(title, quote=True)}'>{shown}</span>"
    )


def _card(
    index: int,
    tokens: Tokens,
    image: ImageFile,
    image_marks: dict[int, list[int]],
    families: Families,
    runs: str,
) -> str:
    """An image's card at its span: thumbnail, what the family expects, what the span holds."""
    ref = tokens.refs[index]
    end = min(ref.offset + ref.length, len(tokens.ids))
    in_span = sum(1 for kind in tokens.types[ref.offset : end] if kind == IMAGE_TYPE)
    family_name = ref.item.get("family")
    grid_text, expected, input_size = "?", "?", "?"
    try:
        family = families.get(str(family_name))
        grid = family.grid(ref.item.get("payload"))
        grid_text = "x".join(map(str, grid))
        expected = str(family.placeholder_length(grid))
        width, height = family.input_size(grid)
        input_size = f"{width}x{height}"
    except BadInputError:
        pass  # The descriptor's problem is in the list; the card shows what it can.
    stored = f"{image.width}x{image.height}" if image.width is not None else "?"
    if image.stored_bytes is not None:
        stored += f", {image.stored_bytes:,} bytes"
    rows = [
        ("image", index),
        ("file", image.path.name),
        ("hash", ref.hash),
        ("family", family_name),
        ("stored size", stored),
        ("model input", input_size),
        ("grid (t x h x w)", grid_text),
        ("expected placeholder", expected),
        ("span", f"[{ref.offset}, {ref.offset + ref.length}), length {ref.length}"),
        ("image tokens in span", in_span),
    ]
    marks = image_marks.get(index)
    classes, extra = "image-span", ""
    if marks:
        classes += " problem"
        extra = f" data-problem='{' '.join(map(str, marks))}'"
    return (
        f"<figure class='{classes}' id='img-{index}' data-image='{index}' data-offset='{ref.offset}' "
        f"data-length='{ref.length}'{extra}>{thumbnail_html(image, image.path.name)}"
        f"<figcaption>{facts(rows)}<div class='span-tokens'>{runs}</div></figcaption></figure>"
    )
