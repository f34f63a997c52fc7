"""Each loss term against hand-computed numpy on tiny feature maps, every normalisation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax.losses import (CONTENT_REDUCTIONS, GRAM_NORMS, STYLE_REDUCTIONS, HParams, LossSpec,
                           content_loss, gram_divisor, make_objective, style_layer_loss, total_variation)
from nstjax.vgg import CAFFE, VGG, gram_matrix

RNG = np.random.default_rng(7)
F = RNG.standard_normal((3, 5, 4)).astype(np.float32)  # H=3, W=5, N=4: M=15
P = RNG.standard_normal((3, 5, 4)).astype(np.float32)
N, M = 4, 15


def np_gram(f, norm):
    mat = f.reshape(-1, f.shape[-1]).T.astype(np.float64)  # N×M as in the paper
    g = mat @ mat.T
    return g / {"none": 1.0, "M": M, "NM": N * M}[norm]


def gram(f, norm):
    h, w, n = f.shape
    return gram_matrix(f[None])[0] / gram_divisor(n, h * w, norm)


@pytest.mark.parametrize("norm", GRAM_NORMS)
def test_gram_matches_numpy(norm):
    np.testing.assert_allclose(gram(jnp.asarray(F), norm), np_gram(F, norm), rtol=1e-5)


@pytest.mark.parametrize("reduction", CONTENT_REDUCTIONS)
def test_content_loss_matches_numpy(reduction):
    sq = (F.astype(np.float64) - P) ** 2
    expected = {"half_sum": 0.5 * sq.sum(), "sum": sq.sum(), "mean": sq.mean()}[reduction]
    np.testing.assert_allclose(content_loss(jnp.asarray(F), jnp.asarray(P), reduction), expected,
                               rtol=1e-5)


@pytest.mark.parametrize("norm,reduction", list(itertools.product(GRAM_NORMS, STYLE_REDUCTIONS)))
def test_style_layer_loss_matches_numpy(norm, reduction):
    g, a = np_gram(F, norm), np_gram(P, norm)
    sq = (g - a) ** 2
    expected = {"gatys": sq.sum() / (4 * N**2 * M**2), "sum": sq.sum(), "mean": sq.mean()}[reduction]
    got = style_layer_loss(gram(jnp.asarray(F), norm), gram(jnp.asarray(P), norm), N, M, reduction)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gatys_normalisation_does_not_overflow_int32():
    # 4·N²·M² for relu1_1 of a 1024² image is ~7e16: must be computed in float.
    g = jnp.ones((64, 64))
    value = style_layer_loss(g, jnp.zeros((64, 64)), 64, 1024 * 1024, "gatys")
    np.testing.assert_allclose(value, 64 * 64 / (4.0 * 64**2 * (1024.0**2) ** 2), rtol=1e-5)


@pytest.mark.parametrize("norm", ["squared", "abs"])
def test_total_variation_matches_numpy(norm):
    x = RNG.random((6, 7, 3))
    dy, dx = np.diff(x, axis=0), np.diff(x, axis=1)
    f = np.square if norm == "squared" else np.abs
    np.testing.assert_allclose(total_variation(jnp.asarray(x, jnp.float32), norm),
                               f(dy).sum() + f(dx).sum(), rtol=1e-5)


def test_neural_style_total_variation_has_the_gradient_of_its_tvloss():
    """neural-style's TVLoss.updateGradInput, its loops over the (H−1)×(W−1) block written out."""
    x = RNG.random((6, 7, 3))
    want = np.zeros_like(x)
    for i in range(x.shape[0] - 1):
        for j in range(x.shape[1] - 1):
            x_diff, y_diff = x[i, j] - x[i, j + 1], x[i, j] - x[i + 1, j]
            want[i, j] += x_diff + y_diff
            want[i, j + 1] -= x_diff
            want[i + 1, j] -= y_diff
    got = jax.grad(lambda v: total_variation(v, "neural_style"))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hparams_default_layer_weights_are_equal_and_sum_to_one():
    spec = LossSpec()
    hp = HParams.create(spec)
    np.testing.assert_allclose(hp.style_layer_weights, [0.2] * 5)
    np.testing.assert_allclose(hp.content_layer_weights, [1.0])
    with pytest.raises(ValueError, match="style_layer_weights has 2 values for 5 layers"):
        HParams.create(spec, style_layer_weights=[1.0, 2.0])


def test_objective_combines_terms_with_weights(synthetic_params):
    """total = α·L_content + β·Σ w_l E_l + λ·TV, with layers read from the model."""
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
                    gram_norm="M", style_reduction="mean", content_reduction="sum")
    model = VGG(CAFFE, "avg")
    x = jnp.asarray(RNG.random((16, 12, 3)), jnp.float32)
    c = jnp.asarray(RNG.random((16, 12, 3)), jnp.float32)
    s = jnp.asarray(RNG.random((20, 8, 3)), jnp.float32)
    params = synthetic_params
    from nstjax.losses import compute_targets

    targets = compute_targets(model, params, c, s, spec)
    hp = HParams.create(spec, alpha=2.0, beta=3.0, style_layer_weights=[0.25, 4.0], tv_weight=0.5)
    terms = jax.jit(make_objective(model, spec))(x, params, targets, hp)

    acts = {k: np.asarray(v[0], np.float64)
            for k, v in model.apply({"params": params}, x[None], ("relu1_1", "relu2_1")).items()}
    pc = np.asarray(model.apply({"params": params}, c[None], ("relu2_1",))["relu2_1"][0], np.float64)
    sa = {k: np.asarray(v[0], np.float64)
          for k, v in model.apply({"params": params}, s[None], ("relu1_1", "relu2_1")).items()}

    def g(f):
        mat = f.reshape(-1, f.shape[-1])
        return mat.T @ mat / mat.shape[0]

    content = 2.0 * ((acts["relu2_1"] - pc) ** 2).sum()
    style = 3.0 * (0.25 * ((g(acts["relu1_1"]) - g(sa["relu1_1"])) ** 2).mean()
                   + 4.0 * ((g(acts["relu2_1"]) - g(sa["relu2_1"])) ** 2).mean())
    xn = np.asarray(x, np.float64)
    tv = 0.5 * ((np.diff(xn, axis=0) ** 2).sum() + (np.diff(xn, axis=1) ** 2).sum())
    np.testing.assert_allclose(terms.content, content, rtol=1e-4)
    np.testing.assert_allclose(terms.style, style, rtol=1e-4)
    np.testing.assert_allclose(terms.tv, tv, rtol=1e-5)
    np.testing.assert_allclose(terms.total, content + style + tv, rtol=1e-4)


def test_objective_vmaps_over_hyperparameters(synthetic_params):
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1",))
    model = VGG(CAFFE, "max")
    x = jnp.asarray(RNG.random((16, 16, 3)), jnp.float32)
    from nstjax.losses import compute_targets

    targets = compute_targets(model, synthetic_params, x * 0.5, x[::-1], spec)
    objective = make_objective(model, spec)
    hps = [HParams.create(spec, beta=b) for b in (1e2, 1e5)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    batched = jax.vmap(objective, in_axes=(None, None, None, 0))(x, synthetic_params, targets, stacked)
    for i, hp in enumerate(hps):
        single = objective(x, synthetic_params, targets, hp)
        np.testing.assert_allclose(batched.total[i], single.total, rtol=1e-5)
    assert batched.style[1] / batched.style[0] == pytest.approx(1e3, rel=1e-5)
