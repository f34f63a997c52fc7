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

from nstjax import images
from nstjax.errors import UserError
from nstjax.losses import HParams, LossSpec, compute_targets, make_objective
from nstjax.optimize import Loop, OptimSpec, Problem
from nstjax.style_losses import StyleHParams
from nstjax.vgg import VGG19, Preprocessing, UnknownLayerError, default_conv, layer_stride, prepare_params
from nstjax.weights import SOURCES, VGGWeights, load_weights, resolve
from nstjax.yardstick import YARDSTICK_LAYERS, yardstick_targets

DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"
MEMBER_KEYS = ("content", "style", "init", "init_noise_std", "seed", "loss.alpha", "loss.beta",
               "loss.tv_weight", "loss.content_layer_weights", "loss.style_layer_weights", "optim.lr",
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
    try:
        return LossSpec.from_config(cfg.loss)
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
                              c.tv_weight, **{k: c[k] for k in StyleHParams._fields})
    except ValueError as e:
        raise UserError(str(e)) from e


def optim_spec(cfg: DictConfig) -> OptimSpec:
    o = cfg.optim
    if o.name == "adam":
        return OptimSpec("adam", b1=o.b1, b2=o.b2, eps=o.eps, epsilon_hat=o.epsilon_hat)
    if o.name == "lbfgs":
        return OptimSpec("lbfgs", memory_size=o.memory_size, linesearch=enum_value(o.linesearch),
                         max_linesearch_steps=o.max_linesearch_steps)
    raise UserError(f"optim.name {o.name!r} is unknown: use optim=adam or optim=lbfgs")


def check_numbers(cfg: DictConfig) -> None:
    o = cfg.optim
    if math.isnan(o.lr) or o.lr <= 0:
        raise UserError(f"optim.lr = {o.lr} must be a positive number")
    for key, value, least in (("optim.steps", o.steps, 0), ("image.size", cfg.image.size, 1),
                              ("chunk_steps", cfg.chunk_steps, 1), ("save_every", cfg.save_every, 0),
                              ("checkpoint_every", cfg.checkpoint_every, 0),
                              ("max_members", cfg.max_members or 1, 1)):
        if value < least:
            raise UserError(f"{key} = {value} must be ≥ {least}")
    if not (cfg.image.style_scale > 0 and math.isfinite(cfg.image.style_scale)):
        raise UserError(f"image.style_scale = {cfg.image.style_scale} must be a positive number")


def preprocessing_override(cfg: DictConfig) -> Preprocessing | None:
    """model.preprocessing's keys that are given (none given: None, the weights' own)."""
    given = {k: enum_value(v) for k, v in (cfg.model.preprocessing or {}).items() if v is not None}
    if not given:
        return None
    try:
        return Preprocessing(**given)
    except ValueError as e:
        raise UserError(f"model.preprocessing: {e}") from e


def input_paths(cfg: DictConfig) -> tuple[str, str]:
    """The content and style files: as given, or the bundled examples."""
    return (str(cfg.content or example_image(DEFAULT_CONTENT)),
            str(cfg.style or example_image(DEFAULT_STYLE)))


def load_inputs(cfg: DictConfig, spec: LossSpec) -> tuple[np.ndarray, np.ndarray]:
    """Content resized to longest side image.size; style to size × style_scale.

    An input file, or a resized image, smaller than the deepest layer needs is refused.
    """
    limit = cfg.image.max_pixels
    deepest = max(spec.layers, key=layer_stride)
    least = layer_stride(deepest)
    sizes = {"content": cfg.image.size, "style": max(1, round(cfg.image.size * cfg.image.style_scale))}
    keys = {"content": "image.size", "style": "image.style_scale"}
    loaded = []
    for what, path in zip(("content", "style"), input_paths(cfg)):
        img = images.load_image(path, limit)
        if min(img.shape[:2]) < least:
            raise UserError(
                f"the {what} image {path} is {img.shape[1]}×{img.shape[0]} px, too small for layer "
                f"{deepest}, which needs at least {least} px on each side: use a larger image"
            )
        img = images.resize_longest(img, sizes[what])
        if min(img.shape[:2]) < least:
            raise UserError(
                f"the {what} image is {img.shape[1]}×{img.shape[0]} px after resizing, too small for "
                f"layer {deepest}, which needs at least {least} px on each side: raise {keys[what]} "
                "or use shallower layers"
            )
        loaded.append(img)
    return loaded[0], loaded[1]


def initial_image(cfg: DictConfig, content: np.ndarray, style: np.ndarray,
                  preprocessing: Preprocessing, key: jax.Array) -> np.ndarray:
    """init: content (Gatys et al.), noise (mean pixel + seeded Gaussian), style, or a file."""
    h, w = content.shape[:2]
    if cfg.init == "content":
        return content
    if cfg.init == "noise":
        mean = np.asarray(preprocessing.mean_rgb(), np.float32)
        noise = np.asarray(jax.random.normal(key, content.shape, jnp.float32))
        return np.clip(mean + cfg.init_noise_std * noise, 0.0, 1.0).astype(np.float32)
    if cfg.init == "style":
        return images.resize_to(style, h, w)
    return images.resize_to(images.load_image(cfg.init, cfg.image.max_pixels), h, w)


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
    style: np.ndarray


def validate(cfg: DictConfig) -> Inputs:
    """Every check that needs no weights and no compiling: numbers, layers, loss weights,
    optimiser, convolution, preprocessing, the weights' name, the images. Raises UserError."""
    check_numbers(cfg)
    spec = loss_spec(cfg)
    hparams(cfg, spec)
    optim_spec(cfg)
    conv_algorithm(cfg)
    preprocessing_override(cfg)
    if str(cfg.model.weights) not in SOURCES:
        resolve(cfg.model.weights)  # a file path, or an unknown name: refused, listing the names
    content, style = load_inputs(cfg, spec)
    return Inputs(spec, content, style)


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
    if inputs.spec.style.reads == "features":
        data["style_shape"] = list(inputs.style.shape[:2])
    return OmegaConf.to_yaml(OmegaConf.create(data))


@dataclasses.dataclass(frozen=True)
class Structure:
    """What every member of a group shares: part of the compiled program."""

    model: VGG19
    loss: LossSpec
    optim: OptimSpec
    chunk_steps: int
    steps: int
    max_evaluations: int

    @functools.cached_property
    def loop(self) -> Loop:
        return Loop(make_objective(self.model, self.loss), self.optim, self.chunk_steps)


@dataclasses.dataclass
class Member:
    """One point of a group: its config, its images and where it came from."""

    cfg: DictConfig
    content: np.ndarray
    style: np.ndarray
    paths: tuple[str, str]


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


def build_group(cfgs: Sequence[DictConfig], inputs: Sequence[Inputs] | None = None) -> Group:
    """Load the weights once, each member's images, targets and initial image, and stack them.

    ``cfgs`` must share their structure (:func:`structure_key`); ``inputs`` are their
    :func:`validate` results, if already at hand.
    """
    inputs = list(inputs) if inputs is not None else [validate(c) for c in cfgs]
    first, spec = cfgs[0], inputs[0].spec
    weights = load_weights(first.model.weights, preprocessing=preprocessing_override(first))
    model = VGG19(weights.preprocessing, enum_value(first.model.pooling),
                  enum_value(first.model.precision), use_remat(first, inputs[0].content.shape),
                  conv=conv_algorithm(first))
    structure = Structure(model, spec, optim_spec(first), int(first.chunk_steps), int(first.optim.steps),
                          min(first.optim.max_evaluations or 2**31 - 1, 2**31 - 1))
    params = prepare_params(jax.tree.map(jnp.asarray, weights.params), model.conv,
                            spec.layers + YARDSTICK_LAYERS)
    targets_fn = jax.jit(functools.partial(compute_targets, model, spec=spec))
    yard_fn = jax.jit(functools.partial(yardstick_targets, model))
    problems, yards, members = [], [], []
    for cfg, inp in zip(cfgs, inputs):
        key = jax.random.key(cfg.seed)
        x0 = initial_image(cfg, inp.content, inp.style, weights.preprocessing, key)
        content, style = jnp.asarray(inp.content), jnp.asarray(inp.style)
        problems.append(Problem(jnp.asarray(x0), targets_fn(params, content, style), hparams(cfg, spec),
                                jnp.float32(cfg.optim.lr), key))
        yards.append(yard_fn(params, content, style))
        members.append(Member(cfg, inp.content, inp.style, input_paths(cfg)))
    return Group(structure, members, weights, params, stack(problems), stack(yards))


def stack(trees: Sequence) -> object:
    """Stack pytrees of equal structure along a new leading (member) axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
