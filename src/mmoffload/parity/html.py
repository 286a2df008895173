"""``parity --html``: per-sample KL plotted, the worst samples shown with their images.

Built from the ``inspect`` and ``audit --html`` pages' parts (styles, thumbnails, fact
lists, inline SVG): self-contained, no network, no script. The plot needs matplotlib
(the ``html`` extra). Stable hooks: ``div.plot[data-plot=kl]``, and per worst sample
``section.sample`` with ``data-status`` and ``data-kl`` (empty when not compared).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from mmoffload.errors import UsageError
from mmoffload.parity.report import ParityReport, SampleImage, SampleParity, Status
from mmoffload.views.audit_html import _svg as inline_svg  # the audit page's inline-SVG writer
from mmoffload.views.page_parts import facts, page, read_image, thumbnail_html

SHOWN_SAMPLES = 12
# KL plotted on a log axis: zero (identical log-probs) is drawn at this floor.
KL_FLOOR = 1e-12
CSS = """
section.sample { border: 1px solid #ccc; border-radius: 6px; padding: .5em .8em; margin: .6em 0; }
section.sample.flagged { border-color: #d7263d; background: #fff7f8; }
section.sample h3 { font-size: 1em; margin: 0 0 .3em; }
"""


def parity_page(report: ParityReport, shown: int = SHOWN_SAMPLES) -> str:
    """Return the page: the run's figures, the per-sample KL plot, per-step figures, the worst samples."""
    verdict = "ok" if report.ok else f"{report.samples_flagged} sample(s) flagged"
    summary = facts(
        [
            ("model", report.model),
            ("device, dtype", f"{report.device}, {report.dtype}"),
            ("micro batches checked", f"{report.micro_batches_checked} of {report.micro_batches}"),
            ("samples compared", f"{report.samples_compared} of {report.samples}"),
            ("threshold (KL)", f"{report.threshold:g}"),
            ("KL mean / max", f"{_number(report.kl_mean)} / {_number(report.kl_max)}"),
            ("verdict", verdict),
        ]
    )
    body = (
        f"<style>{CSS}</style><h1>parity</h1><p class='where'>{html.escape(report.run_dir)}</p>"
        f"<p class='{'ok' if report.ok else 'bad'}'><b>{html.escape(verdict)}</b></p>{summary}"
        f"<h2>Mismatch KL per sample</h2>{_plot(report)}{_steps(report)}"
        f"<h2>Worst samples</h2>{''.join(_card(s) for s in report.per_sample[:shown])}"
    )
    return page(f"parity: {report.run_dir}", body)


def _plot(report: ParityReport) -> str:
    """A dot per sample in run order (step, rank, micro batch, index), the threshold as a line."""
    try:
        from matplotlib.figure import Figure  # The html extra; imported only to draw.
    except ImportError as exc:
        raise UsageError("parity --html draws with matplotlib: pip install 'mmoffload[html]'") from exc
    ordered = sorted(report.per_sample, key=lambda s: (s.step or 0, s.rank or 0, s.micro_batch, s.index))
    compared = [(x, s) for x, s in enumerate(ordered) if s.kl is not None]
    blocked = [
        x for x, s in enumerate(ordered) if s.status in (Status.MISSING_IMAGE, Status.NOT_MATERIALIZED)
    ]
    figure = Figure(figsize=(8, 3))
    axes = figure.add_subplot()
    for over, colour in ((False, "#2e6fd0"), (True, "#d7263d")):
        points = [
            (x, max(s.kl or 0.0, KL_FLOOR))
            for x, s in compared
            if (s.status is Status.OVER_THRESHOLD) == over
        ]
        if points:
            axes.scatter(*zip(*points, strict=True), s=14, color=colour)
    top = max([report.threshold * 10, *(max(s.kl or 0.0, KL_FLOOR) for _, s in compared)])
    if blocked:
        axes.scatter(blocked, [top] * len(blocked), marker="x", color="#d7263d", label="missing / not built")
        axes.legend(fontsize=8, loc="lower right")
    axes.axhline(report.threshold, color="#888", linestyle="--", linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("sample (run order)", fontsize=9)
    axes.set_ylabel("mismatch KL", fontsize=9)
    axes.tick_params(labelsize=8)
    figure.tight_layout()
    return f"<div class='plot' data-plot='kl'>{inline_svg(figure)}</div>"


def _steps(report: ParityReport) -> str:
    header = "".join(
        f"<th>{h}</th>"
        for h in ("step", "micro batches", "samples", "flagged", "tokens", "KL mean", "KL max")
    )
    rows = "".join(
        f"<tr data-step='{s.step}'><td>{s.step}</td><td>{s.micro_batches}</td><td>{s.samples}</td>"
        f"<td>{s.samples_flagged}</td><td>{s.tokens:,}</td><td>{_number(s.kl_mean)}</td><td>{_number(s.kl_max)}</td></tr>"
        for s in report.per_step
    )
    return f"<table class='figures steps'><tr>{header}</tr>{rows}</table>"


def _card(sample: SampleParity) -> str:
    rows: Sequence[tuple[str, object]] = [
        ("status", str(sample.status)),
        ("mismatch KL", _number(sample.kl)),
        ("mean / max |d|", f"{_number(sample.mean_abs_diff)} / {_number(sample.max_abs_diff)}"),
        ("trained tokens", sample.tokens),
        ("tokens in the micro batch", f"{sample.start}..{sample.start + sample.length}"),
    ]
    if sample.message:
        rows = [*rows, ("why", sample.message)]
    images = "".join(_image(image) for image in sample.images) or "<p>no images</p>"
    kl = "" if sample.kl is None else f"{sample.kl:.6g}"
    flagged = " flagged" if sample.flagged else ""
    return (
        f"<section class='sample{flagged}' data-status='{sample.status}' data-kl='{kl}'>"
        f"<h3>{html.escape(sample.label())}</h3>{facts(rows)}<div class='gallery'>{images}</div></section>"
    )


def _image(image: SampleImage) -> str:
    stored = read_image(image.uri)
    caption = (
        f"{html.escape(image.file)}{' (missing: placeholder pixels)' if image.missing else ''}<br>"
        f"hash {html.escape(image.hash[:16])}<br>tokens {image.offset}..{image.offset + image.length}"
    )
    return f"<figure>{thumbnail_html(stored, image.file)}<figcaption>{caption}</figcaption></figure>"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
