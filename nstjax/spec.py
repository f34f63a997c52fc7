"""A config parsed once, into the typed, frozen specs the run computes with.

    parse(cfg) -> Point(structure, member)

:class:`Structure` holds everything that makes a separate program or belongs to a group as a
whole: the network, the loss's structure, the optimiser and its step counts, the image sizes, the
pyramid, colour control, the number of regions and how their masks propagate, and the group's run
settings. It is hashable: points whose structures are equal (and whose images have equal shapes)
are members of one program. :class:`MemberSpec` holds what the members of one program may differ
in: the images, the initial image and seed, the loss's numbers, the learning rate, the average's
decay, the regions; each field names its config key, and these are the sweep's member keys
(:data:`MEMBER_KEYS`). Below this module no config object travels: a pyramid's levels are
structures made with ``dataclasses.replace``.

Parsing checks everything that needs neither the images nor the weights (numbers, layers, the loss
weights, the optimiser, the convolution, the initial image's name, the preprocessing, the weights'
name): a bad config is a :class:`~nstjax.errors.UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from nstjax import blend, inits, pyramid, track
from nstjax.errors import UserError
from nstjax.images import DEFAULT_MAX_PIXELS
from nstjax.losses import HParams, LossSpec
from nstjax.optimize import OptimSpec
from nstjax.style_losses import StyleHParams
from nstjax.vgg import DEFAULT_ARCH, Preprocessing, UnknownLayerError, architecture, default_conv

INT32_MAX = 2**31 - 1
REMATS = ("off", "on", "auto")
"""model.remat: never, always, or from model.remat_pixels up."""


def _plain(value):
    """A config value as plain data: Enum members as their values, lists as tuples."""
    value = getattr(value, "value", value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return tuple(_plain(v) for v in value)
    return value


def _key(name: str):
    """A MemberSpec field's config key."""
    return dataclasses.field(metadata={"key": name})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``model.*``: the network, its weights and how it computes (the convolution as configured;
    :meth:`conv_for` resolves ``auto`` for the backend and the image size)."""

    weights: str = "vgg19"
    arch: str = DEFAULT_ARCH
    pooling: str = "avg"
    ceil_mode: bool = False
    precision: str = "float32"
    configured_conv: str = "auto"
    remat: str = "auto"
    remat_pixels: int = 2048 * 2048
    preprocessing: Optional[Preprocessing] = None  # the override of the weights' own
    normalize: bool = False
    normalize_images: Optional[str] = None
    normalize_size: int = 512

    def conv_for(self, shape) -> str:
        """The convolution algorithm for an image of ``shape`` (H, W, ...): 'auto' resolved for this
        backend and size (nstjax.vgg.default_conv)."""
        if self.configured_conv != "auto":
            return self.configured_conv
        return default_conv(self.precision, pixels=shape[0] * shape[1])

    def uses_remat(self, shape) -> bool:
        """Whether an image of ``shape`` is evaluated with banded remat."""
        return self.remat == "on" or (self.remat == "auto" and shape[0] * shape[1] >= self.remat_pixels)

    def remat_described(self) -> str:
        return ("model.remat=on" if self.remat == "on" else
                f"model.remat=auto, on from model.remat_pixels={self.remat_pixels} pixels")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """``image.*``: the content's (and result's) longest side, the style's scale, the pixel limit."""

    size: int = 512
    style_scale: float = 1.0
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS

    @property
    def style_size(self) -> int:
        return max(1, round(self.size * self.style_scale))


@dataclasses.dataclass(frozen=True)
class PyramidSpec:
    """``pyramid.*`` (nstjax.pyramid): min_size None is one level."""

    min_size: Optional[int] = None
    factor: float = 2.0
    steps: int = 100


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The group's run settings: snapshots, checkpoints, chunks, the progress bar, the memory check,
    members per program and how they share it."""

    save_every: int = 0
    checkpoint_every: int = 100
    chunk_steps: int = 10
    progress: bool = True
    memory_check: bool = True
    max_members: Optional[int] = None
    member_batching: str = "vmap"
    tracking: tuple[str, ...] = ()  # experiment trackers (nstjax.track): tensorboard, mlflow


SCHEDULES = ("sequential", "parallel")
"""video.schedule: frame after frame (Ruder et al.'s single pass), or every frame of a pass as a
member of one program (multi-pass)."""
FLOWS = ("dis", "farneback")
"""video.flow: OpenCV's optical flow methods (nstjax.flow)."""
FLOW_PRESETS = ("ultrafast", "fast", "medium")
"""video.flow_preset: DIS's presets."""
VIDEO_INITS = ("prev_warped", "prev", "init")
"""video.init: frame i starts from frame i − 1's result warped, or as it is, or from ``init``."""


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """``video.*`` (nstjax.video) but its member keys: where the frames come from, the schedule, the
    temporal term's earlier frames J, the steps and passes, the flow."""

    input: Optional[str] = None  # a video file, a folder or a glob of frames; None: not a video run
    frames: tuple = (None, None, 1)  # start, stop, step of the source's frames
    schedule: str = "sequential"
    long_term: tuple[int, ...] = (1,)
    first_frame_steps: Optional[int] = None  # None: optim.steps
    init: str = "prev_warped"
    passes: int = 15
    temporal_from_pass: int = 8
    flow: str = "dis"
    flow_preset: str = "medium"
    fps: Optional[float] = None  # video.mp4's frame rate; None: the source's (a folder's: 25)

    @property
    def enabled(self) -> bool:
        return self.input is not None


@dataclasses.dataclass(frozen=True)
class Structure:
    """Everything that makes a separate program, or belongs to a group: see the module."""

    model: ModelSpec
    loss: LossSpec
    optim: OptimSpec
    optimizer: str  # optim.name
    steps: int
    max_evaluations: Optional[int]
    image: ImageSpec
    pyramid: PyramidSpec
    color: str = "none"
    mask_propagation: str = "simple"
    run: RunSpec = RunSpec()
    video: VideoSpec = VideoSpec()

    @property
    def evaluation_limit(self) -> int:
        """optim.max_evaluations as the loop's int32 limit (none: the largest)."""
        return min(self.max_evaluations or INT32_MAX, INT32_MAX)


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """One region of spatial control (nstjax.regions): its mask, style, style mask and weight."""

    mask: Optional[str] = None
    style: Optional[str] = None
    style_mask: Optional[str] = None
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """What one member of a program is: its inputs and its numbers. Each field's ``key`` metadata
    is its config key."""

    content: Optional[str] = _key("content")
    style: Optional[tuple[str, ...]] = _key("style")
    style_blend_weights: Optional[tuple[float, ...]] = _key("style_blend_weights")
    regions: tuple[RegionSpec, ...] = _key("regions")
    init: str = _key("init")
    init_noise_std: float = _key("init_noise_std")
    seed: int = _key("seed")
    alpha: float = _key("loss.alpha")
    beta: float = _key("loss.beta")
    tv_weight: float = _key("loss.tv_weight")
    content_layer_weights: Optional[tuple[float, ...]] = _key("loss.content_layer_weights")
    style_layer_weights: Optional[tuple[float, ...]] = _key("loss.style_layer_weights")
    mmd_c: float = _key("loss.mmd_c")
    mmd_bandwidth: Optional[float] = _key("loss.mmd_bandwidth")
    remd_moment_weight: float = _key("loss.remd_moment_weight")
    lr: float = _key("optim.lr")
    ema_decay: Optional[float] = _key("optim.ema_decay")
    temporal_weight: float = _key("video.temporal_weight")
    blend: float = _key("video.blend")

    def hparams(self, spec: LossSpec) -> HParams:
        """α, β, the layer weights, the TV weight, the region weights and the style losses'
        numbers as arrays (:meth:`nstjax.losses.HParams.create`)."""
        style = {name: getattr(self, name) for name in StyleHParams._fields}
        try:
            return HParams.create(spec, self.alpha, self.beta, self.content_layer_weights, self.style_layer_weights,
                                  self.tv_weight, [r.weight for r in self.regions], self.temporal_weight, **style)
        except ValueError as e:
            raise UserError(str(e)) from e


MEMBER_KEYS: tuple[str, ...] = tuple(f.metadata["key"] for f in dataclasses.fields(MemberSpec))
"""The config keys in which the members of one program may differ (the MemberSpec's fields)."""
GROUP_KEYS = ("resume", "sweep_group")
"""Keys that belong to the whole run or sweep job, neither structure nor a member's data."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One config, parsed: its structure and its member spec."""

    structure: Structure
    member: MemberSpec


def _check_numbers(cfg) -> None:
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


def _loss_spec(cfg, video: VideoSpec) -> LossSpec:
    """The loss structure; its layers must be layers of model.arch."""
    try:
        spec = LossSpec.from_config(cfg.loss, regions=len(cfg.regions or []),
                                    temporal_frames=len(video.long_term) if video.enabled else 0)
        architecture(_plain(cfg.model.arch)).check_layers(spec.layers)
        return spec
    except UnknownLayerError as e:
        raise UserError(f"loss.content_layers / loss.style_layers: {e}") from e
    except ValueError as e:
        raise UserError(str(e)) from e


def _loss_weights_finite(cfg) -> None:
    for key in ("alpha", "beta", "tv_weight", "content_layer_weights", "style_layer_weights"):
        value = cfg.loss[key]
        values = [] if value is None else (list(value) if not isinstance(value, (int, float)) else [value])
        for v in values:
            if not math.isfinite(v) or v < 0:
                raise UserError(f"loss.{key} = {v} is not allowed: loss weights must be finite and ≥ 0")


def _optim_spec(cfg) -> OptimSpec:
    o = cfg.optim
    if o.name == "adam":
        return OptimSpec("adam", b1=o.b1, b2=o.b2, eps=o.eps, epsilon_hat=o.epsilon_hat, clip=o.clip)
    if o.name == "lbfgs":
        return OptimSpec("lbfgs", memory_size=o.memory_size, linesearch=_plain(o.linesearch),
                         max_linesearch_steps=o.max_linesearch_steps, clip=o.clip, max_increase=o.max_increase)
    raise UserError(f"optim.name {o.name!r} is unknown: use optim=adam or optim=lbfgs")


def _preprocessing(cfg) -> Preprocessing | None:
    """model.preprocessing's keys that are given (none given: None, the weights' own)."""
    given = {k: _plain(v) for k, v in (cfg.model.preprocessing or {}).items() if v is not None}
    if not given:
        return None
    try:
        return Preprocessing(**given)
    except ValueError as e:
        raise UserError(f"model.preprocessing: {e}") from e


def _model_spec(cfg) -> ModelSpec:
    m = cfg.model
    spec = ModelSpec(str(m.weights), _plain(m.arch), _plain(m.pooling), bool(m.ceil_mode), _plain(m.precision),
                     _plain(m.conv), _plain(m.remat), int(m.remat_pixels), _preprocessing(cfg), bool(m.normalize),
                     m.normalize_images, int(m.normalize_size))
    if spec.configured_conv == "winograd" and spec.precision != "float32":
        raise UserError(f"model.conv=winograd computes in float32: use model.precision=float32 or "
                        f"model.conv=direct (model.precision is {spec.precision})")
    return spec


def _member(cfg) -> MemberSpec:
    loss = cfg.loss
    regions = tuple(RegionSpec(r.mask, r.style, r.style_mask, r.weight) for r in cfg.regions or [])
    style = None if cfg.style is None else tuple(blend.style_paths(cfg.style, ""))
    return MemberSpec(
        cfg.content, style, _plain(cfg.style_blend_weights), regions, str(cfg.init), float(cfg.init_noise_std),
        int(cfg.seed), float(loss.alpha), float(loss.beta), float(loss.tv_weight), _plain(loss.content_layer_weights),
        _plain(loss.style_layer_weights), float(loss.mmd_c),
        None if loss.mmd_bandwidth is None else float(loss.mmd_bandwidth), float(loss.remd_moment_weight),
        float(cfg.optim.lr), None if cfg.optim.ema_decay is None else float(cfg.optim.ema_decay),
        float(cfg.video.temporal_weight), float(cfg.video.blend))


def _video_spec(cfg) -> VideoSpec:
    """video.*, checked: the numbers, the choices, and that a video run has no content image,
    regions or pyramid (each frame is the content)."""
    v = cfg.video
    spec = VideoSpec(None if v.input is None else str(v.input), _plain(v.frames) if v.frames else (None, None, 1),
                     _plain(v.schedule), _plain(v.long_term), v.first_frame_steps, _plain(v.init), int(v.passes),
                     int(v.temporal_from_pass), _plain(v.flow), _plain(v.flow_preset),
                     None if v.fps is None else float(v.fps))
    for key in ("temporal_weight", "blend"):
        if not (math.isfinite(v[key]) and v[key] >= 0):
            raise UserError(f"video.{key} = {v[key]} must be a finite number ≥ 0")
    if not spec.enabled:
        return spec
    if cfg.content is not None:
        raise UserError(f"video.input={spec.input} and content={cfg.content}: a video run's content is its frames; "
                        "give one of them")
    if cfg.regions:
        raise UserError("regions are not available for video runs (video.input): leave regions unset")
    if cfg.pyramid.min_size is not None:
        raise UserError("a video run has one level: set pyramid.min_size=null with video.input")
    if len(spec.frames) != 3 or (spec.frames[2] is not None and spec.frames[2] < 1):
        raise UserError(f"video.frames = {list(spec.frames)} must be [start, stop, step] with step ≥ 1 "
                        "(null: the first, the last, 1)")
    if not spec.long_term or any(j < 1 for j in spec.long_term) or len(set(spec.long_term)) != len(spec.long_term):
        raise UserError(f"video.long_term = {list(spec.long_term)}: the earlier frames j of the temporal "
                        "term must be distinct integers ≥ 1")
    for key, value, least in (("video.passes", spec.passes, 1), ("video.temporal_from_pass", spec.temporal_from_pass, 1),
                              ("video.first_frame_steps", spec.first_frame_steps or 0, 0)):
        if value < least:
            raise UserError(f"{key} = {value} must be ≥ {least}")
    if spec.fps is not None and not (math.isfinite(spec.fps) and spec.fps > 0):
        raise UserError(f"video.fps = {spec.fps} must be a positive number (null: the source's)")
    return spec


def parse(cfg) -> Point:
    """The structure and member spec of a composed config (see the module). Raises UserError."""
    _check_numbers(cfg)
    image = ImageSpec(int(cfg.image.size), float(cfg.image.style_scale), cfg.image.max_pixels)
    pyramid_spec = PyramidSpec(cfg.pyramid.min_size, float(cfg.pyramid.factor), int(cfg.pyramid.steps))
    pyramid.check(pyramid_spec, image.size)
    video = _video_spec(cfg)
    spec = _loss_spec(cfg, video)
    _loss_weights_finite(cfg)
    member = _member(cfg)
    member.hparams(spec)
    optim = _optim_spec(cfg)
    model = _model_spec(cfg)
    run = RunSpec(int(cfg.save_every), int(cfg.checkpoint_every), int(cfg.chunk_steps), bool(cfg.progress),
                  bool(cfg.memory_check), cfg.max_members, _plain(cfg.member_batching), _plain(cfg.tracking))
    track.check(run.tracking)
    structure = Structure(model, spec, optim, str(cfg.optim.name), int(cfg.optim.steps), cfg.optim.max_evaluations,
                          image, pyramid_spec, _plain(cfg.color_control), _plain(cfg.mask_propagation), run, video)
    inits.check(member.init, image.max_pixels)
    blend.check_style_loss(spec.style_loss, len(member.style or (None,)))
    blend.blend_weights(member.style_blend_weights, len(member.style or (None,)))
    return Point(structure, member)
