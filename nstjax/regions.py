"""Spatial control with masks (``regions``): guided Gram matrices, Gatys et al. 2017 §4.

Gatys, Ecker, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in
Neural Style Transfer", CVPR 2017, §4.1: each region r of the content image, a
mask image (white = inside, any size: resized to the content; grey values are
soft weights), is styled by its own style image, or by the part of it under its
``style_mask``. At each style layer l the region's guidance channel T_r is
propagated to the layer's size (T_rl), the features are weighted by it, and

    G_rl = (F_l ∘ T_rl)ᵀ (F_l ∘ T_rl) / g(M_rl)       M_rl = Σ_p T_rl(p)²
    A_rl = the same of the style image under its own guide
    E_l  = Σ_r λ_r reduce_s((G_rl − A_rl)²)           λ_r = the region's weight

g is ``loss.gram_norm``'s divisor and reduce_s ``loss.style_reduction`` (Gatys:
1/(4N²M²)), with the positions M of a region taken as its guide's mass M_rl: a
region's Gram matrix is then a mean over the region, whatever its size, and
compares with the style's under a mask of another size (the paper's guided Gram
matrices, normalised per region). The region weights λ_r are traced (a member
key of a sweep); the masks and style images are a member's data; the number of
regions and the propagation are structure.

Propagation of a mask to deeper layers (``mask_propagation``, §4.1):

    simple   the paper's down-sampling: each 2×2 pooling averages the guide over its
             window (as the network's own pooling shrinks the feature maps)
    inside   only positions whose receptive field lies inside the region: each 3×3
             convolution erodes the guide (the minimum over its 3×3 neighbourhood,
             positions outside the image ignored) and each pooling takes the minimum
             over its window

Regions replace the style term (``style`` then only serves ``init`` and the
yardsticks); they need the gram style loss and work with banded remat (the
guides are cut into the bands of the features, :meth:`nstjax.vgg.VGG19.features`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import colors, images
from nstjax.errors import UserError
from nstjax.style_losses import gram_divisor, style_layer_loss
from nstjax.vgg import DEFAULT_ARCH, architecture, pooled_size

PROPAGATIONS = ("simple", "inside")
"""The ``mask_propagation`` choices."""
WHITE = 0.5
"""A mask with no pixel brighter than this is empty."""


class RegionTargets(NamedTuple):
    """A style layer's targets with R regions: the style's guided Gram matrices A_r (R, N, N),
    normalised, and the content's guides T_r at the layer (R, H_l, W_l)."""

    gram: jax.Array
    guide: jax.Array


class Region(NamedTuple):
    """One region, loaded: its weight, its style image, and its guides at each style layer of the
    content and of the style (layer → (H_l, W_l))."""

    weight: float
    style: np.ndarray
    guides: dict
    style_guides: dict


def load_mask(path: str, shape: tuple[int, int], key: str, max_pixels: int | None) -> np.ndarray:
    """A mask image as weights in [0, 1] (its luminance) resized to ``shape``; refused with one
    line naming ``key`` when it is not an image or has no white pixel."""
    try:
        rgb = images.load_image(path, max_pixels)
    except UserError as e:
        raise UserError(f"{key}: {e}") from e
    if rgb.max(initial=0.0) <= WHITE:
        raise UserError(f"{key}: the mask {path} has no white pixel (white marks the region): "
                        "draw the region in white on black")
    return np.clip(colors.luminance(images.resize_to(rgb, *shape)), 0.0, 1.0).astype(np.float32)


def propagate(mask: np.ndarray, layers: Sequence[str], mode: str, ceil: bool = False,
              arch: str = DEFAULT_ARCH) -> dict[str, np.ndarray]:
    """The guide T_l of each of ``layers`` from a mask at the image's size, through the network's
    convolutions and poolings (``mode``: simple or inside; ``ceil``: the pooling's ceil mode;
    ``arch``: the VGG network, :data:`nstjax.vgg.ARCHITECTURES`)."""
    if mode not in PROPAGATIONS:
        raise ValueError(f"mask_propagation must be one of {', '.join(PROPAGATIONS)}, not {mode!r}")
    wanted, out, t = set(layers), {}, np.asarray(mask, np.float64)
    for block, convs in enumerate(architecture(arch).block_sizes, 1):
        for i in range(1, convs + 1):
            if mode == "inside":
                t = _erode3x3(t)
            for name in (f"conv{block}_{i}", f"relu{block}_{i}"):
                if name in wanted:
                    out[name] = t.astype(np.float32)
        if len(out) == len(wanted):
            break
        t = _pool2x2(t, np.mean if mode == "simple" else np.min, ceil)
        if f"pool{block}" in wanted:
            out[f"pool{block}"] = t.astype(np.float32)
    return {name: out[name] for name in layers}


def _erode3x3(t: np.ndarray) -> np.ndarray:
    """min over each position's 3×3 neighbourhood inside the image."""
    padded = np.pad(t, 1, constant_values=np.inf)
    h, w = t.shape
    return np.min([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def _pool2x2(t: np.ndarray, reduce, ceil: bool) -> np.ndarray:
    """``reduce`` over 2×2 windows, stride 2: floor mode, or ceil mode over the values a window holds."""
    h, w = t.shape
    if ceil:
        t = np.pad(t, ((0, h % 2), (0, w % 2)), mode="edge")
    ph, pw = pooled_size(h, ceil), pooled_size(w, ceil)
    return reduce(t[:2 * ph, :2 * pw].reshape(ph, 2, pw, 2), axis=(1, 3))


def check_coverage(guides: dict, key: str, mode: str) -> None:
    """Refuse a guide that covers nothing at a layer."""
    for name, guide in guides.items():
        if not np.any(guide > 0):
            raise UserError(f"{key} covers nothing at {name} with mask_propagation={mode}: use a larger region"
                            + (", mask_propagation=simple" if mode == "inside" else "")
                            + " or shallower loss.style_layers")


def load_regions(regions: Sequence, content_shape: tuple[int, int], load_style, layers: Sequence[str],
                 mode: str, ceil: bool, arch: str = DEFAULT_ARCH, max_pixels: int | None = None) -> list[Region]:
    """Each region (:class:`nstjax.spec.RegionSpec`: mask, style, style_mask, weight) loaded and
    checked: masks, weights, style images (``load_style(path, key)`` resizes one as the run's
    style), and the guides at ``layers`` (every one covering something) by ``mode`` propagation."""
    out = []
    for r, region in enumerate(regions):
        key = f"regions[{r}]"
        if not (math.isfinite(region.weight) and region.weight >= 0):
            raise UserError(f"{key}.weight = {region.weight} is not allowed: region weights must be finite and ≥ 0")
        if region.mask is None:
            raise UserError(f"{key}.mask is missing: give each region a mask image (white = inside)")
        mask = load_mask(region.mask, content_shape, f"{key}.mask", max_pixels)
        style = load_style(region.style, f"{key}.style")
        style_mask = (np.ones(style.shape[:2], np.float32) if region.style_mask is None else
                      load_mask(region.style_mask, style.shape[:2], f"{key}.style_mask", max_pixels))
        guides, style_guides = (propagate(m, layers, mode, ceil, arch) for m in (mask, style_mask))
        check_coverage(guides, f"{key}.mask", mode)
        check_coverage(style_guides, f"{key}.style_mask", mode)
        out.append(Region(float(region.weight), style, guides, style_guides))
    return out


def style_targets(style_grams: Sequence[dict], regions: Sequence[Region], opts) -> dict[str, RegionTargets]:
    """Per layer: the regions' A_r (``style_grams[r][layer]``: the style's guided Gram matrix
    under its guide, (N, N)) divided by g of its guide's mass, and the content's guides."""
    out = {}
    for name in regions[0].guides:
        grams = []
        for grams_r, region in zip(style_grams, regions):
            g = grams_r[name]
            grams.append(g / gram_divisor(g.shape[-1], float(np.sum(np.square(region.style_guides[name]))),
                                          opts.gram_norm))
        out[name] = RegionTargets(jnp.stack(grams), jnp.asarray(np.stack([r.guides[name] for r in regions])))
    return out


def guided_loss(grams: jax.Array, targets: RegionTargets, weights: jax.Array, opts) -> jax.Array:
    """E_l = Σ_r λ_r reduce_s((G_r / g(M_r) − A_r)²) of a layer's guided Gram matrices (R, N, N)."""
    n = grams.shape[-1]
    mass = jnp.sum(jnp.square(targets.guide.astype(jnp.float32)), axis=(1, 2))

    def one(g, a, m):
        return style_layer_loss(g / gram_divisor(n, m, opts.gram_norm), a, n, m, opts.style_reduction)

    return jnp.sum(weights * jax.vmap(one)(grams, targets.gram, mass))
