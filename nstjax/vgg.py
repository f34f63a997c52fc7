"""The VGG networks (Simonyan & Zisserman 2014) as frozen Flax feature extractors.

VGG19's 16 convolutions (blocks of 2, 2, 4, 4, 4 3×3 convolutions, zero 'SAME'
padding, each followed by a ReLU; a 2×2 stride-2 pooling after each block),
NHWC; VGG16 (2, 2, 3, 3, 3), VGG13 (2, 2, 2, 2, 2) and VGG11 (1, 1, 2, 2, 2)
likewise (:data:`ARCHITECTURES`). A call returns the named activations asked
for and stops after the deepest one:

    conv{b}_{i}  convolution output, before the ReLU
    relu{b}_{i}  after the ReLU
    pool{b}      after the pooling of block b

The input is RGB in [0, 1]; the channel order, scale, mean and std that the
weights expect (their :class:`Preprocessing`) are applied by the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nstjax import winograd

BLOCK_CHANNELS = (64, 128, 256, 512, 512)


class UnknownLayerError(ValueError):
    """A layer name that the network does not have."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One network of the VGG family (Simonyan & Zisserman 2014, Table 1): five blocks of
    ``block_sizes`` 3×3 convolutions with ``BLOCK_CHANNELS`` channels, each block followed by a
    2×2 pooling. Layer names follow the blocks: ``conv{b}_{i}``, ``relu{b}_{i}``, ``pool{b}``."""

    name: str
    block_sizes: tuple[int, ...]

    @functools.cached_property
    def conv_layers(self) -> tuple[str, ...]:
        """The convolutions in forward order."""
        return tuple(f"conv{b}_{i}" for b, n in enumerate(self.block_sizes, 1) for i in range(1, n + 1))

    @functools.cached_property
    def layer_names(self) -> tuple[str, ...]:
        """Every activation the model can return, in forward order."""
        names = []
        for b, n in enumerate(self.block_sizes, 1):
            for i in range(1, n + 1):
                names += [f"conv{b}_{i}", f"relu{b}_{i}"]
            names.append(f"pool{b}")
        return tuple(names)

    def conv_shapes(self) -> dict[str, tuple[tuple[int, int, int, int], tuple[int]]]:
        """Kernel (HWIO) and bias shape of each convolution."""
        shapes, c_in = {}, 3
        for b, (n, c_out) in enumerate(zip(self.block_sizes, BLOCK_CHANNELS), 1):
            for i in range(1, n + 1):
                shapes[f"conv{b}_{i}"] = ((3, 3, c_in, c_out), (c_out,))
                c_in = c_out
        return shapes

    def check_layers(self, layers: Iterable[str]) -> tuple[str, ...]:
        """Return ``layers`` as a tuple, or raise naming the valid layer names."""
        layers = tuple(layers)
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise UnknownLayerError(
                f"unknown {self.name.upper()} layer {', '.join(map(repr, unknown))}; valid names: "
                + ", ".join(self.layer_names)
            )
        return layers

    def deepest(self, layers: Iterable[str]) -> str:
        """The last of ``layers`` in forward order."""
        return max(self.check_layers(layers), key=self.layer_names.index)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("vgg11", (1, 1, 2, 2, 2)),
    Architecture("vgg13", (2, 2, 2, 2, 2)),
    Architecture("vgg16", (2, 2, 3, 3, 3)),
    Architecture("vgg19", (2, 2, 4, 4, 4)),
)}
DEFAULT_ARCH = "vgg19"


def architecture(name: str) -> Architecture:
    """The architecture ``name``, or a ValueError listing the choices."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {name!r}: use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


VGG19_ARCH = ARCHITECTURES["vgg19"]
LAYER_NAMES = VGG19_ARCH.layer_names
"""Every layer name of the family (VGG19's names hold every shallower network's)."""


def check_layers(layers: Iterable[str]) -> tuple[str, ...]:
    """``layers`` as a tuple, each a layer name of the family (VGG19's names), else raise listing
    them; :meth:`Architecture.check_layers` checks one network's."""
    return VGG19_ARCH.check_layers(layers)


def layer_channels(name: str) -> int:
    """Number of channels N of a named activation."""
    return BLOCK_CHANNELS[int(name[4]) - 1]


def layer_stride(name: str) -> int:
    """Downsampling factor of a named activation: its input must be at least this wide."""
    block = int(name[4])
    return 2 ** (block if name.startswith("pool") else block - 1)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the weights expect their input: ``(flip(x) * scale - mean) / std``.

    ``channel_order`` is 'RGB' or 'BGR'; ``mean`` and ``std`` are given in that
    channel order and in the scaled units (Caffe: BGR, 0-255, mean pixel
    [103.939, 116.779, 123.68], std 1; torchvision: RGB, [0, 1], ImageNet
    mean and std).
    """

    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 values")

    def __call__(self, rgb: jax.Array) -> jax.Array:
        x = rgb[..., ::-1] if self.channel_order == "BGR" else rgb
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x * self.scale - mean) / std

    def mean_rgb(self) -> tuple[float, float, float]:
        """The mean pixel as RGB in [0, 1] (the image the network sees as zero)."""
        mean = tuple(m / self.scale for m in self.mean)
        return mean[::-1] if self.channel_order == "BGR" else mean

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


POOLINGS = ("max", "avg")
CHANNEL_ORDERS = ("RGB", "BGR")
CAFFE = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TORCHVISION = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

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


def pooled_size(size: int, ceil: bool = False) -> int:
    """Rows (or columns) after a 2×2 stride-2 pooling of ``size``: ⌊size/2⌋, or ⌈size/2⌉ with ``ceil``."""
    return -(-size // 2) if ceil else size // 2


def layer_shape(name: str, height: int, width: int, ceil: bool = False) -> tuple[int, int, int]:
    """(H, W, N) of a named activation of an image of height × width (pooling in ceil mode or not)."""
    for _ in range(int(math.log2(layer_stride(name)))):
        height, width = pooled_size(height, ceil), pooled_size(width, ceil)
    return height, width, layer_channels(name)


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


def default_conv(precision: str, backend: str | None = None) -> str:
    """The convolution algorithm ``conv='auto'`` picks: on CPUs Winograd in float32 (there the
    direct convolution already runs at the peak FLOP rate, so only fewer multiplications help),
    else the direct convolution with its own input gradient (XLA:CPU's autodiff transpose misses
    its fast path inside loops); on GPUs and TPUs XLA's convolution and autodiff (cuDNN chooses
    its algorithms)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    return "winograd" if precision == "float32" else "direct"


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
        return _gram(f)
    t2 = jnp.square(guide.reshape(guide.shape[0], h * w).astype(jnp.float32))
    return jnp.einsum("nmi,rm,nmj->nrij", f, t2, f, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _gram(f: jax.Array) -> jax.Array:
    """Fᵀ F per image of f (n, M, N).

    Its gradient F (dG + dGᵀ) is one matrix product in f's own (M, N) layout; autodiff's two
    products of the einsum came out as (N, M) and were transposed inside the next fusion (strided
    reads of the whole feature map: on a CPU the costliest elementwise pass of an evaluation).
    """
    return jnp.einsum("nmi,nmj->nij", f, f, precision=jax.lax.Precision.HIGHEST)


def _gram_fwd(f):
    return _gram(f), f


def _gram_bwd(f, dg):
    return (jnp.einsum("nmj,nji->nmi", f, dg + jnp.swapaxes(dg, 1, 2), precision=jax.lax.Precision.HIGHEST),)


_gram.defvjp(_gram_fwd, _gram_bwd)


def channel_sums(features: jax.Array) -> jax.Array:
    """Σᵢ fᵢ per image for features (n, H, W, N): (n, N), float32."""
    return jnp.sum(features.astype(jnp.float32), axis=(1, 2))


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


def _run_block(x, convs, block: int, names: tuple[str, ...], grams: tuple[str, ...], sums: tuple[str, ...],
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
    if _block_of(stop) == block and "_" in stop:
        return int(stop.split("_")[1])
    return size


def _band_rows(height: int, width: int, channels: int, band_elements: int) -> int:
    """Rows per band: even, about ``band_elements`` values per activation, bands of near-equal height."""
    rows = max(2, band_elements // (width * channels))
    bands = -(-height // rows)
    rows = -(-height // bands)
    return rows + rows % 2


def _run_block_banded(x, convs, block: int, names: tuple[str, ...], grams: tuple[str, ...],
                      sums: tuple[str, ...], stop: str, pooling: str, precision: str, conv: str, ceil: bool,
                      guides: dict, band_elements: int):
    """:func:`_run_block` computed in horizontal bands, each rematerialised.

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


def _block_of(name: str) -> int:
    return int(name[4])


class _ConvParams(nn.Module):
    """Holds one convolution's ``kernel`` (HWIO) and ``bias``, and its Winograd kernels if
    :func:`prepare_params` added them."""

    shape: tuple[int, int, int, int]

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape)
        bias = self.param("bias", nn.initializers.zeros, self.shape[-1:])
        transformed = None
        if self.has_variable("params", WINOGRAD_PARAMS[0]):
            transformed = tuple(self.get_variable("params", name) for name in WINOGRAD_PARAMS)
        return kernel, bias, transformed


class VGG(nn.Module):
    """A VGG network's convolutional part (VGG11, 13, 16 or 19) returning named activations.

    Params are ``{conv1_1: {kernel (3, 3, in, out), bias (out,)}, ...}``, one per convolution
    of ``arch``.

    Attributes:
      preprocessing: what the weights expect of their input.
      pooling: 'max' (as trained) or 'avg' (Gatys et al. 2016 for synthesis).
      precision: 'float32'; 'tf32' (TF32 convolutions on GPUs) or 'bfloat16'
        (bfloat16 convolution inputs, float32 accumulation and outputs).
      remat: recompute each block's activations in the backward pass
        (``jax.checkpoint`` per block, in horizontal bands of about
        ``band_elements`` values per activation) to fit large images.
      conv: 'direct' (XLA's convolution with its own input gradient), 'xla' (XLA's
        convolution and autodiff) or 'winograd' (F(4×4, 3×3) in float32 for the
        convolutions with ≥ 128 input channels, see :mod:`nstjax.winograd`; needs
        precision 'float32'), or a convolution of the caller's,
        ``conv(x, kernel, bias, precision)`` with :func:`conv3x3`'s signature.
      ceil_mode: pool in Caffe's ceil mode (odd sizes keep their last row and
        column, as the Caffe VGG19 that neural-style runs); False: floor mode,
        as torchvision.
      arch: the network (:data:`ARCHITECTURES`): 'vgg19' (Gatys et al.), 'vgg16', 'vgg13', 'vgg11'.
    """

    preprocessing: Preprocessing = CAFFE
    pooling: str = "max"
    precision: str = "float32"
    remat: bool = False
    conv: str = "direct"
    ceil_mode: bool = False
    band_elements: int = 1 << 26
    arch: str = DEFAULT_ARCH

    @property
    def architecture(self) -> Architecture:
        return architecture(self.arch)

    def layer_shape(self, name: str, height: int, width: int) -> tuple[int, int, int]:
        """(H, W, N) of activation ``name`` for an image of height × width."""
        return layer_shape(name, height, width, self.ceil_mode)

    def __call__(self, rgb: jax.Array, layers: Sequence[str]) -> dict[str, jax.Array]:
        """The activations named in ``layers`` for a batch of RGB images (n, H, W, 3) in [0, 1]."""
        return self.features(rgb, layers).acts

    @nn.compact
    def features(self, rgb: jax.Array, layers: Sequence[str] = (), grams: Sequence[str] = (),
                 sums: Sequence[str] = (), guides: dict[str, jax.Array] | None = None) -> Features:
        """Activations of ``layers``, Gram matrices Fᵀ F (n, N, N) of ``grams`` and channel sums
        Σᵢ fᵢ (n, N) of ``sums``, in one pass. A layer of ``grams`` with a guide in ``guides``
        ((R, H, W): R guidance channels at the layer's size) gets its R guided Gram matrices
        (F ∘ T_r)ᵀ (F ∘ T_r) instead, (n, R, N, N).

        With ``remat`` a layer asked for only as a Gram matrix or sums is never
        held whole in memory.
        """
        arch = self.architecture
        layers, grams, sums = arch.check_layers(layers), arch.check_layers(grams), arch.check_layers(sums)
        if not layers + grams + sums:
            raise ValueError("no layers asked for")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'max' or 'avg', not {self.pooling!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if not callable(self.conv) and self.conv not in CONV_ALGORITHMS:
            raise ValueError(f"conv must be one of {CONV_ALGORITHMS}, not {self.conv!r}")
        if self.conv == "winograd" and self.precision != "float32":
            raise ValueError("conv='winograd' computes in float32: use precision='float32' or conv='direct'")
        shapes = arch.conv_shapes()
        params = {name: _ConvParams(shapes[name][0], name=name)() for name in arch.conv_layers}
        deepest = arch.deepest(layers + grams + sums)
        x = self.preprocessing(rgb.astype(jnp.float32))
        out = Features({}, {}, {})
        for b in range(1, _block_of(deepest) + 1):
            run = functools.partial(_run_block_banded, band_elements=self.band_elements) if self.remat else _run_block
            block = functools.partial(
                run, block=b, names=tuple(n for n in layers if _block_of(n) == b),
                grams=tuple(n for n in grams if _block_of(n) == b),
                sums=tuple(n for n in sums if _block_of(n) == b),
                stop=deepest if b == _block_of(deepest) else f"pool{b}",
                pooling=self.pooling, precision=self.precision, conv=self.conv, ceil=self.ceil_mode,
                guides={n: g for n, g in (guides or {}).items() if _block_of(n) == b},
            )
            convs = [params[f"conv{b}_{i}"] for i in range(1, arch.block_sizes[b - 1] + 1)]
            x, feats = block(x, convs)
            out.acts.update(feats.acts)
            out.grams.update(feats.grams)
            out.sums.update(feats.sums)
        return Features({name: out.acts[name] for name in layers}, {name: out.grams[name] for name in grams},
                        {name: out.sums[name] for name in sums})
