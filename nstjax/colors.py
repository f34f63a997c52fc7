"""Colour control (``color_control``): Gatys et al. 2017 §5 and neural-style's ``-original_colors``.

Gatys, Ecker, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in
Neural Style Transfer", CVPR 2017, §5 "Colour control", keep the content's
colours in one of two ways; neural-style (jcjohnson) adds a third after the
optimisation:

    none             the optimisation as it is (the default)
    luminance        §5.1 luminance-only transfer: content and style to YIQ; the style's
                     luminance matched to the content's mean and std,
                         L_s′ = (σ_c / σ_s) (L_s − μ_s) + μ_c;
                     the optimisation runs on one channel, the luminance L (the network sees
                     it replicated to RGB, R = G = B = L), from the content's L_c; the result
                     is (L, I_c, Q_c) back to RGB
    histogram        §5.2 colour histogram matching, before the optimisation: each style
                     pixel x (RGB) mapped to x′ = A x + b with A = Σ_c^½ Σ_s^−½ and
                     b = μ_c − A μ_s (μ, Σ the pixels' mean and covariance; the square roots
                     symmetric, through the eigendecomposition: Image Analogies' colour
                     transfer), so the mapped style has the content's mean and covariance
    original_colors  neural-style's -original_colors 1, after the optimisation: the result's
                     luminance Y with the content's chrominance U, V (YUV), back to RGB

The conversions are the standard linear ones on RGB in [0, 1]: YIQ as NTSC
(FCC 1953) defines it, YUV as analogue BT.601 / BT.470 (torch7's
``image.rgb2yuv``, what neural-style calls). Both share the luminance
Y = 0.299 R + 0.587 G + 0.114 B. The inverses are the exact inverse matrices
(torch7's ``image.yuv2rgb`` rounds them to five digits), so the luminance of
an ``original_colors`` result is the optimised image's before the final clip
to [0, 1]. The content and the style images (each of them, with several) are
prepared before their targets and the initial image are computed (``init=style``
starts from the mapped style); the yardsticks measure the final RGB result
against the unprepared content and style. The control is structure: points
with different controls are different groups of a sweep.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

COLOR_CONTROLS = ("none", "luminance", "histogram", "original_colors")
"""The ``color_control`` choices."""

RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.5959, -0.2746, -0.3213],
                       [0.2115, -0.5227, 0.3112]])
"""YIQ from RGB (NTSC 1953): rows Y, I, Q."""
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.14713, -0.28886, 0.436],
                       [0.615, -0.51499, -0.10001]])
"""YUV from RGB (analogue BT.601, torch7's image.rgb2yuv): rows Y, U, V."""
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)
COVARIANCE_FLOOR = 1e-8
"""Eigenvalues of the style's colour covariance below this are raised to it (a grey style has
rank 1), so that Σ_s^−½ stays finite."""


def _apply(matrix: np.ndarray, img: np.ndarray) -> np.ndarray:
    """``matrix`` applied to every pixel of an (H, W, 3) image, in float64."""
    return np.asarray(img, np.float64) @ matrix.T


def rgb_to_yiq(rgb: np.ndarray) -> np.ndarray:
    return _apply(RGB_TO_YIQ, rgb)


def yiq_to_rgb(yiq: np.ndarray) -> np.ndarray:
    return _apply(YIQ_TO_RGB, yiq)


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    return _apply(RGB_TO_YUV, rgb)


def yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    return _apply(YUV_TO_RGB, yuv)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Y = 0.299 R + 0.587 G + 0.114 B, (H, W) (the Y of YIQ and of YUV)."""
    return _apply(RGB_TO_YIQ[:1], rgb)[..., 0]


def match_luminance(style_y: np.ndarray, content_y: np.ndarray) -> np.ndarray:
    """Gatys et al. 2017 §5.1: L_s′ = (σ_c / σ_s) (L_s − μ_s) + μ_c (a flat style: μ_c)."""
    mu_s, sigma_s = style_y.mean(), style_y.std()
    scale = content_y.std() / sigma_s if sigma_s > 0 else 0.0
    return scale * (style_y - mu_s) + content_y.mean()


def _sym_power(cov: np.ndarray, power: float) -> np.ndarray:
    """Σ^power of a symmetric positive semi-definite matrix through its eigendecomposition,
    eigenvalues floored at :data:`COVARIANCE_FLOOR`."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.maximum(values, COVARIANCE_FLOOR) ** power) @ vectors.T


def mean_cov(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels' mean (3,) and covariance (3, 3) (divided by the number of pixels)."""
    x = np.asarray(rgb, np.float64).reshape(-1, 3)
    mu = x.mean(axis=0)
    d = x - mu
    return mu, d.T @ d / x.shape[0]


def match_histogram(style: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Gatys et al. 2017 §5.2: x′ = A x + b, A = Σ_c^½ Σ_s^−½, b = μ_c − A μ_s, per style pixel
    (float64, not clipped: the network takes any value)."""
    mu_c, cov_c = mean_cov(content)
    mu_s, cov_s = mean_cov(style)
    a = _sym_power(cov_c, 0.5) @ _sym_power(cov_s, -0.5)
    return _apply(a, style) + (mu_c - a @ mu_s)


def _grey(y: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(y, np.float32)[..., None], 3, axis=-1)


def prepare(mode: str, content: np.ndarray, styles: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
    """The content and style images whose features are the targets: luminance, the content's
    luminance and each style's matched luminance as grey RGB; histogram, each style mapped
    to the content's colours; otherwise as they are."""
    if mode == "luminance":
        y_c = luminance(content)
        return _grey(y_c), [_grey(match_luminance(luminance(s), y_c)) for s in styles]
    if mode == "histogram":
        return content, [match_histogram(s, content).astype(np.float32) for s in styles]
    return content, list(styles)


def optimized(mode: str, x0: np.ndarray) -> np.ndarray:
    """What the optimisation runs on from the RGB initial image x₀: luminance, its luminance
    (H, W, 1); otherwise x₀."""
    if mode == "luminance":
        return np.asarray(luminance(x0), np.float32)[..., None]
    return x0


def network_view(mode: str) -> Callable[[jax.Array], jax.Array]:
    """The RGB image the network sees from the optimised pixels (jnp): luminance, the one
    channel replicated to three; otherwise the pixels.

    The channel is replicated by a concatenation, not a broadcast, so that the gradient is the
    sum of the three channels' slices and not a reduction over a broadcast axis: XLA:CPU puts
    that reduction, with the TV term's gradient (pads of the negated, weight-multiplied
    differences) of vmapped members, into a YNNPACK fusion that reads past the end of its
    operands (jaxlib 0.12: NaN at the last member's last pixels, and luminance members of a
    sweep stopped as diverged at step 1)."""
    if mode == "luminance":
        return lambda pixels: jnp.concatenate([pixels] * 3, axis=-1)
    return lambda pixels: pixels


def objective(fn: Callable, mode: str) -> Callable:
    """``fn(pixels, *args, **kwargs)`` evaluated at the network's view of the optimised pixels
    (for luminance: of the replicated channel, so the TV term counts the luminance's
    differences once per channel)."""
    if mode != "luminance":
        return fn
    view = network_view(mode)
    return lambda pixels, *args, **kwargs: fn(view(pixels), *args, **kwargs)


def finish(mode: str, pixels: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The RGB result in [0, 1] from the optimised pixels: luminance, (L, I_c, Q_c) to RGB;
    original_colors, (Y, U_c, V_c) to RGB; otherwise the pixels; clipped to [0, 1]."""
    pixels = np.asarray(pixels)
    if mode == "luminance":
        iq = rgb_to_yiq(content)[..., 1:]
        rgb = yiq_to_rgb(np.concatenate([np.asarray(pixels, np.float64), iq], axis=-1))
    elif mode == "original_colors":
        uv = rgb_to_yuv(content)[..., 1:]
        rgb = yuv_to_rgb(np.concatenate([luminance(pixels)[..., None], uv], axis=-1))
    else:
        rgb = pixels
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)
