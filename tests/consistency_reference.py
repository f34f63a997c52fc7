"""A plain, loop-based float64 numpy port of Ruder et al.'s ``consistencyChecker.cpp``.

Not a test: a reference that ``nstjax.flow.consistency`` can be checked against.
Nothing here imports nstjax.

Sources read
============

* ``consistencyChecker/consistencyChecker.cpp`` (manuelruder/artistic-videos; the
  stored copy read is the fork fdan/artistic-videos @ bd14f1c5…, same code with
  comments added): ``checkConsistency`` and ``main``.
* ``consistencyChecker/CFilter.h`` (Thomas Brox's library, as shipped with it; the
  stored copy read is zeruniverse/fast-artistic-videos @ 6811d9a2…).
* ``CMatrix.h``: ``clip`` and ``writeToPGM``.

What CFilter.h says
===================

A ``CFilter`` of size n and delta d holds taps for offsets i = -d .. n-d-1
(``operator()(i)`` is ``mData[i+mDelta]``), and every ``NFilter::filter`` is a
*correlation*, ``result(x) += aFilter[i]*aTensor(x+i,...)`` for i in [A, B).

* ``CDerivative<float>(3)``: ``CFilter<T>(aSize,(aSize-1) >> 1)``, so offsets
  -1, 0, 1, with ``mData[0] = -0.5; mData[1] = 0; mData[2] = 0.5;`` — the central
  difference ½(f(x+1) − f(x−1)).
* ``CSmooth<float>(0.8, 2.0)``: ``CFilter<T>(2*(int)ceil(aPrecision*aSigma)+1,
  (int)ceil(aPrecision*aSigma))`` = 5 taps, offsets -2 .. 2, each
  ``exp(i*i/(-2.0*aSqrSigma))/(aSigma*sqrt(2.0*NMath::Pi))``, then
  ``invSum = 1.0/this->sum()`` (sum of the absolute taps) so the taps sum to 1.
* Border (every 1D pass, x, y, tensor or matrix alike)::

      if (x+i < 0) ... aTensor(-1-x-i,y,z);
      else if (x+i >= aTensor.xSize()) ... aTensor(a2Size-x-i,y,z);   // a2Size = 2*xSize-1

  i.e. half-sample symmetric extension: f(−1) = f(0), f(−2) = f(1), f(W) = f(W−1).
* ``NFilter::filter(reliable, smooth, smooth)`` (in-place CMatrix version) filters
  in x first, then in y, with that same border rule.

``main`` then calls ``reliable.clip(0.0f, 255.0f)`` and ``writeToPGM``, which
stores ``(char)mData[i]``: a truncation to an integer. ``reference_consistency``
returns the clipped value / 255 un-truncated by default; ``pgm=True`` applies the
truncation (floor, the values being >= 0) the .pgm file would hold.
"""

from __future__ import annotations

import math

import numpy as np

MOTION_BOUNDARIE_VALUE = 0.0
SMOOTH_STRENGH = 0.8


def derivative_taps():
    """CDerivative<float>(3): {offset: tap}."""
    return {-1: -0.5, 0: 0.0, 1: 0.5}


def smooth_taps(sigma=SMOOTH_STRENGH, precision=2.0):
    """CSmooth<float>(sigma, precision): {offset: tap}, normalised by the sum of |taps|."""
    r = int(math.ceil(precision * sigma))
    taps = {}
    for i in range(0, r + 1):
        t = math.exp(i * i / (-2.0 * sigma * sigma)) / (sigma * math.sqrt(2.0 * math.pi))
        taps[i] = t
        taps[-i] = t
    total = sum(abs(t) for t in taps.values())
    return {i: t / total for i, t in taps.items()}


def mirror(k, n):
    """CFilter.h's border rule: -1-k below 0, 2n-1-k at or above n."""
    if k < 0:
        return -1 - k
    if k >= n:
        return 2 * n - 1 - k
    return k


def filter_x(img, taps):
    """NFilter::filter(..., aFilter, 1[, 1]): correlation along x (axis 1)."""
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            for i, t in taps.items():
                out[y, x] += t * img[y, mirror(x + i, w)]
    return out


def filter_y(img, taps):
    """NFilter::filter(..., 1, aFilter[, 1]): correlation along y (axis 0), the same rule."""
    return filter_x(img.swapaxes(0, 1), taps).swapaxes(0, 1)


def reference_consistency(flow1, flow2, pgm=False):
    """Weights (H, W) in [0, 1] of flow1's pixels: flow1 from frame a to b, flow2 from b to a,
    each (H, W, 2) of (dx, dy). The .pgm value / 255 (truncated to an integer first if ``pgm``)."""
    flow1 = np.asarray(flow1, np.float64)
    flow2 = np.asarray(flow2, np.float64)
    h, w = flow1.shape[:2]

    # checkConsistency
    dx = filter_x(flow1, derivative_taps())
    dy = filter_y(flow1, derivative_taps())
    motion_edge = np.zeros((h, w))
    for ay in range(h):
        for ax in range(w):
            motion_edge[ay, ax] = (dx[ay, ax, 0] ** 2 + dx[ay, ax, 1] ** 2
                                   + dy[ay, ax, 0] ** 2 + dy[ay, ax, 1] ** 2)

    reliable = np.full((h, w), 255.0)
    for ay in range(h):
        for ax in range(w):
            bx = ax + flow1[ay, ax, 0]
            by = ay + flow1[ay, ax, 1]
            x1 = int(math.floor(bx))
            y1 = int(math.floor(by))
            x2 = x1 + 1
            y2 = y1 + 1
            if x1 < 0 or x2 >= w or y1 < 0 or y2 >= h:
                reliable[ay, ax] = 0.0
                continue
            alpha_x = bx - x1
            alpha_y = by - y1
            a = (1.0 - alpha_x) * flow2[y1, x1, 0] + alpha_x * flow2[y1, x2, 0]
            b = (1.0 - alpha_x) * flow2[y2, x1, 0] + alpha_x * flow2[y2, x2, 0]
            u = (1.0 - alpha_y) * a + alpha_y * b
            a_ = (1.0 - alpha_x) * flow2[y1, x1, 1] + alpha_x * flow2[y1, x2, 1]
            b_ = (1.0 - alpha_x) * flow2[y2, x1, 1] + alpha_x * flow2[y2, x2, 1]
            v = (1.0 - alpha_y) * a_ + alpha_y * b_
            cx = bx + u
            cy = by + v
            u2 = flow1[ay, ax, 0]
            v2 = flow1[ay, ax, 1]
            if (cx - ax) ** 2 + (cy - ay) ** 2 >= 0.01 * (u2 * u2 + v2 * v2 + u * u + v * v) + 0.5:
                reliable[ay, ax] = -255.0
                continue
            if motion_edge[ay, ax] > 0.01 * (u2 * u2 + v2 * v2) + 0.002:
                reliable[ay, ax] = MOTION_BOUNDARIE_VALUE
                continue

    # main: smooth (x, then y), clip, write
    if SMOOTH_STRENGH > 0:
        smooth = smooth_taps(SMOOTH_STRENGH, 2.0)
        reliable = filter_y(filter_x(reliable, smooth), smooth)
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            v = min(max(reliable[y, x], 0.0), 255.0)
            if pgm:
                v = float(int(v))
            out[y, x] = v / 255.0
    return out
