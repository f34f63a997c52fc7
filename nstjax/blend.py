"""Several style images with blend weights (``style=[a,b]``, ``style_blend_weights=[w_a,w_b]``).

As neural-style's ``-style_image a,b -style_blend_weights w_a,w_b``
(jcjohnson/neural-style, neural_style.lua): the weights, equal by default, are
normalised to sum to 1, w_k ← w_k / Σ_j w_j, and the style target of each layer
is the blend-weighted sum of each style image's Gram matrix,

    A = Σ_k w_k A_k,   A_k = S_kᵀ S_k / g_k

(A_k as the gram loss computes it for image k alone: ``loss.gram_norm`` divides
by that image's own g_k, as neural-style divides each by its own C·H·W). Each
style image is resized to longest side image.size × image.style_scale. The
blend is computed per member when its targets are built, so the weights may
differ between the members of a batched sweep (a member key). Only the gram
style loss blends: the other style losses' targets are the style's feature
vectors, which have no weighted sum.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from nstjax.errors import UserError
from nstjax.style_losses import STYLE_LOSSES

def style_paths(style, default: str) -> list[str]:
    """``style`` as a list of paths: None is ``default``; a path, or a list of paths."""
    if style is None:
        return [default]
    if isinstance(style, (str, int, float)) and not isinstance(style, bool):
        return [str(style)]
    try:
        paths = list(style)
    except TypeError:
        paths = None
    if not paths or not all(isinstance(p, str) for p in paths):
        raise UserError(f"style = {style!r}: give an image file or a list of them, e.g. style=[a.jpg,b.jpg]")
    return paths


def blend_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """The n normalised weights w_k / Σ_j w_j (None: 1/n each); each must be finite and ≥ 0,
    one per style image, not all 0."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = [float(v) for v in weights]
    if len(w) != n:
        raise UserError(f"style_blend_weights has {len(w)} values for {n} style image"
                        f"{'s' if n != 1 else ''}: give one weight per image of style")
    for v in w:
        if not math.isfinite(v) or v < 0:
            raise UserError(f"style_blend_weights = {list(weights)}: {v} is not allowed, "
                            "blend weights must be finite and ≥ 0")
    total = sum(w)
    if total <= 0:
        raise UserError(f"style_blend_weights = {list(weights)}: the weights sum to 0, give one > 0")
    return np.asarray(w) / total


def check_style_loss(style_loss: str, n: int) -> None:
    """Several style images need a style loss whose targets blend (its registry entry says so)."""
    if n > 1 and not STYLE_LOSSES[style_loss].blends:
        blended = " or ".join(name for name, entry in STYLE_LOSSES.items() if entry.blends)
        raise UserError(f"style has {n} images but loss.style_loss={style_loss} takes one: "
                        f"several style images blend with loss.style_loss={blended}")


def blend(trees: Sequence, weights: Sequence[float]):
    """Σ_k w_k tree_k, leaf by leaf in float32 on the host (numpy: the same products and sums as
    separate float32 operations, without a program per leaf shape), for pytrees of equal structure
    and shapes."""
    return jax.tree.map(lambda *leaves: sum(np.float32(w) * np.asarray(leaf) for w, leaf in zip(weights, leaves)),
                        *trees)
