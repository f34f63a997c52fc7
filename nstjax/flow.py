"""Optical flow, its consistency weights, warping, and the temporal error (host side, numpy).

A flow from frame a to frame b is an (H, W, 2) array of (dx, dy): the pixel (x, y) of a is at
(x + dx, y + dy) in b. Warping an image of frame b into frame a samples it there:
``warp(img_b, flow_ab)(x) = img_b(x + flow_ab(x))``. For frame i and an earlier frame i − j, the
flow from i to i − j (the *backward* flow ŵ) warps the stylised frame i − j into frame i.

Consistency weights (Ruder, Dosovitskiy & Brox 2016, artistic-videos' consistencyChecker.cpp),
for the pixels of frame a from the flow a → b (ŵ) and the flow b → a (w), w̃(x) = w(x + ŵ(x)):

    0     where x + ŵ(x) leaves the frame (its bilinear cell is not inside)
    −1    disocclusion: |w̃ + ŵ|² ≥ 0.01 (|w̃|² + |ŵ|²) + 0.5
    0     motion boundary: |∂x ŵ|² + |∂y ŵ|² > 0.01 |ŵ|² + 0.002
    1     elsewhere

then smoothed by a Gaussian of σ = 0.8 (the −1 of disocclusions spreads the zero outwards) and
clipped to [0, 1]. As Brox's CFilter.h, which consistencyChecker.cpp uses: the derivative is the
central difference ½(f(x+1) − f(x−1)), the Gaussian has radius ⌈2σ⌉ (5 taps) normalised to sum 1,
and both filters extend the image symmetrically at its border (f(−1) = f(0)). The C++ program
stores the weights as an 8-bit .pgm (truncated to 1/255 steps); they are kept unrounded here.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SMOOTH_SIGMA = 0.8
"""consistencyChecker.cpp's SMOOTH_STRENGH: σ of the Gaussian the weights are smoothed with."""
PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}
"""video.flow_preset: OpenCV's DISOpticalFlow_PRESET_ULTRAFAST, _FAST and _MEDIUM."""


def _cv2():
    from nstjax.frames import require_video_extra

    require_video_extra()
    import cv2

    return cv2


def _gray(img: np.ndarray) -> np.ndarray:
    """An (H, W, 3) RGB image in [0, 1] as 8-bit luminance, what OpenCV's flows take."""
    cv2 = _cv2()
    return cv2.cvtColor(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)


def optical_flow(a: np.ndarray, b: np.ndarray, method: str = "dis", preset: str = "medium") -> np.ndarray:
    """The flow from frame ``a`` to frame ``b`` (RGB in [0, 1]): OpenCV's DIS (Kroeger et al. 2016)
    with ``preset``, or Farnebäck's (2003) with OpenCV's customary parameters."""
    cv2 = _cv2()
    ga, gb = _gray(a), _gray(b)
    if method == "dis":
        flow = cv2.DISOpticalFlow_create(PRESETS[preset]).calc(ga, gb, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 5, 15, 5, 7, 1.5, 0)
    else:
        raise ValueError(f"unknown flow method {method!r}: dis or farneback")
    return np.asarray(flow, np.float32)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """img sampled at (x, y), each inside [0, W − 1] × [0, H − 1]."""
    h, w = img.shape[:2]
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = (x - x0)[..., None], (y - y0)[..., None]
    top = (1 - ax) * img[y0, x0] + ax * img[y0, x1]
    bottom = (1 - ax) * img[y1, x0] + ax * img[y1, x1]
    return (1 - ay) * top + ay * bottom


def warp(img: np.ndarray, flow: np.ndarray, fill) -> np.ndarray:
    """``img`` (H, W, C) sampled bilinearly at x + flow(x); where that leaves the image, ``fill``
    (artistic-videos fills with the network's mean pixel)."""
    h, w = flow.shape[:2]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = gx + flow[..., 0], gy + flow[..., 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    out = _bilinear(np.asarray(img, np.float64), np.clip(x, 0, w - 1), np.clip(y, 0, h - 1))
    out = np.where(inside[..., None], out, np.asarray(fill, np.float64))
    return out.astype(np.float32)


def _symmetric_filter(f: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along ``axis`` with an odd kernel, the array extended symmetrically (f(−1) = f(0))."""
    r = len(kernel) // 2
    pad = [(0, 0)] * f.ndim
    pad[axis] = (r, r)
    g = np.pad(f, pad, mode="symmetric")
    n = f.shape[axis]
    return sum(k * np.take(g, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised Gaussian of radius ⌈2σ⌉ (CFilter.h's CSmooth(σ, 2))."""
    r = max(1, math.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def consistency(flow_ab: np.ndarray, flow_ba: np.ndarray) -> np.ndarray:
    """The consistency weights (H, W) in [0, 1] of frame a's pixels (see the module)."""
    flow_ab, flow_ba = np.asarray(flow_ab, np.float64), np.asarray(flow_ba, np.float64)
    h, w = flow_ab.shape[:2]
    central = np.array([-0.5, 0.0, 0.5])
    dx, dy = _symmetric_filter(flow_ab, central, 1), _symmetric_filter(flow_ab, central, 0)
    edge = np.sum(dx ** 2 + dy ** 2, axis=-1)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    bx, by = gx + flow_ab[..., 0], gy + flow_ab[..., 1]
    x1, y1 = np.floor(bx), np.floor(by)
    inside = (x1 >= 0) & (x1 + 1 < w) & (y1 >= 0) & (y1 + 1 < h)
    back = _bilinear(flow_ba, np.clip(bx, 0, w - 1), np.clip(by, 0, h - 1))
    sq = np.sum(flow_ab ** 2, axis=-1)
    disoccluded = np.sum((flow_ab + back) ** 2, axis=-1) >= 0.01 * (sq + np.sum(back ** 2, axis=-1)) + 0.5
    boundary = edge > 0.01 * sq + 0.002
    c = np.where(~inside, 0.0, np.where(disoccluded, -1.0, np.where(boundary, 0.0, 1.0)))
    k = gaussian_kernel(SMOOTH_SIGMA)
    c = _symmetric_filter(_symmetric_filter(c, k, 0), k, 1)
    return np.clip(c, 0.0, 1.0).astype(np.float32)


def long_term_weights(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """artistic-videos' ``closestFirst``: the weights of the earlier frames, closest first, each
    less what the closer frames already took, c'_j = max(c_j − Σ_{k<j} c'_k, 0), so that a pixel
    is compared with the closest frame where it was visible. (Ruder et al.'s paper subtracts the
    unprocessed c_k; the code, followed here, the processed c'_k: equal for weights in {0, 1}.)"""
    out: list[np.ndarray] = []
    for c in weights:
        out.append(np.maximum(c - sum(out, np.zeros_like(c)), 0.0) if out else np.asarray(c))
    return out


def temporal_error(frame: np.ndarray, previous_warped: np.ndarray, weights: np.ndarray) -> float:
    """Ruder et al.'s measure of a pair: (1/D) Σ_k c_k (x_k − ω_k)², D = H·W·C, x the frame and ω
    the previous frame warped into it by the content's flow, c its consistency weights."""
    diff = np.asarray(frame, np.float64) - np.asarray(previous_warped, np.float64)
    return float(np.mean(np.asarray(weights, np.float64)[..., None] * diff ** 2))
