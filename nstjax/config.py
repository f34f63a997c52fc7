"""Structured configs: every key has a type and a default; Hydra checks overrides.

Registered in Hydra's ConfigStore as the schema of ``configs/config.yaml``
(``base_config``) and of the ``optim`` group (``adam_schema``,
``lbfgs_schema``). An unknown key, a value of the wrong type, or a choice that
is not one of an Enum's names is an error naming the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from nstjax.images import DEFAULT_MAX_PIXELS


class Pooling(enum.Enum):
    max = "max"
    avg = "avg"


class Precision(enum.Enum):
    float32 = "float32"
    tf32 = "tf32"
    bfloat16 = "bfloat16"


class Remat(enum.Enum):
    """Recompute activations in the backward pass: never, always, or from ``model.remat_pixels`` up."""

    off = "off"
    on = "on"
    auto = "auto"


class ConvAlgorithm(enum.Enum):
    """How 3×3 convolutions are computed: by Winograd F(4×4, 3×3) on CPUs in float32 (auto), or as chosen."""

    auto = "auto"
    direct = "direct"
    winograd = "winograd"


class GramNorm(enum.Enum):
    none = "none"
    M = "M"
    NM = "NM"


class StyleReduction(enum.Enum):
    gatys = "gatys"
    sum = "sum"
    mean = "mean"


class ContentReduction(enum.Enum):
    half_sum = "half_sum"
    sum = "sum"
    mean = "mean"


class TVNorm(enum.Enum):
    squared = "squared"
    abs = "abs"


class Linesearch(enum.Enum):
    zoom = "zoom"
    none = "none"


class ChannelOrder(enum.Enum):
    RGB = "RGB"
    BGR = "BGR"


@dataclass
class PreprocessingConfig:
    """What a weights file expects of its input, for a file that doesn't say."""

    channel_order: ChannelOrder = ChannelOrder.RGB
    scale: float = 1.0
    mean: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


@dataclass
class ImageConfig:
    size: int = 512  # longest side of the content image and the result, in pixels
    style_scale: float = 1.0  # the style image's longest side is size × style_scale
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # decompression-bomb guard for input files


@dataclass
class ModelConfig:
    weights: str = "vgg19"  # a registry name (python -m nstjax.weights list) or a file path
    pooling: Pooling = Pooling.avg
    precision: Precision = Precision.float32
    conv: ConvAlgorithm = ConvAlgorithm.auto
    remat: Remat = Remat.auto
    remat_pixels: int = 2048 * 2048  # with remat=auto: recompute from this many pixels up
    preprocessing: Optional[PreprocessingConfig] = None  # override for a local weights file


@dataclass
class LossConfig:
    content_layers: List[str] = field(default_factory=lambda: ["relu4_2"])
    style_layers: List[str] = field(
        default_factory=lambda: ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    )
    content_layer_weights: Optional[List[float]] = None  # None: 1/L each
    style_layer_weights: Optional[List[float]] = None  # None: 1/L each (Gatys et al.)
    alpha: float = 1.0
    beta: float = 1e4
    tv_weight: float = 0.0
    tv_norm: TVNorm = TVNorm.squared
    gram_norm: GramNorm = GramNorm.none
    style_reduction: StyleReduction = StyleReduction.gatys
    content_reduction: ContentReduction = ContentReduction.half_sum


@dataclass
class OptimConfig:
    name: str = "lbfgs"
    steps: int = 500
    lr: float = 1.0
    max_evaluations: Optional[int] = None  # stop once this many objective evaluations are spent


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"
    steps: int = 1000
    lr: float = 0.02
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epsilon_hat: bool = False  # ε beside √v rather than √v̂ (Keras/TF Adam)


@dataclass
class LBFGSConfig(OptimConfig):
    name: str = "lbfgs"
    steps: int = 500
    lr: float = 1.0  # step scale with linesearch=none; the zoom line search picks its own
    memory_size: int = 100
    linesearch: Linesearch = Linesearch.zoom
    max_linesearch_steps: int = 20


@dataclass
class Config:
    content: Optional[str] = None  # content image; None: the bundled example
    style: Optional[str] = None  # style image; None: the bundled example
    init: str = "content"  # content | noise | style | a path to an image
    init_noise_std: float = 0.25  # init=noise: clip(mean pixel + std·N(0, 1), 0, 1)
    seed: int = 0
    save_every: int = 0  # snapshot image every N steps (0: none)
    checkpoint_every: int = 100  # checkpoint every N steps (0: only on interrupt)
    chunk_steps: int = 10  # steps per compiled chunk; Python runs between chunks
    resume: Optional[str] = None  # a run directory to continue
    progress: bool = True  # progress bar on the terminal
    memory_check: bool = True  # refuse a run whose compiled programs need more memory than is free
    max_members: Optional[int] = None  # sweep members per compiled program (null: as many as fit)
    sweep_group: Optional[int] = None  # set by the nstjax sweeper: the group a sweep job runs
    image: ImageConfig = field(default_factory=ImageConfig)
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


def register() -> None:
    """Register the schemas, and nstjax's sweeper (hydra/sweeper=nstjax), in Hydra's ConfigStore."""
    import hydra_plugins.nstjax_sweeper.batched_sweeper  # noqa: F401 (stores hydra/sweeper=nstjax)

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="optim", name="adam_schema", node=AdamConfig)
    cs.store(group="optim", name="lbfgs_schema", node=LBFGSConfig)
