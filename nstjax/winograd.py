"""3×3 convolutions by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray 2016).

Per 6×6 input tile d (stride 4) and 3×3 kernel g, the 4×4 output tile is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

summed over input channels, so the 36 elementwise products over all tiles
are 36 matrix products (tiles × C_in) @ (C_in × C_out): 36/16 = 2.25
multiplications per output pixel and channel pair instead of 9. The tile
transforms are sums of slices with constant coefficients (fused by XLA,
memory-bound); they pay where channels are many and images small, i.e. in
VGG19's deeper blocks. In float32 the transforms' rounding makes the result
differ from a direct convolution by about 1e-5 of the layer's largest output
on VGG19's layers (up to 1e-4 on small random ones); points 0, ±1, ±2, ∞.

The input gradient of a convolution is the convolution of the output
gradient with the kernel flipped in space and with in/out channels swapped,
so the backward pass runs the same algorithm (custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

TILE = 4
"""Output tile size m of F(m×m, 3×3)."""

_ALPHA = TILE + 2
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def _combine(coefficients, terms):
    """Σ c·t over the nonzero coefficients (elementwise: XLA fuses it into one loop)."""
    out = None
    for c, t in zip(coefficients, terms):
        if c:
            t = t if c == 1 else (-t if c == -1 else t * c)
            out = t if out is None else out + t
    return out


def _transform_windows(x, axis: int, tiles: int):
    """Bᵀ applied to the 6-long windows (stride 4, from one before each tile to one past it) along
    ``axis`` of ``x``, zero outside ``x`` ('SAME' padding).

    ``x`` has 4·tiles entries along ``axis``; the result has ``tiles`` there and a new leading
    axis of 6 (the transformed window). The windows are slices of ``x`` seen as (tiles, 4) blocks,
    the first and last shifted by one tile with a zero tile let in: written with ``jnp.pad``
    instead, the padding fused into the producer of ``x`` (in the backward pass the output
    transform of the next layer's input gradient) and made that fusion about 5× slower on XLA:CPU.
    """
    shape = x.shape
    blocks = x.reshape(shape[:axis] + (tiles, TILE) + shape[axis + 1:])
    lead = (slice(None),) * axis

    def rows(a, tile_slice=slice(None)):
        return blocks[lead + (tile_slice, a)]

    zero = jnp.zeros(shape[:axis] + (1,) + shape[axis + 1:], x.dtype)
    before = jnp.concatenate([zero, rows(TILE - 1, slice(0, tiles - 1))], axis=axis)
    after = jnp.concatenate([rows(0, slice(1, tiles)), zero], axis=axis)
    window = [before] + [rows(a) for a in range(TILE)] + [after]
    return jnp.stack([_combine(row, window) for row in _BT])


def transform_input(x):
    """Bᵀ d B of every 6×6 tile of NHWC ``x`` ('SAME' padding): (36, n·tiles_h·tiles_w, C).

    The leading index is 6·v + u for row transform u and column transform v.
    """
    n, h, w, c = x.shape
    th, tw = -(-h // TILE), -(-w // TILE)
    if (h, w) != (TILE * th, TILE * tw):
        x = jnp.pad(x, ((0, 0), (0, TILE * th - h), (0, TILE * tw - w), (0, 0)))
    rows = _transform_windows(x, 1, th)  # (6u, n, th, W, C)
    return _transform_windows(rows, 3, tw).reshape(_ALPHA * _ALPHA, n * th * tw, c)


def transform_kernel(kernel):
    """G g Gᵀ of an HWIO 3×3 kernel, in :func:`transform_input`'s order: (36, C_in, C_out), float32.

    Entry 6·v + u is Σᵢⱼ G[u, i] g[i, j] G[v, j]. A concrete kernel is transformed on the host
    in float64 (once, when the params are prepared); a traced one inside the program.
    """
    if isinstance(kernel, jax.core.Tracer):
        g = jnp.asarray(_G, jnp.float32)
        u = jnp.einsum("ui,vj,ijab->vuab", g, g, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    else:
        rows = np.tensordot(_G, np.asarray(kernel, np.float64), axes=(1, 0))  # (u, j, a, b)
        u = np.tensordot(_G, rows, axes=(1, 1))  # (v, u, a, b)
    return u.reshape(_ALPHA * _ALPHA, *kernel.shape[2:]).astype(np.float32)


def _transform_output(products, n: int, h: int, w: int):
    """Aᵀ M A of every tile (products (36, n·tiles, C)) → NHWC (n, h, w, C), as two small matrix
    products. (Written out as 16 sums of the 36 planes it ran as fast, and took XLA:CPU 5× as long
    to compile: ~30 s more for a run's programs.)"""
    th, tw, c = -(-h // TILE), -(-w // TILE), products.shape[-1]
    m = products.reshape(_ALPHA, _ALPHA, n, th, tw, c)  # (v, u, ...)
    at = jnp.asarray(_AT, products.dtype)
    cols = jnp.tensordot(at, m, axes=(1, 0), precision=jax.lax.Precision.HIGHEST)  # (j, u, ...)
    y = jnp.tensordot(at, cols, axes=(1, 1), precision=jax.lax.Precision.HIGHEST)  # (i, j, ...)
    y = y.transpose(2, 3, 0, 4, 1, 5)  # (n, th, i, tw, j, C)
    return y.reshape(n, th * TILE, tw * TILE, c)[:, :h, :w]


def _correlate(x, transformed_kernel):
    n, h, w, _ = x.shape
    products = jax.lax.dot_general(
        transform_input(x.astype(jnp.float32)), transformed_kernel, (((2,), (1,)), ((0,), (0,))),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return _transform_output(products, n, h, w)


def prepare(kernel) -> tuple[jax.Array, jax.Array]:
    """The transformed kernels that :func:`conv3x3` uses: for the forward pass and, of the flipped
    in/out-swapped kernel, for the input gradient."""
    xp = jnp if isinstance(kernel, jax.core.Tracer) else np
    kernel = kernel if xp is jnp else np.asarray(kernel)
    return transform_kernel(kernel), transform_kernel(xp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


def conv3x3(x, kernel, transformed=None):
    """'SAME' 3×3 convolution (cross-correlation, as ``lax.conv``) of NHWC ``x`` with HWIO ``kernel``.

    ``transformed``: the pair of :func:`prepare`'s kernels, computed here when not given.
    """
    return _conv(x, kernel, *(prepare(kernel) if transformed is None else transformed))


@jax.custom_vjp
def _conv(x, kernel, transformed, transformed_flipped):
    return _correlate(x, transformed)


def _conv_fwd(x, kernel, transformed, transformed_flipped):
    return _correlate(x, transformed), (x, kernel, transformed_flipped)


def _conv_bwd(residuals, dy):
    """dL/dx = conv(dy, kernel flipped in space, in/out swapped), by the same algorithm.

    dL/dkernel is autodiff's of the direct convolution (dead code when only
    the pixels are differentiated); the transformed kernels are treated as
    functions of the kernel, so their own cotangents are zero.
    """
    x, kernel, transformed_flipped = residuals
    dx = _correlate(dy, transformed_flipped)
    _, kernel_vjp = jax.vjp(functools.partial(_direct, x), kernel)
    zero = jnp.zeros_like(transformed_flipped)
    return dx.astype(x.dtype), kernel_vjp(dy)[0], zero.transpose(0, 2, 1), zero


def _direct(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


_conv.defvjp(_conv_fwd, _conv_bwd)
