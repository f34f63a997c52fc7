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

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from nstjax.errors import UserError


def sizes(cfg: DictConfig) -> list[int]:
    """The longest side of each level, smallest first (one level, image.size, when off)."""
    p, size = cfg.pyramid, int(cfg.image.size)
    if p.min_size is None:
        return [size]
    out = [size]
    while p.min_size <= (below := round(out[-1] / p.factor)) < out[-1]:
        out.append(below)
    return out[::-1]


def check(cfg: DictConfig) -> None:
    """pyramid.* in range: min_size ≤ image.size, factor > 1, steps ≥ 1."""
    p = cfg.pyramid
    if p.min_size is None:
        return
    if p.min_size < 1 or p.min_size > cfg.image.size:
        raise UserError(f"pyramid.min_size = {p.min_size} must be between 1 and image.size = {cfg.image.size}: "
                        "lower it, raise image.size, or set pyramid.min_size=null to run at one size")
    if not p.factor > 1:
        raise UserError(f"pyramid.factor = {p.factor} must be > 1 (2 halves the size at each level down)")
    if p.steps < 1:
        raise UserError(f"pyramid.steps = {p.steps} must be ≥ 1")


def level_configs(cfg: DictConfig) -> list[DictConfig]:
    """The config of each level: image.size its size, optim.steps pyramid.steps below the last.
    With one level, ``cfg`` itself."""
    levels = sizes(cfg)
    if len(levels) == 1:
        return [cfg]
    out = []
    for k, size in enumerate(levels):
        level = OmegaConf.merge(cfg, {"image": {"size": size}})
        if k < len(levels) - 1:
            level.optim.steps = int(cfg.pyramid.steps)
        out.append(level)
    return out


def upsample(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A batch of images (n, h, w, c) resized to ``shape`` (H, W) bicubically, clipped to [0, 1]."""
    n, _, _, c = pixels.shape
    out = jax.image.resize(jnp.asarray(pixels, jnp.float32), (n, *shape, c), "bicubic")
    return np.asarray(jnp.clip(out, 0.0, 1.0))
