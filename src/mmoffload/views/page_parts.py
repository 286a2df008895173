"""Parts every HTML page shares: the stylesheet, the page frame, image thumbnails, fact lists."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmoffload.contract.addresses import sniff_extension, uri_to_path
from mmoffload.errors import BadInputError, MMOffloadError
from mmoffload.store.images import open_image, to_rgb
from mmoffload.store.read import read_verified

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
