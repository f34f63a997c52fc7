"""The Gatys et al. objective as pure functions of arrays.

For a layer with N channels and M = H·W positions, F (M×N here, the transpose
of the paper's N×M) holds the features of the image x, P those of the content.

    content  L_content = Σ_l c_l · reduce_c((F − P)²)     reduce_c: ½Σ (the seed), Σ, or mean
    Gram     G = Fᵀ F / g                              g: 1 (the seed), M, or N·M
    style    E_l = reduce_s((G − A)²)                   reduce_s: Σ/(4N²M²) (the seed), Σ, or mean
             L_style = Σ_l w_l E_l
    TV       L_tv = Σ |∂x x|ᵖ + Σ |∂y x|ᵖ               p = 2 ('squared') or 1 ('abs')
    total    L = α L_content + β L_style + λ_tv L_tv

Targets (P and the style Gram matrices A) are computed once per run. The
objective takes the pixels, the VGG params, the targets and the hyperparameters
(α, β, c_l, w_l, λ_tv as arrays) as arguments, so one compiled program serves a
whole sweep and ``jax.vmap`` over the hyperparameters works.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from nstjax.vgg import VGG19, check_layers, layer_channels, layer_stride

GRAM_NORMS = ("none", "M", "NM")
STYLE_REDUCTIONS = ("gatys", "sum", "mean")
CONTENT_REDUCTIONS = ("half_sum", "sum", "mean")
TV_NORMS = ("squared", "abs")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The structure of the objective: static, part of the compiled program."""

    content_layers: tuple[str, ...] = ("relu4_2",)
    style_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    gram_norm: str = "none"
    style_reduction: str = "gatys"
    content_reduction: str = "half_sum"
    tv_norm: str = "squared"

    def __post_init__(self):
        object.__setattr__(self, "content_layers", check_layers(self.content_layers))
        object.__setattr__(self, "style_layers", check_layers(self.style_layers))
        for name, value, choices in (
            ("gram_norm", self.gram_norm, GRAM_NORMS),
            ("style_reduction", self.style_reduction, STYLE_REDUCTIONS),
            ("content_reduction", self.content_reduction, CONTENT_REDUCTIONS),
            ("tv_norm", self.tv_norm, TV_NORMS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {value!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the objective reads, each once."""
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))


class HParams(NamedTuple):
    """The numeric hyperparameters: arrays, so they can be traced and vmapped."""

    alpha: jax.Array
    beta: jax.Array
    content_layer_weights: jax.Array  # (len(content_layers),)
    style_layer_weights: jax.Array  # (len(style_layers),)
    tv_weight: jax.Array

    @classmethod
    def create(cls, spec: LossSpec, alpha=1.0, beta=1e4, content_layer_weights=None,
               style_layer_weights=None, tv_weight=0.0) -> "HParams":
        """Defaults: equal layer weights summing to 1 (w_l = 1/L, as Gatys et al.)."""
        def layer_weights(given, layers, key):
            if given is None or len(given) == 0:
                return jnp.full((len(layers),), 1.0 / len(layers), jnp.float32)
            if len(given) != len(layers):
                raise ValueError(
                    f"loss.{key} has {len(given)} values for {len(layers)} layers {list(layers)}"
                )
            return jnp.asarray(given, jnp.float32)

        return cls(
            jnp.asarray(alpha, jnp.float32),
            jnp.asarray(beta, jnp.float32),
            layer_weights(content_layer_weights, spec.content_layers, "content_layer_weights"),
            layer_weights(style_layer_weights, spec.style_layers, "style_layer_weights"),
            jnp.asarray(tv_weight, jnp.float32),
        )


class Targets(NamedTuple):
    """Content features P per content layer and style Gram matrices A per style layer."""

    content: dict[str, jax.Array]
    style: dict[str, jax.Array]


class Terms(NamedTuple):
    """The weighted terms as they enter the objective; total is their sum."""

    total: jax.Array
    content: jax.Array
    style: jax.Array
    tv: jax.Array


def gram_divisor(n: int, m: int, norm: str) -> float:
    """g of G = Fᵀ F / g: 1, M or N·M."""
    return {"none": 1.0, "M": float(m), "NM": float(n * m)}[norm]


def content_loss(features: jax.Array, target: jax.Array, reduction: str = "half_sum") -> jax.Array:
    """½ Σ (F − P)² (Gatys et al.), Σ (F − P)², or its mean over N·M."""
    sq = jnp.square(features.astype(jnp.float32) - target.astype(jnp.float32))
    if reduction == "half_sum":
        return 0.5 * jnp.sum(sq)
    return jnp.sum(sq) if reduction == "sum" else jnp.mean(sq)


def style_layer_loss(g: jax.Array, a: jax.Array, n: int, m: int, reduction: str = "gatys") -> jax.Array:
    """E_l = Σ (G − A)² / (4 N² M²) (Gatys et al.), Σ (G − A)², or its mean over N²."""
    sq = jnp.square(g - a)
    if reduction == "gatys":
        return jnp.sum(sq) / (4.0 * float(n) ** 2 * float(m) ** 2)
    return jnp.sum(sq) if reduction == "sum" else jnp.mean(sq)


def total_variation(x: jax.Array, norm: str = "squared") -> jax.Array:
    """Σ |x[i+1, j] − x[i, j]|ᵖ + Σ |x[i, j+1] − x[i, j]|ᵖ over pixels and channels."""
    dy = x[1:, :, :] - x[:-1, :, :]
    dx = x[:, 1:, :] - x[:, :-1, :]
    if norm == "squared":
        return jnp.sum(jnp.square(dy)) + jnp.sum(jnp.square(dx))
    return jnp.sum(jnp.abs(dy)) + jnp.sum(jnp.abs(dx))


def compute_targets(model: VGG19, params, content: jax.Array, style: jax.Array,
                    spec: LossSpec) -> Targets:
    """P = features of the content image, A = Gram matrices of the style image."""
    content_acts = model.apply({"params": params}, content[None], spec.content_layers)
    style_grams = model.apply({"params": params}, style[None], grams=spec.style_layers,
                              method=VGG19.features).grams
    return Targets(
        content={name: content_acts[name][0] for name in spec.content_layers},
        style={name: style_grams[name][0] / gram_divisor(*_layer_size(name, style.shape), spec.gram_norm)
               for name in spec.style_layers},
    )


def _layer_size(name: str, image_shape) -> tuple[int, int]:
    """(N, M) of a layer for an (H, W, 3) image: channels and positions."""
    stride = layer_stride(name)
    return layer_channels(name), (image_shape[0] // stride) * (image_shape[1] // stride)


def make_objective(model: VGG19, spec: LossSpec) -> Callable[..., Terms]:
    """Return ``objective(pixels, params, targets, hparams, key=None) -> Terms``, pure and jittable.

    ``pixels`` is one (H, W, 3) RGB image in [0, 1]; ``key`` is the PRNG key of this
    evaluation, for terms that sample. The structure (layers, normalisations,
    the model's pooling and preprocessing) is fixed here; all arrays are arguments.
    """

    def objective(pixels, params, targets: Targets, hp: HParams, key=None) -> Terms:
        feats = model.apply({"params": params}, pixels[None], spec.content_layers, spec.style_layers,
                            method=VGG19.features)
        l_content = sum(
            hp.content_layer_weights[i] * content_loss(feats.acts[name][0], targets.content[name],
                                                       spec.content_reduction)
            for i, name in enumerate(spec.content_layers)
        )
        l_style = 0.0
        for i, name in enumerate(spec.style_layers):
            n, m = _layer_size(name, pixels.shape)
            g = feats.grams[name][0] / gram_divisor(n, m, spec.gram_norm)
            e = style_layer_loss(g, targets.style[name], n, m, spec.style_reduction)
            l_style = l_style + hp.style_layer_weights[i] * e
        content = hp.alpha * l_content
        style = hp.beta * l_style
        tv = hp.tv_weight * total_variation(pixels, spec.tv_norm)
        return Terms(content + style + tv, content, style, tv)

    return objective
