"""The objective as pure functions of arrays.

For a layer with N channels and M = H·W positions, F (M×N here, the transpose
of the paper's N×M) holds the features of the image x, P those of the content.

    content  L_content = Σ_l c_l · C_l                 C_l: loss.content_loss (mse: reduce_c((F − P)²))
    style    L_style = Σ_l w_l E_l                     E_l: loss.style_loss (gram: reduce_s((G − A)²));
                                                       with regions Σ_r λ_r of guided Grams (nstjax.regions)
    TV       L_tv = Σ |∂x x|ᵖ + Σ |∂y x|ᵖ               p = 2 ('squared') or 1 ('abs'); or neural-style's
    temporal L_temporal = Σ_j (1/D) Σ_k c_jk (x_k − ω_jk)²   video (Ruder et al. 2016): ω_j an earlier
                                                       stylised frame warped into this one, c_j its
                                                       consistency weights, D = H·W·C (nstjax.video)
    total    L = α L_content + β L_style + λ_tv L_tv + γ L_temporal

The per-layer losses E_l and C_l, each with its formula, are in
:mod:`nstjax.style_losses`: Gatys et al.'s Gram loss (G = Fᵀ F / g, E_l =
reduce_s((G − A)²)) and mean squared content loss are the defaults.

Targets (P and the style loss's statistics of the style image) are computed
once per run. The objective takes the pixels, the VGG params, the targets, the
hyperparameters (α, β, c_l, w_l, λ_tv and the style losses' numbers as arrays)
and a PRNG key as arguments, so one compiled program serves a whole sweep and
``jax.vmap`` over the hyperparameters works.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from nstjax import gradnorm, regions
from nstjax.style_losses import (CONTENT_REDUCTIONS, GRAM_NORMS, STYLE_REDUCTIONS, LayerInput,
                                 LayerLossOptions, Reads, STYLE_LOSSES, StyleHParams, content_loss, gram_divisor,
                                 style_layer_loss)
from nstjax.vgg import VGG, Features, check_layers, layer_stride

__all__ = ["CONTENT_REDUCTIONS", "GRAM_NORMS", "STYLE_REDUCTIONS", "TV_NORMS", "HParams", "LossSpec",
           "StyleHParams", "Targets", "Temporal", "Terms", "compute_targets", "content_loss", "gram_divisor",
           "make_objective", "style_layer_loss", "temporal_loss", "total_variation"]

TV_NORMS = ("squared", "abs", "neural_style")


@dataclasses.dataclass(frozen=True)
class LossSpec(LayerLossOptions):
    """The structure of the objective: static, part of the compiled program.

    The per-layer losses' options (style_loss, gram_norm, …) are those of
    :class:`nstjax.style_losses.LayerLossOptions`; fields are named as the
    ``loss.*`` config keys.
    """

    content_layers: tuple[str, ...] = ("relu4_2",)
    style_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    tv_norm: str = "squared"
    normalize_gradients: bool = False  # each term's gradient ÷ its L1 norm (nstjax.gradnorm)
    regions: int = 0  # spatial control: the number of regions (the top-level ``regions``, nstjax.regions)
    temporal_frames: int = 0  # video: the earlier frames the temporal term compares with (len(video.long_term))

    def __post_init__(self):
        super().__post_init__()
        if self.regions and (not self.style.guides or self.normalize_gradients):
            guided = " or ".join(name for name, entry in STYLE_LOSSES.items() if entry.guides)
            raise ValueError(f"regions are styled through guided Gram matrices: use loss.style_loss={guided} "
                             "and loss.normalize_gradients=false with regions")
        object.__setattr__(self, "content_layers", check_layers(self.content_layers))
        object.__setattr__(self, "style_layers", check_layers(self.style_layers))
        if self.tv_norm not in TV_NORMS:
            raise ValueError(f"loss.tv_norm must be one of {', '.join(TV_NORMS)}, not {self.tv_norm!r}")

    @classmethod
    def from_config(cls, loss, regions: int = 0, temporal_frames: int = 0) -> "LossSpec":
        """The spec from a ``loss`` config node (or any mapping with its keys), field by field;
        Enum values become their names, lists of layers tuples. Other keys are not read."""
        def plain(name):
            value = getattr(loss[name], "value", loss[name])
            return tuple(value) if name.endswith("_layers") else value

        return cls(**{f.name: plain(f.name) for f in dataclasses.fields(cls)
                      if f.name not in ("regions", "temporal_frames")}, regions=regions, temporal_frames=temporal_frames)

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the objective reads, each once."""
        return tuple(dict.fromkeys(self.content_layers + self.style_layers))

    @property
    def samples(self) -> bool:
        """Whether the objective draws random samples: then it needs a key at every evaluation."""
        return self.style_samples or self.content_samples

    def check_shapes(self, image_shape, style_shape) -> None:
        """A ValueError naming the layer when a style layer's feature map of the image (the
        content's shape) or of the style is smaller than the style loss compares (mrf: 3×3)."""
        least = self.style.least_size
        for name in self.style_layers:
            stride = layer_stride(name)
            for what, (h, w) in (("content", image_shape[:2]), ("style", style_shape[:2])):
                if min(h // stride, w // stride) < least:
                    raise ValueError(
                        f"loss.style_loss={self.style_loss} compares {least}×{least} patches, but {name} "
                        f"of the {what} image is {w // stride}×{h // stride}: raise image.size"
                        f"{' or image.style_scale' if what == 'style' else ''} or use shallower "
                        "loss.style_layers")


ALPHA, BETA = 1.0, 1e4
"""Gatys et al.'s α and β: the content and style terms' weights by default."""


class HParams(NamedTuple):
    """The numeric hyperparameters: arrays, so they can be traced and vmapped."""

    alpha: jax.Array
    beta: jax.Array
    content_layer_weights: jax.Array  # (len(content_layers),)
    style_layer_weights: jax.Array  # (len(style_layers),)
    tv_weight: jax.Array
    style: StyleHParams  # the per-layer losses' numbers: mmd_c, mmd_bandwidth, remd_moment_weight
    region_weights: jax.Array  # (spec.regions,): λ_r of each region (nstjax.regions)
    temporal_weight: jax.Array  # γ of the temporal term (video)

    @classmethod
    def create(cls, spec: LossSpec, alpha=ALPHA, beta=BETA, content_layer_weights=None,
               style_layer_weights=None, tv_weight=0.0, region_weights=None, temporal_weight=0.0,
               **style) -> "HParams":
        """Defaults: equal layer weights summing to 1 (w_l = 1/L, as Gatys et al.), region weights
        1; ``style``: the fields of :class:`StyleHParams` (their defaults where not given)."""
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
            StyleHParams.create(**style),
            jnp.asarray([1.0] * spec.regions if region_weights is None else region_weights, jnp.float32),
            jnp.asarray(temporal_weight, jnp.float32),
        )


class Temporal(NamedTuple):
    """The temporal term's targets (video, :mod:`nstjax.video`): ω_j, the earlier stylised frames
    warped into this one, and c_j, their consistency weights (0 where a pixel is not comparable)."""

    warped: jax.Array  # (J, H, W, C) in the optimised pixels' space
    weights: jax.Array  # (J, H, W, 1) in [0, 1]


class Targets(NamedTuple):
    """Content features P per content layer; per style layer, the style loss's targets (for
    ``gram`` the style's Gram matrix A, see :class:`nstjax.style_losses.StyleLoss`); with video,
    the temporal term's (:class:`Temporal`)."""

    content: dict[str, jax.Array]
    style: dict
    temporal: Temporal | None = None


class Terms(NamedTuple):
    """The weighted terms as they enter the objective; total is their sum."""

    total: jax.Array
    content: jax.Array
    style: jax.Array
    tv: jax.Array
    temporal: jax.Array


def temporal_loss(x: jax.Array, temporal: Temporal) -> jax.Array:
    """Ruder, Dosovitskiy & Brox 2016: Σ_j (1/D) Σ_k c_jk (x_k − ω_jk)², D = H·W·C (the weights
    apply to every channel of a pixel), as artistic-videos' WeightedContentLoss (an MSE mean)."""
    return jnp.sum(jnp.mean(temporal.weights * jnp.square(x[None] - temporal.warped), axis=(1, 2, 3)))


def total_variation(x: jax.Array, norm: str = "squared") -> jax.Array:
    """Σ |x[i+1, j] − x[i, j]|ᵖ + Σ |x[i, j+1] − x[i, j]|ᵖ over pixels and channels, p = 2
    ('squared') or 1 ('abs'); 'neural_style': neural-style's TVLoss, whose hand-written gradient
    is that of ½ Σ (x[i, j] − x[i, j+1])² + (x[i, j] − x[i+1, j])² over the (H−1)×(W−1) block
    i < H−1, j < W−1 (the last row's right and the last column's down differences left out)."""
    if norm == "neural_style":
        corner = x[:-1, :-1, :]
        return 0.5 * (jnp.sum(jnp.square(corner - x[:-1, 1:, :])) + jnp.sum(jnp.square(corner - x[1:, :-1, :])))
    dy = x[1:, :, :] - x[:-1, :, :]
    dx = x[:, 1:, :] - x[:, :-1, :]
    if norm == "squared":
        return jnp.sum(jnp.square(dy)) + jnp.sum(jnp.square(dx))
    return jnp.sum(jnp.abs(dy)) + jnp.sum(jnp.abs(dx))


def compute_targets(model: VGG, params, content: jax.Array, style: jax.Array,
                    spec: LossSpec) -> Targets:
    """P = features of the content image; the style loss's targets of the style image."""
    content_acts = model.apply({"params": params}, content[None], spec.content_layers)
    style_feats = _style_features(model, params, style, spec)
    entry = spec.style
    return Targets(
        content={name: content_acts[name][0] for name in spec.content_layers},
        style={name: entry.targets(_layer_input(model, name, style.shape, style_feats, spec.style_reads), spec)
               for name in spec.style_layers},
    )


def _style_features(model: VGG, params, image: jax.Array, spec: LossSpec,
                    extra_layers: tuple[str, ...] = (), guides: dict | None = None) -> Features:
    """One model pass: ``extra_layers`` and the style layers as the style loss reads them
    (feature maps, or only sums over positions: Gram matrices, and channel sums for 'moments';
    guided Gram matrices of the layers with ``guides``)."""
    reads = spec.style_reads
    maps = reads is Reads.FEATURES
    layers = tuple(dict.fromkeys(extra_layers + (spec.style_layers if maps else ())))
    return model.apply({"params": params}, image[None], layers, () if maps else spec.style_layers,
                       spec.style_layers if reads is Reads.MOMENTS else (), guides, method=VGG.features)


def _layer_input(model: VGG, name: str, image_shape, feats: Features, reads: Reads) -> LayerInput:
    """A style layer's :class:`LayerInput` from the model's features of one image."""
    if reads is Reads.FEATURES:
        return LayerInput(tuple(feats.acts[name].shape[1:]), features=feats.acts[name][0])
    shape = model.layer_shape(name, *image_shape[:2])
    sums = feats.sums[name][0] if reads is Reads.MOMENTS else None
    return LayerInput(shape, gram=feats.grams[name][0], sums=sums)


def make_objective(model: VGG, spec: LossSpec) -> Callable[..., Terms]:
    """Return ``objective(pixels, params, targets, hparams, key=None) -> Terms``, pure and jittable.

    ``pixels`` is one (H, W, 3) RGB image in [0, 1]; ``key`` a typed PRNG key
    (``jax.random.key``) for this evaluation, split into one key per layer.
    Losses that don't sample ignore it; those that do (``spec.samples``) raise
    a ValueError when it is None. The structure (layers, loss choices, the
    model's pooling and preprocessing) is fixed here; all arrays are arguments.
    """
    style_entry, content_entry = spec.style, spec.content
    read = spec.content_layers
    if spec.normalize_gradients:  # neural-style's -normalize_gradients: the terms read activations
        style_entry, content_entry = gradnorm.style_entry(style_entry), gradnorm.content_entry(content_entry)
        read = read + spec.style_layers
    n_layers = len(spec.content_layers) + len(spec.style_layers)

    def objective(pixels, params, targets: Targets, hp: HParams, key=None) -> Terms:
        guides = {name: targets.style[name].guide for name in spec.style_layers} if spec.regions else None
        feats = _style_features(model, params, pixels, spec, read, guides)
        keys = [None] * n_layers if key is None else list(jax.random.split(key, n_layers))
        content_keys, style_keys = keys[:len(spec.content_layers)], keys[len(spec.content_layers):]
        l_content = sum(
            hp.content_layer_weights[i] * content_entry.loss(feats.acts[name][0], targets.content[name],
                                                             content_keys[i], spec)
            for i, name in enumerate(spec.content_layers)
        )
        l_style = 0.0
        for i, name in enumerate(spec.style_layers):
            if spec.regions:
                e = regions.guided_loss(feats.grams[name][0], targets.style[name], hp.region_weights, spec)
            else:
                x = _layer_input(model, name, pixels.shape, feats, style_entry.reads(spec))
                e = style_entry.loss(x, targets.style[name], hp.style, style_keys[i], spec)
            l_style = l_style + hp.style_layer_weights[i] * e
        content = hp.alpha * l_content
        style = hp.beta * l_style
        tv = hp.tv_weight * total_variation(pixels, spec.tv_norm)
        temporal = (hp.temporal_weight * temporal_loss(pixels, targets.temporal) if spec.temporal_frames
                    else jnp.zeros_like(tv))
        return Terms(content + style + tv + temporal, content, style, tv, temporal)

    return objective
