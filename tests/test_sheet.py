"""Sweep pictures that read at any size: labels of a sheet of 32 px results and of a trade-off
plot never overlap (PIL's and matplotlib's text extents)."""

import itertools

import numpy as np
from PIL import Image

from nstjax.sheet import grid_sheet, overlapping, tradeoff_figure


def points():
    values = itertools.product(["1000.0", "10000.0", "100000.0", "1000000.0"], ["0.5", "1.0"], ["0", "1"])
    return [{"loss.beta": b, "optim.lr": lr, "seed": s} for b, lr, s in values]


def test_a_sheet_of_32_px_results_labels_each_value_once_without_overlap():
    rng = np.random.default_rng(0)
    pts = points()
    tiles = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in pts]
    made = grid_sheet(tiles, pts, ["loss.beta", "optim.lr", "seed"])
    sheet, boxes = made.image, made.labels
    assert overlapping(boxes) == []
    assert all(0 <= b[0] and b[2] <= sheet.width and 0 <= b[1] and b[3] <= sheet.height for b in boxes)
    assert len(boxes) == 1 + 4 + 4  # the first key once, its 4 values, the 4 rows (lr, seed)
    heads = sorted(boxes[1:5])
    assert all(a[2] < b[0] for a, b in zip(heads, heads[1:]))  # each column's label ends before the next
    assert sheet.width >= 4 * 160  # small results upscaled


def test_a_tradeoff_plot_names_each_point_by_its_values_without_overlap():
    pts = points()
    rng = np.random.default_rng(1)
    style, content = list(10 ** rng.uniform(1, 5, len(pts))), list(rng.uniform(1, 2, len(pts)))
    fig = tradeoff_figure(pts, ["loss.beta", "optim.lr", "seed"], style, content)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = ax.get_legend().get_texts()
    assert [t.get_text() for t in texts][0] == "loss.beta=1000.0, optim.lr=0.5, seed=0"
    boxes = [tuple(t.get_window_extent(renderer).extents) for t in texts]
    assert overlapping(boxes) == []
    plot = ax.get_window_extent(renderer).extents
    assert all(b[0] >= plot[2] for b in boxes)  # beside the plot, not over its points
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"  # style spans decades, content does not
