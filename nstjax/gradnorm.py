"""Gradient normalisation (``loss.normalize_gradients``), as neural-style's ``-normalize_gradients``.

jcjohnson/neural-style (neural_style.lua, ContentLoss and StyleLoss
``updateGradInput``) divides the gradient of each loss term E_l with respect
to its layer's activations F by its L1 norm before weighting it:

    ∂E_l/∂F  ↦  (∂E_l/∂F) / (‖∂E_l/∂F‖₁ + 10⁻⁸),   then × the term's weight

so every content and style layer pulls on the image with the same strength,
whatever its scale. The loss values are unchanged (history.csv, metrics.json
show the objective itself); only the gradient the optimiser gets is
normalised, so it is no longer the gradient of the objective: use it with
Adam or L-BFGS without line search (the zoom line search's Wolfe conditions
assume the true gradient), as neural-style does. The TV term is not normalised
(neural-style's TVLoss is not). The Gram style loss then reads the layer's
activations whole, not Gram matrices summed over bands (``model.remat``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from nstjax.style_losses import ContentLoss, LayerInput, Reads, StyleLoss

EPS = 1e-8
"""neural-style's 1e-8 beside the L1 norm."""


def normalized(loss: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``loss(F) -> E`` with the same value and the gradient g / (‖g‖₁ + ε), g = ∂E/∂F.

    A surrogate: E + Σ sg(ĝ) · (F − sg(F)) has E's value and the gradient ĝ
    (sg: stop_gradient), so it traces, vmaps and differentiates as any loss.
    """
    def fn(f: jax.Array) -> jax.Array:
        value, g = jax.value_and_grad(loss)(f)
        g = g / (jnp.sum(jnp.abs(g.astype(jnp.float32))) + EPS)
        step = f - jax.lax.stop_gradient(f)
        return jax.lax.stop_gradient(value) + jnp.sum(jax.lax.stop_gradient(g) * step, dtype=jnp.float32)

    return fn


def style_entry(entry: StyleLoss) -> StyleLoss:
    """``entry`` with its gradient normalised in the layer's activations: it reads the feature map
    (a Gram-reading loss gets FᵀF computed from it)."""
    def loss(x: LayerInput, targets, hp, key, opts):
        return normalized(lambda f: entry.loss(LayerInput.of(f, entry.reads(opts)), targets, hp, key, opts))(
            x.features)

    return entry._replace(loss=loss, reads=lambda opts: Reads.FEATURES)


def content_entry(entry: ContentLoss) -> ContentLoss:
    """``entry`` with its gradient normalised in the layer's activations."""
    def loss(features, target, key, opts):
        return normalized(lambda f: entry.loss(f, target, key, opts))(features)

    return entry._replace(loss=loss)
