"""The VGG family's layer table (Simonyan & Zisserman 2014, Table 1): each network's blocks and
convolutions as records, the layer names ``conv{b}_{i}``, ``relu{b}_{i}``, ``pool{b}``, and the
shape of each named activation."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

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


def pooled_size(size: int, ceil: bool = False) -> int:
    """Rows (or columns) after a 2×2 stride-2 pooling of ``size``: ⌊size/2⌋, or ⌈size/2⌉ with ``ceil``."""
    return -(-size // 2) if ceil else size // 2


def layer_shape(name: str, height: int, width: int, ceil: bool = False) -> tuple[int, int, int]:
    """(H, W, N) of a named activation of an image of height × width (pooling in ceil mode or not)."""
    for _ in range(int(math.log2(layer_stride(name)))):
        height, width = pooled_size(height, ceil), pooled_size(width, ceil)
    return height, width, layer_channels(name)


def block_of(name: str) -> int:
    """The block of a layer name: conv3_2 is in block 3."""
    return int(name[4])


