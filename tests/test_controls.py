"""The controls of Gatys et al. 2017 and neural-style: initial images, several style images,
colour control, against numpy references, and a few small runs of the CLI."""

import jax
import numpy as np
import pytest
from scipy import stats

from cli import EXAMPLES, run_cli, small_run_args
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


# ---------------------------------------------------------------- several style images


@pytest.mark.parametrize("gram_norm", ["none", "NM"])
def test_blended_style_targets_are_the_weighted_sum_of_each_images_gram(synthetic_params, gram_norm):
    import functools

    import jax.numpy as jnp

    from nstjax.blend import blend_weights
    from nstjax.losses import LossSpec, compute_targets
    from nstjax.vgg import VGG19

    rng = np.random.default_rng(2)
    content, a, b = (rng.random(s, dtype=np.float32) for s in ((32, 40, 3), (24, 32, 3), (40, 24, 3)))
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu3_1"), gram_norm=gram_norm)
    model = VGG19(CAFFE, "avg")
    w = blend_weights([0.7, 0.3], 2)
    got = build.blended_targets(functools.partial(compute_targets, model, spec=spec), synthetic_params,
                                jnp.asarray(content), [a, b], w)
    for name in spec.style_layers:
        want = 0
        for wk, img in zip((0.7, 0.3), (a, b)):
            f = np.asarray(model.apply({"params": synthetic_params}, jnp.asarray(img)[None], (name,))[name][0],
                           np.float64)
            f = f.reshape(-1, f.shape[-1])
            g = {"none": 1.0, "NM": f.size}[gram_norm]
            want = want + wk * (f.T @ f) / g
        np.testing.assert_allclose(np.asarray(got.style[name]), want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    f = model.apply({"params": synthetic_params}, jnp.asarray(content)[None], ("relu2_1",))["relu2_1"][0]
    np.testing.assert_array_equal(np.asarray(got.content["relu2_1"]), np.asarray(f))


def test_blend_weights_are_normalised_and_checked():
    from nstjax.blend import blend_weights, style_paths

    np.testing.assert_allclose(blend_weights(None, 4), [0.25] * 4)
    np.testing.assert_allclose(blend_weights([3, 1], 2), [0.75, 0.25])
    for bad, words in (([1, 2, 3], "3 values for 2 style images"), ([1, -1], "-1.0"),
                       ([0, 0], "sum to 0"), ([1, float("nan")], "nan")):
        with pytest.raises(UserError) as info:
            blend_weights(bad, 2)
        assert str(info.value).startswith("style_blend_weights") and words in str(info.value)
    assert style_paths(None, "d.jpg") == ["d.jpg"] and style_paths("a.jpg", "d.jpg") == ["a.jpg"]
    assert style_paths(["a.jpg", "b.jpg"], "d.jpg") == ["a.jpg", "b.jpg"]
    with pytest.raises(UserError, match="^style = "):
        style_paths([], "d.jpg")


def test_several_styles_are_validated_before_anything_runs():
    two = f"style=[{EXAMPLES / 'starry_night.jpg'},{EXAMPLES / 'the_scream.jpg'}]"
    inputs = build.validate(config.compose(["image.size=32", two]))
    assert [s.shape[2] for s in inputs.styles] == [3, 3] and inputs.style is inputs.styles[0]
    with pytest.raises(UserError, match="^style_blend_weights has 1 values for 2"):
        build.validate(config.compose(["image.size=32", two, "style_blend_weights=[1]"]))
    with pytest.raises(UserError, match="loss.style_loss=mean_std"):
        build.validate(config.compose(["image.size=32", two, "loss.style_loss=mean_std"]))


def test_a_sweep_over_blend_weights_is_one_group(tmp_path, synthetic_weights_file, nstjax_cache):
    import json

    sweep_dir = tmp_path / "multirun"
    styles = f"style=[{EXAMPLES / 'starry_night.jpg'},{EXAMPLES / 'the_scream.jpg'}]"
    args = [a for a in small_run_args(synthetic_weights_file, tmp_path, "optim.steps=2")
            if not a.startswith(("style=", "hydra.run.dir"))]
    proc = run_cli(["-m", *args, styles, "style_blend_weights=[0.7,0.3],[1,3]", f"hydra.sweep.dir={sweep_dir}"],
                   nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 points in 1 group(s)" in proc.stderr
    metrics = [json.loads((sweep_dir / n / "metrics.json").read_text()) for n in ("0", "1")]
    assert [m["style_blend_weights"] for m in metrics] == [pytest.approx([0.7, 0.3]), pytest.approx([0.25, 0.75])]
    assert all(m["status"] == "finished" and m["members"] == 2 and len(m["style_image"]) == 2 for m in metrics)
    first = [float((sweep_dir / n / "history.csv").read_text().splitlines()[1].split(",")[3]) for n in ("0", "1")]
    assert first[0] != first[1]  # other targets: another style loss at the same initial image
    bad = run_cli([*args, styles, "style_blend_weights=[1,1,1]", f"hydra.run.dir={tmp_path / 'bad'}"],
                  nstjax_cache)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: style_blend_weights"), bad.stderr
