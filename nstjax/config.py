"""Structured configs: every key has a type and a default; Hydra checks overrides.

Registered in Hydra's ConfigStore as the schema of ``configs/config.yaml``
(``base_config``) and of the ``optim`` group (``adam_schema``,
``lbfgs_schema``). An unknown key, a value of the wrong type, or a choice that
is not one of an Enum's names is an error naming the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from nstjax.colors import COLOR_CONTROLS
from nstjax.regions import PROPAGATIONS
from nstjax.losses import ALPHA, BETA, TV_NORMS, LossSpec
from nstjax.optimize import LINESEARCHES, MEMBER_BATCHING, OptimSpec
from nstjax.spec import (FLOW_PRESETS, FLOWS, REMATS, SCHEDULES, VIDEO_INITS, ImageSpec, ModelSpec,
                         PyramidSpec, RegionSpec, RunSpec, VideoSpec)
from nstjax.vgg import ARCHITECTURES, CHANNEL_ORDERS, CONV_ALGORITHMS, POOLINGS, PRECISIONS
from nstjax.track import BACKENDS
from nstjax.style_losses import (CONTENT_LOSSES, CONTENT_REDUCTIONS, GRAM_NORMS, MMD_KERNELS,
                                 STYLE_LOSSES, STYLE_REDUCTIONS, StyleHParams)


def _choices(name: str, choices, doc: str) -> type[enum.Enum]:
    """An Enum whose names and values are ``choices`` (the tuple or registry that defines them)."""
    made = enum.Enum(name, [(c, c) for c in choices], module=__name__, qualname=name)
    made.__doc__ = doc
    return made


GramNorm = _choices("GramNorm", GRAM_NORMS, "g of the Gram matrix G = Fᵀ F / g: 1, M or N·M.")
StyleReduction = _choices("StyleReduction", STYLE_REDUCTIONS, "How the gram loss reduces (G − A)².")
ContentReduction = _choices("ContentReduction", CONTENT_REDUCTIONS, "How the mse content loss reduces (F − P)².")
TVNorm = _choices("TVNorm", TV_NORMS, "Total variation of squared or absolute differences, or neural-style's.")
StyleLoss = _choices("StyleLoss", STYLE_LOSSES, "The per-layer style loss (nstjax.style_losses.STYLE_LOSSES).")
MMDKernel = _choices("MMDKernel", MMD_KERNELS, "The kernel of the mmd style loss.")
ColorControl = _choices("ColorControl", COLOR_CONTROLS,
                        "Colour control (nstjax.colors): none, luminance, histogram or original_colors.")
ContentLoss = _choices("ContentLoss", CONTENT_LOSSES,
                       "The per-layer content loss (nstjax.style_losses.CONTENT_LOSSES).")

Pooling = _choices("Pooling", POOLINGS, "VGG's pooling (nstjax.vgg.POOLINGS): max or avg.")
Precision = _choices("Precision", PRECISIONS, "The convolutions' precision (nstjax.vgg.PRECISIONS).")
Remat = _choices("Remat", REMATS, "Recompute activations in the backward pass: never, always, or from "
                 "model.remat_pixels up (nstjax.spec.REMATS).")
ConvAlgorithm = _choices("ConvAlgorithm", ("auto",) + CONV_ALGORITHMS,
                         "How 3×3 convolutions are computed (nstjax.vgg.CONV_ALGORITHMS; auto: "
                         "nstjax.vgg.default_conv, Winograd F(4×4, 3×3) on CPUs in float32, XLA's "
                         "convolution on GPUs and TPUs).")
Linesearch = _choices("Linesearch", LINESEARCHES, "L-BFGS's line search (nstjax.optimize.LINESEARCHES).")
ChannelOrder = _choices("ChannelOrder", CHANNEL_ORDERS, "The channel order a weights file expects.")
Arch = _choices("Arch", ARCHITECTURES, "The VGG network (nstjax.vgg.ARCHITECTURES): vgg19, vgg16, vgg13 or vgg11.")
MaskPropagation = _choices("MaskPropagation", PROPAGATIONS,
                           "How region masks reach deeper layers (nstjax.regions): simple or inside.")
MemberBatching = _choices("MemberBatching", MEMBER_BATCHING,
                          "How the members of a group share one program: batched (vmap) or one after another "
                          "inside it (map); see nstjax.optimize.Loop.")

Schedule = _choices("Schedule", SCHEDULES, "How a video's frames are optimised (nstjax.spec.SCHEDULES).")
Flow = _choices("Flow", FLOWS, "The optical flow method (nstjax.flow).")
FlowPreset = _choices("FlowPreset", FLOW_PRESETS, "DIS optical flow's preset.")
Tracking = _choices("Tracking", BACKENDS, "An experiment tracker (nstjax.track.BACKENDS).")
VideoInit = _choices("VideoInit", VIDEO_INITS, "Where a video frame after the first starts (nstjax.video).")


@dataclass
class PreprocessingConfig:
    """What a weights file expects of its input, for a file that doesn't say
    (:class:`nstjax.vgg.Preprocessing`). Every key null: the file's own; a key left null when
    others are given takes Preprocessing's default. (A node, not null, so that an override such
    as ``model.preprocessing={channel_order:BGR,...}`` can be merged into it.)"""

    channel_order: Optional[ChannelOrder] = None
    scale: Optional[float] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass
class ImageConfig:
    size: int = ImageSpec.size  # longest side of the content image and the result, in pixels
    style_scale: float = ImageSpec.style_scale  # the style image's longest side is size × style_scale
    max_pixels: Optional[int] = ImageSpec.max_pixels  # decompression-bomb guard for input files


@dataclass
class ModelConfig:
    """Defaults: :class:`nstjax.spec.ModelSpec`'s."""

    weights: str = ModelSpec.weights  # a registry name (python -m nstjax.weights list) or a file path
    arch: Arch = Arch[ModelSpec.arch]  # the network the weights are of: vgg19 | vgg16 | vgg13 | vgg11
    pooling: Pooling = Pooling[ModelSpec.pooling]
    ceil_mode: bool = ModelSpec.ceil_mode  # pool in Caffe's ceil mode: odd sizes keep their last row and column (neural-style)
    precision: Precision = Precision[ModelSpec.precision]
    conv: ConvAlgorithm = ConvAlgorithm[ModelSpec.configured_conv]
    remat: Remat = Remat[ModelSpec.remat]
    remat_pixels: int = ModelSpec.remat_pixels  # with remat=auto: recompute from this many pixels up
    preprocessing: Optional[PreprocessingConfig] = field(default_factory=PreprocessingConfig)  # override
    normalize: bool = ModelSpec.normalize  # Gatys et al.'s normalised VGG: each filter's mean activation 1 (nstjax.normalize)
    normalize_images: Optional[str] = ModelSpec.normalize_images  # normalize: the folder of images the means are taken over; None: examples/
    normalize_size: int = ModelSpec.normalize_size  # normalize: the images' longest side


_HP = StyleHParams._field_defaults


@dataclass
class LossConfig:
    """The objective. Defaults are those of :class:`nstjax.losses.LossSpec` (structure) and
    :class:`nstjax.style_losses.StyleHParams` (the style losses' numbers)."""

    content_layers: List[str] = field(default_factory=lambda: list(LossSpec.content_layers))
    style_layers: List[str] = field(default_factory=lambda: list(LossSpec.style_layers))
    content_layer_weights: Optional[List[float]] = None  # None: 1/L each
    style_layer_weights: Optional[List[float]] = None  # None: 1/L each (Gatys et al.)
    alpha: float = ALPHA
    beta: float = BETA
    tv_weight: float = 0.0
    tv_norm: TVNorm = TVNorm[LossSpec.tv_norm]
    gram_norm: GramNorm = GramNorm[LossSpec.gram_norm]
    style_reduction: StyleReduction = StyleReduction[LossSpec.style_reduction]
    content_reduction: ContentReduction = ContentReduction[LossSpec.content_reduction]
    style_loss: StyleLoss = StyleLoss[LossSpec.style_loss]
    content_loss: ContentLoss = ContentLoss[LossSpec.content_loss]
    mmd_kernel: MMDKernel = MMDKernel[LossSpec.mmd_kernel]
    mmd_degree: int = LossSpec.mmd_degree  # poly: d of (xᵀy + c)^d; exact up to 2, sampled above
    mmd_c: float = _HP["mmd_c"]  # poly: c of (xᵀy + c)^d
    mmd_bandwidth: Optional[float] = _HP["mmd_bandwidth"]  # gaussian: σ²; None: the style vectors' mean squared distance
    style_positions: int = LossSpec.style_positions  # positions sampled per evaluation (mmd gaussian, remd, self_similarity)
    sw_projections: Optional[int] = LossSpec.sw_projections  # sliced_wasserstein directions; None: N
    mrf_stride: int = LossSpec.mrf_stride  # mrf: stride of the 3×3 patches
    remd_moment_weight: float = _HP["remd_moment_weight"]  # remd: weight of the moment term (STROTSS: 1)
    normalize_gradients: bool = LossSpec.normalize_gradients  # each term's gradient ÷ its L1 norm (neural-style)


@dataclass
class OptimConfig:
    name: str = "lbfgs"
    steps: int = 500
    lr: float = 1.0
    max_evaluations: Optional[int] = None  # stop once this many objective evaluations are spent
    clip: bool = OptimSpec.clip  # pixels clipped to [0, 1] after each step; false: only the saved image
    # the result, snapshots and yardsticks are the average of the iterates, a ← d·a + (1 − d)·x (bias-corrected,
    # crowsonkb's --avg-decay); the history stays the iterates'; null: the last iterate
    ema_decay: Optional[float] = None


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"
    steps: int = 1000
    lr: float = 0.02
    b1: float = OptimSpec.b1
    b2: float = OptimSpec.b2
    eps: float = OptimSpec.eps
    epsilon_hat: bool = OptimSpec.epsilon_hat  # ε beside √v rather than √v̂ (Keras/TF Adam)


@dataclass
class LBFGSConfig(OptimConfig):
    name: str = "lbfgs"
    steps: int = 500
    lr: float = 1.0  # step scale with linesearch=none; the zoom line search picks its own
    memory_size: int = OptimSpec.memory_size
    linesearch: Linesearch = Linesearch[OptimSpec.linesearch]
    max_linesearch_steps: int = OptimSpec.max_linesearch_steps
    # linesearch=none: a step whose loss exceeds max_increase × the last is taken back and tried
    # shorter (10×, and no pixel moving more than 0.05; the length grows back 10× a step taken);
    # null: torch.optim.LBFGS's steps exactly (nstjax.optimize.backtrack)
    max_increase: Optional[float] = 10.0


@dataclass
class PyramidConfig:
    """Coarse to fine (nstjax.pyramid)."""

    min_size: Optional[int] = PyramidSpec.min_size  # longest side of the smallest level; None: off (one level)
    factor: float = PyramidSpec.factor  # each level is factor × the one below (crowsonkb: √2)
    steps: int = PyramidSpec.steps  # steps at each level below the last (the last runs optim.steps)


@dataclass
class RegionConfig:
    """One region of spatial control (nstjax.regions)."""

    mask: Optional[str] = RegionSpec.mask  # the region of the content: an image, white = inside (resized to the content)
    style: Optional[str] = RegionSpec.style  # the region's style image; None: the run's style (the first)
    style_mask: Optional[str] = RegionSpec.style_mask  # the part of the style image to take, white = taken; None: all of it
    weight: float = RegionSpec.weight  # λ_r, the region's weight in the style loss


@dataclass
class VideoConfig:
    """Video (nstjax.video, Ruder et al. 2016). Defaults: :class:`nstjax.spec.VideoSpec`'s and
    :class:`nstjax.spec.MemberSpec`'s."""

    input: Optional[str] = VideoSpec.input  # a video file (anything ffmpeg reads), a folder or a glob of frames
    frames: Optional[List[Optional[int]]] = None  # [start, stop, step] of the source's frames; null: all
    schedule: Schedule = Schedule[VideoSpec.schedule]  # sequential | parallel
    temporal_weight: float = 0.0  # γ of the temporal term (member key)
    blend: float = 1.0  # parallel: δ of a frame's start (x + δ c ω) / (1 + δ c) (member key)
    long_term: List[int] = field(default_factory=lambda: list(VideoSpec.long_term))  # J: earlier frames i − j compared with
    first_frame_steps: Optional[int] = VideoSpec.first_frame_steps  # sequential: the first frame's steps; null: optim.steps
    init: VideoInit = VideoInit[VideoSpec.init]  # sequential: prev_warped | prev | init (the top-level init)
    passes: int = VideoSpec.passes  # parallel: passes of optim.steps steps
    temporal_from_pass: int = VideoSpec.temporal_from_pass  # parallel: the temporal term from this pass on
    flow: Flow = Flow[VideoSpec.flow]  # dis | farneback (OpenCV)
    flow_preset: FlowPreset = FlowPreset[VideoSpec.flow_preset]  # DIS: ultrafast | fast | medium
    fps: Optional[float] = VideoSpec.fps  # video.mp4's frame rate; null: the source's


@dataclass
class Config:
    content: Optional[str] = None  # content image; None: the bundled example
    style: Any = None  # a style image or a list of them (nstjax.blend); None: the bundled example
    style_blend_weights: Optional[List[float]] = None  # one per style image, normalised to sum 1; None: equal
    color_control: ColorControl = ColorControl.none  # none | luminance | histogram | original_colors (nstjax.colors)
    regions: Optional[List[RegionConfig]] = None  # spatial control: [{mask, style, style_mask, weight}, ...]
    mask_propagation: MaskPropagation = MaskPropagation.simple  # regions: simple | inside (nstjax.regions)
    init: str = "content"  # content | noise | style | gray | uniform | style_stats (nstjax.inits) | an image file
    init_noise_std: float = 0.25  # init=noise: clip(mean pixel + std·N(0, 1), 0, 1)
    seed: int = 0
    save_every: int = RunSpec.save_every  # snapshot image every N steps (0: none)
    checkpoint_every: int = RunSpec.checkpoint_every  # checkpoint every N steps (0: only on interrupt)
    chunk_steps: int = RunSpec.chunk_steps  # steps per compiled chunk; Python runs between chunks
    resume: Optional[str] = None  # a run directory to continue
    progress: bool = RunSpec.progress  # progress bar on the terminal
    memory_check: bool = RunSpec.memory_check  # refuse a run whose compiled programs need more memory than is free
    max_members: Optional[int] = RunSpec.max_members  # sweep members per compiled program (null: as many as fit)
    member_batching: MemberBatching = MemberBatching[RunSpec.member_batching]  # vmap | map: how a group's members share a program
    tracking: List[Tracking] = field(default_factory=list)  # experiment trackers: [tensorboard], [mlflow], both (nstjax.track)
    sweep_group: Optional[int] = None  # set by the nstjax sweeper: the group a sweep job runs
    image: ImageConfig = field(default_factory=ImageConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = MISSING  # the optim group: optim=lbfgs or optim=adam


OPTIM_SCHEMAS = {"adam": AdamConfig, "lbfgs": LBFGSConfig}


def from_container(data) -> DictConfig:
    """A saved config (a dict or DictConfig, e.g. a run's config.yaml) checked against the schema."""
    data = OmegaConf.create(data) if not isinstance(data, DictConfig) else data
    schema = Config(optim=OPTIM_SCHEMAS[data.optim.name]())
    return OmegaConf.merge(OmegaConf.structured(schema), data)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config that ``python -m nstjax.run OVERRIDES`` runs, without Hydra's run directory
    or logging: for calling nstjax from Python. ``+experiment=NAME`` picks a preset."""
    from hydra import compose as hydra_compose, initialize_config_module

    register()
    with initialize_config_module("nstjax.configs", version_base=None):
        return hydra_compose("config", overrides=list(overrides))


_NOISE = ("Config search path", "provider=", "reference_type=", "object_type=", "See https://")


def one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their causes) as one line."""
    from hydra.errors import OverrideParseException

    parts = [f"malformed override {exc.override!r}"] if isinstance(exc, OverrideParseException) else []
    while exc is not None:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        text = " ".join(ln for ln in lines if ln and not ln.startswith(_NOISE))
        if text and text != "None" and text not in parts:
            parts.append(text)
        exc = exc.__cause__
    return " — ".join(parts)


def register() -> None:
    """Register the schemas in Hydra's ConfigStore, and let Hydra's plugin scan find nstjax's
    sweeper (hydra_plugins/nstjax_sweeper, which stores hydra/sweeper=nstjax itself when Hydra
    imports it): the scan lists ``hydra_plugins.__path__`` with pkgutil, which cannot list an
    editable install's import hook, so the plugin's folder is added there."""
    import importlib.util
    from pathlib import Path

    import hydra_plugins

    folder = str(Path(importlib.util.find_spec("hydra_plugins.nstjax_sweeper").origin).parent.parent)
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="optim", name="adam_schema", node=AdamConfig)
    cs.store(group="optim", name="lbfgs_schema", node=LBFGSConfig)
