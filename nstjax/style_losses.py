"""The style losses of the literature, and the STROTSS content loss, as interchangeable pure functions.

For a layer, F (M positions × N channels) holds the features of the image x
and S (M′ × N) those of the style image; fᵢ, sⱼ are their rows, μ, μ′ their
means over positions, Σ = (1/M) Σᵢ (fᵢ − μ)(fᵢ − μ)ᵀ and Σ′ their covariances.

    gram                E = reduce_s((G − A)²), G = Fᵀ F / g                           Gatys et al. 2016
    mean_std            E = (1/N) Σ_c (μ_c − μ′_c)² + (σ_c − σ′_c)²                    Li et al. 2017
    mmd                 E = mean k(f, f′) + mean k(s, s′) − 2 mean k(f, s)              Li et al. 2017
    gaussian_w2         E = ‖μ − μ′‖² + tr(Σ + Σ′ − 2 (Σ′^½ Σ Σ′^½)^½)                crowsonkb's StyleLossW2
    sliced_wasserstein  E = (1/K) Σ_k (1/M) Σᵢ (sort(F v_k)ᵢ − q_k(i))²                  Heitz et al. 2021
    histogram           E = Σ (F − R)² / (N·M), R = sg(F histogram-matched to S)       Risser et al. 2017
    mrf                 E = Σᵢ ‖Ψᵢ(F) − Ψ_NN(i)(S)‖² / #patches                        Li & Wand 2016
    remd                E = max(meanᵢ minⱼ Cᵢⱼ, meanⱼ minᵢ Cᵢⱼ) + w_m · moments         Kolkin et al. 2019

Each loss is one pure function (its formula in its docstring) and one
:class:`StyleLoss` entry of :data:`STYLE_LOSSES`, chosen by ``loss.style_loss``.
An entry says what the style's targets are (computed once per run, from the
style's feature map), how a layer's loss follows from the image's features and
the targets, whether it draws random samples (then it needs a PRNG key at every
evaluation) and what it reads of a feature map: the map itself, or only sums
over positions (the Gram matrix Fᵀ F, and the channel sums Σᵢ fᵢ), which the
model accumulates band by band under banded remat, so that the map is never
held whole. The content losses (``mse``, Gatys
et al.; ``self_similarity``, Kolkin et al. 2019) are entries of
:data:`CONTENT_LOSSES`, chosen by ``loss.content_loss``.

The structure of the losses (which one, kernel, degree, sample counts, strides)
is :class:`LayerLossOptions`, static; their numbers (kernel offset, bandwidth,
moment weight) are :class:`StyleHParams`, arrays that can be traced and vmapped.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from nstjax.statistics import (COSINE_EPS, HIGHEST, cosine_distances, covariance_rank, mean_cov, psd_factor,
                               resample_sorted, sample_positions, sqrt0, trace_sqrt_product)

GRAM_NORMS = ("none", "M", "NM")
STYLE_REDUCTIONS = ("gatys", "sum", "mean")
CONTENT_REDUCTIONS = ("half_sum", "sum", "mean")
MMD_KERNELS = ("linear", "poly", "gaussian")


class Reads(enum.Enum):
    """What a style loss reads of a feature map: the map itself, or only sums over positions (which
    the model accumulates band by band under banded remat, so that the map is never held whole)."""

    FEATURES = "features"  # the (H, W, N) map
    GRAM = "gram"  # Fᵀ F
    MOMENTS = "moments"  # Fᵀ F and Σᵢ fᵢ

    @property
    def sums_only(self) -> bool:
        return self is not Reads.FEATURES

EXACT_POLY_DEGREE = 2
"""Polynomial kernels up to this degree are computed exactly through their feature space (moment
tensors of N^d values); higher degrees on sampled positions, as the Gaussian kernel."""


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"loss.{key} must be one of {', '.join(choices)}, not {value!r}")


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"loss.{key} must be an integer ≥ {low}, not {value!r}")


@dataclasses.dataclass(frozen=True)
class LayerLossOptions:
    """The static structure of the per-layer loss terms (a part of :class:`nstjax.losses.LossSpec`).

    Field names are the ``loss.*`` config keys.
    """

    style_loss: str = "gram"
    gram_norm: str = "none"  # gram: g of G = Fᵀ F / g: 1, M or N·M
    style_reduction: str = "gatys"  # gram: Σ/(4N²M²), Σ or mean of (G − A)²
    mmd_kernel: str = "gaussian"  # mmd: linear | poly | gaussian
    mmd_degree: int = 2  # mmd, poly: d of (xᵀy + c)^d
    style_positions: int = 1024  # mmd (sampled), remd, self_similarity: positions drawn per evaluation
    sw_projections: Optional[int] = None  # sliced_wasserstein: directions K per evaluation; None: N
    mrf_stride: int = 1  # mrf: stride of the 3×3 patches of the image and of the style
    content_loss: str = "mse"
    content_reduction: str = "half_sum"  # mse: ½Σ, Σ or mean of (F − P)²

    def __post_init__(self):
        for key, choices in (("style_loss", tuple(STYLE_LOSSES)), ("gram_norm", GRAM_NORMS),
                             ("style_reduction", STYLE_REDUCTIONS), ("mmd_kernel", MMD_KERNELS),
                             ("content_loss", tuple(CONTENT_LOSSES)),
                             ("content_reduction", CONTENT_REDUCTIONS)):
            _check_choice(key, getattr(self, key), choices)
        for key, low in (("mmd_degree", 1), ("style_positions", 2), ("mrf_stride", 1)):
            _check_int(key, getattr(self, key), low)
        if self.sw_projections is not None:
            _check_int("sw_projections", self.sw_projections, 1)

    @property
    def style(self) -> "StyleLoss":
        return STYLE_LOSSES[self.style_loss]

    @property
    def content(self) -> "ContentLoss":
        return CONTENT_LOSSES[self.content_loss]

    @property
    def style_samples(self) -> bool:
        """Whether the style loss draws random samples (needs a key at every evaluation)."""
        return self.style.samples(self)

    @property
    def style_reads(self) -> Reads:
        """What the style loss reads of a feature map."""
        return self.style.reads(self)

    @property
    def content_samples(self) -> bool:
        return self.content.samples


class StyleHParams(NamedTuple):
    """The numeric hyperparameters of the style and content losses. :meth:`create` makes them arrays.

    The field defaults are the config's defaults.
    """

    mmd_c: Any = 0.0  # mmd, poly: c of (xᵀy + c)^d
    mmd_bandwidth: Any = None  # mmd, gaussian: σ²; None (NaN as an array): the style vectors' mean squared distance
    remd_moment_weight: Any = 1.0  # remd: w_m, STROTSS's moment_weight

    @classmethod
    def create(cls, **values) -> "StyleHParams":
        """Float32 arrays from numbers (defaults for those not given); bad numbers are ValueErrors."""
        unknown = sorted(set(values) - set(cls._fields))
        if unknown:
            raise ValueError(f"unknown style hyperparameter(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(cls._fields)}")
        hp = cls(**values)
        for key, value in hp._asdict().items():
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"loss.{key} = {value} must be finite")
        if isinstance(hp.mmd_bandwidth, (int, float)) and hp.mmd_bandwidth <= 0:
            raise ValueError(f"loss.mmd_bandwidth = {hp.mmd_bandwidth} must be positive (or null)")
        if isinstance(hp.remd_moment_weight, (int, float)) and hp.remd_moment_weight < 0:
            raise ValueError(f"loss.remd_moment_weight = {hp.remd_moment_weight} must be ≥ 0")
        bandwidth = math.nan if hp.mmd_bandwidth is None else hp.mmd_bandwidth
        return cls(jnp.asarray(hp.mmd_c, jnp.float32), jnp.asarray(bandwidth, jnp.float32),
                   jnp.asarray(hp.remd_moment_weight, jnp.float32))


class LayerInput(NamedTuple):
    """What a layer loss gets of a feature map: its static shape (H, W, N), and the map itself
    (entries that read ``features``), its Gram matrix Fᵀ F (N, N) (``gram``), or Fᵀ F and the
    channel sums Σᵢ fᵢ (N,) (``moments``); the model computes those sums, in bands under remat,
    so the map need not be held whole."""

    shape: tuple[int, int, int]
    features: Optional[jax.Array] = None
    gram: Optional[jax.Array] = None
    sums: Optional[jax.Array] = None

    @property
    def positions(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def channels(self) -> int:
        return self.shape[2]

    def flat(self) -> jax.Array:
        """F: (M, N) float32."""
        return self.features.reshape(self.positions, self.channels).astype(jnp.float32)

    def mean_second_moment(self) -> tuple[jax.Array, jax.Array]:
        """μ = Σᵢ fᵢ / M and Fᵀ F / M, from the sums."""
        m = float(self.positions)
        return self.sums / m, self.gram / m

    @classmethod
    def of(cls, features: jax.Array, reads: Reads) -> "LayerInput":
        """The input an entry reading ``reads`` gets of an (H, W, N) feature map."""
        if reads is Reads.FEATURES:
            return cls(features.shape, features=features)
        f = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
        gram = jnp.matmul(f.T, f, precision=HIGHEST)
        return cls(features.shape, gram=gram, sums=jnp.sum(f, axis=0) if reads is Reads.MOMENTS else None)


def _need_key(key, what: str) -> None:
    if key is None:
        raise ValueError(f"{what} draws random samples at every evaluation: the objective needs a key, "
                         "objective(pixels, params, targets, hp, key)")


# ---------------------------------------------------------------- shared statistics


def moments_mean_cov(x: LayerInput) -> tuple[jax.Array, jax.Array]:
    """μ and Σ = Fᵀ F / M − μ μᵀ from the sums over positions (what banded remat accumulates)."""
    mu, second = x.mean_second_moment()
    return mu, second - jnp.outer(mu, mu)


# ---------------------------------------------------------------- gram (Gatys et al. 2016)


def _real(m):
    """A count as a float (a traced M, a guide's mass, stays an array)."""
    return m if isinstance(m, jax.Array) else float(m)


def gram_divisor(n: int, m, norm: str):
    """g of G = Fᵀ F / g: 1, M or N·M."""
    return {"none": 1.0, "M": _real(m), "NM": float(n) * _real(m)}[norm]


def style_layer_loss(g: jax.Array, a: jax.Array, n: int, m, reduction: str = "gatys") -> jax.Array:
    """E_l = Σ (G − A)² / (4 N² M²) (Gatys et al.), Σ (G − A)², or its mean over N²."""
    sq = jnp.square(g - a)
    if reduction == "gatys":
        return jnp.sum(sq) / (4.0 * float(n) ** 2 * _real(m) ** 2)
    return jnp.sum(sq) if reduction == "sum" else jnp.mean(sq)


def gram_targets(x: LayerInput, opts: LayerLossOptions) -> jax.Array:
    """A = Sᵀ S / g of the style."""
    return x.gram / gram_divisor(x.channels, x.positions, opts.gram_norm)


def gram_loss(x: LayerInput, a: jax.Array, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Gatys et al. 2016: E = reduce_s((G − A)²), G = Fᵀ F / g (see :func:`style_layer_loss`)."""
    n, m = x.channels, x.positions
    return style_layer_loss(x.gram / gram_divisor(n, m, opts.gram_norm), a, n, m, opts.style_reduction)


# ---------------------------------------------------------------- mean_std (Li et al. 2017)


def channel_mean_std(x: LayerInput) -> tuple[jax.Array, jax.Array]:
    """μ_c and the population σ_c = √((1/M) Σᵢ f_ic² − μ_c²) of each channel, from the sums
    Σᵢ fᵢ and diag(Fᵀ F)."""
    mu, second = x.mean_second_moment()
    return mu, sqrt0(jnp.diagonal(second) - jnp.square(mu))


def mean_std_targets(x: LayerInput, opts: LayerLossOptions):
    return channel_mean_std(x)


def mean_std_loss(x: LayerInput, targets, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Li, Wang, Liu & Hou 2017, "Demystifying Neural Style Transfer" (batch-norm statistics):

        E = (1/N) Σ_c [(μ_c − μ′_c)² + (σ_c − σ′_c)²]

    μ, σ: mean and population standard deviation of each channel over positions,
    from Σᵢ fᵢ and Σᵢ fᵢ² = diag(Fᵀ F) (sums over positions: banded remat works).
    """
    mu, sd = channel_mean_std(x)
    mu_s, sd_s = targets
    return jnp.mean(jnp.square(mu - mu_s) + jnp.square(sd - sd_s))


# ---------------------------------------------------------------- gaussian_w2 (crowsonkb)


def gaussian_w2_targets(x: LayerInput, opts: LayerLossOptions):
    """(μ′, B, tr Σ′) of the style: B (min(N, M′ − 1), N) its covariance's square-root factor,
    Bᵀ B = Σ′ (:func:`psd_factor`)."""
    mu, cov = moments_mean_cov(x)
    return mu, psd_factor(cov, covariance_rank(x.positions, x.channels)), jnp.trace(cov)


def gaussian_w2_loss(x: LayerInput, targets, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Squared 2-Wasserstein distance between the Gaussians N(μ, Σ) and N(μ′, Σ′) fitted to F and S
    (crowsonkb's style-transfer-pytorch, StyleLossW2):

        E = ‖μ − μ′‖² + tr Σ + tr Σ′ − 2 tr (Σ′^½ Σ Σ′^½)^½,   tr (Σ′^½ Σ Σ′^½)^½ = ‖A Bᵀ‖_*

    Σ = (1/M) Σᵢ (fᵢ − μ)(fᵢ − μ)ᵀ = Fᵀ F / M − μ μᵀ, from the sums over positions Σᵢ fᵢ and
    Fᵀ F (banded remat works). The cross term is the nuclear norm (sum of singular values) of A Bᵀ,
    A and B square-root factors Aᵀ A = Σ, Bᵀ B = Σ′ from their eigendecompositions
    (:func:`trace_sqrt_product`), not the square roots of the eigenvalues of Σ′^½ Σ Σ′^½, whose
    small ones float32 loses (the condition is squared).

    Fewer positions than channels: Σ has rank ≤ min(N, M − 1) (its centred rows sum to zero) and
    ≤ the number of channels that vary. When M ≤ N (relu5_1 of images under 512·16² = 131,072
    pixels, relu4_1 under 512·8² = 32,768) A keeps only the M − 1 largest eigenpairs of Σ (B the
    M′ − 1 of Σ′), and dead channels' zero eigenvalues are dropped, so that the rounding noise of
    eigenvalues that are zero does not add its square root (~3e-4 √λ_max) once per eigenvalue.
    Tested on VGG features at 48 px, M < N and M ≥ N alike: the value within 1e-5 of float64's,
    the gradient within 1e-4 (L2); before, the value was 3 % off at relu4_1.

    crowsonkb averages over channels instead of summing and adds 1e-4·I to both covariances; here
    the formula is exact.
    """
    mu, cov = moments_mean_cov(x)
    mu_s, b, trace_s = targets
    cross = trace_sqrt_product(cov, b, covariance_rank(x.positions, x.channels))
    return jnp.sum(jnp.square(mu - mu_s)) + jnp.trace(cov) + trace_s - 2.0 * cross


# ---------------------------------------------------------------- mmd (Li et al. 2017)


def mmd_is_exact(opts: LayerLossOptions) -> bool:
    """Linear and polynomial (d ≤ EXACT_POLY_DEGREE) kernels are exact, through sums over positions."""
    return opts.mmd_kernel == "linear" or (opts.mmd_kernel == "poly" and opts.mmd_degree <= EXACT_POLY_DEGREE)


def _moment_tensors(x: LayerInput, d: int) -> tuple[jax.Array, ...]:
    """(T_1, …, T_d), T_k = (1/M) Σᵢ fᵢ^⊗k: T_1 = μ, T_2 = Fᵀ F / M (d ≤ 2), from the sums."""
    return x.mean_second_moment()[:d]


def _mmd_reads(opts: LayerLossOptions) -> Reads:
    return Reads.MOMENTS if mmd_is_exact(opts) else Reads.FEATURES


def mmd_targets(x: LayerInput, opts: LayerLossOptions):
    """Exact kernels: the style's moment tensors (T_1, …, T_d). Sampled kernels: (S, the mean squared
    distance between distinct style vectors, (1/(M′(M′−1))) Σᵢⱼ ‖sᵢ − sⱼ‖² = 2 M′/(M′−1) tr Σ′)."""
    if mmd_is_exact(opts):
        return _moment_tensors(x, _exact_degree(opts))
    s = x.flat()
    m = s.shape[0]
    return s, 2.0 * m / max(m - 1, 1) * jnp.trace(mean_cov(s)[1])


def _exact_degree(opts: LayerLossOptions) -> int:
    return 1 if opts.mmd_kernel == "linear" else opts.mmd_degree


def mmd_kernel_matrix(x: jax.Array, y: jax.Array, opts: LayerLossOptions, c, bandwidth) -> jax.Array:
    """k(xᵢ, yⱼ): xᵀy (linear), (xᵀy + c)^d (poly) or exp(−‖x − y‖² / (2σ²)) (gaussian, σ² = bandwidth)."""
    dots = jnp.matmul(x, y.T, precision=HIGHEST)
    if opts.mmd_kernel == "linear":
        return dots
    if opts.mmd_kernel == "poly":
        return (dots + c) ** opts.mmd_degree
    sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * dots
    return jnp.exp(-jnp.maximum(sq, 0.0) / (2.0 * bandwidth))


def mmd_loss(x: LayerInput, targets, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Squared maximum mean discrepancy between the image's and the style's feature vectors
    (Li, Wang, Liu & Hou 2017, "Demystifying Neural Style Transfer"):

        E = mean_{i,i′} k(fᵢ, fᵢ′) + mean_{j,j′} k(sⱼ, sⱼ′) − 2 mean_{i,j} k(fᵢ, sⱼ)

    Kernels (``loss.mmd_kernel``): linear k = xᵀy; poly k = (xᵀy + c)^d
    (c = ``loss.mmd_c``, traced; d = ``loss.mmd_degree``); gaussian
    k = exp(−‖x − y‖²/(2σ²)), σ² = ``loss.mmd_bandwidth`` or by default the mean
    squared distance between the style vectors.

    Linear and polynomial kernels of degree d ≤ 2 are exact over all positions,
    through their feature spaces: with (xᵀy + c)^d = Σ_k C(d, k) c^(d−k) (xᵀy)^k and
    mean (fᵀs)^k = ⟨T_k(F), T_k(S)⟩, T_k the mean k-fold outer product,

        E = Σ_{k=1..d} C(d, k) c^(d−k) ‖T_k(F) − T_k(S)‖²

    (linear: ‖μ_F − μ_S‖²; d = 2, c = 0: ‖mean f fᵀ − mean s sᵀ‖²_F, the Gram
    loss up to scale), from the sums over positions Σᵢ fᵢ and Fᵀ F (banded remat
    works). The Gaussian kernel and polynomials of degree > 2 (whose T_k hold N^k
    values) use ``loss.style_positions`` positions of F and of S, drawn from
    ``key`` at every evaluation.
    """
    if mmd_is_exact(opts):
        d = _exact_degree(opts)
        total = 0.0
        for k, (t, t_s) in enumerate(zip(_moment_tensors(x, d), targets), 1):
            coeff = 1.0 if opts.mmd_kernel == "linear" else math.comb(d, k) * hp.mmd_c ** (d - k)
            total = total + coeff * jnp.sum(jnp.square(t - t_s))
        return total
    f = x.flat()
    _need_key(key, f"loss.style_loss='mmd' with mmd_kernel={opts.mmd_kernel!r}")
    s_all, mean_sq_distance = targets
    key_f, key_s = jax.random.split(key)
    f = f[sample_positions(key_f, f.shape[0], opts.style_positions)]
    s = s_all[sample_positions(key_s, s_all.shape[0], opts.style_positions)]
    bandwidth = jnp.where(jnp.isnan(hp.mmd_bandwidth), mean_sq_distance, hp.mmd_bandwidth)
    bandwidth = jnp.maximum(bandwidth, jnp.finfo(jnp.float32).tiny)

    def kmean(a, b):
        return jnp.mean(mmd_kernel_matrix(a, b, opts, hp.mmd_c, bandwidth))

    return kmean(f, f) + kmean(s, s) - 2.0 * kmean(f, s)


# ---------------------------------------------------------------- sliced_wasserstein (Heitz et al. 2021)


def random_directions(key, n: int, k: int) -> jax.Array:
    """K directions uniform on the unit sphere of R^N, as the columns of an (N, K) array."""
    v = jax.random.normal(key, (n, k), jnp.float32)
    return v / jnp.linalg.norm(v, axis=0, keepdims=True)


def sliced_wasserstein_distance(f: jax.Array, s: jax.Array, directions: jax.Array) -> jax.Array:
    """(1/K) Σ_k (1/M) Σᵢ (sort(F v_k)ᵢ − q_k(i))², q_k = sort(S v_k) resampled to M quantiles
    (:func:`resample_sorted`) when M′ ≠ M; v_k the columns of ``directions`` (N, K)."""
    pf = jnp.sort(jnp.matmul(f, directions, precision=HIGHEST), axis=0)
    ps = resample_sorted(jnp.sort(jnp.matmul(s, directions, precision=HIGHEST), axis=0), f.shape[0])
    return jnp.mean(jnp.square(pf - ps))


def style_features_targets(x: LayerInput, opts: LayerLossOptions) -> jax.Array:
    """S (M′, N) itself: for losses that need the style's feature vectors at every evaluation."""
    return x.flat()


def sliced_wasserstein_loss(x: LayerInput, s: jax.Array, hp: StyleHParams, key,
                            opts: LayerLossOptions) -> jax.Array:
    """Heitz, Vanhoey, Chambon & Belcour 2021, "A Sliced Wasserstein Loss for Neural Texture Synthesis":

        E = (1/K) Σ_k (1/M) Σᵢ (sort(F v_k)ᵢ − q_k(i))²

    K = ``loss.sw_projections`` (default N) random unit directions v_k, drawn
    afresh from ``key`` at every evaluation; q_k the style's sorted projections
    S v_k, resampled by linear interpolation of their quantile function to M
    values when M′ ≠ M.
    """
    _need_key(key, "loss.style_loss='sliced_wasserstein'")
    directions = random_directions(key, x.channels, opts.sw_projections or x.channels)
    return sliced_wasserstein_distance(x.flat(), s, directions)


# ---------------------------------------------------------------- histogram (Risser et al. 2017)


def histogram_targets(x: LayerInput, opts: LayerLossOptions) -> jax.Array:
    """Each channel of S sorted: (M′, N)."""
    return jnp.sort(x.flat(), axis=0)


def histogram_match(f: jax.Array, sorted_s: jax.Array) -> jax.Array:
    """R: each channel of F (M, N) with its values replaced, in F's rank order, by the quantiles of
    the same channel of S (``sorted_s`` (M′, N), sorted; resampled to M values when M′ ≠ M)."""
    q = resample_sorted(sorted_s, f.shape[0])
    ranks = jnp.argsort(jnp.argsort(f, axis=0), axis=0)
    return jnp.take_along_axis(q, ranks, axis=0)


def histogram_loss(x: LayerInput, sorted_s: jax.Array, hp: StyleHParams, key,
                   opts: LayerLossOptions) -> jax.Array:
    """Risser, Wilmot & Barnes 2017, "Stable and Controllable Neural Texture Synthesis and Style
    Transfer Using Histogram Losses":

        E = Σ (F − R)² / (N·M),   R = stop_gradient(histogram_match(F, S))

    R matches each channel of F exactly to the style's histogram (by sorting, as
    Risser et al.'s exact histogram matching), so the gradient pulls F towards it.
    """
    f = x.flat()
    r = jax.lax.stop_gradient(histogram_match(f, sorted_s))
    return jnp.mean(jnp.square(f - r))


# ---------------------------------------------------------------- mrf (Li & Wand 2016)

MRF_PATCH = 3


def patches(x: jax.Array, stride: int) -> jax.Array:
    """The 3×3 patches Ψᵢ of an (H, W, N) map at ``stride`` (no padding), as rows (P, 9N) in
    (channel, row, column) order; P = (⌊(H − 3)/stride⌋ + 1)(⌊(W − 3)/stride⌋ + 1)."""
    if x.shape[0] < MRF_PATCH or x.shape[1] < MRF_PATCH:
        raise ValueError(f"loss.style_loss='mrf' needs feature maps of at least {MRF_PATCH}×{MRF_PATCH} "
                         f"positions, not {x.shape[0]}×{x.shape[1]}: use larger images or shallower layers")
    p = jax.lax.conv_general_dilated_patches(
        x[None].astype(jnp.float32), (MRF_PATCH, MRF_PATCH), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return p.reshape(-1, p.shape[-1])


def mrf_targets(x: LayerInput, opts: LayerLossOptions):
    """(Ψ(S) (P′, 9N), the normalised style patches Ψⱼ(S)/‖Ψⱼ(S)‖ as convolution kernels (3, 3, N, P′))."""
    p = patches(x.features, opts.mrf_stride)
    unit = p / jnp.maximum(jnp.linalg.norm(p, axis=1, keepdims=True), COSINE_EPS)
    kernels = unit.reshape(-1, x.channels, MRF_PATCH, MRF_PATCH).transpose(2, 3, 1, 0)
    return p, kernels


def mrf_loss(x: LayerInput, targets, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Li & Wand 2016, "Combining Markov Random Fields and Convolutional Neural Networks for Image
    Synthesis" (as pystiche's MRFLoss):

        E = Σᵢ ‖Ψᵢ(F) − Ψ_NN(i)(S)‖² / P,   NN(i) = argmaxⱼ ⟨Ψᵢ(F), Ψⱼ(S)⟩ / (‖Ψᵢ(F)‖ ‖Ψⱼ(S)‖)

    Ψᵢ the P 3×3 patches of the image's feature map at stride ``loss.mrf_stride``,
    Ψⱼ those of the style's (same stride). The matching (normalised
    cross-correlation) is a convolution of F with the normalised style patches as
    kernels; the matched patches are constants of the gradient.
    """
    style_patches, kernels = targets
    stride = opts.mrf_stride
    scores = jax.lax.conv_general_dilated(
        x.features[None].astype(jnp.float32), kernels, (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    nearest = jnp.argmax(scores.reshape(-1, kernels.shape[-1]), axis=1)
    own = patches(x.features, stride)
    return jnp.sum(jnp.square(own - style_patches[nearest])) / float(own.shape[0])


# ---------------------------------------------------------------- remd (Kolkin et al. 2019)


def relaxed_emd(c: jax.Array) -> jax.Array:
    """max(meanᵢ minⱼ Cᵢⱼ, meanⱼ minᵢ Cᵢⱼ) of a cost matrix C."""
    return jnp.maximum(jnp.mean(jnp.min(c, axis=1)), jnp.mean(jnp.min(c, axis=0)))


def moment_distance(mu, cov, mu_s, cov_s) -> jax.Array:
    """STROTSS's moment_loss: (1/N) Σ_c |μ_c − μ′_c| + (1/N²) Σ_cd |Σ_cd − Σ′_cd|."""
    return jnp.mean(jnp.abs(mu - mu_s)) + jnp.mean(jnp.abs(cov - cov_s))


def remd_targets(x: LayerInput, opts: LayerLossOptions):
    """(S (M′, N), μ′, Σ′)."""
    s = x.flat()
    return (s, *mean_cov(s))


def remd_loss(x: LayerInput, targets, hp: StyleHParams, key, opts: LayerLossOptions) -> jax.Array:
    """Kolkin, Salavon & Shakhnarovich 2019, "Style Transfer by Relaxed Optimal Transport and
    Self-Similarity" (STROTSS), the style term:

        E = max(meanᵢ minⱼ Cᵢⱼ, meanⱼ minᵢ Cᵢⱼ) + w_m ((1/N) ‖μ − μ′‖₁ + (1/N²) ‖Σ − Σ′‖₁)

    Cᵢⱼ = 1 − cos(fᵢ, sⱼ) between ``loss.style_positions`` positions of F and of
    S, drawn from ``key`` at every evaluation; w_m = ``loss.remd_moment_weight``
    (STROTSS: 1). The moments are over all positions (STROTSS uses the sampled
    ones), their L1 distances averaged over entries as in STROTSS's moment_loss.
    STROTSS's colour-palette term and its concatenation of all layers into one
    hypercolumn are not part of this per-layer loss.
    """
    _need_key(key, "loss.style_loss='remd'")
    s_all, mu_s, cov_s = targets
    f_all = x.flat()
    key_f, key_s = jax.random.split(key)
    f = f_all[sample_positions(key_f, f_all.shape[0], opts.style_positions)]
    s = s_all[sample_positions(key_s, s_all.shape[0], opts.style_positions)]
    return relaxed_emd(cosine_distances(f, s)) + hp.remd_moment_weight * moment_distance(
        *mean_cov(f_all), mu_s, cov_s)


# ---------------------------------------------------------------- the style registry


def _always(opts: LayerLossOptions) -> bool:
    return True


def _never(opts: LayerLossOptions) -> bool:
    return False


def _reads(what: Reads) -> Callable[[LayerLossOptions], Reads]:
    return lambda opts: what


class StyleLoss(NamedTuple):
    """One style loss of :data:`STYLE_LOSSES`, and what it can do.

    targets(style: LayerInput, opts) -> pytree: computed once per run from the style's feature map.
    loss(image: LayerInput, targets, hp: StyleHParams, key | None, opts) -> scalar E_l.
    reads(opts) -> :class:`Reads`: with GRAM and MOMENTS the image enters only through sums over
        positions, which banded remat accumulates band by band.
    samples(opts) -> bool: it draws random samples (needs a typed PRNG key at every evaluation).
    least_size: the smallest feature map (positions a side) it compares.
    blends: the targets of several style images blend into one, A = Σ_k w_k A_k (nstjax.blend).
    guides: it takes region guides (spatial control, nstjax.regions: guided Gram matrices).
    options(opts) -> the options that decide ``reads``, as config overrides (messages).
    banded: under banded remat, the settings of this loss that read sums only (messages).
    """

    targets: Callable[[LayerInput, LayerLossOptions], Any]
    loss: Callable[[LayerInput, Any, StyleHParams, Any, LayerLossOptions], jax.Array]
    reads: Callable[[LayerLossOptions], Reads]
    samples: Callable[[LayerLossOptions], bool]
    least_size: int = 1
    blends: bool = False
    guides: bool = False
    options: Callable[[LayerLossOptions], str] = lambda opts: ""
    banded: str = ""


def _mmd_options(opts: LayerLossOptions) -> str:
    return f" with mmd_kernel={opts.mmd_kernel}" + (f" and mmd_degree={opts.mmd_degree}"
                                                    if opts.mmd_kernel == "poly" else "")


STYLE_LOSSES: dict[str, StyleLoss] = {
    "gram": StyleLoss(gram_targets, gram_loss, _reads(Reads.GRAM), _never, blends=True, guides=True),
    "mean_std": StyleLoss(mean_std_targets, mean_std_loss, _reads(Reads.MOMENTS), _never),
    "mmd": StyleLoss(mmd_targets, mmd_loss, _mmd_reads, lambda o: not mmd_is_exact(o), options=_mmd_options,
                     banded=f"mmd with mmd_kernel=linear, or poly with mmd_degree ≤ {EXACT_POLY_DEGREE}"),
    "gaussian_w2": StyleLoss(gaussian_w2_targets, gaussian_w2_loss, _reads(Reads.MOMENTS), _never),
    "sliced_wasserstein": StyleLoss(style_features_targets, sliced_wasserstein_loss, _reads(Reads.FEATURES),
                                    _always),
    "histogram": StyleLoss(histogram_targets, histogram_loss, _reads(Reads.FEATURES), _never),
    "mrf": StyleLoss(mrf_targets, mrf_loss, _reads(Reads.FEATURES), _never, MRF_PATCH),
    "remd": StyleLoss(remd_targets, remd_loss, _reads(Reads.FEATURES), _always),
}
"""The style losses by ``loss.style_loss`` name."""


def banded_remat_refusal(opts: LayerLossOptions, remat: str) -> Optional[str]:
    """Why these losses cannot run with banded remat (described by ``remat``, e.g. 'model.remat=on'),
    and what to choose instead, in one line; None when they can (they read sums over positions only)."""
    if not opts.style_reads.sums_only:
        what = f"loss.style_loss={opts.style_loss}" + opts.style.options(opts)
        banded = [name for name, entry in STYLE_LOSSES.items()
                  if entry.reads(LayerLossOptions(style_loss=name)).sums_only]
        others = [entry.banded for entry in STYLE_LOSSES.values() if entry.banded]
        instead = f"a style loss that reads only sums over positions ({', '.join(banded)}, or {', or '.join(others)})"
    elif opts.content_samples:
        what, instead = f"loss.content_loss={opts.content_loss}", "loss.content_loss=mse"
    else:
        return None
    return (f"{what} compares whole feature maps, which banded remat ({remat}) never holds: "
            f"set model.remat=off, or choose {instead}")


# ---------------------------------------------------------------- content losses


def content_loss(features: jax.Array, target: jax.Array, reduction: str = "half_sum") -> jax.Array:
    """½ Σ (F − P)² (Gatys et al.), Σ (F − P)², or its mean over N·M."""
    sq = jnp.square(features.astype(jnp.float32) - target.astype(jnp.float32))
    if reduction == "half_sum":
        return 0.5 * jnp.sum(sq)
    return jnp.sum(sq) if reduction == "sum" else jnp.mean(sq)


def mse_content_loss(features: jax.Array, target: jax.Array, key, opts: LayerLossOptions) -> jax.Array:
    """Gatys et al. 2016: reduce_c((F − P)²), reduce_c = ``loss.content_reduction`` (:func:`content_loss`)."""
    return content_loss(features, target, opts.content_reduction)


def self_similarity(x: jax.Array) -> jax.Array:
    """D̂: the cosine distances Dᵢⱼ = 1 − cos(xᵢ, xⱼ) between the rows of x, each row divided by its sum."""
    d = cosine_distances(x, x)
    return d / jnp.maximum(jnp.sum(d, axis=1, keepdims=True), 1e-12)


def self_similarity_loss(features: jax.Array, target: jax.Array, key, opts: LayerLossOptions) -> jax.Array:
    """Kolkin, Salavon & Shakhnarovich 2019 (STROTSS), the content term:

        E = (1/k) Σᵢⱼ |D̂ᵢⱼ(F) − D̂ᵢⱼ(P)|

    D̂ the row-normalised cosine self-similarity (distance) matrices of the
    image's and the content's features at the same k = ``loss.style_positions``
    positions, drawn from ``key`` at every evaluation (STROTSS normalises
    columns; D is symmetric, so the sum is the same). 1/k as STROTSS's code (its
    paper writes 1/k²).
    """
    _need_key(key, "loss.content_loss='self_similarity'")
    f = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    p = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
    idx = sample_positions(key, f.shape[0], opts.style_positions)
    return jnp.sum(jnp.abs(self_similarity(f[idx]) - self_similarity(p[idx]))) / float(idx.shape[0])


class ContentLoss(NamedTuple):
    """One content loss of :data:`CONTENT_LOSSES`: loss(features (H, W, N), P (H, W, N), key | None,
    opts) -> scalar, and whether it draws random samples. Its target is the content's feature map."""

    loss: Callable[[jax.Array, jax.Array, Any, LayerLossOptions], jax.Array]
    samples: bool


CONTENT_LOSSES: dict[str, ContentLoss] = {
    "mse": ContentLoss(mse_content_loss, False),
    "self_similarity": ContentLoss(self_similarity_loss, True),
}
"""The content losses by ``loss.content_loss`` name."""
