"""A VGG block run on a whole image, or in horizontal bands recomputed in the backward pass
(banded remat): each band reads as many rows beyond it as the block has convolutions, rows outside
the image are zeroed after every ReLU, so each band is exact; Gram matrices and channel sums are
summed over the bands."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nstjax import winograd
from nstjax.layers import BLOCK_CHANNELS, block_of, pooled_size
from nstjax.ops import channel_sums, conv3x3, gram_matrix, pool, uses_winograd

class Features(NamedTuple):
    """What :meth:`VGG.features` returns by layer name: activations, Gram matrices Fᵀ F and
    per-channel sums Σᵢ fᵢ."""

    acts: dict[str, jax.Array]
    grams: dict[str, jax.Array]
    sums: dict[str, jax.Array]


def _run_convs(x, convs, block: int, stop: str, precision: str, conv: str, keep=None):
    """The convolutions of block ``block`` up to ``stop``; return (x, activations, stopped).

    ``convs`` holds each convolution's (kernel, bias, Winograd kernels or None). ``keep``
    (if given) is applied to each ReLU output before the next convolution.
    """
    acts = {}
    for i, (kernel, bias, transformed) in enumerate(convs, 1):
        if callable(conv):  # a convolution of the caller's: conv(x, kernel, bias, precision)
            x = conv(x, kernel, bias, precision)
        elif uses_winograd(conv, kernel.shape):
            x = winograd.conv3x3(x, kernel, transformed) + bias
        else:
            x = conv3x3(x, kernel, bias, precision, conv)
        acts[f"conv{block}_{i}"] = x
        x = jax.nn.relu(x)
        if keep is not None:
            x = keep(x)
        acts[f"relu{block}_{i}"] = x
        if stop in (f"conv{block}_{i}", f"relu{block}_{i}"):
            return x, acts, True
    return x, acts, False


def run_block(x, convs, block: int, names: tuple[str, ...], grams: tuple[str, ...], sums: tuple[str, ...],
               stop: str, pooling: str, precision: str, conv: str, ceil: bool, guides: dict):
    """Run block ``block`` up to activation ``stop``; return (x, Features of names, grams (guided
    by ``guides[name]`` where given) and sums)."""
    x, acts, stopped = _run_convs(x, convs, block, stop, precision, conv)
    if not stopped:
        x = pool(x, pooling, ceil)
        acts[f"pool{block}"] = x
    return x, Features({n: acts[n] for n in names}, {n: gram_matrix(acts[n], guides.get(n)) for n in grams},
                       {n: channel_sums(acts[n]) for n in sums})


def _convs_run(block: int, size: int, stop: str) -> int:
    """How many convolutions of block ``block`` (of ``size``) run before ``stop``."""
    if block_of(stop) == block and "_" in stop:
        return int(stop.split("_")[1])
    return size


def _band_rows(height: int, width: int, channels: int, band_elements: int) -> int:
    """Rows per band: even, about ``band_elements`` values per activation, bands of near-equal height."""
    rows = max(2, band_elements // (width * channels))
    bands = -(-height // rows)
    rows = -(-height // bands)
    return rows + rows % 2


def run_block_banded(x, convs, block: int, names: tuple[str, ...], grams: tuple[str, ...],
                      sums: tuple[str, ...], stop: str, pooling: str, precision: str, conv: str, ceil: bool,
                      guides: dict, band_elements: int):
    """:func:`run_block` computed in horizontal bands, each rematerialised.

    A block of k 3×3 convolutions sees k rows beyond each band, so band i is
    computed from input rows [iR − k, iR + R + k) and its central R rows are
    exact (rows outside the image are zeroed after every ReLU, as the 'SAME'
    padding of the whole image would). The bands run one after another
    (``lax.map``) under ``jax.checkpoint``: the backward pass keeps only the
    input bands and recomputes one band at a time. Gram matrices and channel
    sums are summed over the bands (G = Σ_bands F_bᵀ F_b, Σf = Σ_bands Σ f_b),
    so a layer used only for these statistics is never held whole: a block
    needs the memory of one band, not of the image. Bands have an even number
    of rows, so in ceil mode only the image's last odd row is a half window:
    its zeroed partner leaves a max unchanged (ReLU outputs are ≥ 0) and halves
    a mean, which is doubled back. Guides of guided Gram matrices are cut into
    the same bands (zero past the image's end).
    """
    n, height, width, _ = x.shape
    k = _convs_run(block, len(convs), stop)
    rows = _band_rows(height, width, BLOCK_CHANNELS[block - 1], band_elements)
    count = -(-height // rows)
    x_pad = jnp.pad(x, ((0, 0), (k, count * rows - height + k), (0, 0), (0, 0)))
    bands = jnp.stack([x_pad[:, i * rows: i * rows + rows + 2 * k] for i in range(count)])
    pooled_name = f"pool{block}"
    pooled_height = pooled_size(height, ceil)

    def guide_bands(name, guide):  # (R, H_l, W_l) -> (bands, R, band rows of the layer, W_l)
        band_rows = rows // 2 if name == pooled_name else rows
        padded = jnp.pad(guide, ((0, 0), (0, count * band_rows - guide.shape[1]), (0, 0)))
        return jnp.moveaxis(padded.reshape(guide.shape[0], count, band_rows, guide.shape[2]), 1, 0)

    banded_guides = {name: guide_bands(name, g) for name, g in guides.items() if name in grams}

    def band(args):
        index, xb, band_guides = args
        row = index * rows - k + jnp.arange(rows + 2 * k)
        inside = ((row >= 0) & (row < height)).astype(xb.dtype)[None, :, None, None]
        y, acts, stopped = _run_convs(xb, convs, block, stop, precision, conv, keep=lambda a: a * inside)
        acts = {name: a[:, k: k + rows] for name, a in acts.items()}
        y = y[:, k: k + rows]
        inside_pooled = None
        if not stopped:
            y = pool(y, pooling, ceil)
            pooled_row = index * (rows // 2) + jnp.arange(rows // 2)
            if ceil and pooling == "avg" and height % 2:
                y = y * jnp.where(pooled_row == height // 2, 2.0, 1.0).astype(y.dtype)[None, :, None, None]
            acts[pooled_name] = y
            inside_pooled = (pooled_row < pooled_height).astype(y.dtype)[None, :, None, None]

        def inside_only(name):  # rows past the image's end would add to the Gram matrix and sums
            return acts[name] * (inside_pooled if name == pooled_name else inside[:, k: k + rows])

        return y, Features({name: acts[name] for name in names},
                           {name: gram_matrix(inside_only(name), band_guides.get(name)) for name in grams},
                           {name: channel_sums(inside_only(name)) for name in sums})

    # prevent_cse=False: inside lax.map no common subexpression can merge across the bands
    y, feats = jax.lax.map(jax.checkpoint(band, prevent_cse=False), (jnp.arange(count), bands, banded_guides))

    def unband(a):  # (bands, n, rows or rows/2, W, C) -> (n, height or height//2, W, C)
        full_rows = height if a.shape[2] == rows else pooled_height
        a = a if n == 1 else jnp.moveaxis(a, 0, 1)  # with one image, a reshape and no copy
        return a.reshape(n, -1, *a.shape[3:])[:, :full_rows]

    return unband(y), Features({name: unband(a) for name, a in feats.acts.items()},
                               {name: g.sum(axis=0) for name, g in feats.grams.items()},
                               {name: t.sum(axis=0) for name, t in feats.sums.items()})


