"""The statistics of feature maps that several style losses share: means and covariances, the
square-root factor of a covariance and the trace of the square root of a product of covariances
(the 2-Wasserstein distance between Gaussians), random positions, quantile functions, cosine
distances. Pure functions of arrays."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
COSINE_EPS = 1e-8
"""Norm floor of the cosine distance (as torch's ``cosine_similarity``): zero vectors stay finite."""



def mean_cov(f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """μ = (1/M) Σᵢ fᵢ and Σ = (1/M) Σᵢ (fᵢ − μ)(fᵢ − μ)ᵀ of F (M, N)."""
    mu = jnp.mean(f, axis=0)
    d = f - mu
    return mu, jnp.matmul(d.T, d, precision=HIGHEST) / float(f.shape[0])


def sqrt0(x: jax.Array) -> jax.Array:
    """√x for x ≥ 0 with a zero (not infinite) derivative at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def covariance_rank(positions: int, channels: int) -> int:
    """min(N, M − 1) (at least 1): the largest rank of a covariance of M positions of N channels
    (the centred rows fᵢ − μ sum to zero)."""
    return max(1, min(channels, positions - 1))


def psd_factor(a: jax.Array, rank: int) -> jax.Array:
    """R (rank, N) with Rᵀ R = A for a symmetric positive semi-definite A (N, N) of rank ≤ ``rank``:
    R = diag(√λ) Uᵀ of the ``rank`` largest eigenpairs of A (by eigh, λ clamped at 0).

    A covariance's channels that do not vary (a zero diagonal entry: a dead ReLU channel) have zero
    rows and columns in A: only the largest min(rank, z) eigenpairs are kept, z the number of
    channels that vary, and the columns of the others are zero. The eigenvalues dropped are zero in
    exact arithmetic; in float32 they are rounding noise of about 1e-7 λ_max, whose square roots
    (3e-4 √λ_max each) would add up.
    """
    w, u = jnp.linalg.eigh(0.5 * (a + a.T))  # ascending
    w, u = w[-rank:], u[:, -rank:]
    varies = jnp.diagonal(a) > 0
    kept = jnp.minimum(rank, jnp.sum(varies))
    w = jnp.where(jnp.arange(rank) >= rank - kept, jnp.maximum(w, 0.0), 0.0)
    return (u * sqrt0(w)).T * varies


W2_GRADIENT_FLOOR = 1e-6
"""The derivative of :func:`trace_sqrt_product` weighs each singular value s by 1/(2s), evaluated at
s ≥ this × s_max, so that it is finite where the cross covariance is singular. Singular values
this small are beyond float32's resolution anyway (a channel active at one position makes one of
~1e-7 s_max); a larger floor would bias the gradient (1e-3, the square root of the 1e-6 floor on
eigenvalues it replaces, put 3 % (L2) errors in relu2_1's at 48 px)."""


def _nonzero(x: jax.Array, axis: int) -> jax.Array:
    return jnp.any(x != 0, axis=axis)


def _trace_sqrt_product(cov, b, rank, vectors=True):
    a = psd_factor(cov, rank)
    ab = jnp.matmul(a, b.T, precision=HIGHEST)
    if vectors:  # the derivative's (and the SVD's cost, twice that of the values alone)
        _, s, qt = jnp.linalg.svd(ab, full_matrices=False)
    else:
        s, qt = jnp.linalg.svd(ab, compute_uv=False), None
    rank_bound = jnp.minimum(jnp.minimum(jnp.sum(_nonzero(a, 1)), jnp.sum(_nonzero(b, 1))),
                             jnp.sum(_nonzero(a, 0) & _nonzero(b, 0)))
    kept = jnp.arange(s.shape[0]) < rank_bound  # s descending; the others are zero in exact arithmetic
    return jnp.sum(jnp.where(kept, s, 0.0)), (s, qt, kept)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def trace_sqrt_product(cov: jax.Array, b: jax.Array, rank: int) -> jax.Array:
    """tr (B Σ Bᵀ)^½ = tr (Σ′^½ Σ Σ′^½)^½ for Σ′ = Bᵀ B, Σ (N, N) positive semi-definite of rank ≤
    ``rank`` (static), B (r′, N): the sum of the singular values of A Bᵀ, A = :func:`psd_factor`
    (Σ, rank), since B Σ Bᵀ = (A Bᵀ)ᵀ (A Bᵀ).

    The singular values of the product of the square-root factors are as accurate as the factors
    (float32: ~1e-7 s_max each), where the eigenvalues of B Σ Bᵀ, whose condition is the square,
    would lose their small ones before their square roots. A Bᵀ has rank ≤ the number of non-zero
    rows of A, of B, and of channels where both have non-zero columns: only that many of the largest
    singular values count, the others are zero in exact arithmetic.

    Derivative: with B Σ Bᵀ = Q diag(s²) Qᵀ (Q the right singular vectors of A Bᵀ),
    ∂/∂Σ = Bᵀ Q diag(1/(2s)) Qᵀ B and ∂/∂B = Q diag(1/s) Qᵀ B Σ over the counted s, no eigenvector
    derivative (exact for repeated values); 1/s is evaluated at max(s, W2_GRADIENT_FLOOR · s_max), so
    it is finite for a singular Σ. Along the directions that keep Σ of rank ≤ ``rank`` (all of
    those of a covariance of M positions: rank = M − 1), the dropped values stay zero to first order.
    """
    return _trace_sqrt_product(cov, b, rank, vectors=False)[0]


def _trace_sqrt_product_fwd(cov, b, rank):
    value, (s, qt, kept) = _trace_sqrt_product(cov, b, rank)
    return value, (cov, b, s, qt, kept)


def _trace_sqrt_product_bwd(rank, residuals, g):
    cov, b, s, qt, kept = residuals
    floor = jnp.maximum(W2_GRADIENT_FLOOR * jnp.max(s), jnp.sqrt(jnp.finfo(jnp.float32).tiny))
    inv = jnp.where(kept, 1.0 / jnp.maximum(s, floor), 0.0)
    qb = jnp.matmul(qt, b, precision=HIGHEST)  # Qᵀ B
    d_cov = 0.5 * jnp.matmul(qb.T * inv, qb, precision=HIGHEST)
    d_b = jnp.matmul(qt.T * inv, jnp.matmul(qb, 0.5 * (cov + cov.T), precision=HIGHEST), precision=HIGHEST)
    return g * d_cov, g * d_b


trace_sqrt_product.defvjp(_trace_sqrt_product_fwd, _trace_sqrt_product_bwd)


def sample_positions(key, m: int, k: int) -> jax.Array:
    """Indices of min(k, m) distinct positions of m drawn from ``key``; all of them, in order, if k ≥ m."""
    if k >= m:
        return jnp.arange(m)
    return jax.random.choice(key, m, (k,), replace=False)


def resample_sorted(sorted_values: jax.Array, m: int) -> jax.Array:
    """(M′, K) columns sorted ascending → (m, K): each column's quantile function at i/(m − 1).

    Linear interpolation between order statistics (numpy's ``quantile`` 'linear'
    method); the values themselves when m = M′. Positions are computed in
    float32 (relative error ~1e-7 of M′).
    """
    mp = sorted_values.shape[0]
    if mp == m:
        return sorted_values
    t = jnp.arange(m, dtype=jnp.float32) * ((mp - 1) / max(m - 1, 1))
    lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, mp - 1)
    hi = jnp.minimum(lo + 1, mp - 1)
    w = (t - lo)[:, None]
    return sorted_values[lo] * (1.0 - w) + sorted_values[hi] * w


def cosine_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """Cᵢⱼ = 1 − xᵢᵀyⱼ / (‖xᵢ‖ ‖yⱼ‖) for rows of x (m, N) and y (m′, N); norms floored at COSINE_EPS."""
    def unit(v):
        return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=1, keepdims=True), COSINE_EPS**2))

    return 1.0 - jnp.matmul(unit(x), unit(y).T, precision=HIGHEST)
