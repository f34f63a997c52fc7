"""Prototype 3×3 convolutions for nstjax.vgg._conv3x3 (benchmarks only; nstjax is not edited).

Each ``conv(x, kernel, bias, precision)`` has the signature of ``nstjax.vgg._conv3x3`` (NHWC input,
HWIO kernel, 'SAME' zero padding); :func:`patched` swaps one in for the duration of a block.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from nstjax import vgg

_PRECISIONS = vgg._PRECISIONS


def _lax_conv(x, k, precision, dn=("NHWC", "HWIO", "NHWC")):
    dtype, lax_precision = _PRECISIONS[precision]
    return jax.lax.conv_general_dilated(
        x.astype(dtype), k.astype(dtype), (1, 1), "SAME", dimension_numbers=dn,
        precision=lax_precision, preferred_element_type=jnp.float32)


def lax_nhwc(x, kernel, bias, precision):
    """nstjax's convolution as is."""
    return _lax_conv(x, kernel, precision) + bias


# --- explicit input-gradient convolution with a materialised flipped, transposed kernel -----------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_explicit_bwd(x, kernel, precision):
    return _lax_conv(x, kernel, precision)


def _ceb_fwd(x, kernel, precision):
    return _lax_conv(x, kernel, precision), (x, kernel)


def _ceb_bwd(precision, res, dy):
    x, kernel = res
    # dL/dx = conv(dy, flip(kernel) with in/out swapped), as an ordinary HWIO convolution. The
    # optimisation barrier keeps XLA from folding the transpose into the convolution's dimension
    # numbers ('01oi' kernels leave XLA:CPU's Eigen/oneDNN path inside while-loop bodies).
    k_t = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    dx = _lax_conv(dy, k_t, precision).astype(x.dtype)
    # dL/dkernel (dead code, removed by XLA, when the weights are not differentiated).
    _, vjp_k = jax.vjp(lambda k: _lax_conv(x, k, precision), kernel)
    (dk,) = vjp_k(dy)
    return dx, dk


_conv_explicit_bwd.defvjp(_ceb_fwd, _ceb_bwd)


def explicit_bwd(x, kernel, bias, precision):
    """lax conv forward, custom VJP whose dL/dx is a plain HWIO conv with a materialised kernel."""
    return _conv_explicit_bwd(x, kernel, precision) + bias


VARIANTS = {"lax_nhwc": lax_nhwc, "explicit_bwd": explicit_bwd}


@contextlib.contextmanager
def patched(name_or_fn):
    """Use another convolution in nstjax.vgg while tracing inside this block."""
    fn = VARIANTS[name_or_fn] if isinstance(name_or_fn, str) else name_or_fn
    saved = vgg._conv3x3
    vgg._conv3x3 = fn
    try:
        yield
    finally:
        vgg._conv3x3 = saved


# --- Winograd minimal filtering F(m×m, 3×3) (Lavin & Gray 2016) -----------------------------------
# y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A per α×α input tile (α = m + 2), m×m output tile. Multiplications per
# output pixel and channel pair: α²/m² instead of 9 (F(2,3): 4, 2.25× fewer; F(4,3): 2.25, 4× fewer).
# The transforms are written as sums of strided slices with constant coefficients (XLA fuses them
# into a few memory-bound loops); the α² products are one batched matmul. The input gradient of a
# convolution is the convolution of the output gradient with the flipped, in/out-swapped kernel, so
# the backward pass runs the same Winograd code (custom VJP).

_WINOGRAD = {
    2: dict(
        BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        G=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        AT=((1, 1, 1, 0), (0, 1, -1, -1)),
    ),
    4: dict(
        BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    ),
}


def _combine(terms, coeffs):
    """Σ c·t over the nonzero coefficients (elementwise, so XLA fuses it)."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        t = t if c == 1 else (-t if c == -1 else t * c)
        out = t if out is None else out + t
    return out


def _winograd_forward(x, kernel, m: int, precision: str):
    """'SAME' 3×3 correlation of NHWC x with HWIO kernel by F(m×m, 3×3)."""
    mats = _WINOGRAD[m]
    bt, g, at = mats["BT"], jnp.asarray(mats["G"], jnp.float32), mats["AT"]
    alpha = m + 2
    n, h, w, c = x.shape
    nh, nw = -(-h // m), -(-w // m)
    dtype, lax_precision = _PRECISIONS[precision]
    xp = jnp.pad(x, ((0, 0), (1, nh * m + 1 - h), (1, nw * m + 1 - w), (0, 0)))
    # Bᵀ d B: rows, then columns; V[u][v] has shape (n, nh, nw, c).
    rows = [xp[:, a: a + m * (nh - 1) + 1: m] for a in range(alpha)]
    vr = [_combine(rows, bt[u]) for u in range(alpha)]
    v = []
    for u in range(alpha):
        cols = [vr[u][:, :, b: b + m * (nw - 1) + 1: m] for b in range(alpha)]
        v += [_combine(cols, bt[q]) for q in range(alpha)]
    v = jnp.stack(v).reshape(alpha * alpha, n * nh * nw, c)
    # G g Gᵀ: (α, α, cin, cout) → (α², cin, cout).
    u_ = jnp.einsum("ai,ijcd,bj->abcd", g, kernel.astype(jnp.float32), g,
                    precision=jax.lax.Precision.HIGHEST).reshape(alpha * alpha, c, -1)
    prod = jax.lax.dot_general(v.astype(dtype), u_.astype(dtype), (((2,), (1,)), ((0,), (0,))),
                               precision=lax_precision, preferred_element_type=jnp.float32)
    cout = prod.shape[-1]
    prod = prod.reshape(alpha, alpha, n, nh, nw, cout)
    # Aᵀ M A: columns, then rows; then interleave the m×m tiles.
    mc = [[_combine([prod[u, q] for q in range(alpha)], at[j]) for j in range(m)] for u in range(alpha)]
    y = jnp.stack([jnp.stack([_combine([mc[u][j] for u in range(alpha)], at[i]) for j in range(m)])
                   for i in range(m)])  # (m_i, m_j, n, nh, nw, cout)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, nh * m, nw * m, cout)
    return y[:, :h, :w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd(x, kernel, m, precision):
    return _winograd_forward(x, kernel, m, precision)


def _wg_fwd(x, kernel, m, precision):
    return _winograd_forward(x, kernel, m, precision), (x, kernel)


def _wg_bwd(m, precision, res, dy):
    x, kernel = res
    dx = _winograd_forward(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), m, precision)
    _, vjp_k = jax.vjp(lambda k: _lax_conv(x, k, precision), kernel)  # dead code unless asked for
    (dk,) = vjp_k(dy)
    return dx.astype(x.dtype), dk


_winograd.defvjp(_wg_fwd, _wg_bwd)


def winograd2(x, kernel, bias, precision):
    return _winograd(x, kernel, 2, precision) + bias


def winograd4(x, kernel, bias, precision):
    return _winograd(x, kernel, 4, precision) + bias


def winograd4_deep(x, kernel, bias, precision):
    """F(4,3) except where Cin = 3 (conv1_1: too few channels for the transforms to pay)."""
    if kernel.shape[2] < 16:
        return explicit_bwd(x, kernel, bias, precision)
    return winograd4(x, kernel, bias, precision)


VARIANTS.update(winograd2=winograd2, winograd4=winograd4, winograd4_deep=winograd4_deep)
