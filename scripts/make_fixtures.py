"""Generate mmoffload's committed fixtures, deterministically.

    python scripts/make_fixtures.py            # writes fixtures/ next to this script's repo
    python scripts/make_fixtures.py OUT_DIR    # writes the same files under OUT_DIR

Running it twice gives byte-identical files (with the same Pillow, zlib, libjpeg
and libwebp: ``manifest.json`` records their versions). What each file is, and the
token ids used, is described in docs/fixtures.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features

from mmoffload.contract.addresses import content_hash
from mmoffload.families import BUNDLED_CONFIGS, Families, Family
from mmoffload.io.outputs import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_ID = "mini-browse"
BASE_TIMESTAMP = 1_735_689_600.0  # 2025-01-01T00:00:00Z: fixed, so reruns are byte-identical
TEMPERATURE = 1.0

# ---------------------------------------------------------------------------------------------
# Screenshots
# ---------------------------------------------------------------------------------------------

WHITE, INK, MUTED, LINK, RULE = (255, 255, 255), (32, 33, 36), (95, 99, 104), (26, 13, 171), (218, 220, 224)
ACCENT, GREEN, ORANGE = (26, 115, 232), (24, 128, 56), (242, 153, 0)
FILLER = (
    "Compare specifications, prices and delivery times from trusted sellers. Prices include VAT "
    "and are updated every hour. Free returns within 30 days on most items, extended warranty "
    "available at checkout. Reviews are verified purchases only and are moderated daily."
)
LOREM = FILLER.split()


# Save options per encoding: PNG at the highest compression, JPEG as screenshot tools save it,
# WebP both lossless (what browsers' capture APIs write) and lossy.
ENCODINGS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG", "compress_level": 9},
    "jpeg": {"format": "JPEG", "quality": 65},
    "webp": {"format": "WEBP", "lossless": True, "quality": 100, "method": 4},
    "webp-lossy": {"format": "WEBP", "quality": 70, "method": 4},
}


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Return Pillow's bundled default font at ``size`` (no system fonts: same output everywhere)."""
    return ImageFont.load_default(size=size)


class Page:
    """A screenshot being drawn: browser chrome plus a page viewport below it."""

    def __init__(self, width: int, height: int, url: str, title: str, mobile: bool = False) -> None:
        self.image = Image.new("RGB", (width, height), WHITE)
        self.draw = ImageDraw.Draw(self.image)
        self.width, self.height = width, height
        self.top = self._mobile_chrome(url) if mobile else self._desktop_chrome(url, title)

    def text(self, xy: tuple[float, float], value: str, size: int = 13, fill: tuple[int, ...] = INK) -> None:
        self.draw.text(xy, value, fill=fill, font=font(size))

    def text_width(self, value: str, size: int = 13) -> float:
        return font(size).getlength(value)

    def paragraph(self, x: int, y: int, width: int, lines: int, rng: random.Random, size: int = 12) -> int:
        """Draw ``lines`` lines of filler text wrapped to ``width``; return the y below them."""
        for _ in range(lines):
            words: list[str] = []
            while self.text_width(" ".join([*words, "word"]), size) < width:
                words.append(rng.choice(LOREM))
            self.text((x, y), " ".join(words[:-1]), size, MUTED)
            y += size + 7
        return y

    def button(self, box: tuple[int, int, int, int], label: str, fill: tuple[int, ...], ink=WHITE) -> None:
        self.draw.rounded_rectangle(box, radius=6, fill=fill)
        x = (box[0] + box[2] - self.text_width(label, 13)) / 2
        self.text((x, (box[1] + box[3]) / 2 - 8), label, 13, ink)

    def encode(self, encoding: str) -> bytes:
        out = io.BytesIO()
        self.image.save(out, **ENCODINGS[encoding])
        return out.getvalue()

    def _desktop_chrome(self, url: str, title: str) -> int:
        d, w = self.draw, self.width
        d.rectangle((0, 0, w, 36), fill=(222, 225, 230))
        d.rounded_rectangle((8, 6, 250, 40), radius=8, fill=(247, 248, 250))
        d.ellipse((18, 15, 32, 29), fill=ACCENT)
        self.text((40, 14), title[:30], 12)
        self.text((232, 13), "x", 12, MUTED)
        self.text((262, 11), "+", 16, MUTED)
        d.rectangle((0, 36, w, 76), fill=(247, 248, 250))
        for x, points in ((14, ((10, 0), (0, 6), (10, 12))), (44, ((0, 0), (10, 6), (0, 12)))):
            d.line([(x + px, 50 + py) for px, py in points], fill=MUTED, width=2)
        d.arc((74, 48, 90, 64), start=30, end=330, fill=MUTED, width=2)
        d.rounded_rectangle((104, 42, w - 110, 70), radius=14, fill=(232, 234, 237))
        d.rectangle((118, 55, 128, 63), fill=MUTED)
        d.arc((119, 49, 127, 59), start=180, end=360, fill=MUTED, width=2)
        self.text((138, 49), url, 13)
        for i in range(3):
            d.ellipse((w - 96 + i * 28, 47, w - 78 + i * 28, 65), fill=(170, 180, 195) if i < 2 else ACCENT)
        d.line((0, 76, w, 76), fill=RULE)
        return 77

    def _mobile_chrome(self, url: str) -> int:
        d, w = self.draw, self.width
        d.rectangle((0, 0, w, 26), fill=(245, 245, 245))
        self.text((16, 6), "9:41", 13)
        d.rectangle((w - 40, 8, w - 16, 18), outline=INK, width=1)
        d.rectangle((w - 38, 10, w - 22, 16), fill=INK)
        d.rounded_rectangle((12, 32, w - 12, 64), radius=16, fill=(232, 234, 237))
        host = url.split("/")[2] if "//" in url else url
        self.text(((w - self.text_width(host, 14)) / 2, 40), host, 14)
        d.line((0, 70, w, 70), fill=RULE)
        d.rectangle((0, self.height - 48, w, self.height), fill=(247, 248, 250))
        for i in range(5):
            cx = w * (2 * i + 1) // 10
            d.rounded_rectangle((cx - 9, self.height - 33, cx + 9, self.height - 15), radius=4, outline=MUTED)
        return 71

    def site_header(self, brand: str, links: list[str], color: tuple[int, int, int]) -> int:
        """Draw a site's own header bar under the chrome; return the y below it."""
        y = self.top
        self.draw.rectangle((0, y, self.width, y + 52), fill=color)
        self.text((24, y + 14), brand, 20, WHITE)
        x = self.width - 24
        for link in reversed(links):
            x -= self.text_width(link, 13) + 26
            self.text((x, y + 19), link, 13, WHITE)
        return y + 52


def bar_chart(
    page: Page,
    box: tuple[int, int, int, int],
    values: list[int],
    labels: list[str],
    title: str,
    highlight: int,
) -> None:
    """Draw a titled bar chart with gridlines and axis labels, bar ``highlight`` in orange."""
    d = page.draw
    x0, y0, x1, y1 = box
    d.rounded_rectangle(box, radius=8, outline=RULE, fill=WHITE)
    page.text((x0 + 16, y0 + 12), title, 15)
    left, top, bottom = x0 + 52, y0 + 44, y1 - 28
    top_value = max(values) * 1.15
    for i in range(5):
        gy = bottom - (bottom - top) * i / 4
        d.line((left, gy, x1 - 16, gy), fill=(236, 238, 241))
        tick = top_value * i / 4
        page.text(
            (x0 + 10, gy - 7), f"{tick / 1000:.0f}k" if top_value > 10_000 else f"{tick:.0f}", 10, MUTED
        )
    step = (x1 - 16 - left) / len(values)
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        bx = left + i * step + step * 0.18
        by = bottom - (bottom - top) * value / top_value
        d.rectangle((bx, by, bx + step * 0.64, bottom), fill=ORANGE if i == highlight else ACCENT)
        page.text((bx, bottom + 6), label, 10, MUTED)


def line_chart(page: Page, box: tuple[int, int, int, int], series: list[int], title: str) -> None:
    """Draw a titled line chart with a filled area under it."""
    x0, y0, x1, y1 = box
    page.draw.rounded_rectangle(box, radius=8, outline=RULE, fill=WHITE)
    page.text((x0 + 16, y0 + 12), title, 15)
    left, top, bottom, right = x0 + 20, y0 + 44, y1 - 20, x1 - 20
    lo, hi = min(series), max(series)
    points = [
        (left + (right - left) * i / (len(series) - 1), bottom - (bottom - top) * (v - lo) / (hi - lo or 1))
        for i, v in enumerate(series)
    ]
    page.draw.polygon([*points, (right, bottom), (left, bottom)], fill=(225, 236, 252))
    page.draw.line(points, fill=ACCENT, width=2)


MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
REVENUE_2024 = [31_400, 29_800, 35_100, 33_900, 38_200, 41_700, 39_500, 42_300, 44_900, 46_100, 48_200, 45_600]  # fmt: skip
BEST_MONTH = REVENUE_2024.index(max(REVENUE_2024))
LAPTOPS = [
    ("Aero 14", '14"', "16 GB", "512 GB", 649),
    ("Nimbus Pro 14", '14"', "32 GB", "1 TB", 1_149),
    ("Vertex 15 Air", '15.6"', "16 GB", "512 GB", 799),
    ("Lumen 14 Plus", '14"', "16 GB", "1 TB", 899),
    ("Orbit 13", '13.3"', "8 GB", "256 GB", 579),
]


def draw_start(page: Page, rng: random.Random) -> None:
    w = page.width
    page.text((w - 190, page.top + 18), "Images    Maps", 13, MUTED)
    page.button((w - 96, page.top + 12, w - 24, page.top + 42), "Sign in", ACCENT)
    logo_y = page.top + (page.height - page.top) // 4
    page.text(((w - page.text_width("mini-browse", 56)) / 2, logo_y), "mini-browse", 56, ACCENT)
    box = (w // 2 - 290, logo_y + 90, w // 2 + 290, logo_y + 136)
    page.draw.rounded_rectangle(box, radius=23, outline=RULE, fill=WHITE, width=2)
    page.draw.ellipse((box[0] + 18, box[1] + 15, box[0] + 32, box[1] + 29), outline=MUTED, width=2)
    page.text((box[0] + 44, box[1] + 14), "Search the web or type a URL", 15, MUTED)
    for i, label in enumerate(("Search", "I'm feeling lucky")):
        x = w // 2 - 150 + i * 160
        page.button((x, box[3] + 28, x + 140, box[3] + 64), label, (241, 243, 244), INK)
    tiles = ["shop.example", "news.example", "stats.example", "mail.example", "docs.example"]
    for i, tile in enumerate(tiles):
        x = w // 2 - 5 * 56 + i * 112 + 8
        page.draw.rounded_rectangle((x, box[3] + 100, x + 96, box[3] + 170), radius=10, fill=(241, 243, 244))
        page.draw.ellipse((x + 34, box[3] + 110, x + 62, box[3] + 138), fill=(60 + 40 * i, 120, 200))
        page.text((x + 48 - page.text_width(tile, 10) / 2, box[3] + 148), tile, 10, MUTED)
    page.draw.rectangle((0, page.height - 40, w, page.height), fill=(242, 242, 242))
    page.text((24, page.height - 28), "About    Advertising    Business    Privacy    Terms", 12, MUTED)


def draw_results(page: Page, rng: random.Random) -> None:
    y = page.site_header("shop.example", ["Deals", "Laptops", "Phones", "Cart (0)"], (35, 47, 62))
    page.draw.rounded_rectangle((24, y + 16, 560, y + 50), radius=6, outline=RULE, fill=WHITE)
    page.text((36, y + 24), "14-inch laptop", 14)
    page.text(
        (24, y + 62), "Showing 1-5 of 86 results for 14-inch laptop   Sort by: Price low to high", 12, MUTED
    )
    y += 92
    for name, size, ram, disk, price in sorted(LAPTOPS, key=lambda item: item[4]):
        page.text((24, y), f"shop.example > laptops > {name.lower().replace(' ', '-')}", 11, GREEN)
        page.text((24, y + 16), f"{name} {size} laptop, {ram} RAM, {disk} SSD", 16, LINK)
        page.text((24, y + 40), f"${price:,}.00", 15, INK)
        page.text(
            (100, y + 42),
            f"Free delivery   {rng.randint(30, 49) / 10} stars   {rng.randint(40, 900)} reviews",
            12,
            MUTED,
        )
        y += 76
    x = page.width - 300
    page.draw.rounded_rectangle((x, page.top + 70, page.width - 24, page.top + 330), radius=8, outline=RULE)
    page.text((x + 16, page.top + 84), "Top deals this week", 15)
    for i in range(4):
        ty = page.top + 118 + i * 52
        page.draw.rectangle((x + 16, ty, x + 60, ty + 40), fill=(200 - i * 20, 210, 230))
        page.text((x + 72, ty + 4), f"Accessory bundle {i + 1}", 12, LINK)
        page.text((x + 72, ty + 22), f"${29 + 10 * i}.99  -{10 + 5 * i}%", 11, GREEN)


def draw_product(page: Page, rng: random.Random) -> None:
    y = page.site_header("shop.example", ["Deals", "Laptops", "Cart (0)"], (35, 47, 62))
    page.text((24, y + 12), "Home / Laptops / 14-inch / Aero 14", 11, MUTED)
    pic = (24, y + 36, page.width // 2 - 12, y + 36 + (page.width // 2 - 36) * 3 // 4)
    page.draw.rectangle(pic, fill=(240, 242, 245))
    cx, cy, s = (pic[0] + pic[2]) // 2, (pic[1] + pic[3]) // 2, (pic[2] - pic[0]) // 3
    page.draw.rounded_rectangle((cx - s, cy - s * 2 // 3, cx + s, cy + s // 3), radius=6, fill=(60, 64, 72))
    page.draw.rectangle((cx - s + 8, cy - s * 2 // 3 + 8, cx + s - 8, cy + s // 3 - 8), fill=(120, 170, 230))
    base = cy + s // 3
    page.draw.polygon(
        [(cx - s - 16, base), (cx + s + 16, base), (cx + s + 6, base + 12), (cx - s - 6, base + 12)],
        fill=(90, 94, 102),
    )
    x = page.width // 2 + 12
    page.text((x, y + 36), "Aero 14 laptop", 24)
    for i in range(5):
        sx = x + i * 20
        star = [
            (sx + 8, y + 74),
            (sx + 10, y + 80),
            (sx + 16, y + 80),
            (sx + 11, y + 84),
            (sx + 13, y + 90),
            (sx + 8, y + 86),
            (sx + 3, y + 90),
            (sx + 5, y + 84),
            (sx, y + 80),
            (sx + 6, y + 80),
        ]
        page.draw.polygon(star, fill=ORANGE if i < 4 else RULE)
    page.text((x + 108, y + 76), "4.3 (1,208 reviews)", 12, MUTED)
    page.text((x, y + 104), "$649.00", 28, (177, 39, 4))
    page.text((x, y + 144), "In stock. Free delivery by Friday.", 12, GREEN)
    page.button((x, y + 170, x + 160, y + 206), "Add to cart", ORANGE)
    page.button((x + 172, y + 170, x + 312, y + 206), "Buy now", (35, 47, 62))
    specs = ["14-inch 1920x1200 display", "16 GB RAM, 512 GB SSD", "1.3 kg, 12 h battery", "2x USB-C, HDMI"]
    for i, spec in enumerate(specs):
        page.text((x, y + 224 + i * 20), f"- {spec}", 12)
    page.paragraph(24, pic[3] + 16, page.width - 48, 3, rng, 11)


def draw_mobile_shop(page: Page, rng: random.Random) -> None:
    w = page.width
    y = page.site_header("shop", ["Cart"], (35, 47, 62))
    page.draw.rounded_rectangle((12, y + 12, w - 12, y + 44), radius=8, outline=RULE)
    page.text((24, y + 20), "14-inch laptop", 14)
    page.text((12, y + 56), "Filters: 14 inch  |  Sort: Price", 12, MUTED)
    y += 84
    for name, size, ram, _disk, price in sorted(LAPTOPS, key=lambda item: item[4]):
        if y + 128 > page.height - 56:
            break
        page.draw.rounded_rectangle((12, y, w - 12, y + 118), radius=10, outline=RULE)
        page.draw.rectangle((24, y + 12, 116, y + 106), fill=(225, 230, 238))
        page.text((128, y + 14), f"{name} {size}", 15)
        page.text((128, y + 38), f"{ram} RAM", 12, MUTED)
        page.text((128, y + 62), f"${price:,}", 18, (177, 39, 4))
        page.text((128, y + 90), "Free delivery", 11, GREEN)
        y += 130


def draw_compare(page: Page, rng: random.Random) -> None:
    y = page.site_header("shop.example", ["Deals", "Laptops", "Compare (5)"], (35, 47, 62))
    page.text((24, y + 18), "Compare 14-inch laptops", 22)
    page.paragraph(24, y + 52, page.width - 48, 1, rng, 12)
    cols = ["Model", "Screen", "RAM", "Storage", "Price"]
    xs = [24 + i * (page.width - 48) // len(cols) for i in range(len(cols))]
    ty = y + 90
    page.draw.rectangle((24, ty, page.width - 24, ty + 34), fill=(241, 243, 244))
    for x, col in zip(xs, cols, strict=True):
        page.text((x + 12, ty + 9), col, 13)
    rows = [row for row in LAPTOPS if row[1] == '14"']
    cheapest = min(row[4] for row in rows)
    for i, row in enumerate(rows):
        ry = ty + 34 + i * 40
        if row[4] == cheapest:
            page.draw.rectangle((24, ry, page.width - 24, ry + 40), fill=(230, 244, 234))
        page.draw.line((24, ry + 40, page.width - 24, ry + 40), fill=RULE)
        for x, value in zip(xs, (*row[:4], f"${row[4]:,}"), strict=True):
            page.text((x + 12, ry + 12), value, 13, LINK if x == xs[0] else INK)
    below = ty + 60 + 40 * len(rows)
    page.paragraph(24, below, page.width // 2 - 48, 8, rng, 12)
    prices = [row[4] for row in rows]
    names = [row[0].split()[0] for row in rows]
    bar_chart(
        page,
        (page.width // 2, below, page.width - 24, page.height - 16),
        prices,
        names,
        "Price (USD)",
        prices.index(cheapest),
    )


def draw_dashboard(page: Page, rng: random.Random) -> None:
    w, h, top = page.width, page.height, page.top
    page.draw.rectangle((0, top, 200, h), fill=(32, 41, 56))
    page.text((20, top + 18), "stats.example", 16, WHITE)
    for i, item in enumerate(["Overview", "Revenue", "Orders", "Customers", "Reports", "Settings"]):
        if i == 1:
            page.draw.rectangle((0, top + 56 + i * 36, 200, top + 88 + i * 36), fill=(52, 64, 84))
        page.text((24, top + 64 + i * 36), item, 13, (220, 226, 235))
    page.text((224, top + 16), "Revenue 2024", 22)
    kpis = [("Total revenue", "$476,700"), ("Orders", "9,812"), ("Avg. order", "$48.58"), ("Refunds", "1.9%")]
    card_w = (w - 248 - 3 * 16) // 4
    for i, (label, value) in enumerate(kpis):
        x = 224 + i * (card_w + 16)
        page.draw.rounded_rectangle((x, top + 56, x + card_w, top + 126), radius=8, outline=RULE)
        page.text((x + 14, top + 66), label, 12, MUTED)
        page.text((x + 14, top + 88), value, 22)
    chart_top = top + 142
    bar_chart(
        page, (224, chart_top, w * 2 // 3, h - 16), REVENUE_2024, MONTHS, "Monthly revenue (USD)", BEST_MONTH
    )
    visitors = [60 + 2 * i + rng.randint(-6, 6) for i in range(20)]
    line_chart(page, (w * 2 // 3 + 16, chart_top, w - 24, h - 16), visitors, "Daily visitors")


def draw_table(page: Page, rng: random.Random) -> None:
    y = page.site_header("stats.example", ["Reports", "Export"], (32, 41, 56))
    page.text((24, y + 14), "Revenue by month, 2024", 18)
    cols, xs = ["Month", "Revenue", "Orders", "Change"], [24, 180, 340, 480]
    ty = y + 48
    page.draw.rectangle((16, ty, page.width - 16, ty + 28), fill=(241, 243, 244))
    for x, col in zip(xs, cols, strict=True):
        page.text((x, ty + 7), col, 12)
    previous = REVENUE_2024[0]
    for i, (month, value) in enumerate(zip(MONTHS, REVENUE_2024, strict=True)):
        ry = ty + 28 + i * 26
        if ry + 26 > page.height - 8:
            break
        if value == max(REVENUE_2024):
            page.draw.rectangle((16, ry, page.width - 16, ry + 26), fill=(254, 239, 214))
        elif i % 2:
            page.draw.rectangle((16, ry, page.width - 16, ry + 26), fill=(250, 250, 251))
        change = (value - previous) / previous * 100
        cells = [month, f"${value:,}", f"{value // 48:,}", f"{change:+.1f}%"]
        for x, cell in zip(xs, cells, strict=True):
            page.text((x, ry + 6), cell, 12, (GREEN if change >= 0 else (197, 34, 31)) if x == xs[3] else INK)
        previous = value


def draw_login(page: Page, rng: random.Random) -> None:
    w, h = page.width, page.height
    page.draw.rectangle((0, page.top, w, h), fill=(243, 245, 248))
    card = (w // 2 - 180, page.top + 70, w // 2 + 180, page.top + 430)
    page.draw.rounded_rectangle(card, radius=12, fill=WHITE, outline=RULE)
    page.text((card[0] + 32, card[1] + 28), "stats.example", 22, ACCENT)
    page.text((card[0] + 32, card[1] + 64), "Sign in to view your reports", 13, MUTED)
    for i, (label, value) in enumerate((("Email", "analyst@example.com"), ("Password", "************"))):
        fy = card[1] + 104 + i * 76
        page.text((card[0] + 32, fy), label, 12)
        page.draw.rounded_rectangle((card[0] + 32, fy + 20, card[2] - 32, fy + 56), radius=6, outline=RULE)
        page.text((card[0] + 44, fy + 30), value, 13)
    page.button((card[0] + 32, card[1] + 270, card[2] - 32, card[1] + 310), "Sign in", ACCENT)
    page.text((card[0] + 32, card[1] + 326), "Forgot password?", 12, LINK)
    page.paragraph(w // 2 - 300, card[3] + 40, 600, 2, rng, 11)


def draw_mobile_dashboard(page: Page, rng: random.Random) -> None:
    w = page.width
    y = page.site_header("stats", ["Menu"], (32, 41, 56))
    for i, (label, value) in enumerate((("Revenue 2024", "$476,700"), ("Best month", "Nov"))):
        x = 12 + i * (w - 24) // 2
        page.draw.rounded_rectangle((x, y + 12, x + (w - 24) // 2 - 8, y + 82), radius=8, outline=RULE)
        page.text((x + 12, y + 22), label, 11, MUTED)
        page.text((x + 12, y + 44), value, 20)
    bar_chart(
        page, (12, y + 96, w - 12, y + 356), REVENUE_2024[6:], MONTHS[6:], "Revenue, Jul-Dec", BEST_MONTH - 6
    )
    page.paragraph(16, y + 372, w - 32, 6, rng, 12)


def draw_article(page: Page, rng: random.Random) -> None:
    y = page.site_header("news.example", ["World", "Tech", "Business", "Sport"], (153, 27, 30))
    main_w = page.width - 380
    page.text((32, y + 24), "Laptop prices fall as new 14-inch models arrive", 26)
    page.text((32, y + 64), "By A. Writer  |  12 March 2025  |  4 min read", 12, MUTED)
    page.draw.rectangle((32, y + 92, 32 + main_w, y + 92 + 200), fill=(214, 222, 232))
    yy = page.paragraph(32, y + 310, main_w, 4, rng, 13) + 12
    page.paragraph(32, yy, main_w, 3, rng, 13)
    x = page.width - 320
    page.draw.rounded_rectangle((x, y + 24, page.width - 32, y + 330), radius=8, outline=RULE)
    page.text((x + 16, y + 38), "Trending", 16)
    for i in range(5):
        page.text((x + 16, y + 72 + i * 50), f"{i + 1}", 20, (153, 27, 30))
        page.paragraph(x + 44, y + 74 + i * 50, 230, 2, rng, 11)


def draw_settings_dialog(page: Page, rng: random.Random) -> None:
    # A window screenshot with transparent rounded corners: an RGBA image, as OS tools save them.
    w, h = page.width, page.height
    page.text((24, page.top + 16), "Settings", 20)
    for i, (label, on) in enumerate(
        (("Block pop-ups", True), ("Send do-not-track", False), ("Save passwords", True))
    ):
        ry = page.top + 60 + i * 44
        page.text((24, ry), label, 14)
        page.draw.rounded_rectangle((w - 80, ry - 2, w - 36, ry + 20), radius=11, fill=ACCENT if on else RULE)
        knob = w - 58 if on else w - 80
        page.draw.ellipse((knob + 2, ry, knob + 20, ry + 18), fill=WHITE)
    page.paragraph(24, page.top + 200, w - 48, 5, rng, 12)
    alpha = Image.new("L", (w, h), 0)
    ImageDraw.Draw(alpha).rounded_rectangle((0, 0, w - 1, h - 1), radius=14, fill=255)
    page.image.putalpha(alpha)


@dataclass(frozen=True)
class Shot:
    """One fixture screenshot: file name, size, encoding, page and what it draws."""

    name: str
    width: int
    height: int
    encoding: str  # a key of ENCODINGS
    url: str
    title: str
    draw: Callable[[Page, random.Random], None]
    mobile: bool = False

    @property
    def media_type(self) -> str:
        return f"image/{ENCODINGS[self.encoding]['format'].lower()}"


SHOTS = [
    Shot("start_page.png", 1280, 720, "png", "https://mini-browse.example/", "mini-browse", draw_start),
    Shot(
        "shop_results.jpg",
        1024,
        768,
        "jpeg",
        "https://shop.example/search?q=14-inch+laptop",
        "14-inch laptop - shop.example",
        draw_results,
    ),
    Shot(
        "laptop_detail.webp",
        800,
        600,
        "webp-lossy",
        "https://shop.example/p/aero-14",
        "Aero 14 - shop.example",
        draw_product,
    ),
    Shot(
        "shop_mobile.png",
        390,
        844,
        "png",
        "https://m.shop.example/search?q=14-inch+laptop",
        "shop",
        draw_mobile_shop,
        mobile=True,
    ),
    Shot(
        "laptop_compare.png",
        1280,
        720,
        "png",
        "https://shop.example/compare?size=14",
        "Compare laptops - shop.example",
        draw_compare,
    ),
    Shot(
        "sales_dashboard.webp",
        1280,
        720,
        "webp",
        "https://stats.example/revenue/2024",
        "Revenue 2024",
        draw_dashboard,
    ),
    Shot(
        "revenue_table.webp",
        800,
        600,
        "webp",
        "https://stats.example/reports/revenue?year=2024",
        "Revenue report",
        draw_table,
    ),
    Shot(
        "analytics_login.jpg",
        1024,
        768,
        "jpeg",
        "https://stats.example/login?next=/revenue",
        "Sign in - stats.example",
        draw_login,
    ),
    Shot(
        "dashboard_mobile.webp",
        414,
        896,
        "webp",
        "https://m.stats.example/revenue",
        "stats",
        draw_mobile_dashboard,
        mobile=True,
    ),
    # Not used by the rollouts: a wide laptop screen, and an RGBA window capture.
    Shot(
        "news_article.jpg",
        1366,
        768,
        "jpeg",
        "https://news.example/tech/laptop-prices",
        "Laptop prices fall - news.example",
        draw_article,
    ),
    Shot(
        "settings_dialog.png", 640, 480, "png", "chrome://settings/privacy", "Settings", draw_settings_dialog
    ),
]


def render_shot(shot: Shot) -> bytes:
    """Draw and encode one screenshot; a per-image seed keeps filler text stable."""
    page = Page(shot.width, shot.height, shot.url, shot.title, mobile=shot.mobile)
    shot.draw(page, random.Random(shot.name))
    return page.encode(shot.encoding)


def data_url(shot: Shot, data: bytes) -> str:
    return f"data:{shot.media_type};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a web browsing agent. After every action you see a screenshot of the page. "
    "Use the tools goto(url), click(x, y) and type_text(text); reply with the answer when you know it."
)
TASKS = {
    0: (
        "mini-browse/cheapest-14-inch-laptop",
        "Find the cheapest 14-inch laptop on shop.example and tell me its price.",
        "Aero 14, $649",
    ),
    1: (
        "mini-browse/best-revenue-month",
        "On stats.example, which month of 2024 had the highest revenue, and how much was it?",
        "November 2024, $48,200",
    ),
}


@dataclass(frozen=True)
class Step:
    """One agent step: a tool call, then the tool result carrying a screenshot."""

    thought: str
    tool: str
    arguments: dict[str, Any]
    result: str
    shot: str
    shape: str  # the image part shape of the tool result (contract.md section 3)


@dataclass(frozen=True)
class Rollout:
    example_id: int
    prompt_shape: str
    steps: tuple[Step, Step]
    answer: str
    scores: dict[str, float]
    weights: dict[str, float] = field(default_factory=lambda: {"task_success": 1.0, "format": 0.5})

    @property
    def reward(self) -> float:
        return sum(self.scores[name] * self.weights[name] for name in self.scores)


ROLLOUTS = [
    Rollout(
        0,
        "image_url",
        (
            Step(
                "I will search the shop for 14-inch laptops.",
                "goto",
                {"url": "https://shop.example/search?q=14-inch+laptop&sort=price"},
                "Loaded https://shop.example/search?q=14-inch+laptop&sort=price",
                "shop_results.jpg",
                "image_url",
            ),
            Step(
                "Results are sorted by price; the first 14-inch one is the Aero 14. Opening it.",
                "click",
                {"x": 180, "y": 310},
                "Clicked the link 'Aero 14 14\" laptop'",
                "laptop_detail.webp",
                "image_url",
            ),
        ),
        "The cheapest 14-inch laptop is the Aero 14 at $649.",
        {"task_success": 1.0, "format": 1.0},
    ),
    Rollout(
        0,
        "image",
        (
            Step(
                "Searching on the shop.",
                "goto",
                {"url": "https://m.shop.example/search?q=14-inch+laptop"},
                "Loaded https://m.shop.example/search?q=14-inch+laptop",
                "shop_mobile.png",
                "image_url",
            ),
            Step(
                "Let me compare the 14-inch models side by side.",
                "goto",
                {"url": "https://shop.example/compare?size=14"},
                "Loaded https://shop.example/compare?size=14",
                "laptop_compare.png",
                "image_url",
            ),
        ),
        "The Lumen 14 Plus, $899.",
        {"task_success": 0.0, "format": 1.0},
    ),
    Rollout(
        1,
        "image_url",
        (
            Step(
                "Opening the 2024 revenue dashboard.",
                "goto",
                {"url": "https://stats.example/revenue/2024"},
                "Loaded https://stats.example/revenue/2024",
                "sales_dashboard.webp",
                "image_url_string",
            ),
            Step(
                "The tallest bar is November; the report table has the exact figure.",
                "goto",
                {"url": "https://stats.example/reports/revenue?year=2024"},
                "Loaded https://stats.example/reports/revenue?year=2024",
                "revenue_table.webp",
                "image_url",
            ),
        ),
        "November 2024 had the highest revenue: $48,200.",
        {"task_success": 1.0, "format": 1.0},
    ),
    Rollout(
        1,
        "image_url",
        (
            Step(
                "Going to the stats site.",
                "goto",
                {"url": "https://stats.example/revenue"},
                "Redirected to https://stats.example/login?next=/revenue",
                "analytics_login.jpg",
                "input_image",
            ),
            Step(
                "Signing in with the saved account.",
                "click",
                {"x": 512, "y": 427},
                "Signed in; loaded https://m.stats.example/revenue",
                "dashboard_mobile.webp",
                "image",
            ),
        ),
        "November, about $48,000.",
        {"task_success": 1.0, "format": 0.0},
    ),
]
START_SHOT = "start_page.png"


def image_part(shape: str, url: str) -> dict[str, Any]:
    """Return an image content part in one of the shapes of contract.md section 3."""
    if shape == "image_url":
        return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    if shape == "image_url_string":
        return {"type": "image_url", "image_url": url}
    if shape == "image":
        return {"type": "image", "image": url}
    if shape == "input_image":
        return {"type": "input_image", "image_url": url}
    raise ValueError(f"unknown image part shape {shape!r}")


def call_id(index: int, turn: int) -> str:
    return f"call_{index}_{turn}"


def rollout_messages(index: int, rollout: Rollout, urls: dict[str, str]) -> list[dict[str, Any]]:
    """Return the rollout's chat: system, user (start screenshot), then assistant/tool turns."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": TASKS[rollout.example_id][1]},
                image_part(rollout.prompt_shape, urls[START_SHOT]),
            ],
        },
    ]
    for turn, step in enumerate(rollout.steps):
        messages.append(
            {
                "role": "assistant",
                "content": step.thought,
                "tool_calls": [
                    {
                        "id": call_id(index, turn),
                        "type": "function",
                        "function": {"name": step.tool, "arguments": json.dumps(step.arguments)},
                    }
                ],
            }
        )
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call_id(index, turn),
                "content": [
                    {"type": "text", "text": step.result},
                    image_part(step.shape, urls[step.shot]),
                ],
            }
        )
    messages.append({"role": "assistant", "content": rollout.answer})
    return messages


def rollout_images(rollout: Rollout) -> list[str]:
    return [START_SHOT, *(step.shot for step in rollout.steps)]


def rollout_record(index: int, rollout: Rollout, urls: dict[str, str]) -> dict[str, Any]:
    """Return one line of a verifiers-style rollout JSONL (mini_browse.jsonl)."""
    messages = rollout_messages(index, rollout, urls)
    task, _, answer = TASKS[rollout.example_id]
    return {
        "example_id": rollout.example_id,
        "task": task,
        "prompt": messages[:2],
        "completion": messages[2:],
        "answer": answer,
        "reward": rollout.reward,
        "metrics": dict(rollout.scores),
        "info": {"env_id": ENV_ID, "rollout": index, "start_url": "https://mini-browse.example/"},
    }


# ---------------------------------------------------------------------------------------------
# Rendering to tokens
# ---------------------------------------------------------------------------------------------

# The special tokens of each family's tokenizer, with their published ids (docs/fixtures.md).
QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
KIMI_SPECIALS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "<|media_begin|>": 163602,
    "<|media_content|>": 163603,
    "<|media_end|>": 163604,
    "<|media_pad|>": 163605,
    "<think>": 163606,
    "</think>": 163607,
    "[UNK]": 163838,
    "[PAD]": 163839,
}


@dataclass(frozen=True)
class Shown:
    """An image in a rendered message: the screenshot it shows."""

    shot: str


# A rendered message: pieces (a special token's name, plain text, or an image), each flagged
# sampled (trainable, mask true) or not.
Piece = str | Shown
Rendered = list[tuple[Piece, bool]]


def prompt(*pieces: Piece) -> Rendered:
    return [(piece, False) for piece in pieces]


def sampled(*pieces: Piece) -> Rendered:
    return [(piece, True) for piece in pieces]


def content(message: dict[str, Any], shots: list[str]) -> list[Piece]:
    """A message's content parts in order: text as text, each image part as the next shot."""
    if isinstance(message["content"], str):
        return [message["content"]]
    pending = iter(shots)
    return [part["text"] if part["type"] == "text" else Shown(next(pending)) for part in message["content"]]


def render_qwen(message: dict[str, Any], shots: list[str]) -> Rendered:
    """Render one message as the Qwen3-VL chat template does (tool results as user turns)."""
    role = message["role"]
    if role == "assistant":
        body: list[Piece] = [message["content"]]
        for call in message.get("tool_calls", []):
            function = call["function"]
            payload = json.dumps({"name": function["name"], "arguments": json.loads(function["arguments"])})
            body += ["\n", "<tool_call>", f"\n{payload}\n", "</tool_call>"]
        # The generation prompt is not sampled; the reply and its end token are; the newline is template.
        return [*prompt("<|im_start|>", "assistant\n"), *sampled(*body, "<|im_end|>"), *prompt("\n")]
    if role == "tool":
        return prompt(
            "<|im_start|>", "user\n", "<tool_response>", "\n", *content(message, shots), "\n",
            "</tool_response>", "<|im_end|>", "\n",
        )  # fmt: skip
    return prompt("<|im_start|>", f"{role}\n", *content(message, shots), "<|im_end|>", "\n")


def render_kimi(message: dict[str, Any], shots: list[str]) -> Rendered:
    """Render one message in Kimi K2.5's chat format (tool results as system turns named tool)."""
    role = message["role"]
    if role == "assistant":
        body: list[Piece] = [message["content"]]
        if calls := message.get("tool_calls", []):
            body.append("<|tool_calls_section_begin|>")
            for call in calls:
                body += [
                    "<|tool_call_begin|>", f"functions.{call['function']['name']}:{call['id']}",
                    "<|tool_call_argument_begin|>", call["function"]["arguments"], "<|tool_call_end|>",
                ]  # fmt: skip
            body.append("<|tool_calls_section_end|>")
        return [*prompt("<|im_assistant|>", "assistant", "<|im_middle|>"), *sampled(*body, "<|im_end|>")]
    if role == "tool":
        return prompt(
            "<|im_system|>", "tool", "<|im_middle|>", f"## Return of {message['tool_call_id']}\n",
            *content(message, shots), "<|im_end|>",
        )  # fmt: skip
    opener = "<|im_system|>" if role == "system" else "<|im_user|>"
    return prompt(opener, role, "<|im_middle|>", *content(message, shots), "<|im_end|>")


def text_tokens(text: str) -> list[int]:
    """Byte-level fallback tokenizer: one token per UTF-8 byte, id = byte value (0..255).

    No real tokenizer can be downloaded; these ids sit far below every special token.
    """
    return list(text.encode("utf-8"))


@dataclass(frozen=True)
class Renderer:
    """How one model family turns messages into tokens."""

    family: str
    specials: dict[str, int]
    render: Callable[[dict[str, Any], list[str]], Rendered]
    image_open: tuple[str, ...]  # pieces before the pad run: Kimi's include the text "image"
    pad: str
    image_close: str
    descriptor_extra: dict[str, str]

    def tokens(self, piece: str) -> list[int]:
        """Tokens of a special token's name or of plain text."""
        return [self.specials[piece]] if piece in self.specials else text_tokens(piece)

    def image_tokens(self, length: int) -> tuple[list[int], int]:
        """Return the tokens of one image and the index of its first pad token in them."""
        opening = [token for piece in self.image_open for token in self.tokens(piece)]
        return [*opening, *[self.specials[self.pad]] * length, self.specials[self.image_close]], len(opening)


RENDERERS = [
    Renderer(
        family="qwen_vl",
        specials=QWEN_SPECIALS,
        render=render_qwen,
        image_open=("<|vision_start|>",),
        pad="<|image_pad|>",
        image_close="<|vision_end|>",
        descriptor_extra={},
    ),
    Renderer(
        family="kimi_k25",
        specials=KIMI_SPECIALS,
        render=render_kimi,
        image_open=("<|media_begin|>", "image", "<|media_content|>"),
        pad="<|media_pad|>",
        image_close="<|media_end|>",
        descriptor_extra={"vllm_modality": "vision_chunk"},
    ),
]


@dataclass(frozen=True)
class Encoded:
    """An encoded fixture screenshot, with its data URL and content hash."""

    shot: Shot
    data: bytes
    url: str
    hash: str


def logprobs(rng: random.Random, count: int) -> list[float]:
    """Deterministic plausible logprobs: negative, mostly near zero, a few confident misses."""
    return [-round(0.0001 + rng.random() ** 4 * 3.0, 4) for _ in range(count)]


def trace_node(
    message: dict[str, Any],
    shots: list[str],
    renderer: Renderer,
    family: Family,
    images: dict[str, Encoded],
    offset: int,
    rng: random.Random,
) -> dict[str, Any]:
    """Return one trace node: the message's tokens, mask, logprobs and image sidecar.

    ``offset`` is where the node starts in its branch: placeholder offsets are absolute.
    """
    tokens: list[int] = []
    mask: list[bool] = []
    items, hashes, placeholders = [], [], []
    for piece, is_sampled in renderer.render(message, shots):
        if isinstance(piece, Shown):
            image = images[piece.shot]
            grid = family.layout(image.shot.width, image.shot.height)
            length = family.placeholder_length(grid)
            new, pad_at = renderer.image_tokens(length)
            items.append(
                {
                    "kind": "prime_raw_mm_item",
                    "modality": "image",
                    "family": renderer.family,
                    **renderer.descriptor_extra,
                    "raw_image_data": image.url,
                    "payload": family.payload(grid),
                }
            )
            hashes.append(image.hash)
            placeholders.append({"offset": offset + len(tokens) + pad_at, "length": length})
        else:
            new = renderer.tokens(piece)
        tokens += new
        mask += [is_sampled] * len(new)
    node: dict[str, Any] = {
        "message": message,
        "token_ids": tokens,
        "mask": mask,
        "logprobs": logprobs(rng, sum(mask)),
        "sampled": message["role"] == "assistant",
    }
    if items:
        node["multi_modal_data"] = {
            "mm_items": {"image": items},
            "mm_hashes": {"image": hashes},
            "mm_placeholders": {"image": placeholders},
        }
    return node


def image_count(message: dict[str, Any]) -> int:
    if isinstance(message["content"], str):
        return 0
    return sum(1 for part in message["content"] if part["type"] != "text")


def episode(
    index: int, rollout: Rollout, renderer: Renderer, family: Family, images: dict[str, Encoded]
) -> dict[str, Any]:
    """Return one verifiers v1 episode: a single trace whose nodes form one chain (one branch)."""
    messages = rollout_messages(index, rollout, {name: image.url for name, image in images.items()})
    pending = rollout_images(rollout)
    rng = random.Random(f"{renderer.family}:{index}")
    nodes, offset = [], 0
    for position, message in enumerate(messages):
        count = image_count(message)
        shots, pending = pending[:count], pending[count:]
        node = trace_node(message, shots, renderer, family, images, offset, rng)
        offset += len(node["token_ids"])
        nodes.append(
            {
                "parent": position - 1 if position else None,
                **node,
                "timestamp": BASE_TIMESTAMP + 60 * index + 5 * position,
            }
        )
    rewards: dict[str, Any] | float = {
        name: {"score": score, "weight": rollout.weights[name]} for name, score in rollout.scores.items()
    }
    # Kimi traces carry the summed reward as a plain number: both forms of traces.md appear.
    if renderer.family == "kimi_k25":
        rewards = rollout.reward
    return {
        "env": {"id": ENV_ID},
        "episode_id": f"episode-{index:04d}",
        "traces": [
            {
                "id": f"trace-{index:04d}",
                "agent": {"id": "policy", "trainable": True},
                "task": TASKS[rollout.example_id][0],
                "example_id": rollout.example_id,
                "temperature": TEMPERATURE,
                "rewards": rewards,
                "nodes": nodes,
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------

MODEL_DIRS = {
    "qwen3_vl": (
        "qwen3_vl",
        QWEN_SPECIALS,
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 262144,
        },
    ),
    "kimi_k25": (
        "kimi_k25",
        KIMI_SPECIALS,
        {
            "tokenizer_class": "TikTokenTokenizer",
            "bos_token": "[BOS]",
            "eos_token": "[EOS]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "model_max_length": 262144,
        },
    ),
}


def tokenizer_config(specials: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """Return a tokenizer_config.json listing the special tokens (no vocabulary: offline only)."""
    decoder = {
        str(token_id): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name, token_id in sorted(specials.items(), key=lambda item: item[1])
    }
    return {"added_tokens_decoder": decoder, **extra}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def dump_json(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def dump_jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)


def build() -> dict[str, bytes]:
    """Return every fixture file, relative path -> bytes."""
    files: dict[str, bytes] = {}
    images: dict[str, Encoded] = {}
    for shot in SHOTS:
        data = render_shot(shot)
        images[shot.name] = Encoded(shot, data, data_url(shot, data), content_hash(data))
        files[f"images/{shot.name}"] = data
    urls = {name: image.url for name, image in images.items()}
    files["rollouts/mini_browse.jsonl"] = dump_jsonl(
        [rollout_record(i, rollout, urls) for i, rollout in enumerate(ROLLOUTS)]
    )
    families = Families()
    for renderer in RENDERERS:
        family = families.get(renderer.family)
        episodes = [episode(i, rollout, renderer, family, images) for i, rollout in enumerate(ROLLOUTS)]
        files[f"traces/{renderer.family}.jsonl"] = dump_jsonl(episodes)
    for directory, (bundled, specials, extra) in MODEL_DIRS.items():
        config = json.loads((BUNDLED_CONFIGS / bundled / "preprocessor_config.json").read_bytes())
        files[f"models/{directory}/preprocessor_config.json"] = dump_json(config)
        files[f"models/{directory}/tokenizer_config.json"] = dump_json(tokenizer_config(specials, extra))
    files["manifest.json"] = dump_json(manifest(files, images, families))
    return files


def manifest(files: dict[str, bytes], images: dict[str, Encoded], families: Families) -> dict[str, Any]:
    """Describe the fixtures: the libraries that encoded them, each image, each file's digest."""
    return {
        "generator": "scripts/make_fixtures.py",
        "libraries": library_versions(),
        "images": {
            name: {
                "width": image.shot.width,
                "height": image.shot.height,
                "encoding": image.shot.encoding,
                "hash": image.hash,
                "used_by_rollouts": any(name in rollout_images(r) for r in ROLLOUTS),
                "grids": {
                    renderer.family: list(
                        families.get(renderer.family).layout(image.shot.width, image.shot.height)
                    )
                    for renderer in RENDERERS
                },
            }
            for name, image in images.items()
        },
        "files": {
            path: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for path, data in sorted(files.items())
        },
    }


def library_versions() -> dict[str, str | None]:
    """The encoder versions the image bytes depend on: fixtures are byte-identical only under these."""
    import PIL

    return {
        "pillow": PIL.__version__,
        **{name: features.version(name) for name in ("zlib", "libjpeg_turbo", "webp", "freetype2")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=REPO_ROOT / "fixtures",
        help="directory to write the fixtures into (default: the repo's fixtures/)",
    )
    args = parser.parse_args(argv)
    files = build()
    for path, data in files.items():
        atomic_write(args.out / path, data)
    total = sum(len(data) for data in files.values())
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB, to {args.out}")


if __name__ == "__main__":
    main()
