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
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nstjax.bands import Features, run_block, run_block_banded
from nstjax.layers import (ARCHITECTURES, BLOCK_CHANNELS, DEFAULT_ARCH, LAYER_NAMES, Architecture, UnknownLayerError,
                           architecture, block_of, check_layers, layer_channels, layer_shape, layer_stride,
                           pooled_size)
from nstjax.ops import (CONV_ALGORITHMS, POOLINGS, PRECISIONS, WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_PIXELS,
                        WINOGRAD_PARAMS, channel_sums,
                        conv3x3, default_conv, gram_matrix, lax_conv, pool, prepare_params, uses_winograd)

__all__ = [  # the model; the layer table (nstjax.layers) and the operations (nstjax.ops) it is made of
    "VGG", "Features", "Preprocessing", "CAFFE", "TORCHVISION", "CHANNEL_ORDERS",
    "ARCHITECTURES", "BLOCK_CHANNELS", "DEFAULT_ARCH", "LAYER_NAMES", "Architecture", "UnknownLayerError",
    "architecture", "block_of", "check_layers", "layer_channels", "layer_shape", "layer_stride", "pooled_size",
    "CONV_ALGORITHMS", "POOLINGS", "PRECISIONS", "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS", "WINOGRAD_PARAMS",
    "channel_sums",
    "conv3x3", "default_conv", "gram_matrix", "lax_conv", "pool", "prepare_params", "uses_winograd",
]


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


CHANNEL_ORDERS = ("RGB", "BGR")
CAFFE = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TORCHVISION = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

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
        if self.precision not in PRECISIONS:
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
        for b in range(1, block_of(deepest) + 1):
            run = functools.partial(run_block_banded, band_elements=self.band_elements) if self.remat else run_block
            block = functools.partial(
                run, block=b, names=tuple(n for n in layers if block_of(n) == b),
                grams=tuple(n for n in grams if block_of(n) == b),
                sums=tuple(n for n in sums if block_of(n) == b),
                stop=deepest if b == block_of(deepest) else f"pool{b}",
                pooling=self.pooling, precision=self.precision, conv=self.conv, ceil=self.ceil_mode,
                guides={n: g for n, g in (guides or {}).items() if block_of(n) == b},
            )
            convs = [params[f"conv{b}_{i}"] for i in range(1, arch.block_sizes[b - 1] + 1)]
            x, feats = block(x, convs)
            out.acts.update(feats.acts)
            out.grams.update(feats.grams)
            out.sums.update(feats.sums)
        return Features({name: out.acts[name] for name in layers}, {name: out.grams[name] for name in grams},
                        {name: out.sums[name] for name in sums})
