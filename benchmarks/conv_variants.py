"""Other 3×3 convolutions (benchmarks only; nstjax is not edited).

Each ``conv(x, kernel, bias, precision)`` has the signature of :func:`nstjax.vgg.conv3x3` (NHWC
input, HWIO kernel, 'SAME' zero padding) and is given to the model as its convolution,
``VGG(conv=VARIANTS[name])``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nstjax import vgg

_lax_conv = vgg.lax_conv


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


def direct(x, kernel, bias, precision):
    """nstjax's direct convolution (``model.conv=direct``)."""
    return _DIRECT(x, kernel, bias, precision)


_DIRECT = vgg.conv3x3
VARIANTS = {"direct": direct, "lax_nhwc": lax_nhwc, "explicit_bwd": explicit_bwd}
