"""Contact sheets and trade-off plots of a sweep that read at any size.

A sheet is a grid: a column per value of the first swept key, a row per combination of the others.
The first key's name is written once, as the columns' title; each column is headed by its value and
each row by its values; every cell is at least as wide as its label and at least ``least`` pixels
(small results are upscaled), so no label runs into the next.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class Sheet:
    """A contact sheet: its image, the boxes (x0, y0, x1, y1) of its labels and of its tiles (one per point)."""

    image: Image.Image
    labels: list[Box]
    tiles: list[Box]


def _text_width(text: str) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text)
    return right - left


def grid_sheet(tiles: Sequence[Image.Image], points: Sequence[dict], keys: Sequence[str],
               least: int = 160) -> Sheet:
    """The sheet of ``tiles`` (one per point: its values of ``keys`` as text)."""
    first, rest = (keys[0] if keys else ""), list(keys[1:])
    columns = list(dict.fromkeys(str(p[first]) if first else "" for p in points))
    row_text = [", ".join(f"{k}={p[k]}" for k in rest) for p in points]
    rows = list(dict.fromkeys(row_text))
    cell = max([least, *(_text_width(c) + 8 for c in columns)])
    heights = [round(t.height * cell / t.width) for t in tiles]
    cell_h = max(heights)
    label = max([0, *(_text_width(r) + 12 for r in rows if r)])
    top, line, pad = 34, 14, 6
    sheet = Image.new("RGB", (label + len(columns) * (cell + pad) + pad, top + len(rows) * (cell_h + pad)), "white")
    pen = ImageDraw.Draw(sheet)
    boxes: list[Box] = []
    placed: list[Box] = []

    def write(xy, text):
        if text:
            pen.text(xy, text, fill="black")
            boxes.append(pen.textbbox(xy, text))

    write((label + pad, 2), first)
    for j, c in enumerate(columns):
        write((label + pad + j * (cell + pad), 2 + line), c)
    for i, r in enumerate(rows):
        write((4, top + i * (cell_h + pad) + cell_h // 2 - 6), r)
    for tile, p, r, h in zip(tiles, points, row_text, heights):
        j, i = columns.index(str(p[first]) if first else ""), rows.index(r)
        x, y = label + pad + j * (cell + pad), top + i * (cell_h + pad)
        sheet.paste(tile.convert("RGB").resize((cell, h), Image.LANCZOS), (x, y))
        placed.append((x, y, x + cell, y + h))
    return Sheet(sheet, boxes, placed)


def overlapping(boxes: Sequence[Box]) -> list[tuple[Box, Box]]:
    """The pairs of boxes that overlap."""
    return [(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


def tradeoff_figure(points: Sequence[dict], keys: Sequence[str], style: Sequence[float], content: Sequence[float]):
    """Content yardstick against style yardstick, a marker per point and a legend naming its swept
    values; an axis is logarithmic where its values span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    markers = "osD^v<>pPX*h"
    for k, (p, x, y) in enumerate(zip(points, style, content)):
        label = ", ".join(f"{key}={p[key]}" for key in keys) or f"n={p.get('n', k)}"
        ax.scatter([x], [y], marker=markers[k % len(markers)], label=label)
    for values, scale in ((style, ax.set_xscale), (content, ax.set_yscale)):
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and positive and max(positive) > 10 * min(positive):
            scale("log")
    ax.set_xlabel("style yardstick (mean E_l, relu1_1…relu5_1)")
    ax.set_ylabel("content yardstick (½Σ(F−P)², relu4_2)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
