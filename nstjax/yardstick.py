"""Yardsticks: the same two distances for every run, whatever its own loss, layers and weights.

With the run's network (weights, pooling, preprocessing), for an image x:

    content  ½ Σ (F − P)²               at relu4_2 (P: the content image's features)
    style    E_l = Σ (G − A)² / (4 N² M²) at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1,
             G = FᵀF of x, A = SᵀS of the style image (the seed's formulas, unweighted)

and their mean over the five style layers. ``metrics.json`` records them for
the initial and the final image, so that runs optimising different objectives
can be compared on one scale.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nstjax.style_losses import content_loss, style_layer_loss
from nstjax.vgg import VGG

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
YARDSTICK_LAYERS = (CONTENT_LAYER,) + STYLE_LAYERS


class YardstickTargets(NamedTuple):
    content: jax.Array  # (H/8, W/8, 512) features of the content image at relu4_2
    grams: dict[str, jax.Array]  # raw Gram matrices SᵀS of the style image


def yardstick_targets(model: VGG, params, content: jax.Array, style: jax.Array) -> YardstickTargets:
    acts = model.apply({"params": params}, content[None], (CONTENT_LAYER,))
    grams = model.apply({"params": params}, style[None], grams=STYLE_LAYERS, method=VGG.features).grams
    return YardstickTargets(acts[CONTENT_LAYER][0], {name: grams[name][0] for name in STYLE_LAYERS})


def yardstick(model: VGG, params, pixels: jax.Array, targets: YardstickTargets) -> dict[str, jax.Array]:
    """``{"content": ½Σ(F−P)², "style": (E_l for each of STYLE_LAYERS)}`` of one (H, W, 3) image."""
    feats = model.apply({"params": params}, pixels[None], (CONTENT_LAYER,), STYLE_LAYERS,
                        method=VGG.features)
    content = content_loss(feats.acts[CONTENT_LAYER][0], targets.content, "half_sum")
    style = []
    for name in STYLE_LAYERS:
        h, w, n = model.layer_shape(name, *pixels.shape[:2])
        style.append(style_layer_loss(feats.grams[name][0], targets.grams[name], n, h * w, "gatys"))
    return {"content": content, "style": jnp.stack(style)}


def as_metrics(values: dict) -> dict:
    """One image's yardsticks as JSON: content, style per layer, and the style mean."""
    style = [float(v) for v in values["style"]]
    return {"content": float(values["content"]), "style": dict(zip(STYLE_LAYERS, style)),
            "style_mean": sum(style) / len(style)}
