"""The controls of Gatys et al. 2017 and neural-style: initial images, several style images,
colour control, against numpy references, and a few small runs of the CLI."""

import numpy as np
import pytest
from scipy import stats

import jax

from nstjax import build, config, inits
from nstjax.errors import UserError
from nstjax.vgg import CAFFE


def _init(name, content, styles, blend=(1.0,), seed=0):
    return inits.initial_image(name, content, styles, blend, jax.random.key(seed),
                               noise_mean=CAFFE.mean_rgb(), noise_std=0.25, max_pixels=None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    content = rng.random((96, 128, 3), dtype=np.float32)
    # Two style images of other sizes with channel means and spreads far from the content's.
    a = np.clip(rng.normal([0.2, 0.5, 0.8], [0.05, 0.1, 0.2], (40, 60, 3)), 0, 1).astype(np.float32)
    b = np.clip(rng.normal([0.7, 0.3, 0.4], [0.15, 0.05, 0.1], (50, 30, 3)), 0, 1).astype(np.float32)
    return content, a, b


def test_gray_init_is_half_plus_noise_under_one_level(images):
    content = images[0]
    x = _init("gray", content, [images[1]])
    assert x.shape == content.shape and x.dtype == np.float32
    assert x.min() >= 0.5 and x.max() < 0.5 + 1 / 255
    u = (x.astype(np.float64) - 0.5) * 255  # U[0, 1): mean 1/2, std 1/√12
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01


def test_uniform_init_is_seeded_uniform(images):
    content = images[0]
    x = _init("uniform", content, [images[1]], seed=3)
    assert x.min() >= 0 and x.max() < 1
    assert abs(x.mean() - 0.5) < 0.01 and abs(x.std() - 12**-0.5) < 0.01
    np.testing.assert_array_equal(x, _init("uniform", content, [images[1]], seed=3))
    assert not np.array_equal(x, _init("uniform", content, [images[1]], seed=4))


@pytest.mark.parametrize("blend", [(1.0,), (0.7, 0.3)])
def test_style_stats_init_has_the_styles_truncated_normal_moments(images, blend):
    content, *styles = images
    styles = styles[:len(blend)]
    x = _init("style_stats", content, styles, blend).reshape(-1, 3).astype(np.float64)
    # The reference: numpy's blend-weighted channel means and (unbiased) variances, and scipy's
    # moments of the normal truncated to [0, 1].
    mu = sum(w * s.reshape(-1, 3).astype(np.float64).mean(0) for w, s in zip(blend, styles))
    var = sum(w * s.reshape(-1, 3).astype(np.float64).var(0, ddof=1) for w, s in zip(blend, styles))
    sigma = np.sqrt(var)
    law = stats.truncnorm((0 - mu) / sigma, (1 - mu) / sigma, loc=mu, scale=sigma)
    assert x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x.mean(0), law.mean(), atol=0.005)
    np.testing.assert_allclose(x.std(0), law.std(), atol=0.005)


def test_init_style_and_noise_keep_their_meaning(images):
    content, a, _ = images
    from nstjax.images import resize_to

    np.testing.assert_array_equal(_init("style", content, [a]), resize_to(a, 96, 128))
    noise = _init("noise", content, [a])
    assert abs(noise.mean() - np.mean(CAFFE.mean_rgb())) < 0.02 and _init("content", content, [a]) is content


def test_unknown_init_names_the_key_and_the_choices():
    cfg = config.compose(["init=nonsense"])
    with pytest.raises(UserError) as info:
        build.check_init(cfg)
    message = str(info.value)
    assert "init=nonsense" in message and all(name in message for name in inits.INITS)
    assert "\n" not in message
