"""Coarse to fine (``pyramid.*``): Gatys et al. 2017 §6, pystiche's ImagePyramid, crowsonkb's scales.

The optimisation runs at the smallest size first; each level starts from the
previous level's result, upsampled (bicubic, clipped to [0, 1]) to its size:

    sizes   s_L = image.size,  s_(k−1) = round(s_k / pyramid.factor),  down to the
            last that is ≥ pyramid.min_size (null: off, one level)
    steps   pyramid.steps at each level below the last; optim.steps at the last

Each level is a run at its size (content and style resized to it, their targets
computed there, the optimiser started afresh from the upsampled image); the
members of a group go through the levels together, each wave of members level by
level (:class:`nstjax.driver.Driver`). history.csv has the rows of every level in
order with their ``level``; ``levels/level_K.png`` is each level's result; a
checkpoint names its level, so an interrupted run resumes at any level.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nstjax.errors import UserError


def sizes(pyramid, size: int) -> list[int]:
    """The longest side of each level, smallest first (one level, ``size``, when off);
    ``pyramid`` a :class:`nstjax.spec.PyramidSpec`."""
    if pyramid.min_size is None:
        return [size]
    out = [size]
    while pyramid.min_size <= (below := round(out[-1] / pyramid.factor)) < out[-1]:
        out.append(below)
    return out[::-1]


def check(pyramid, size: int) -> None:
    """pyramid.* in range: min_size ≤ image.size (``size``), factor > 1, steps ≥ 1."""
    p = pyramid
    if p.min_size is None:
        return
    if p.min_size < 1 or p.min_size > size:
        raise UserError(f"pyramid.min_size = {p.min_size} must be between 1 and image.size = {size}: "
                        "lower it, raise image.size, or set pyramid.min_size=null to run at one size")
    if not p.factor > 1:
        raise UserError(f"pyramid.factor = {p.factor} must be > 1 (2 halves the size at each level down)")
    if p.steps < 1:
        raise UserError(f"pyramid.steps = {p.steps} must be ≥ 1")


def levels(structure) -> list:
    """The structure of each level (a :class:`nstjax.spec.Structure`): its image size, and
    pyramid.steps steps below the last. With one level, ``structure`` itself."""
    all_sizes = sizes(structure.pyramid, structure.image.size)
    if len(all_sizes) == 1:
        return [structure]
    return [dataclasses.replace(structure, image=dataclasses.replace(structure.image, size=size),
                                steps=structure.pyramid.steps if k < len(all_sizes) - 1 else structure.steps)
            for k, size in enumerate(all_sizes)]


def upsample(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A batch of images (n, h, w, c) resized to ``shape`` (H, W) bicubically, clipped to [0, 1]."""
    n, _, _, c = pixels.shape
    out = jax.image.resize(jnp.asarray(pixels, jnp.float32), (n, *shape, c), "bicubic")
    return np.asarray(jnp.clip(out, 0.0, 1.0))
