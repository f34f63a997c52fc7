"""From parsed points to problems: validate each point's inputs, group points, build a group.

A config is parsed once (:func:`nstjax.spec.parse`) into its :class:`~nstjax.spec.Structure`
(what makes a separate program) and :class:`~nstjax.spec.MemberSpec` (what the members of one
program may differ in). :func:`validate` loads and checks a point's images; points whose
:func:`group_key` agree (their structure, and the shapes of their images) form one group,
optimised together with a leading member axis: :func:`build_group` reads the weights once, builds
the network and each member's targets, initial image and numbers as a
:class:`~nstjax.optimize.Problem` batch.

    group = build_group([point_a, point_b])    # points of one group
    group.problems                             # a Problem batch, member axis first
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import blend, colors, images, inits, normalize, programs, pyramid, regions
from nstjax.errors import UserError
from nstjax.losses import LossSpec, Targets, compute_targets, make_objective
from nstjax.optimize import Loop, Problem
from nstjax.spec import ModelSpec, Point, Structure
from nstjax.style_losses import banded_remat_refusal
from nstjax.vgg import VGG, Preprocessing, layer_stride, prepare_params
from nstjax.weights import SOURCES, VGGWeights, cache_dir, load_weights, resolve
from nstjax.yardstick import YARDSTICK_LAYERS, yardstick_targets

DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"


def example_image(name: str) -> Path:
    """Path of a bundled example image (examples/, shipped as nstjax.examples)."""
    return Path(str(resources.files("nstjax.examples").joinpath(name)))


def input_paths(point: Point) -> tuple[str, list[str]]:
    """The content file and the style files: as given, or the bundled examples."""
    m = point.member
    return str(m.content or example_image(DEFAULT_CONTENT)), list(m.style or (str(example_image(DEFAULT_STYLE)),))


def _least(spec: LossSpec) -> tuple[str, int]:
    deepest = max(spec.layers, key=layer_stride)
    return deepest, layer_stride(deepest)


def load_resized(structure: Structure, path: str, what: str) -> np.ndarray:
    """One input image resized: the content (``what``) to longest side image.size, a style to
    size × style_scale. An input file, or a resized image, smaller than the deepest layer needs
    is refused."""
    deepest, least = _least(structure.loss)
    size, key = ((structure.image.size, "image.size") if what == "content" else
                 (structure.image.style_size, "image.style_scale"))
    img = images.load_image(path, structure.image.max_pixels)
    if min(img.shape[:2]) < least:
        raise UserError(
            f"the {what} image {path} is {img.shape[1]}×{img.shape[0]} px, too small for layer "
            f"{deepest}, which needs at least {least} px on each side: use a larger image"
        )
    img = images.resize_longest(img, size)
    check_resized(img, what, structure.loss, f"raise {key} or use shallower layers")
    return img


def check_resized(img: np.ndarray, what: str, spec: LossSpec, remedy: str) -> None:
    """Refuse a resized input smaller than the deepest layer needs; ``remedy`` says what to do."""
    deepest, least = _least(spec)
    if min(img.shape[:2]) < least:
        raise UserError(
            f"the {what} image is {img.shape[1]}×{img.shape[0]} px after resizing, too small for "
            f"layer {deepest}, which needs at least {least} px on each side: {remedy}"
        )


def load_regions(point: Point, content: np.ndarray, structure: Structure | None = None) -> list[regions.Region]:
    """The point's regions loaded (:func:`nstjax.regions.load_regions`) at ``structure``'s size
    (a pyramid level's; default the point's): a region without a style takes the run's (first)
    style image."""
    s = structure or point.structure

    def load_style(path, key):
        try:
            return load_resized(s, path or input_paths(point)[1][0], "style")
        except UserError as e:
            raise UserError(f"{key}: {e}") from e

    return regions.load_regions(point.member.regions, content.shape[:2], load_style, s.loss.style_layers,
                                s.mask_propagation, s.model.ceil_mode, s.model.arch, s.image.max_pixels)


def initial_image(point: Point, content: np.ndarray, styles: Sequence[np.ndarray], preprocessing: Preprocessing,
                  key: jax.Array) -> np.ndarray:
    """x₀ for ``init`` (:mod:`nstjax.inits`): content, noise (the weights' mean pixel + seeded
    Gaussian), style, gray, uniform, style_stats, or a file; ``styles`` with the blend weights."""
    m = point.member
    weights = blend.blend_weights(m.style_blend_weights, len(styles))
    return inits.initial_image(m.init, content, styles, weights, key, noise_mean=preprocessing.mean_rgb(),
                               noise_std=m.init_noise_std, max_pixels=point.structure.image.max_pixels)


def normalize_folder(model: ModelSpec) -> Path:
    """model.normalize_images, or the bundled examples' folder."""
    return Path(model.normalize_images or example_image(DEFAULT_CONTENT).parent)


def check_arch(model: ModelSpec, weights_arch: str) -> None:
    """Refuse weights of another network than model.arch, naming both."""
    if weights_arch != model.arch:
        raise UserError(f"model.weights={model.weights} holds a {weights_arch.upper()}, model.arch is "
                        f"{model.arch}: set model.arch={weights_arch} (or choose {model.arch.upper()} weights)")


def read_weights(structure: Structure) -> VGGWeights:
    """The model's weights, read and checked against model.arch; with model.normalize, normalised
    (Gatys et al.'s normalised VGG19, :mod:`nstjax.normalize`) for this pooling."""
    m = structure.model
    weights = load_weights(m.weights, preprocessing=m.preprocessing)
    check_arch(m, weights.arch)
    if m.normalize:
        model = VGG(weights.preprocessing, m.pooling, ceil_mode=m.ceil_mode, arch=weights.arch)
        params = normalize.normalized_params(model, weights.params, weights.sha256, normalize_folder(m),
                                             m.normalize_size, cache_dir(), structure.image.max_pixels)
        weights = dataclasses.replace(weights, params=params)
    return weights


@dataclasses.dataclass
class Inputs:
    """What validating a point loaded: its resized images and regions."""

    content: np.ndarray
    styles: list[np.ndarray]
    regions: list[regions.Region] = dataclasses.field(default_factory=list)

    @property
    def style(self) -> np.ndarray:
        """The style image (the first, with several)."""
        return self.styles[0]


def validate(point: Point) -> Inputs:
    """Every check that needs no weights and no compiling beyond the parse's: the weights' name
    (or file), the folder of images model.normalize averages over, the images, the regions, the
    loss's shapes, the pyramid's smaller levels; a video's frames (:func:`nstjax.video.validate`).
    Raises UserError."""
    s = point.structure
    if s.model.normalize:
        normalize.image_files(normalize_folder(s.model))
    if s.model.weights not in SOURCES:
        resolve(s.model.weights)  # a file path, or an unknown name: refused, listing the names
    else:
        check_arch(s.model, SOURCES[s.model.weights].arch)
    if s.video.enabled:
        from nstjax import video

        return video.validate(point)
    content_path, style_paths = input_paths(point)
    content = load_resized(s, content_path, "content")
    styles = [load_resized(s, p, "style") for p in style_paths]
    loaded = load_regions(point, content)
    for style in styles + [r.style for r in loaded]:
        check_loss_shapes(s, content.shape, style.shape)
    inputs = Inputs(content, styles, loaded)
    for level in pyramid.levels(s)[:-1]:  # the smaller levels' inputs, as the run makes them
        try:
            small = level_inputs(point, level, inputs)
            for what, img in [("content", small.content)] + [("style", st) for st in small.styles]:
                check_resized(img, what, s.loss, "raise pyramid.min_size or use shallower layers")
        except UserError as e:
            raise UserError(f"pyramid level of {level.image.size} px: {e}") from None
    return inputs


def level_inputs(point: Point, level: Structure, inputs: Inputs) -> Inputs:
    """A pyramid level's inputs (:mod:`nstjax.pyramid`): the run's images resized to the level's
    size (content: image.size, styles: × style_scale), its regions' masks and styles reloaded."""
    content = images.resize_longest(inputs.content, level.image.size)
    styles = [images.resize_longest(s, level.image.style_size) for s in inputs.styles]
    return Inputs(content, styles, load_regions(point, content, level))


def check_loss_shapes(structure: Structure, content_shape, style_shape) -> None:
    """Refuse a style or content loss that needs whole feature maps with banded remat, and
    feature maps smaller than the style loss compares."""
    if structure.model.uses_remat(content_shape):
        why = banded_remat_refusal(structure.loss, structure.model.remat_described())
        if why:
            raise UserError(why)
    try:
        structure.loss.check_shapes(content_shape, style_shape)
    except ValueError as e:
        raise UserError(str(e)) from e


def group_key(point: Point, inputs: Inputs) -> tuple:
    """Points with equal keys are members of one program: their structure, the content's resized
    shape, and the style's for a style loss whose targets are the style's features."""
    style_shape = None if point.structure.loss.style_reads.sums_only else tuple(inputs.style.shape[:2])
    return point.structure, tuple(inputs.content.shape[:2]), style_shape


@dataclasses.dataclass
class Member:
    """One point of a group: its spec, its images, where they came from, the blend weights."""

    spec: object  # nstjax.spec.MemberSpec
    content: np.ndarray
    styles: list[np.ndarray]
    paths: tuple[str, list[str]]
    blend: np.ndarray


@dataclasses.dataclass
class Group:
    """Points of one structure, as a batch: the network, ``problems`` with the member axis first."""

    structure: Structure
    model: VGG
    members: list[Member]
    weights: VGGWeights
    params: dict
    problems: Problem
    yardstick_targets: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.members[0].content.shape[:2])

    @functools.cached_property
    def loop(self) -> Loop:
        s = self.structure
        objective = colors.objective(make_objective(self.model, s.loss), s.color)
        return Loop(objective, s.optim, s.run.chunk_steps, s.run.member_batching)

    @property
    def program_key(self) -> tuple:
        """What the compiled programs of this group trace beyond their arguments' shapes (the step
        counts are arguments): the key of :mod:`nstjax.programs`."""
        return self.model, self.structure.loss, self.structure.optim, self.structure.color

    def output_image(self, i: int, pixels: np.ndarray) -> np.ndarray:
        """Member ``i``'s RGB image in [0, 1] from its optimised pixels (:func:`nstjax.colors.finish`)."""
        return colors.finish(self.structure.color, pixels, self.members[i].content)


def build_group(points: Sequence[Point], inputs: Sequence[Inputs] | None = None,
                weights: VGGWeights | None = None, structure: Structure | None = None) -> Group:
    """Read the weights once, build each member's targets and initial image, and stack them.

    ``points`` share their group key (:func:`group_key`); ``inputs`` are their :func:`validate`
    results, if already at hand; ``weights`` those of another group of the same run (a pyramid's
    level below: ``Group.weights``, already normalised), not read again; ``structure`` a pyramid
    level's (default: the points')."""
    inputs = list(inputs) if inputs is not None else [validate(p) for p in points]
    s = structure or points[0].structure
    spec = s.loss
    weights = weights or read_weights(s)
    shape = inputs[0].content.shape
    model = VGG(weights.preprocessing, s.model.pooling, s.model.precision, s.model.uses_remat(shape),
                conv=s.model.conv_for(shape), ceil_mode=s.model.ceil_mode, arch=weights.arch)
    params = prepare_params(jax.device_put(weights.params), model.conv, spec.layers + YARDSTICK_LAYERS)
    targets_fn = programs.cached_jit("targets", functools.partial(compute_targets, model, spec=spec), (model, spec))
    guided_fn = programs.cached_jit("guided_grams", functools.partial(guided_grams, model, layers=spec.style_layers),
                                    (model, spec))
    yard_fn = programs.cached_jit("yardstick_targets", functools.partial(yardstick_targets, model), model)
    problems, yards, members = [], [], []
    for point, inp in zip(points, inputs):
        m = point.member
        key = jax.random.key(m.seed)
        mix = blend.blend_weights(m.style_blend_weights, len(inp.styles))
        shown, styles = colors.prepare(s.color, inp.content, inp.styles)  # what the targets are of
        x0 = colors.optimized(s.color, initial_image(point, shown, styles, weights.preprocessing, key))
        targets = blended_targets(targets_fn, params, jax.device_put(shown), styles, mix)
        if inp.regions:
            region_styles = colors.prepare(s.color, inp.content, [r.style for r in inp.regions])[1]
            grams = [guided_fn(params, jax.device_put(style), r.style_guides)
                     for style, r in zip(region_styles, inp.regions)]
            targets = targets._replace(style=regions.style_targets(grams, inp.regions, spec))
        content = jax.device_put(inp.content)
        problems.append(Problem(jax.device_put(x0), targets, m.hparams(spec), jnp.float32(m.lr), key,
                                jnp.float32(m.ema_decay or 0.0)))
        yard = [yard_fn(params, content, jax.device_put(st)) for st in inp.styles]
        yards.append(yard[0]._replace(grams=blend.blend([y.grams for y in yard], mix)))
        members.append(Member(m, inp.content, inp.styles, input_paths(point), mix))
    return Group(s, model, members, weights, params, stack(problems), stack(yards))


def blended_targets(targets_fn, params, content: jax.Array, styles: Sequence[np.ndarray],
                    weights: Sequence[float]) -> Targets:
    """The content's targets and the style targets of each layer blended over the style images,
    A = Σ_k w_k A_k (:mod:`nstjax.blend`); ``targets_fn(params, content, style)`` computes them
    for one style image."""
    each = [targets_fn(params, content, jax.device_put(s)) for s in styles]
    return each[0]._replace(style=blend.blend([t.style for t in each], weights))


def guided_grams(model: VGG, params, style: jax.Array, guides: dict, layers: Sequence[str]) -> dict:
    """The guided Gram matrices (S ∘ T)ᵀ (S ∘ T) of one style image under its guide at each layer."""
    grams = model.apply({"params": params}, style[None], (), tuple(layers),
                        guides={name: guides[name][None] for name in layers}, method=VGG.features).grams
    return {name: grams[name][0, 0] for name in layers}


def stack(trees: Sequence) -> object:
    """Stack pytrees of equal structure along a new leading (member) axis: on the host and copied
    to the device (``jnp.stack`` would compile a program per leaf shape in every process); PRNG
    keys with ``jnp.stack``."""
    def leaf(*leaves):
        if jax.dtypes.issubdtype(leaves[0].dtype, jax.dtypes.prng_key):
            return jnp.stack(leaves)
        return jax.device_put(np.stack([np.asarray(x) for x in leaves]))
    return jax.tree.map(leaf, *trees)
