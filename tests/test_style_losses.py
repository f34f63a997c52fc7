"""The style losses and the STROTSS content loss against independent numpy / scipy references.

Small feature maps (M ≤ 64 positions, N ≤ 8 channels); the objective on a tiny VGG at the end.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import linear_sum_assignment

from nstjax.losses import HParams, LossSpec, compute_targets, make_objective
from nstjax.statistics import trace_sqrt_product
from nstjax.style_losses import (STYLE_LOSSES, LayerInput, LayerLossOptions, StyleHParams, histogram_match,
                                 random_directions, self_similarity_loss, sliced_wasserstein_distance)
from nstjax.vgg import CAFFE, VGG


def layer_loss(features, style_features, opts=None, hp=None, key=None):
    """E_l of one layer from the image's (H, W, N) and the style's (H′, W′, N) feature maps, through
    the registry entry: its targets of the style, then its loss (as the objective does)."""
    opts = LayerLossOptions() if opts is None else opts
    entry, reads = opts.style, opts.style_reads
    hp = StyleHParams.create() if hp is None else hp
    targets = entry.targets(LayerInput.of(style_features, reads), opts)
    return entry.loss(LayerInput.of(features, reads), targets, hp, key, opts)

RNG = np.random.default_rng(11)
N = 4
F = RNG.standard_normal((4, 5, N)).astype(np.float32)  # M = 20
S = (1.5 * RNG.standard_normal((3, 6, N)) + 0.5).astype(np.float32)  # M′ = 18
KEY, OTHER_KEY = jax.random.key(0), jax.random.key(1)
ALL = 64  # style_positions ≥ every M here: sampled losses use every position


def flat(x):
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


def value(style_loss, f=F, s=S, key=None, hp=None, **options):
    opts = LayerLossOptions(style_loss=style_loss, **options)
    return float(layer_loss(jnp.asarray(f), jnp.asarray(s), opts, hp, key))


def hp(**values):
    return StyleHParams.create(**values)


# Every configuration of the registry: (style_loss, options).
CONFIGS = [
    ("gram", {}), ("gram", {"gram_norm": "NM", "style_reduction": "mean"}),
    ("mean_std", {}),
    ("mmd", {"mmd_kernel": "linear"}), ("mmd", {"mmd_kernel": "poly"}),
    ("mmd", {"mmd_kernel": "poly", "mmd_degree": 3, "style_positions": ALL}),
    ("mmd", {"mmd_kernel": "gaussian", "style_positions": ALL}),
    ("gaussian_w2", {}), ("sliced_wasserstein", {}), ("histogram", {}),
    ("mrf", {}), ("mrf", {"mrf_stride": 2}), ("remd", {"style_positions": ALL}),
]
SET_CONFIGS = [c for c in CONFIGS if c[0] != "mrf"]  # mrf compares spatial patches, not sets of vectors


def config_id(c):
    return c[0] + "".join(f"-{k}={v}" for k, v in c[1].items())


# ---------------------------------------------------------------- references


def test_mean_std_matches_numpy():
    f, s = flat(F), flat(S)
    expected = np.mean((f.mean(0) - s.mean(0)) ** 2 + (f.std(0) - s.std(0)) ** 2)
    np.testing.assert_allclose(value("mean_std"), expected, rtol=1e-5)


def test_gaussian_w2_matches_scipy_sqrtm():
    f, s = flat(F), flat(S)
    cov, cov_s = np.cov(f.T, bias=True), np.cov(s.T, bias=True)
    root_s = scipy.linalg.sqrtm(cov_s).real
    cross = scipy.linalg.sqrtm(root_s @ cov @ root_s).real
    expected = np.sum((f.mean(0) - s.mean(0)) ** 2) + np.trace(cov + cov_s - 2 * cross)
    np.testing.assert_allclose(value("gaussian_w2"), expected, rtol=1e-5)


def w2_float64(f, s):
    """E of gaussian_w2 and ∂E/∂F in float64, by the nuclear norm tr (Σ′^½ Σ Σ′^½)^½ = ‖D D′ᵀ‖_* / √(M M′)
    of the centred features D, D′ (through their QR factors: D D′ᵀ = Q R R′ᵀ Q′ᵀ), no matrix square
    root: ∂‖D D′ᵀ‖_*/∂D = Q P Vᵀ R′ over the non-zero singular values of R R′ᵀ = P S Vᵀ."""
    shape = f.shape
    f, s = flat(f), flat(s)
    m, m_s = f.shape[0], s.shape[0]
    d, d_s = f - f.mean(0), s - s.mean(0)
    (q, r), (_, r_s) = np.linalg.qr(d), np.linalg.qr(d_s)
    p, sv, vt = np.linalg.svd(r @ r_s.T, full_matrices=False)
    k = int(np.sum(sv > 1e-12 * sv[0]))
    scale = 1.0 / math.sqrt(m * m_s)
    delta = f.mean(0) - s.mean(0)
    e = np.sum(delta**2) + np.sum(d * d) / m + np.sum(d_s * d_s) / m_s - 2 * scale * np.sum(sv)
    grad = 2 * delta / m + 2 * d / m - 2 * scale * (q @ p[:, :k]) @ (vt[:k] @ r_s)
    return e, grad.reshape(shape)


W2_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@pytest.fixture(scope="module")
def vgg_features_48px(synthetic_params):
    """{layer: (F, S)}: the default style layers of the bundled pair at 48 px (longest side; the image
    is the content with noise), synthetic weights. relu1_1 and relu2_1 have M ≥ N (M = 1728, 432),
    relu3_1 … relu5_1 M < N (108, 24, 6 positions of 256, 512, 512 channels); the style's M′ differs."""
    from cli import EXAMPLES
    from nstjax.images import load_image, resize_longest

    content = resize_longest(load_image(EXAMPLES / "tubingen.jpg"), 48)
    style = resize_longest(load_image(EXAMPLES / "starry_night.jpg"), 48)
    x = np.clip(content + 0.1 * np.random.default_rng(0).standard_normal(content.shape), 0, 1)
    model = VGG(CAFFE, "avg")
    feats = [model.apply({"params": synthetic_params}, jnp.asarray(a, jnp.float32)[None], W2_LAYERS)
             for a in (x, style)]
    return {name: (feats[0][name][0], feats[1][name][0]) for name in W2_LAYERS}


def assert_w2_exact(f, s, gradient_rtol=1e-4):
    """Value within 1e-5 of float64; gradient w.r.t. the features where they are positive (what passes
    a ReLU to the pixels) within ``gradient_rtol`` (L2) and 10× that of the largest entry."""
    opts = LayerLossOptions(style_loss="gaussian_w2")
    e, grad = jax.jit(jax.value_and_grad(lambda x: layer_loss(x, jnp.asarray(s), opts)))(jnp.asarray(f))
    e64, grad64 = w2_float64(f, s)
    np.testing.assert_allclose(float(e), e64, rtol=1e-5)
    live = np.asarray(f) > 0
    error = np.asarray(grad, np.float64)[live] - grad64[live]
    assert np.linalg.norm(error) <= gradient_rtol * np.linalg.norm(grad64[live])
    assert np.abs(error).max() <= 10 * gradient_rtol * np.abs(grad64[live]).max()


@pytest.mark.parametrize("layer", W2_LAYERS)
def test_gaussian_w2_is_float64_exact_on_vgg_features_at_48px(vgg_features_48px, layer):
    """Also when M < N: Σ has rank ≤ M − 1, and the float32 eigenvalues that are zero must not count
    (before: 3 % off float64 at relu4_1, 1 % over the five layers)."""
    f, s = vgg_features_48px[layer]
    assert (f.shape[0] * f.shape[1] < f.shape[2]) == (layer not in ("relu1_1", "relu2_1"))
    assert_w2_exact(f, s)


def test_the_float64_reference_gradient_matches_central_differences(vgg_features_48px):
    """w2_float64's ∂E/∂F against float64 central differences along a random direction of the positive
    features: step 1e-6 of the largest feature, so that the O(h²) error is ~1e-10 of the derivative
    and the rounding error (1e-16 E / h) ~1e-9."""
    rng = np.random.default_rng(2)
    for layer in W2_LAYERS:
        f, s = (np.asarray(a, np.float64) for a in vgg_features_48px[layer])
        v = rng.standard_normal(f.shape) * (f > 0)
        h = 1e-6 * np.abs(f).max()
        difference = (w2_float64(f + h * v, s)[0] - w2_float64(f - h * v, s)[0]) / (2 * h)
        np.testing.assert_allclose(np.sum(w2_float64(f, s)[1] * v), difference, rtol=1e-6, err_msg=layer)


def relu_features(rng, m, n, rank=6):
    """(1, M, N) ReLU features of a few latent dimensions: half of the values zero, correlated channels,
    small eigenvalues, as a network's."""
    z = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) + 0.3 * rng.standard_normal((m, n))
    return np.maximum(z + 0.2 * rng.standard_normal(n), 0).astype(np.float32)[None]


@pytest.mark.parametrize("m,m_style", [(8, 12), (8, 80), (80, 8), (60, 90)],
                         ids=["both-M<N", "M<N<M'", "M'<N<M", "both-M>N"])
def test_gaussian_w2_is_float64_exact_for_each_side_of_n(m, m_style):
    """N = 32 channels: the rank bounds min(N, M − 1) of Σ and min(N, M′ − 1) of Σ′ on either side of N."""
    rng = np.random.default_rng(m * 100 + m_style)
    assert_w2_exact(relu_features(rng, m, 32), relu_features(rng, m_style, 32))


def test_trace_sqrt_product_and_its_gradient_match_scipy():
    """tr (B Σ Bᵀ)^½, ∂/∂Σ = ½ Bᵀ C^-½ B and ∂/∂B = C^-½ B Σ (C = B Σ Bᵀ) for full-rank Σ and B."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((5, 5))
    cov = a @ a.T / 7 + 0.1 * np.eye(5)
    inv_root = np.linalg.inv(scipy.linalg.sqrtm(b @ cov @ b.T).real)
    value, (d_cov, d_b) = jax.value_and_grad(trace_sqrt_product, argnums=(0, 1))(
        jnp.asarray(cov, jnp.float32), jnp.asarray(b, jnp.float32), 5)
    np.testing.assert_allclose(value, np.trace(scipy.linalg.sqrtm(b @ cov @ b.T).real), rtol=1e-5)
    np.testing.assert_allclose(d_cov, 0.5 * b.T @ inv_root @ b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_b, inv_root @ b @ cov, rtol=1e-4, atol=1e-5)


def numpy_quantiles(sorted_columns, m):
    return np.stack([np.quantile(col, np.linspace(0, 1, m), method="linear") for col in sorted_columns.T], 1)


@pytest.mark.parametrize("style_shape", [(4, 5), (3, 6)], ids=["equal-M", "resampled"])
def test_sliced_wasserstein_with_fixed_directions_matches_numpy_sorting(style_shape):
    s = RNG.standard_normal((*style_shape, N)).astype(np.float32) * 2
    v = RNG.standard_normal((N, 6))
    v /= np.linalg.norm(v, axis=0)
    pf = np.sort(flat(F) @ v, axis=0)
    ps = np.sort(flat(s) @ v, axis=0)
    ps = ps if ps.shape[0] == pf.shape[0] else numpy_quantiles(ps, pf.shape[0])
    expected = np.mean(np.sum((pf - ps) ** 2, axis=0) / pf.shape[0])
    got = sliced_wasserstein_distance(jnp.asarray(flat(F), jnp.float32), jnp.asarray(flat(s), jnp.float32),
                                      jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sliced_wasserstein_in_one_dimension_is_the_optimal_transport_cost():
    """In 1-D every direction is ±1, and sorting is the optimal matching: W2² = min over matchings."""
    f = RNG.standard_normal((4, 5, 1)).astype(np.float32)
    s = (RNG.standard_normal((5, 4, 1)) * 3 + 1).astype(np.float32)
    cost = (flat(f) - flat(s).T) ** 2
    rows, cols = linear_sum_assignment(cost)
    expected = cost[rows, cols].mean()
    for key in (KEY, OTHER_KEY):
        np.testing.assert_allclose(value("sliced_wasserstein", f, s, key), expected, rtol=1e-5)


@pytest.mark.parametrize("projections", [None, 7])
def test_sliced_wasserstein_draws_its_directions_from_the_key(projections):
    """K = sw_projections directions (N by default), those of random_directions(key)."""
    directions = random_directions(KEY, N, projections or N)
    assert directions.shape == (N, projections or N)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-6)
    expected = sliced_wasserstein_distance(jnp.asarray(flat(F), jnp.float32), jnp.asarray(flat(S), jnp.float32),
                                           directions)
    np.testing.assert_allclose(value("sliced_wasserstein", key=KEY, sw_projections=projections), expected,
                               rtol=1e-6)


def brute_mmd(f, s, kernel):
    def mean_k(a, b):
        return np.mean([[kernel(x, y) for y in b] for x in a])

    return mean_k(f, f) + mean_k(s, s) - 2 * mean_k(f, s)


@pytest.mark.parametrize("kernel,degree,c", [("linear", 2, 0.0), ("poly", 2, 0.0), ("poly", 2, 1.5),
                                              ("poly", 1, 0.7), ("poly", 3, 0.5)])
def test_mmd_linear_and_polynomial_match_brute_force_kernel_sums(kernel, degree, c):
    f, s = flat(F), flat(S)
    k = (lambda x, y: x @ y) if kernel == "linear" else (lambda x, y: (x @ y + c) ** degree)
    got = value("mmd", key=KEY, hp=hp(mmd_c=c), mmd_kernel=kernel, mmd_degree=degree, style_positions=ALL)
    np.testing.assert_allclose(got, brute_mmd(f, s, k), rtol=1e-4)


@pytest.mark.parametrize("bandwidth", [2.0, None])
def test_mmd_gaussian_matches_brute_force_kernel_sums(bandwidth):
    f, s = flat(F), flat(S)
    if bandwidth is None:  # the mean squared distance between distinct style vectors
        sigma2 = np.mean([np.sum((a - b) ** 2) for a, b in itertools.permutations(s, 2)])
    else:
        sigma2 = bandwidth
    expected = brute_mmd(f, s, lambda x, y: np.exp(-np.sum((x - y) ** 2) / (2 * sigma2)))
    got = value("mmd", key=KEY, hp=hp(mmd_bandwidth=bandwidth), mmd_kernel="gaussian", style_positions=ALL)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def numpy_histogram_match(f, s):
    r = np.empty_like(f)
    q = np.stack([np.quantile(col, np.linspace(0, 1, f.shape[0]), method="linear") for col in s.T], 1)
    for c in range(f.shape[1]):
        r[np.argsort(f[:, c]), c] = q[:, c]
    return r


def test_histogram_matching_and_loss_match_numpy():
    f, s = flat(F), flat(S)
    r = numpy_histogram_match(f, s)
    got_r = histogram_match(jnp.asarray(f, jnp.float32), jnp.sort(jnp.asarray(s, jnp.float32), axis=0))
    np.testing.assert_allclose(got_r, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value("histogram"), np.sum((f - r) ** 2) / f.size, rtol=1e-5)
    # R is a constant of the gradient: dE/dF = 2 (F − R) / (N·M)
    grad = jax.grad(lambda x: layer_loss(x, jnp.asarray(S), LayerLossOptions(style_loss="histogram")))(
        jnp.asarray(F))
    np.testing.assert_allclose(np.asarray(grad).reshape(f.shape), 2 * (f - r) / f.size, rtol=1e-4, atol=1e-7)


def numpy_patches(x, stride):
    h, w, _ = x.shape
    return np.stack([x[i:i + 3, j:j + 3].ravel() for i in range(0, h - 2, stride)
                     for j in range(0, w - 2, stride)])


@pytest.mark.parametrize("stride", [1, 2])
def test_mrf_matches_brute_force_nearest_patches(stride):
    f = RNG.standard_normal((5, 6, 3))
    s = RNG.standard_normal((6, 7, 3)) + 0.3
    pf, ps = numpy_patches(f, stride), numpy_patches(s, stride)
    ncc = (pf @ ps.T) / np.linalg.norm(pf, axis=1)[:, None] / np.linalg.norm(ps, axis=1)[None, :]
    nearest = ncc.argmax(axis=1)
    expected = np.sum((pf - ps[nearest]) ** 2) / pf.shape[0]
    np.testing.assert_allclose(value("mrf", f.astype(np.float32), s.astype(np.float32), mrf_stride=stride),
                               expected, rtol=1e-5)


def numpy_cosine_distances(x, y):
    return 1 - (x @ y.T) / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(y, axis=1)[None, :]


def test_remd_matches_brute_force():
    f, s = flat(F), flat(S)
    c = numpy_cosine_distances(f, s)
    remd = max(np.mean([min(row) for row in c]), np.mean([min(col) for col in c.T]))
    cov, cov_s = np.cov(f.T, bias=True), np.cov(s.T, bias=True)
    moments = np.mean(np.abs(f.mean(0) - s.mean(0))) + np.mean(np.abs(cov - cov_s))
    got = value("remd", key=KEY, hp=hp(remd_moment_weight=0.5), style_positions=ALL)
    np.testing.assert_allclose(got, remd + 0.5 * moments, rtol=1e-5)


def test_self_similarity_content_loss_matches_brute_force():
    p = RNG.standard_normal(F.shape).astype(np.float32)

    def normalised(x):
        d = numpy_cosine_distances(x, x)
        return d / d.sum(axis=1, keepdims=True)

    expected = np.sum(np.abs(normalised(flat(F)) - normalised(flat(p)))) / flat(F).shape[0]
    got = self_similarity_loss(jnp.asarray(F), jnp.asarray(p), KEY, LayerLossOptions(style_positions=ALL))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_zero_for_identical_features(config):
    name, options = config
    assert abs(value(name, F, F, KEY, **options)) < 1e-5
    assert value(name, F, S, KEY, **options) > 1e-3  # and not zero for different ones


@pytest.mark.parametrize("config", SET_CONFIGS, ids=config_id)
def test_invariant_to_a_permutation_of_positions(config):
    name, options = config
    perm_f, perm_s = RNG.permutation(20), RNG.permutation(18)
    f = flat(F)[perm_f].reshape(5, 4, N).astype(np.float32)
    s = flat(S)[perm_s].reshape(6, 3, N).astype(np.float32)
    np.testing.assert_allclose(value(name, f, s, KEY, **options), value(name, F, S, KEY, **options),
                               rtol=2e-5, atol=1e-7)


def rank_one(shape):
    u, v = RNG.standard_normal(shape[:2]), RNG.standard_normal(shape[2])
    return (np.abs(u[..., None] * v)).astype(np.float32)


DEGENERATE = {
    "zeros": (np.zeros((4, 4, N), np.float32), S),
    "constant": (np.full((4, 4, N), 0.5, np.float32), S),
    "rank_one": (rank_one((4, 4, N)), S),
    "fewer_positions_than_channels": (RNG.random((3, 3, 12)).astype(np.float32),
                                      RNG.random((3, 4, 12)).astype(np.float32)),
    "constant_style": (F, np.full((3, 6, N), 2.0, np.float32)),
}


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("case", DEGENERATE)
def test_finite_value_and_gradient_for_degenerate_features(config, case):
    name, options = config
    f, s = DEGENERATE[case]
    opts = LayerLossOptions(style_loss=name, **options)
    e, grad = jax.value_and_grad(lambda x: layer_loss(x, jnp.asarray(s), opts, None, KEY))(jnp.asarray(f))
    assert np.isfinite(e) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.slow
def test_self_similarity_has_finite_gradients_for_degenerate_features(case):
    f, _ = DEGENERATE[case]
    p = RNG.random(f.shape).astype(np.float32)
    opts = LayerLossOptions(style_positions=8)
    grad = jax.grad(lambda x: self_similarity_loss(x, jnp.asarray(p), KEY, opts))(jnp.asarray(f))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("field,values,config", [
    ("mmd_bandwidth", [0.5, 2.0, 8.0], ("mmd", {"mmd_kernel": "gaussian", "style_positions": 8})),
    ("mmd_c", [0.0, 1.0, 3.0], ("mmd", {"mmd_kernel": "poly"})),
    ("remd_moment_weight", [0.0, 1.0, 4.0], ("remd", {"style_positions": 8})),
], ids=["mmd_bandwidth", "mmd_c", "remd_moment_weight"])
def test_vmap_over_a_traced_hyperparameter_equals_separate_calls(field, values, config):
    name, options = config
    opts = LayerLossOptions(style_loss=name, **options)
    hps = [hp(**{field: v}) for v in values]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    batched = jax.vmap(lambda h: layer_loss(jnp.asarray(F), jnp.asarray(S), opts, h, KEY))(stacked)
    singles = [layer_loss(jnp.asarray(F), jnp.asarray(S), opts, h, KEY) for h in hps]
    np.testing.assert_allclose(batched, singles, rtol=1e-5)
    assert len(set(np.round(singles, 6))) == len(values)  # the parameter matters


SAMPLED = [("mmd", {"mmd_kernel": "gaussian", "style_positions": 8}),
           ("mmd", {"mmd_kernel": "poly", "mmd_degree": 3, "style_positions": 8}),
           ("sliced_wasserstein", {}), ("remd", {"style_positions": 8})]


@pytest.mark.parametrize("config", SAMPLED, ids=config_id)
def test_sampled_losses_are_deterministic_per_key_and_differ_between_keys(config):
    name, options = config
    first = value(name, key=KEY, **options)
    assert value(name, key=jax.random.key(0), **options) == first
    assert value(name, key=OTHER_KEY, **options) != first


def test_self_similarity_is_deterministic_per_key_and_differs_between_keys():
    p = RNG.standard_normal(F.shape).astype(np.float32)
    opts = LayerLossOptions(style_positions=8)

    def ss(key):
        return float(self_similarity_loss(jnp.asarray(F), jnp.asarray(p), key, opts))

    assert ss(KEY) == ss(jax.random.key(0)) and ss(KEY) != ss(OTHER_KEY)


@pytest.mark.parametrize("config", CONFIGS + SAMPLED, ids=config_id)
def test_a_loss_needs_a_key_exactly_when_it_says_it_samples(config):
    name, options = config
    opts = LayerLossOptions(style_loss=name, **options)
    if opts.style_samples:
        with pytest.raises(ValueError, match="needs a key"):
            value(name, **options)
    else:
        assert value(name, **options) == value(name, key=KEY, **options)


def test_mmd_samples_only_for_kernels_without_an_exact_feature_space():
    def opts(kernel, degree=2):
        return LayerLossOptions(style_loss="mmd", mmd_kernel=kernel, mmd_degree=degree)

    assert not opts("linear").style_samples and opts("linear").style_reads.sums_only
    assert not opts("poly", 2).style_samples and opts("poly", 2).style_reads.sums_only
    assert opts("poly", 3).style_samples and not opts("poly", 3).style_reads.sums_only
    assert opts("gaussian").style_samples and not opts("gaussian").style_reads.sums_only


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("options,message", [
    ({"style_loss": "wasserstein"}, "loss.style_loss must be one of gram, mean_std, mmd"),
    ({"mmd_kernel": "rbf"}, "loss.mmd_kernel must be one of linear, poly, gaussian"),
    ({"content_loss": "l1"}, "loss.content_loss must be one of mse, self_similarity"),
    ({"style_positions": 1}, "loss.style_positions must be an integer ≥ 2"),
    ({"sw_projections": 0}, "loss.sw_projections must be an integer ≥ 1"),
    ({"mrf_stride": 0}, "loss.mrf_stride must be an integer ≥ 1"),
    ({"mmd_degree": 0}, "loss.mmd_degree must be an integer ≥ 1"),
])
def test_bad_options_are_errors_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        LossSpec(**options)


@pytest.mark.parametrize("values,message", [
    ({"mmd_bandwidth": 0.0}, "loss.mmd_bandwidth = 0.0 must be positive"),
    ({"mmd_bandwidth": -1.0}, "loss.mmd_bandwidth = -1.0 must be positive"),
    ({"remd_moment_weight": -1.0}, "loss.remd_moment_weight = -1.0 must be ≥ 0"),
    ({"mmd_c": math.inf}, "loss.mmd_c = inf must be finite"),
    ({"mmd_sigma": 1.0}, "unknown style hyperparameter"),
])
def test_bad_hyperparameters_are_errors_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        HParams.create(LossSpec(), **values)


def test_config_defaults_are_the_specs_defaults():
    from omegaconf import OmegaConf

    from nstjax.config import LossConfig

    cfg = OmegaConf.structured(LossConfig)
    assert LossSpec.from_config(cfg) == LossSpec()
    assert LossSpec.from_config(OmegaConf.merge(cfg, {"style_loss": "mrf", "mrf_stride": 2})) == LossSpec(
        style_loss="mrf", mrf_stride=2)
    assert StyleHParams(**{k: cfg[k] for k in StyleHParams._fields}) == StyleHParams()
    for name in STYLE_LOSSES:  # every registry entry is a valid config choice
        assert OmegaConf.merge(cfg, {"style_loss": name}).style_loss.value == name
    from omegaconf.errors import ValidationError
    with pytest.raises(ValidationError, match="style_loss"):
        OmegaConf.merge(cfg, {"style_loss": "bogus"})


# ---------------------------------------------------------------- the objective


@pytest.mark.parametrize("style_loss,options", [(name, {}) for name in STYLE_LOSSES]
                         + [("mmd", {"mmd_kernel": "linear"}), ("gram", {"content_loss": "self_similarity"})],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
@pytest.mark.slow
def test_objective_with_each_loss_has_finite_value_and_gradient(synthetic_params, style_loss, options):
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"), style_loss=style_loss,
                    style_positions=16, **options)
    model = VGG(CAFFE, "avg")
    x = jnp.asarray(RNG.random((8, 8, 3)), jnp.float32)
    content = jnp.asarray(RNG.random((8, 8, 3)), jnp.float32)
    style = jnp.asarray(RNG.random((12, 8, 3)), jnp.float32)
    targets = compute_targets(model, synthetic_params, content, style, spec)
    objective = make_objective(model, spec)
    hparams = HParams.create(spec, beta=1.0)

    @jax.jit
    def value_and_grad(pixels, key):
        return jax.value_and_grad(lambda p: objective(p, synthetic_params, targets, hparams, key).style)(pixels)

    style_value, grad = value_and_grad(x, KEY)
    assert np.isfinite(style_value) and style_value > 0
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    terms = jax.jit(objective)(x, synthetic_params, targets, hparams, KEY)
    assert np.isfinite(terms.total) and np.isfinite(terms.content)
    if spec.samples:
        with pytest.raises(ValueError, match="needs a key"):
            objective(x, synthetic_params, targets, hparams)
    else:
        np.testing.assert_allclose(jax.jit(objective)(x, synthetic_params, targets, hparams).total, terms.total,
                                   rtol=1e-6)


# ---------------------------------------------------------------- banded remat

BANDED = [("gram", {}), ("mean_std", {}), ("gaussian_w2", {}), ("mmd", {"mmd_kernel": "linear"}),
          ("mmd", {"mmd_kernel": "poly"})]
BANDED_HP = {"mmd": {"mmd_c": 0.5}}  # poly: both T_1 (μ) and T_2 (Fᵀ F / M) count
BANDS = 64 * 36 * 8  # band_elements: relu1_1 of a 40×36 image in 5 bands, block 2 in 3


@pytest.mark.parametrize("config", BANDED, ids=config_id)
@pytest.mark.slow
def test_sums_over_positions_losses_are_the_same_with_banded_remat(synthetic_params, config):
    """gram, mean_std, gaussian_w2 and exact mmd read Fᵀ F and Σᵢ fᵢ, which the model sums band by
    band under remat: value and gradient equal the plain pass's up to the summation order."""
    name, options = config
    # conv2_1 (no ReLU: no dead channels) with more positions than channels (M = 360, 352 > N = 128):
    # full-rank covariances, so gaussian_w2's matrix square roots are well conditioned
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "conv2_1"), style_loss=name,
                    **options)
    assert spec.style_reads.sums_only
    rng = np.random.default_rng(4)
    x, content, style = (jnp.asarray(rng.random(s), jnp.float32) for s in ((40, 36, 3), (40, 36, 3), (44, 32, 3)))
    hparams = HParams.create(spec, beta=1.0, **BANDED_HP.get(name, {}))

    def run(remat):
        model = VGG(CAFFE, "avg", remat=remat, band_elements=BANDS)
        targets = compute_targets(model, synthetic_params, content, style, spec)
        objective = make_objective(model, spec)
        return jax.jit(jax.value_and_grad(lambda p: objective(p, synthetic_params, targets, hparams).style))(x)

    (plain, plain_grad), (banded, banded_grad) = run(False), run(True)
    assert plain > 0
    np.testing.assert_allclose(banded, plain, rtol=1e-4)
    scale = float(jnp.abs(plain_grad).max())
    assert scale > 0
    np.testing.assert_allclose(banded_grad, plain_grad, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.slow
def test_gaussian_w2_with_fewer_positions_than_channels_is_the_same_with_banded_remat(synthetic_params):
    """relu3_1 of a 40×36 image has M < N (10×9 = 90 positions of 256 channels), summed in 5 bands:
    the banded value equals the plain one and both float64's of the plain features, the gradients
    agree."""
    spec = LossSpec(content_layers=("relu3_1",), style_layers=("relu3_1",), style_loss="gaussian_w2")
    rng = np.random.default_rng(6)
    x, content, style = (jnp.asarray(rng.random(s), jnp.float32) for s in ((40, 36, 3), (40, 36, 3), (44, 32, 3)))
    hparams = HParams.create(spec, beta=1.0)

    def run(remat):
        model = VGG(CAFFE, "avg", remat=remat, band_elements=2 * 9 * 256)  # block 3: 2 rows a band
        targets = jax.jit(lambda p: compute_targets(model, p, content, style, spec))(synthetic_params)
        objective = make_objective(model, spec)
        return jax.jit(jax.value_and_grad(lambda p: objective(p, synthetic_params, targets, hparams).style))(x)

    (plain, plain_grad), (banded, banded_grad) = run(False), run(True)
    f, s = (VGG(CAFFE, "avg").apply({"params": synthetic_params}, a[None], ("relu3_1",))["relu3_1"][0]
            for a in (x, style))
    assert f.shape == (10, 9, 256)
    expected = float(hparams.style_layer_weights[0]) * w2_float64(f, s)[0]
    np.testing.assert_allclose([plain, banded], expected, rtol=1e-5)
    scale = float(jnp.abs(plain_grad).max())
    assert scale > 0
    np.testing.assert_allclose(banded_grad, plain_grad, rtol=1e-3, atol=1e-4 * scale)


def _shapes_in(jaxpr) -> set:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    shapes |= _shapes_in(sub)
    return shapes


@pytest.mark.parametrize("style_loss,held", [("mean_std", False), ("gaussian_w2", False), ("histogram", True)])
def test_banded_remat_never_holds_a_style_layer_of_a_sums_loss_whole(synthetic_params, style_loss, held):
    """With remat, relu1_1 (40×36×64) appears in the program of loss + gradient only in bands, unless
    the loss reads the feature map itself."""
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"), style_loss=style_loss)
    model = VGG(CAFFE, "avg", remat=True, band_elements=BANDS)
    x = jnp.zeros((40, 36, 3), jnp.float32)
    targets = jax.eval_shape(lambda: compute_targets(model, synthetic_params, x, x, spec))
    objective = make_objective(model, spec)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, t: objective(p, synthetic_params, t, HParams.create(spec)).total))(
        x, targets)
    assert ((1, 40, 36, 64) in _shapes_in(jaxpr.jaxpr)) is held


def _validate(*overrides):
    from cli import EXAMPLES
    from nstjax import config
    from nstjax.build import validate
    from nstjax.spec import parse

    return validate(parse(config.compose([f"content={EXAMPLES / 'tubingen.jpg'}", f"style={EXAMPLES / 'starry_night.jpg'}",
                                    "image.size=32", "loss.style_layers=[relu1_1,relu2_1,relu3_1]",
                                    "loss.style_layer_weights=null", *overrides])))


WHOLE_MAP = [["loss.style_loss=sliced_wasserstein"], ["loss.style_loss=histogram"], ["loss.style_loss=mrf"],
             ["loss.style_loss=remd"], ["loss.style_loss=mmd", "loss.mmd_kernel=gaussian"],
             ["loss.style_loss=mmd", "loss.mmd_kernel=poly", "loss.mmd_degree=3"],
             ["loss.content_loss=self_similarity"]]


@pytest.mark.parametrize("remat", [["model.remat=on"], ["model.remat=auto", "model.remat_pixels=100"]],
                         ids=["on", "auto"])
@pytest.mark.parametrize("overrides", WHOLE_MAP, ids=lambda o: " ".join(v.split("=")[1] for v in o))
def test_losses_that_need_whole_maps_are_refused_with_banded_remat(overrides, remat):
    from nstjax.errors import UserError

    with pytest.raises(UserError) as e:
        _validate(*overrides, *remat)
    message = str(e.value)
    assert "\n" not in message and overrides[0] in message
    assert all(o.removeprefix("loss.") in message for o in overrides[1:])
    assert "whole feature maps" in message and remat[0] in message and "model.remat=off" in message
    assert ("loss.content_loss=mse" if "content" in overrides[0] else "gram, mean_std, gaussian_w2") in message
    _validate(*overrides, "model.remat=off")  # the same loss without remat is fine


@pytest.mark.parametrize("overrides", [o for name, opts in BANDED
                                       for o in [[f"loss.style_loss={name}", *(f"loss.{k}={v}" for k, v in opts.items())]]],
                         ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_sums_over_positions_losses_are_accepted_with_banded_remat(overrides):
    _validate(*overrides, "model.remat=on")


def test_mrf_on_maps_smaller_than_its_patches_is_refused_naming_the_layer():
    from nstjax.errors import UserError

    with pytest.raises(UserError, match=r"loss.style_loss=mrf compares 3×3 patches, but relu5_1 of the content "
                                        r"image is 2×1: raise image.size"):
        _validate("loss.style_loss=mrf", "loss.style_layers=[relu1_1,relu5_1]")  # 32×24 px
    _validate("loss.style_loss=mrf", "loss.style_layers=[relu1_1,relu5_1]", "image.size=96")
