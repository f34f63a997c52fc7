"""The initial image x₀ of the optimisation (``init``): a name of :data:`INITS` or an image file.

All are RGB (H, W, 3) in [0, 1] at the content's size; the random ones are drawn
from the run's key (``seed``), so the same seed gives the same image.

    content      x₀ = p, the content image                                   Gatys et al. 2016
    noise        x₀ = clip(m + s·z, 0, 1), z ~ N(0, 1), m the weights' mean pixel,
                 s = init_noise_std                                           neural-style's -init random
    style        x₀ = Σ_k w_k a_k, the style images resized to the content's size
    gray         x₀ = 0.5 + u/255, u ~ U[0, 1)                                crowsonkb's init='gray'
    uniform      x₀ = u, u ~ U[0, 1)                                          crowsonkb's init='uniform'
    style_stats  x₀,c ~ N(μ_c, σ_c²) truncated to [0, 1] per channel c, μ_c = Σ_k w_k μ_k,c and
                 σ_c² = Σ_k w_k σ²_k,c the blend-weighted means and variances of the style
                 images' channels                                             crowsonkb's init='style_stats'
    PATH         the image file, resized to the content's size

w_k are the style blend weights (one style image: w = 1). crowsonkb is
Katherine Crowson's style-transfer-pytorch (``StyleTransfer.stylize``, its
``init`` argument); like it, style_stats uses the unbiased variance (torch.var),
and draws the truncated normal per channel (jax.random.truncated_normal, for
torch.nn.init.trunc_normal_). It takes the statistics of the style images as
they are optimised against (resized by image.style_scale), where crowsonkb
takes them from the files.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import images

INITS = ("content", "noise", "style", "gray", "uniform", "style_stats")
"""The named initial images; any other ``init`` is an image file."""


def style_stats(styles: Sequence[np.ndarray], blend: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, μ_c = Σ_k w_k mean(a_k,c) and σ_c = √(Σ_k w_k var(a_k,c)) (unbiased variances)."""
    mean = sum(w * s.reshape(-1, 3).mean(axis=0, dtype=np.float64) for w, s in zip(blend, styles))
    var = sum(w * s.reshape(-1, 3).var(axis=0, ddof=1, dtype=np.float64) for w, s in zip(blend, styles))
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def truncated_normal(key: jax.Array, mean: np.ndarray, std: np.ndarray, shape) -> np.ndarray:
    """N(mean, std²) per channel, truncated to [0, 1]; a channel with std 0 is its mean."""
    std = np.asarray(std, np.float32)
    safe = np.where(std > 0, std, 1.0).astype(np.float32)
    lower, upper = (0.0 - mean) / safe, (1.0 - mean) / safe
    z = jax.random.truncated_normal(key, jnp.asarray(lower), jnp.asarray(upper), shape, jnp.float32)
    x = np.where(std > 0, mean + safe * np.asarray(z), mean)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def initial_image(init: str, content: np.ndarray, styles: Sequence[np.ndarray], blend: Sequence[float],
                  key: jax.Array, *, noise_mean, noise_std: float, max_pixels: int | None) -> np.ndarray:
    """x₀ for ``init`` (see the module's table): ``content`` fixes the size, ``styles`` and
    ``blend`` are the style images and their weights, ``key`` draws the random ones."""
    h, w = content.shape[:2]
    if init == "content":
        return content
    if init == "noise":
        noise = np.asarray(jax.random.normal(key, content.shape, jnp.float32))
        return np.clip(np.asarray(noise_mean, np.float32) + noise_std * noise, 0.0, 1.0).astype(np.float32)
    if init == "style":
        return sum(wk * images.resize_to(s, h, w) for wk, s in zip(blend, styles)).astype(np.float32)
    if init == "gray":
        return np.asarray(0.5 + jax.random.uniform(key, content.shape, jnp.float32) / 255.0)
    if init == "uniform":
        return np.asarray(jax.random.uniform(key, content.shape, jnp.float32))
    if init == "style_stats":
        return truncated_normal(key, *style_stats(styles, blend), content.shape)
    return images.resize_to(images.load_image(init, max_pixels), h, w)


def check(init: str, max_pixels: int | None) -> None:
    """``init`` is one of :data:`INITS` or a readable image file."""
    if init not in INITS:
        from nstjax.errors import UserError

        try:
            images.load_image(init, max_pixels)
        except UserError as e:
            raise UserError(f"init={init}: {e} (init is one of {', '.join(INITS)} or an image file)") from e
