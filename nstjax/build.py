"""From configs to problems: validate each point, group points by structure, build a group.

A config is split in two. What may differ between the members of one compiled
program (:data:`MEMBER_KEYS`: the loss weights, the learning rate, the seed, the
images) becomes arrays of a :class:`~nstjax.optimize.Problem`; everything else
is static structure (:class:`Structure`: layers, normalisations, the network,
the optimiser, the image shape, the step counts). Points whose structure agrees
form one group, optimised together with a leading member axis.

    group = build_group([cfg_a, cfg_b])     # configs with the same structure
    group.problems                          # a Problem batch, member axis first
"""

from __future__ import annotations

import dataclasses
import functools
import math
from importlib import resources
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from nstjax import blend, colors, images, inits, normalize, programs, pyramid, regions
from nstjax.errors import UserError
from nstjax.losses import HParams, LossSpec, Targets, compute_targets, make_objective
from nstjax.optimize import Loop, OptimSpec, Problem
from nstjax.style_losses import StyleHParams, banded_remat_refusal
from nstjax.vgg import (VGG, Preprocessing, UnknownLayerError, architecture, default_conv, layer_stride,
                        prepare_params)
from nstjax.weights import SOURCES, VGGWeights, cache_dir, load_weights, resolve
from nstjax.yardstick import YARDSTICK_LAYERS, yardstick_targets

DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"
MEMBER_KEYS = ("content", "style", "style_blend_weights", "regions", "init", "init_noise_std", "seed", "loss.alpha", "loss.beta",
               "loss.tv_weight", "loss.content_layer_weights", "loss.style_layer_weights", "optim.lr", "optim.ema_decay",
               *(f"loss.{k}" for k in StyleHParams._fields))
"""The keys in which the members of one group may differ: they become arrays of the Problem."""
GROUP_KEYS = ("resume",)
"""Keys that belong to the whole run, neither structure nor a member's data."""


def example_image(name: str) -> Path:
    """Path of a bundled example image (examples/, shipped as nstjax.examples)."""
    return Path(str(resources.files("nstjax.examples").joinpath(name)))


def enum_value(v):
    return getattr(v, "value", v)


def loss_spec(cfg: DictConfig) -> LossSpec:
    """The loss structure; its layers must be layers of model.arch."""
    try:
        spec = LossSpec.from_config(cfg.loss, regions=len(cfg.regions or []))
        architecture(enum_value(cfg.model.arch)).check_layers(spec.layers)
        return spec
    except UnknownLayerError as e:
        raise UserError(f"loss.content_layers / loss.style_layers: {e}") from e
    except ValueError as e:
        raise UserError(str(e)) from e


def hparams(cfg: DictConfig, spec: LossSpec) -> HParams:
    """α, β, layer weights and TV weight as arrays; each must be finite and ≥ 0."""
    c = cfg.loss
    for key in ("alpha", "beta", "tv_weight", "content_layer_weights", "style_layer_weights"):
        values = c[key]
        values = [] if values is None else (list(values) if not isinstance(values, (int, float)) else [values])
        for v in values:
            if not math.isfinite(v) or v < 0:
                raise UserError(f"loss.{key} = {v} is not allowed: loss weights must be finite and ≥ 0")
    try:
        return HParams.create(spec, c.alpha, c.beta, c.content_layer_weights, c.style_layer_weights,
                              c.tv_weight, [r.weight for r in cfg.regions or []],
                              **{k: c[k] for k in StyleHParams._fields})
    except ValueError as e:
        raise UserError(str(e)) from e


def optim_spec(cfg: DictConfig) -> OptimSpec:
    o = cfg.optim
    if o.name == "adam":
        return OptimSpec("adam", b1=o.b1, b2=o.b2, eps=o.eps, epsilon_hat=o.epsilon_hat, clip=o.clip)
    if o.name == "lbfgs":
        return OptimSpec("lbfgs", memory_size=o.memory_size, linesearch=enum_value(o.linesearch),
                         max_linesearch_steps=o.max_linesearch_steps, clip=o.clip, max_increase=o.max_increase)
    raise UserError(f"optim.name {o.name!r} is unknown: use optim=adam or optim=lbfgs")


def check_numbers(cfg: DictConfig) -> None:
    o = cfg.optim
    if math.isnan(o.lr) or o.lr <= 0:
        raise UserError(f"optim.lr = {o.lr} must be a positive number")
    for key, value, least in (("optim.steps", o.steps, 0), ("image.size", cfg.image.size, 1),
                              ("model.normalize_size", cfg.model.normalize_size, 16),
                              ("chunk_steps", cfg.chunk_steps, 1), ("save_every", cfg.save_every, 0),
                              ("checkpoint_every", cfg.checkpoint_every, 0),
                              ("max_members", cfg.max_members or 1, 1)):
        if value < least:
            raise UserError(f"{key} = {value} must be ≥ {least}")
    if not (cfg.image.style_scale > 0 and math.isfinite(cfg.image.style_scale)):
        raise UserError(f"image.style_scale = {cfg.image.style_scale} must be a positive number")
    decay = o.ema_decay
    if decay is not None and not (math.isfinite(decay) and 0.0 <= decay < 1.0):
        raise UserError(f"optim.ema_decay = {decay} must be in [0, 1) (null: no average)")
    increase = o.get("max_increase")
    if increase is not None and not (math.isfinite(increase) and increase >= 1):
        raise UserError(f"optim.max_increase = {increase} must be a number ≥ 1, or null to take every step")


def preprocessing_override(cfg: DictConfig) -> Preprocessing | None:
    """model.preprocessing's keys that are given (none given: None, the weights' own)."""
    given = {k: enum_value(v) for k, v in (cfg.model.preprocessing or {}).items() if v is not None}
    if not given:
        return None
    try:
        return Preprocessing(**given)
    except ValueError as e:
        raise UserError(f"model.preprocessing: {e}") from e


def input_paths(cfg: DictConfig) -> tuple[str, list[str]]:
    """The content file and the style files (``style``: one or a list): as given, or the
    bundled examples."""
    return (str(cfg.content or example_image(DEFAULT_CONTENT)),
            blend.style_paths(cfg.style, str(example_image(DEFAULT_STYLE))))


def load_resized(cfg: DictConfig, spec: LossSpec, path: str, what: str) -> np.ndarray:
    """One input image resized: the content (``what``) to longest side image.size, a style to
    size × style_scale. An input file, or a resized image, smaller than the deepest layer needs
    is refused."""
    deepest = max(spec.layers, key=layer_stride)
    least = layer_stride(deepest)
    size, key = ((cfg.image.size, "image.size") if what == "content" else
                 (max(1, round(cfg.image.size * cfg.image.style_scale)), "image.style_scale"))
    img = images.load_image(path, cfg.image.max_pixels)
    if min(img.shape[:2]) < least:
        raise UserError(
            f"the {what} image {path} is {img.shape[1]}×{img.shape[0]} px, too small for layer "
            f"{deepest}, which needs at least {least} px on each side: use a larger image"
        )
    img = images.resize_longest(img, size)
    check_resized(img, what, spec, f"raise {key} or use shallower layers")
    return img


def check_resized(img: np.ndarray, what: str, spec: LossSpec, remedy: str) -> None:
    """Refuse a resized input smaller than the deepest layer needs; ``remedy`` says what to do."""
    deepest = max(spec.layers, key=layer_stride)
    least = layer_stride(deepest)
    if min(img.shape[:2]) < least:
        raise UserError(
            f"the {what} image is {img.shape[1]}×{img.shape[0]} px after resizing, too small for "
            f"layer {deepest}, which needs at least {least} px on each side: {remedy}"
        )


def load_inputs(cfg: DictConfig, spec: LossSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """The content resized to longest side image.size; each style image to size × style_scale."""
    content_path, style_paths = input_paths(cfg)
    return (load_resized(cfg, spec, content_path, "content"),
            [load_resized(cfg, spec, p, "style") for p in style_paths])


def load_regions(cfg: DictConfig, spec: LossSpec, content: np.ndarray) -> list[regions.Region]:
    """``regions`` loaded (:func:`nstjax.regions.load_regions`): a region without a style takes
    the run's (first) style image."""
    def load_style(path, key):
        try:
            return load_resized(cfg, spec, path or input_paths(cfg)[1][0], "style")
        except UserError as e:
            raise UserError(f"{key}: {e}") from e

    return regions.load_regions(cfg, content.shape[:2], load_style, spec.style_layers, cfg.model.ceil_mode,
                                enum_value(cfg.model.arch))


def initial_image(cfg: DictConfig, content: np.ndarray, styles: Sequence[np.ndarray],
                  preprocessing: Preprocessing, key: jax.Array) -> np.ndarray:
    """x₀ for ``init`` (:mod:`nstjax.inits`): content, noise (the weights' mean pixel + seeded
    Gaussian), style, gray, uniform, style_stats, or a file; ``styles`` with the blend weights."""
    weights = blend.blend_weights(cfg.style_blend_weights, len(styles))
    return inits.initial_image(cfg.init, content, styles, weights, key, noise_mean=preprocessing.mean_rgb(),
                               noise_std=cfg.init_noise_std, max_pixels=cfg.image.max_pixels)


def check_init(cfg: DictConfig) -> None:
    """``init`` is one of :data:`nstjax.inits.INITS` or a readable image file."""
    if cfg.init not in inits.INITS:
        try:
            images.load_image(cfg.init, cfg.image.max_pixels)
        except UserError as e:
            raise UserError(f"init={cfg.init}: {e} (init is one of {', '.join(inits.INITS)} "
                            "or an image file)") from e


def normalized_weights(cfg: DictConfig, weights: VGGWeights) -> dict:
    """The params of Gatys et al.'s normalised VGG19 (:mod:`nstjax.normalize`) for this pooling."""
    model = VGG(weights.preprocessing, enum_value(cfg.model.pooling), ceil_mode=cfg.model.ceil_mode,
                arch=weights.arch)
    return normalize.normalized_params(model, weights.params,
                                       weights.sha256, normalize_folder(cfg), cfg.model.normalize_size,
                                       cache_dir(), cfg.image.max_pixels)


def normalize_folder(cfg: DictConfig) -> Path:
    """model.normalize_images, or the bundled examples' folder."""
    return Path(cfg.model.normalize_images or example_image(DEFAULT_CONTENT).parent)


def check_arch(cfg: DictConfig, weights_arch: str) -> None:
    """Refuse weights of another network than model.arch, naming both."""
    arch = enum_value(cfg.model.arch)
    if weights_arch != arch:
        raise UserError(f"model.weights={cfg.model.weights} holds a {weights_arch.upper()}, model.arch is "
                        f"{arch}: set model.arch={weights_arch} (or choose {arch.upper()} weights)")


def use_remat(cfg: DictConfig, shape) -> bool:
    mode = enum_value(cfg.model.remat)
    return mode == "on" or (mode == "auto" and shape[0] * shape[1] >= cfg.model.remat_pixels)


def conv_algorithm(cfg: DictConfig) -> str:
    """model.conv with 'auto' resolved for this backend; Winograd needs float32."""
    conv, precision = enum_value(cfg.model.conv), enum_value(cfg.model.precision)
    if conv == "auto":
        return default_conv(precision)
    if conv == "winograd" and precision != "float32":
        raise UserError(f"model.conv=winograd computes in float32: use model.precision=float32 or "
                        f"model.conv=direct (model.precision is {precision})")
    return conv


@dataclasses.dataclass
class Inputs:
    """What validating a config loaded: its loss structure and its resized images."""

    spec: LossSpec
    content: np.ndarray
    styles: list[np.ndarray]
    regions: list[regions.Region] = dataclasses.field(default_factory=list)

    @property
    def style(self) -> np.ndarray:
        """The style image (the first, with several)."""
        return self.styles[0]


def validate(cfg: DictConfig) -> Inputs:
    """Every check that needs no weights and no compiling: numbers, layers, loss weights,
    optimiser, convolution, preprocessing, the weights' name, the images. Raises UserError."""
    check_numbers(cfg)
    pyramid.check(cfg)
    spec = loss_spec(cfg)
    hparams(cfg, spec)
    optim_spec(cfg)
    conv_algorithm(cfg)
    check_init(cfg)
    if cfg.model.normalize:
        normalize.image_files(normalize_folder(cfg))
    styles = input_paths(cfg)[1]
    blend.check_style_loss(spec.style_loss, len(styles))
    blend.blend_weights(cfg.style_blend_weights, len(styles))
    preprocessing_override(cfg)
    if str(cfg.model.weights) not in SOURCES:
        resolve(cfg.model.weights)  # a file path, or an unknown name: refused, listing the names
    else:
        check_arch(cfg, SOURCES[str(cfg.model.weights)].arch)
    content, styles = load_inputs(cfg, spec)
    loaded = load_regions(cfg, spec, content)
    for style in styles + [r.style for r in loaded]:
        check_loss_shapes(cfg, spec, content.shape, style.shape)
    inputs = Inputs(spec, content, styles, loaded)
    for level in pyramid.level_configs(cfg)[:-1]:  # the smaller levels' inputs, as the run makes them
        try:
            small = level_inputs(level, inputs)
            for what, img in [("content", small.content)] + [("style", s) for s in small.styles]:
                check_resized(img, what, spec, "raise pyramid.min_size or use shallower layers")
        except UserError as e:
            raise UserError(f"pyramid level of {level.image.size} px: {e}") from None
    return inputs


def level_inputs(level: DictConfig, inputs: Inputs) -> Inputs:
    """A pyramid level's inputs (:mod:`nstjax.pyramid`): the run's images resized to the level's
    size (content: image.size, styles: × style_scale), its regions' masks and styles reloaded."""
    size = int(level.image.size)
    content = images.resize_longest(inputs.content, size)
    styles = [images.resize_longest(s, max(1, round(size * level.image.style_scale))) for s in inputs.styles]
    return Inputs(inputs.spec, content, styles, load_regions(level, inputs.spec, content))


def check_loss_shapes(cfg: DictConfig, spec: LossSpec, content_shape, style_shape) -> None:
    """Refuse a style or content loss that needs whole feature maps with banded remat, and
    feature maps smaller than the style loss compares."""
    if use_remat(cfg, content_shape):
        remat = ("model.remat=on" if enum_value(cfg.model.remat) == "on" else
                 f"model.remat=auto, on from model.remat_pixels={cfg.model.remat_pixels} pixels")
        why = banded_remat_refusal(spec, remat)
        if why:
            raise UserError(why)
    try:
        spec.check_shapes(content_shape, style_shape)
    except ValueError as e:
        raise UserError(str(e)) from e


def structure_key(cfg: DictConfig, inputs: Inputs) -> str:
    """The config less its member and group keys, with the content's resized shape (and the
    style's, for a style loss whose targets are the style's features): points with equal keys
    can be optimised as members of one program."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in MEMBER_KEYS + GROUP_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    data["content_shape"] = list(inputs.content.shape[:2])
    data["regions"] = len(inputs.regions)
    if not inputs.spec.style_reads.sums_only:
        data["style_shape"] = list(inputs.style.shape[:2])
    return OmegaConf.to_yaml(OmegaConf.create(data))


@dataclasses.dataclass(frozen=True)
class Structure:
    """What every member of a group shares: part of the compiled program."""

    model: VGG
    loss: LossSpec
    optim: OptimSpec
    chunk_steps: int
    steps: int
    max_evaluations: int
    members: str = "vmap"  # Loop's member batching: vmap | map
    color: str = "none"  # color_control (nstjax.colors): what the pixels optimised are

    @property
    def program_key(self) -> tuple:
        """What the compiled programs of this structure trace beyond their arguments' shapes (the
        step counts are arguments): the key of :mod:`nstjax.programs`."""
        return self.model, self.loss, self.optim, self.color

    @functools.cached_property
    def loop(self) -> Loop:
        objective = colors.objective(make_objective(self.model, self.loss), self.color)
        return Loop(objective, self.optim, self.chunk_steps, self.members)


@dataclasses.dataclass
class Member:
    """One point of a group: its config, its images, where they came from, the blend weights."""

    cfg: DictConfig
    content: np.ndarray
    styles: list[np.ndarray]
    paths: tuple[str, list[str]]
    blend: np.ndarray


@dataclasses.dataclass
class Group:
    """Points of equal structure, as a batch: ``problems`` has the member axis first."""

    structure: Structure
    members: list[Member]
    weights: VGGWeights
    params: dict
    problems: Problem
    yardstick_targets: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.members[0].content.shape[:2])

    def output_image(self, i: int, pixels: np.ndarray) -> np.ndarray:
        """Member ``i``'s RGB image in [0, 1] from its optimised pixels (:func:`nstjax.colors.finish`)."""
        return colors.finish(self.structure.color, pixels, self.members[i].content)


def build_group(cfgs: Sequence[DictConfig], inputs: Sequence[Inputs] | None = None,
                weights: VGGWeights | None = None) -> Group:
    """Load the weights once, each member's images, targets and initial image, and stack them.

    ``cfgs`` must share their structure (:func:`structure_key`); ``inputs`` are their
    :func:`validate` results, if already at hand; ``weights`` those of another group of the
    same run (a pyramid's level below: ``Group.weights``, already normalised), not read again.
    """
    inputs = list(inputs) if inputs is not None else [validate(c) for c in cfgs]
    first, spec = cfgs[0], inputs[0].spec
    if weights is None:
        weights = load_weights(first.model.weights, preprocessing=preprocessing_override(first))
        check_arch(first, weights.arch)
        if first.model.normalize:
            weights = dataclasses.replace(weights, params=normalized_weights(first, weights))
    model = VGG(weights.preprocessing, enum_value(first.model.pooling),
                  enum_value(first.model.precision), use_remat(first, inputs[0].content.shape),
                  conv=conv_algorithm(first), ceil_mode=first.model.ceil_mode, arch=weights.arch)
    structure = Structure(model, spec, optim_spec(first), int(first.chunk_steps), int(first.optim.steps),
                          min(first.optim.max_evaluations or 2**31 - 1, 2**31 - 1),
                          color=enum_value(first.color_control), members=enum_value(first.member_batching))
    params = prepare_params(jax.tree.map(jnp.asarray, weights.params), model.conv,
                            spec.layers + YARDSTICK_LAYERS)
    targets_fn = programs.cached_jit("targets", functools.partial(compute_targets, model, spec=spec), (model, spec))
    guided_fn = programs.cached_jit("guided_grams", functools.partial(guided_grams, model, layers=spec.style_layers),
                                    (model, spec))
    yard_fn = programs.cached_jit("yardstick_targets", functools.partial(yardstick_targets, model), model)
    problems, yards, members = [], [], []
    for cfg, inp in zip(cfgs, inputs):
        key = jax.random.key(cfg.seed)
        mix = blend.blend_weights(cfg.style_blend_weights, len(inp.styles))
        shown, styles = colors.prepare(structure.color, inp.content, inp.styles)  # what the targets are of
        x0 = colors.optimized(structure.color, initial_image(cfg, shown, styles, weights.preprocessing, key))
        targets = blended_targets(targets_fn, params, jnp.asarray(shown), styles, mix)
        if inp.regions:
            region_styles = colors.prepare(structure.color, inp.content, [r.style for r in inp.regions])[1]
            grams = [guided_fn(params, jnp.asarray(style), r.style_guides)
                     for style, r in zip(region_styles, inp.regions)]
            targets = targets._replace(style=regions.style_targets(grams, inp.regions, spec))
        content = jnp.asarray(inp.content)
        problems.append(Problem(jnp.asarray(x0), targets, hparams(cfg, spec), jnp.float32(cfg.optim.lr), key,
                                jnp.float32(cfg.optim.ema_decay or 0.0)))
        yard = [yard_fn(params, content, jnp.asarray(s)) for s in inp.styles]
        yards.append(yard[0]._replace(grams=blend.blend([y.grams for y in yard], mix)))
        members.append(Member(cfg, inp.content, inp.styles, input_paths(cfg), mix))
    return Group(structure, members, weights, params, stack(problems), stack(yards))


def blended_targets(targets_fn, params, content: jax.Array, styles: Sequence[np.ndarray],
                    weights: Sequence[float]) -> Targets:
    """The content's targets and the style targets of each layer blended over the style images,
    A = Σ_k w_k A_k (:mod:`nstjax.blend`); ``targets_fn(params, content, style)`` computes them
    for one style image."""
    each = [targets_fn(params, content, jnp.asarray(s)) for s in styles]
    return each[0]._replace(style=blend.blend([t.style for t in each], weights))


def guided_grams(model: VGG, params, style: jax.Array, guides: dict, layers: Sequence[str]) -> dict:
    """The guided Gram matrices (S ∘ T)ᵀ (S ∘ T) of one style image under its guide at each layer."""
    grams = model.apply({"params": params}, style[None], (), tuple(layers),
                        guides={name: guides[name][None] for name in layers}, method=VGG.features).grams
    return {name: grams[name][0, 0] for name in layers}


def stack(trees: Sequence) -> object:
    """Stack pytrees of equal structure along a new leading (member) axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
