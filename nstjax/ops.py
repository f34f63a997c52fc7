"""The network's operations with the gradients nstjax gives them: 3×3 convolutions (XLA's, the
direct one with its own input gradient, Winograd's through :mod:`nstjax.winograd`), 2×2 pooling
(max with its own gradient, average; floor or Caffe's ceil mode), Gram matrices with their own
gradient, and the precisions they compute in."""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp

from nstjax import winograd
from nstjax.layers import LAYER_NAMES, check_layers

POOLINGS = ("max", "avg")

_PRECISIONS = {
    "float32": (jnp.float32, jax.lax.Precision.HIGHEST),
    "tf32": (jnp.float32, jax.lax.Precision.DEFAULT),
    "bfloat16": (jnp.bfloat16, jax.lax.Precision.DEFAULT),
}
PRECISIONS = tuple(_PRECISIONS)


def pool(x: jax.Array, kind: str, ceil: bool = False) -> jax.Array:
    """2×2 stride-2 pooling: floor mode (torch's MaxPool2d/AvgPool2d), or with ``ceil`` Caffe's
    ceil mode (torch's ``ceil_mode=True``): an odd last row or column is a window of its own, its
    max or mean over the values it holds (the edge repeated into the missing half).

    Written as a reshape and a reduction: the same values as
    ``reduce_window``, with a cheaper gradient on XLA's CPU backend.
    """
    if ceil:
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), mode="edge")
    return _max_pool(x) if kind == "max" else _windows(x).mean(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    """(n, H, W, C) → (n, H//2, 2, W//2, 2, C): the 2×2 windows (odd last row/column dropped)."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool(x: jax.Array) -> jax.Array:
    """2×2 max pooling whose gradient goes to the first maximum of each window (as torch's).

    Autodiff's rule for a max reduction divides by the number of elements
    equal to the maximum; compiled by XLA:CPU that count came out 0 for some
    shapes (NaN gradients), so the window's winner is chosen explicitly.
    """
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = _max_pool(x)
    return y, (x, y)


def _max_pool_bwd(residuals, dy):
    x, y = residuals
    w = _windows(x)
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        wins = ~taken if (i, j) == (1, 1) else ~taken & (w[:, :, i, :, j] == y)
        grads.append(jnp.where(wins, dy, 0.0))
        taken = taken | wins
    rows = [jnp.stack(grads[2 * i: 2 * i + 2], axis=-2) for i in (0, 1)]  # (n, h/2, w/2, 2, C)
    dx = jnp.stack(rows, axis=2).reshape(x.shape[0], 2 * y.shape[1], 2 * y.shape[2], x.shape[3])
    return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - dx.shape[1]), (0, x.shape[2] - dx.shape[2]), (0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def lax_conv(x, kernel, precision: str):
    """XLA's 3×3 convolution ('SAME', NHWC input, HWIO kernel) in ``precision`` (float32 accumulation)."""
    dtype, lax_precision = _PRECISIONS[precision]
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax_precision,
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, precision: str):
    return lax_conv(x, kernel, precision)


def _conv_fwd(x, kernel, precision):
    return lax_conv(x, kernel, precision), (x, kernel)


def _conv_bwd(precision, residuals, dy):
    """dL/dx = conv(dy, kernel flipped in space with in/out swapped), an ordinary HWIO conv.

    Autodiff's transpose convolution takes the kernel in '01oi' order, which
    inside a loop body (``lax.scan``) misses XLA:CPU's fast convolution path
    (2–3× slower steps); the kernel is materialised in HWIO order behind an
    optimisation barrier instead. dL/dkernel is autodiff's (dead code when
    only the pixels are differentiated).
    """
    x, kernel = residuals
    flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    dx = lax_conv(dy, flipped, precision).astype(x.dtype)
    _, kernel_vjp = jax.vjp(lambda k: lax_conv(x, k, precision), kernel)
    return dx, kernel_vjp(dy)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x, kernel, bias, precision: str, conv: str = "direct"):
    """3×3 convolution, zero 'SAME' padding (= torch ``padding=1``), HWIO kernel: XLA's with its
    autodiff (``conv='xla'``), else with its own input gradient (``'direct'``, and Winograd's
    layers with few channels: the CPU's fast path)."""
    return (lax_conv(x, kernel, precision) if conv == "xla" else _conv(x, kernel, precision)) + bias


CONV_ALGORITHMS = ("direct", "xla", "winograd")
WINOGRAD_PARAMS = ("winograd", "winograd_flipped")
"""Names of a convolution's :func:`winograd.prepare` kernels among its params."""
WINOGRAD_MIN_CHANNELS = 128
"""With ``conv='winograd'``, convolutions with at least this many input channels (conv2_2 on) use it."""


def uses_winograd(conv: str, kernel_shape) -> bool:
    """Whether a convolution with this HWIO kernel shape runs by Winograd F(4×4, 3×3)."""
    return conv == "winograd" and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS


WINOGRAD_MIN_PIXELS = 256 * 128
"""``conv='auto'`` on a CPU takes Winograd for images of at least this many pixels: below, the
seconds it adds to compiling a run's programs outweigh what it saves an evaluation."""


def default_conv(precision: str, backend: str | None = None, pixels: int | None = None) -> str:
    """The convolution algorithm ``conv='auto'`` picks for images of ``pixels`` pixels (None: any
    size): on CPUs Winograd in float32 from :data:`WINOGRAD_MIN_PIXELS` up (there the direct
    convolution already runs at the peak FLOP rate, so only fewer multiplications help), else the
    direct convolution with its own input gradient (XLA:CPU's autodiff transpose misses its fast
    path inside loops); on GPUs and TPUs XLA's convolution and autodiff (cuDNN chooses its
    algorithms)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    small = pixels is not None and pixels < WINOGRAD_MIN_PIXELS
    return "winograd" if precision == "float32" and not small else "direct"


def prepare_params(params: dict, conv: str, layers: Iterable[str] = LAYER_NAMES) -> dict:
    """``params`` with the transformed kernels (``winograd``, ``winograd_flipped``: (36, C_in, C_out),
    4× the kernel each) added to each Winograd convolution that computing ``layers`` runs, so that
    they are computed once and not at every evaluation. The model computes missing ones itself.

    They are device arrays where the kernels are (numpy arrays would be copied to the device at
    every call of a compiled program: about 0.4 GB for VGG19 up to relu5_1)."""
    deepest = LAYER_NAMES.index(max(check_layers(layers), key=LAYER_NAMES.index))

    def transformed(kernel):
        kernels = winograd.prepare(kernel)
        return tuple(map(jnp.asarray, kernels)) if isinstance(kernel, jax.Array) else kernels

    return {name: {**p, **dict(zip(WINOGRAD_PARAMS, transformed(p["kernel"])))}
            if uses_winograd(conv, p["kernel"].shape) and LAYER_NAMES.index(name) <= deepest else p
            for name, p in params.items()}


def gram_matrix(features: jax.Array, guide: jax.Array | None = None) -> jax.Array:
    """G = Fᵀ F per image for features (n, H, W, N) as F (H·W × N): (n, N, N), float32. With a
    ``guide`` (R, H, W): the guided Gram matrices G_r = (F ∘ T_r)ᵀ (F ∘ T_r), (n, R, N, N)."""
    n, h, w, c = features.shape
    f = features.reshape(n, h * w, c).astype(jnp.float32)
    if guide is None:
        return jnp.einsum("nmi,nmj->nij", f, f, precision=jax.lax.Precision.HIGHEST)
    t2 = jnp.square(guide.reshape(guide.shape[0], h * w).astype(jnp.float32))
    return jnp.einsum("nmi,rm,nmj->nrij", f, t2, f, precision=jax.lax.Precision.HIGHEST)


def channel_sums(features: jax.Array) -> jax.Array:
    """Σᵢ fᵢ per image for features (n, H, W, N): (n, N), float32."""
    return jnp.sum(features.astype(jnp.float32), axis=(1, 2))


