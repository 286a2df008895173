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

import base64
import html
import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from mmoffload.assets import read_verified, sniff_extension, uri_to_path
from mmoffload.audit import Violation, audit_record
from mmoffload.errors import BadInputError, MMOffloadError
from mmoffload.families import IMAGE_TYPE, VIDEO_TYPE, Families
from mmoffload.families.base import read_added_tokens, to_rgb
from mmoffload.images import open_image
from mmoffload.show import Selected
from mmoffload.spans import DEFAULT_TOKEN_NAMES, run_edges, type_ids_from_spans
from mmoffload.wire import MicroBatch, MMImageRef

THUMBNAIL_SIDE = 240
THUMBNAIL_QUALITY = 80
# A run of equal tokens shown as one element with a count from this many on.
COLLAPSE_FROM = 4

CSS = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.where { color: #666; font-family: monospace; word-break: break-all; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0 1em; margin: .4em 0; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; font-family: monospace; }
.banner { padding: .4em .8em; margin: .6em 0; border-radius: 4px; }
.banner.dummy { background: repeating-linear-gradient(45deg, #eee, #eee 6px, #ddd 6px, #ddd 12px); }
.ok { color: #176117; } .bad { color: #b00020; }
ol.problems li { margin: .2em 0; } ol.problems code { background: #fbe9eb; }
.legend span { margin-right: 1em; white-space: nowrap; }
.tokens { font-family: monospace; font-size: 12px; line-height: 2.1; overflow-wrap: anywhere; }
.t { padding: 1px 2px; border-bottom: 3px solid transparent; white-space: pre-wrap; }
.t.m { border-bottom-color: #2e9d48; }
.t.img { background: #cfe3ff; } .t.vid { background: #e7d4ff; }
.t.pad { background: #e4e4e4; color: #888; }
.t .n { font-size: 10px; color: #444; vertical-align: super; }
.seq1 { background-color: #fff8e1; }
.seq-start { display: inline-block; padding: 0 4px; margin: 0 3px; background: #444; color: #fff;
  border-radius: 3px; font-size: 10px; line-height: 1.6; }
.problem { outline: 3px solid #d7263d; outline-offset: 1px; }
figure.image-span { display: inline-flex; gap: .8em; vertical-align: top; margin: .3em 2px;
  padding: .5em; border: 2px solid #5b8fd9; border-radius: 6px; background: #f3f8ff; max-width: 100%; }
figure.image-span.problem { border-color: #d7263d; outline: none; background: #fff1f2; }
figure.image-span img { max-width: 240px; max-height: 240px; border: 1px solid #bbb; }
figure.image-span figcaption { font-family: system-ui, sans-serif; font-size: 12px; min-width: 18em; }
figure.image-span .span-tokens { margin-top: .3em; }
.missing-image { width: 160px; height: 100px; display: flex; align-items: center; justify-content: center;
  background: #fbe9eb; color: #b00020; border: 1px dashed #b00020; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 200px; font-size: 12px; overflow-wrap: anywhere; }
.gallery img { max-width: 200px; max-height: 160px; border: 1px solid #bbb; }
table.figures td { padding: 0 1em 0 0; font-family: monospace; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots svg { max-width: 420px; height: auto; }
"""


# --- shared by the HTML pages ---------------------------------------------------------------


def page(title: str, body: str) -> str:
    """Return a complete HTML document with the shared styles inline."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


@dataclass(frozen=True, slots=True)
class ImageFile:
    """An image file as stored, and a thumbnail of it (None when it cannot be read)."""

    path: Path
    stored_bytes: int | None
    width: int | None
    height: int | None
    thumbnail: str | None
    problem: str | None


def read_image(uri: str) -> ImageFile:
    """Read an image file for a page: its stored size and a JPEG thumbnail as a ``data:`` URL.

    A file that is missing or does not decode gives ``thumbnail=None`` and says why in ``problem``.
    """
    try:
        path = uri_to_path(uri)
    except MMOffloadError as exc:
        return ImageFile(Path(uri), None, None, None, None, exc.message)
    try:
        data = read_verified(path, None)
    except MMOffloadError as exc:
        return ImageFile(path, None, None, None, None, exc.message)
    if sniff_extension(data) is None:
        return ImageFile(path, len(data), None, None, None, "Image file does not decode: not an image format")
    try:
        with open_image(data, uri) as opened:
            width, height = opened.size
            image = to_rgb(opened)
            # An RGB image under the thumbnail size is `opened` itself, unread: read it before it closes.
            image.load()
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    except BadInputError as exc:
        return ImageFile(path, len(data), None, None, None, exc.message)
    except (OSError, ValueError) as exc:
        return ImageFile(path, len(data), None, None, None, f"Image file does not decode: {exc}")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    return ImageFile(path, len(data), width, height, url, None)


def thumbnail_html(image: ImageFile, alt: str) -> str:
    """Return the ``<img>`` of a thumbnail, or a box that says why there is none."""
    if image.thumbnail is None:
        return f"<div class='missing-image'>{html.escape(image.problem or 'no image')}</div>"
    return f"<img src='{image.thumbnail}' alt='{html.escape(alt, quote=True)}'>"


def facts(rows: Sequence[tuple[str, object]]) -> str:
    """Return a definition list of label/value rows."""
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rows)
    return f"<dl class='facts'>{items}</dl>"


# --- token text -------------------------------------------------------------------------------


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
        from tokenizers import Tokenizer  # Only a model directory with a full tokenizer needs it.

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
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


# --- the record page --------------------------------------------------------------------------


@dataclass(slots=True)
class _Tokens:
    """The per-token views of a sample or micro batch that the page draws."""

    ids: list[int]
    mask: list[bool]
    types: list[int]
    padding: list[bool]
    sequence_starts: list[int]
    refs: list[MMImageRef]
    dummy: bool
    marks: dict[int, list[int]] = field(default_factory=dict)  # position -> problem numbers


def _tokens(selected: Selected) -> _Tokens:
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
    return _Tokens(list(ids), list(mask), list(types), padding, starts or [0], refs, dummy)


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
    tokens = _tokens(selected)
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
    body.append(_legend())
    body.append("<h2>Tokens</h2>")
    body.append(
        f"<div class='tokens' id='tokens'>{_stream(tokens, images, image_marks, families, text)}</div>"
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


def _summary(tokens: _Tokens, text: TokenText) -> str:
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


def _legend() -> str:
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


def _stream(
    tokens: _Tokens,
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


def _run(start: int, end: int, sequence: int, tokens: _Tokens, text: TokenText) -> str:
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
    tokens: _Tokens,
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
