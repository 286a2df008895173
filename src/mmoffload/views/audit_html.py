"""``audit --html``: the run's figures, its distinct images, and per-rank plots, as one page.

Built from the ``AuditReport`` plus one separate pass over the rank files (the
audit itself keeps no per-rank figures). Plots are SVG drawn by matplotlib (the
``html`` extra), inlined, so the page needs no network. Rules where the spec is
silent (docs/inspect.md says the same):

- Images and reference counts are over trainer-bound refs: rank files when a
  run has any, else its TrainingBatch files (as audit counts ``descriptors``).
- Padding is known from the micro batch's layout (``contract.packed.padding_tokens``); real
  tokens are the rest, less those of dummies (they train nothing).
- Fill ratio of a rank = its real tokens / (its micro batches x the longest
  micro batch of the step): the rank files do not record ``seq_len``.
- A sequence is truncated when its real tokens are a strict prefix of a sample
  of the step's TrainingBatch and no sample equals them; it dropped the rest of
  that sample. Without a TrainingBatch, truncation is not known (shown as 0).
"""

from __future__ import annotations

import html
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.audit import AuditReport, binary_artifacts
from mmoffload.contract import rundir
from mmoffload.contract.packed import fill_ratio, padding_tokens
from mmoffload.contract.wire import MicroBatch, TrainingSample, read_rank_file, read_training_batch
from mmoffload.errors import UsageError
from mmoffload.views.page_parts import page, read_image, thumbnail_html

SHOWN_VIOLATIONS = 50
_PREFIX = 16  # Tokens that index samples for the truncation match.


@dataclass(slots=True)
class RankFigures:
    """One rank file's figures for the plots."""

    label: str
    micro_batches: int = 0
    dummies: int = 0
    tokens: int = 0
    padding: int = 0
    dummy_tokens: int = 0
    seq_len: int = 0
    truncated_sequences: int = 0
    tokens_dropped: int = 0

    @property
    def real(self) -> int:
        return self.tokens - self.padding - self.dummy_tokens

    @property
    def fill_ratio(self) -> float:
        return fill_ratio(self.real, self.micro_batches, self.seq_len)


@dataclass(slots=True)
class _ImageUse:
    uri: str
    references: int = 0
    families: set[str] = field(default_factory=set)


def audit_page(paths: Sequence[Path], report: AuditReport) -> str:
    """Return the audit page of ``paths`` for their ``report``.

    Raises:
        UsageError: matplotlib (the ``html`` extra) is not installed, or a path cannot be read.
    """
    ranks: list[RankFigures] = []
    images: dict[str, _ImageUse] = {}
    for training_batches, rank_files in binary_artifacts(paths):
        if rank_files:
            ranks += _rank_figures(training_batches, rank_files)
        for path in rank_files or training_batches:
            for record in _records(path):
                for ref in record.mm_refs.images if record.mm_refs is not None else []:
                    use = images.setdefault(ref.uri, _ImageUse(ref.uri))
                    use.references += 1
                    use.families.add(str(ref.item.get("family")))
    body = [
        "<h1>mmoffload audit</h1>",
        f"<div class='where'>{html.escape(' '.join(map(str, paths)))}</div>",
        f"<h2 class='{'ok' if report.ok else 'bad'}' id='verdict'>"
        f"{'ok: no violations' if report.ok else f'{len(report.violations):,} violation(s)'}</h2>",
        "<h2>Figures</h2>",
        _figures(report),
        _violations(report),
        f"<h2>Images ({len(images)} distinct, {sum(u.references for u in images.values())} references)</h2>",
        _gallery(images),
        "<h2>Ranks</h2>",
        _plots(ranks) if ranks else "<p>No rank files.</p>",
    ]
    return page("mmoffload audit", "\n".join(body))


def _records(path: Path) -> Sequence[TrainingSample | MicroBatch]:
    return read_rank_file(path) if rundir.rank_of(path) is not None else read_training_batch(path).examples


def _rank_figures(training_batches: Sequence[Path], rank_files: Sequence[Path]) -> list[RankFigures]:
    """Figures per rank file; each step's TrainingBatch (beside it) tells truncation."""
    samples_by_dir = {path.parent: read_training_batch(path).examples for path in training_batches}
    by_step: dict[Path, list[tuple[Path, list[MicroBatch]]]] = defaultdict(list)
    for path in rank_files:
        by_step[path.parent].append((path, read_rank_file(path)))
    figures: list[RankFigures] = []
    for step_dir, files in by_step.items():
        # Rank files do not record seq_len: the step's longest micro batch (unpadded) stands in for it,
        # exact whenever some bin was filled (docs/inspect.md).
        seq_len = max(
            (len(mb.input_ids) - padding_tokens(mb) for _, batches in files for mb in batches), default=0
        )
        index = _sample_index(samples_by_dir.get(step_dir, []))
        for path, batches in files:
            rank = RankFigures(f"{step_dir.parent.parent.name}/{step_dir.name}/{path.stem}")
            for batch in batches:
                _add_micro_batch(rank, batch, index)
            rank.seq_len = seq_len
            figures.append(rank)
    return figures


def _sample_index(samples: Sequence[TrainingSample]) -> dict[tuple[int, ...], list[list[int]]]:
    index: dict[tuple[int, ...], list[list[int]]] = defaultdict(list)
    for sample in samples:
        index[tuple(sample.token_ids[:_PREFIX])].append(sample.token_ids)
    return index


def _add_micro_batch(
    rank: RankFigures, batch: MicroBatch, index: dict[tuple[int, ...], list[list[int]]]
) -> None:
    n = len(batch.input_ids)
    pad = padding_tokens(batch)
    padding = [False] * (n - pad) + [True] * pad
    rank.micro_batches += 1
    rank.tokens += n
    rank.padding += pad
    if n and not any(batch.loss_mask):
        rank.dummies += 1
        rank.dummy_tokens += n - pad
        return  # A dummy copies a real micro batch: its sequences are counted there.
    start = 0
    for length in batch.sequence_lengths:
        real = [
            t
            for t, pad in zip(
                batch.input_ids[start : start + length], padding[start : start + length], strict=False
            )
            if not pad
        ]
        start += length
        candidates = index.get(tuple(real[:_PREFIX]), [])
        if not real or any(tokens == real for tokens in candidates):
            continue
        longer = [
            len(tokens) for tokens in candidates if len(tokens) > len(real) and tokens[: len(real)] == real
        ]
        if longer:
            rank.truncated_sequences += 1
            rank.tokens_dropped += min(longer) - len(real)


def _figures(report: AuditReport) -> str:
    rows = [
        (name, value)
        for name, value in msgspec.structs.asdict(report).items()
        if isinstance(value, int | bool) and name != "ok"
    ]
    cells = "".join(
        f"<tr data-figure='{name}'><td>{html.escape(name)}</td><td>{str(value).lower() if isinstance(value, bool) else f'{value:,}'}</td></tr>"
        for name, value in rows
    )
    return f"<table class='figures'>{cells}</table>"


def _violations(report: AuditReport) -> str:
    if report.ok:
        return ""
    items = "".join(
        f"<li class='problem-item' data-kind='{html.escape(v.kind)}'><code>{html.escape(v.kind)}</code> "
        f"{html.escape(Path(v.file).name)}"
        f"{'' if v.index is None else f' index {v.index}'}{'' if v.image is None else f' image {v.image}'}: "
        f"{html.escape(v.reason)}</li>"
        for v in report.violations[:SHOWN_VIOLATIONS]
    )
    more = len(report.violations) - SHOWN_VIOLATIONS
    tail = f"<p>and {more:,} more (<code>--json</code> lists them all)</p>" if more > 0 else ""
    return f"<h2>Violations</h2><ol class='problems'>{items}</ol>{tail}"


def _gallery(images: dict[str, _ImageUse]) -> str:
    cards = []
    for use in sorted(images.values(), key=lambda u: (-u.references, u.uri)):
        image = read_image(use.uri)
        size = f"{image.width}x{image.height}" if image.width is not None else "?"
        stored = f"{image.stored_bytes:,} bytes" if image.stored_bytes is not None else "missing"
        cards.append(
            f"<figure class='gallery-image' data-references='{use.references}'>"
            f"{thumbnail_html(image, image.path.name)}<figcaption>"
            f"<b>{use.references} reference{'s' * (use.references != 1)}</b><br>"
            f"{html.escape(image.path.name)}<br>{size}, {stored}<br>{html.escape(', '.join(sorted(use.families)))}"
            "</figcaption></figure>"
        )
    return f"<div class='gallery'>{''.join(cards)}</div>"


def _plots(ranks: Sequence[RankFigures]) -> str:
    """Four small bar charts, one bar per rank file, as inline SVG."""
    try:
        from matplotlib.figure import Figure  # The html extra; imported only to draw.
    except ImportError as exc:
        raise UsageError("audit --html draws with matplotlib: pip install 'mmoffload[html]'") from exc
    labels = [rank.label for rank in ranks]
    charts = [
        ("tokens", "tokens (real + padding)", [r.real for r in ranks], [r.padding for r in ranks]),
        ("fill_ratio", "fill ratio", [r.fill_ratio for r in ranks], None),
        ("padding", "padding tokens", [r.padding for r in ranks], None),
        ("truncation", "tokens dropped by truncation", [r.tokens_dropped for r in ranks], None),
    ]
    svgs = []
    for name, title, values, stacked in charts:
        figure = Figure(figsize=(4.2, 0.9 + 0.32 * len(ranks)))
        axes = figure.add_subplot()
        axes.barh(labels, values, color="#2e6fd0")
        if stacked is not None:
            axes.barh(labels, stacked, left=values, color="#bbbbbb")
        axes.set_title(title, fontsize=10)
        axes.invert_yaxis()
        axes.tick_params(labelsize=8)
        if name == "fill_ratio" or not any(values):
            axes.set_xlim(0, 1)  # A ratio, or all zero: a fixed axis rather than matplotlib's +-0.04.
        figure.tight_layout()
        svgs.append(f"<div class='plot' data-plot='{name}'>{_svg(figure)}</div>")
    table = _rank_table(ranks)
    return f"<div class='plots'>{''.join(svgs)}</div>{table}"


def _svg(figure: Any) -> str:
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg") :]  # Drop the XML prolog and doctype: the SVG is inline.


def _rank_table(ranks: Sequence[RankFigures]) -> str:
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "rank file",
            "micro batches",
            "dummies",
            "tokens",
            "padding",
            "fill",
            "truncated",
            "dropped",
        )
    )
    rows = "".join(
        f"<tr data-rank='{html.escape(r.label)}'><td>{html.escape(r.label)}</td><td>{r.micro_batches}</td>"
        f"<td>{r.dummies}</td><td>{r.tokens:,}</td><td>{r.padding:,}</td><td>{r.fill_ratio:.3f}</td>"
        f"<td>{r.truncated_sequences}</td><td>{r.tokens_dropped:,}</td></tr>"
        for r in ranks
    )
    return f"<table class='figures ranks'><tr>{header}</tr>{rows}</table>"
