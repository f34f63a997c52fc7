"""The controls of Gatys et al. 2017 and neural-style: initial images, several style images,
colour control, against numpy references, and a few small runs of the CLI."""

import jax
import numpy as np
import pytest
from scipy import stats

from cli import EXAMPLES, run_cli, small_run_args
from nstjax import build, config, inits
from nstjax.errors import UserError
from nstjax.spec import parse
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
        parse(cfg)
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
    from nstjax.vgg import VGG

    rng = np.random.default_rng(2)
    content, a, b = (rng.random(s, dtype=np.float32) for s in ((32, 40, 3), (24, 32, 3), (40, 24, 3)))
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu3_1"), gram_norm=gram_norm)
    model = VGG(CAFFE, "avg")
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
    inputs = build.validate(parse(config.compose(["image.size=32", two])))
    assert [s.shape[2] for s in inputs.styles] == [3, 3] and inputs.style is inputs.styles[0]
    with pytest.raises(UserError, match="^style_blend_weights has 1 values for 2"):
        build.validate(parse(config.compose(["image.size=32", two, "style_blend_weights=[1]"])))
    with pytest.raises(UserError, match="loss.style_loss=mean_std"):
        build.validate(parse(config.compose(["image.size=32", two, "loss.style_loss=mean_std"])))


# ---------------------------------------------------------------- colour control

# The standard matrices as published (NTSC 1953 YIQ; analogue BT.601 YUV as torch7's image.rgb2yuv)
# and their published inverses, rounded to three and five digits.
YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
YIQ_INV = np.array([[1, 0.956, 0.619], [1, -0.272, -0.647], [1, -1.106, 1.703]])
YUV = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])
YUV_INV = np.array([[1, 0, 1.13983], [1, -0.39465, -0.58060], [1, 2.03211, 0]])


@pytest.mark.parametrize("forward,back,matrix,inverse,digits", [
    ("rgb_to_yiq", "yiq_to_rgb", YIQ, YIQ_INV, 3), ("rgb_to_yuv", "yuv_to_rgb", YUV, YUV_INV, 5)])
def test_colour_conversions_are_the_standard_matrices(forward, back, matrix, inverse, digits):
    from nstjax import colors

    rgb = np.random.default_rng(3).random((7, 5, 3))
    converted = getattr(colors, forward)(rgb)
    np.testing.assert_allclose(converted, np.einsum("ij,hwj->hwi", matrix, rgb), atol=1e-12)
    np.testing.assert_allclose(getattr(colors, back)(converted), rgb, atol=1e-12)
    np.testing.assert_allclose(getattr(colors, back)(converted), np.einsum("ij,hwj->hwi", inverse, converted),
                               atol=2 * 10.0**-digits)
    grey = np.full((1, 1, 3), 0.4)
    np.testing.assert_allclose(getattr(colors, forward)(grey)[0, 0], [0.4, 0, 0], atol=1e-4)
    np.testing.assert_allclose(colors.luminance(rgb), converted[..., 0], atol=1e-12)


def test_histogram_matching_gives_the_style_the_contents_mean_and_covariance(images):
    from nstjax import colors

    content, a, b = images
    for style in (a, b):
        mapped = colors.match_histogram(style, content).reshape(-1, 3)
        c = content.reshape(-1, 3).astype(np.float64)
        np.testing.assert_allclose(mapped.mean(0), c.mean(0), atol=1e-4)
        np.testing.assert_allclose(np.cov(mapped, rowvar=False, bias=True), np.cov(c, rowvar=False, bias=True),
                                   atol=1e-4)
    # x′ = A x + b with A = Σc^½ Σs^−½: the symmetric square roots, from scipy.
    from scipy.linalg import sqrtm

    cov = [np.cov(x.reshape(-1, 3).astype(np.float64), rowvar=False, bias=True) for x in (content, a)]
    a_ref = np.real(sqrtm(cov[0]) @ np.linalg.inv(sqrtm(cov[1])))
    x = a.reshape(-1, 3).astype(np.float64)
    want = (x - x.mean(0)) @ a_ref.T + content.reshape(-1, 3).mean(0, dtype=np.float64)
    np.testing.assert_allclose(colors.match_histogram(a, content).reshape(-1, 3), want, atol=1e-6)


def test_luminance_control_prepares_grey_images_and_keeps_the_contents_chrominance(images):
    from nstjax import colors

    content, a, b = images
    shown, (sa, sb) = colors.prepare("luminance", content, [a, b])
    y_c = colors.luminance(content)
    for grey in (shown, sa, sb):
        assert grey.shape[-1] == 3 and np.array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_allclose(shown[..., 0], y_c, atol=1e-6)
    for s in (sa, sb):  # L_s′ = σc/σs (L_s − μs) + μc: the content's mean and std
        assert abs(s[..., 0].mean() - y_c.mean()) < 1e-5 and abs(s[..., 0].std() - y_c.std()) < 1e-5
    x0 = colors.optimized("luminance", content)
    assert x0.shape == content.shape[:2] + (1,)
    y = np.clip(y_c[..., None] + 0.05 * np.sin(np.arange(y_c.size)).reshape(x0.shape), 0.2, 0.8)
    out = colors.finish("luminance", y, content)
    inside = np.all((out > 0) & (out < 1), axis=-1)  # pixels the final clip leaves alone
    assert inside.mean() > 0.5
    yiq_out, yiq_c = colors.rgb_to_yiq(out), colors.rgb_to_yiq(content)
    np.testing.assert_allclose(yiq_out[inside][:, 0], y[inside][:, 0], atol=1e-6)
    np.testing.assert_allclose(yiq_out[inside][:, 1:], yiq_c[inside][:, 1:], atol=1e-6)
    view = colors.network_view("luminance")(jax.numpy.asarray(y))
    assert view.shape == content.shape and np.array_equal(np.asarray(view[..., 1]), y[..., 0].astype(np.float32))


def test_luminance_gradient_of_vmapped_members_with_tv_is_exact():
    """d/dL of a luminance objective with a TV term, two members vmapped and jitted: Σ_c of the
    RGB view's gradient, 3 × the TV gradient of L. With the channel broadcast, XLA:CPU fused the
    gradient's reduction over the broadcast axis with the TV term's pads into a YNNPACK fusion
    that reads past its operands' ends (jaxlib 0.12: NaN at the last member's last pixels, what
    made the luminance members of a sweep stop as diverged at step 1)."""
    import jax.numpy as jnp

    from nstjax import colors
    from nstjax.losses import total_variation

    def fn(rgb, g, tv):
        return jnp.sum(g * rgb) + tv * total_variation(rgb)

    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=(2, 24, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, 24, 32, 1)), jnp.float32)
    tv = jnp.asarray([0.0, 0.5], jnp.float32)
    grad = jax.jit(jax.vmap(jax.grad(colors.objective(fn, "luminance"))))
    exact = jax.vmap(jax.grad(lambda l, g, tv: jnp.sum(jnp.sum(g, -1, keepdims=True) * l)
                              + 3 * tv * total_variation(l)))
    expected = np.asarray(exact(y, g, tv))
    for _ in range(5):
        np.testing.assert_allclose(np.asarray(grad(y, g, tv)), expected, rtol=1e-5, atol=1e-5)


def test_original_colors_keep_the_results_luminance_and_the_contents_uv(images):
    from nstjax import colors

    content = images[0]
    result = np.clip(0.6 * np.random.default_rng(4).random(content.shape) + 0.2, 0, 1)
    out = colors.finish("original_colors", result, content)
    inside = np.all((out > 0) & (out < 1), axis=-1)
    assert inside.mean() > 0.5
    yuv_out, yuv_c = colors.rgb_to_yuv(out), colors.rgb_to_yuv(content)
    np.testing.assert_allclose(yuv_out[inside][:, 0], colors.luminance(result)[inside], atol=1e-6)
    np.testing.assert_allclose(yuv_out[inside][:, 1:], yuv_c[inside][:, 1:], atol=1e-6)
    np.testing.assert_array_equal(colors.finish("none", result, content), result.astype(np.float32))


def test_unknown_colour_control_names_the_key_and_the_choices():
    from nstjax.colors import COLOR_CONTROLS

    with pytest.raises(Exception) as info:
        config.compose(["color_control=sepia"])
    message = str(info.value.__cause__)
    assert "color_control" in message and all(c in message for c in COLOR_CONTROLS)


@pytest.mark.slow
def test_a_sweep_over_colour_controls_and_blend_weights(tmp_path, synthetic_weights_file, nstjax_cache):
    """One process: three colour controls (three groups), each with two blend weights (members
    of one group, one program), on the normalised network; the outputs keep the content's
    chrominance."""
    import json

    from PIL import Image

    from nstjax import colors

    sweep_dir = tmp_path / "multirun"
    styles = f"style=[{EXAMPLES / 'starry_night.jpg'},{EXAMPLES / 'the_scream.jpg'}]"
    args = [a for a in small_run_args(synthetic_weights_file, tmp_path, "optim.steps=2", "model.conv=direct",
                                      "optim=adam", "optim.lr=0.02")
            if not a.startswith(("style=", "hydra.run.dir", "optim.linesearch"))]
    # The normalised network too, its means over two of the examples at 32 px (cached by the first group).
    folder = tmp_path / "normalize"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    normalized = ["model.normalize=true", f"model.normalize_images={folder}", "model.normalize_size=32"]
    proc = run_cli(["-m", *args, styles, *normalized, "color_control=luminance,original_colors,histogram",
                    "style_blend_weights=[0.7,0.3],[1,3]", f"hydra.sweep.dir={sweep_dir}"], nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from nstjax import normalize
    from nstjax.weights import load_weights

    key = normalize.cache_key(load_weights(synthetic_weights_file).sha256, "avg",
                              normalize.image_files(folder), 32)
    assert (nstjax_cache / "normalize" / f"{key}.json").is_file()
    assert "6 points in 3 group(s) of 2, 2, 2 member(s)" in proc.stderr
    metrics = [json.loads((sweep_dir / str(n) / "metrics.json").read_text()) for n in range(6)]
    assert [m["group"] for m in metrics] == [0, 0, 1, 1, 2, 2]
    assert all(m["status"] == "finished" and m["members"] == 2 and len(m["style_image"]) == 2 for m in metrics)
    assert [m["style_blend_weights"] for m in metrics[:2]] == [pytest.approx([0.7, 0.3]), pytest.approx([0.25, 0.75])]
    for pair in ((0, 1), (2, 3), (4, 5)):  # other blend weights, other targets: another style loss at step 0
        first = [float((sweep_dir / str(n) / "history.csv").read_text().splitlines()[1].split(",")[3]) for n in pair]
        assert first[0] != first[1]
    content = np.asarray(Image.open(sweep_dir / "0" / "result.png"), np.float32)  # the content's size
    from nstjax.images import load_image, resize_to

    content = resize_to(load_image(EXAMPLES / "tubingen.jpg"), *content.shape[:2])
    for n, convert in ((0, colors.rgb_to_yiq), (2, colors.rgb_to_yuv)):
        out = np.asarray(Image.open(sweep_dir / str(n) / "result.png"), np.float32) / 255
        inside = np.all((out > 0.02) & (out < 0.98), axis=-1)
        chroma = np.abs(convert(out)[..., 1:] - convert(content)[..., 1:])[inside]
        assert inside.mean() > 0.5 and np.median(chroma) < 0.005, (n, np.median(chroma))
    bad = run_cli([*args, styles, "style_blend_weights=[1,1,1]", f"hydra.run.dir={tmp_path / 'bad'}"],
                  nstjax_cache)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: style_blend_weights"), bad.stderr


# ---------------------------------------------------------------- clamping and gradient normalisation


@pytest.mark.parametrize("clip", [True, False])
def test_optim_clip_false_leaves_the_pixels_unclamped(clip):
    """Minimising Σ (x − 2)² from x = 0.5: clamped, the pixels stop at 1; not, they pass it."""
    import jax.numpy as jnp

    from nstjax.losses import Terms
    from nstjax.optimize import Loop, OptimSpec, Problem

    def objective(pixels, params, targets, hp, key=None):
        total = jnp.sum(jnp.square(pixels - 2.0))
        return Terms(total, total, jnp.float32(0), jnp.float32(0), jnp.float32(0))

    loop = Loop(objective, OptimSpec("adam", clip=clip), chunk_steps=20)
    problems = build.stack([Problem(jnp.full((4, 4, 3), 0.5), {}, jnp.float32(0), jnp.float32(0.1),
                                    jax.random.key(0), jnp.float32(0))])
    state, _, _ = jax.jit(loop.chunk)(loop.init(problems, None), problems, None, jnp.int32(20), jnp.int32(10**6))
    pixels = np.asarray(state.pixels)
    assert (pixels.max() == 1.0) if clip else (pixels.min() > 1.5)
    from nstjax import colors

    assert colors.finish("none", pixels[0], pixels[0]).max() == 1.0  # the saved image is clamped
    cfg = config.compose(["optim=adam", f"optim.clip={str(clip).lower()}"])
    assert parse(cfg).structure.optim.clip is clip and parse(config.compose([])).structure.optim.clip is True


def test_normalized_gradients_follow_neural_style(synthetic_params):
    """∇x of α c Σ C + β Σ w_l E_l with each term's gradient in its layer's activations divided by
    its L1 norm: against the analytic ∂C/∂F = F − P and ∂E/∂F = F (G − A) / (N² M²) (Gatys et al.
    2016, eq. 6), normalised in numpy and pulled back through the network by its VJP."""
    import jax.numpy as jnp

    from nstjax.losses import HParams, LossSpec, compute_targets, make_objective
    from nstjax.vgg import VGG

    rng = np.random.default_rng(6)
    content, style, x = (jnp.asarray(rng.random((32, 32, 3)), jnp.float32) for _ in range(3))
    model = VGG(CAFFE, "avg")
    spec = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"), normalize_gradients=True)
    plain = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
    targets = compute_targets(model, synthetic_params, content, style, plain)
    hp = HParams.create(spec, alpha=2.0, beta=1e3, style_layer_weights=[0.3, 0.7])
    value, grad = jax.jit(jax.value_and_grad(
        lambda p: make_objective(model, spec)(p, synthetic_params, targets, hp).total))(x)
    plain_value = jax.jit(make_objective(model, plain))(x, synthetic_params, targets, hp).total
    assert float(value) == pytest.approx(float(plain_value), rel=1e-6)
    feats = jax.jit(lambda p: model.apply({"params": synthetic_params}, p[None], spec.layers))

    def acts(p, name):
        return feats(p)[name][0]

    def pulled_back(name, g):
        return np.asarray(jax.vjp(lambda p: acts(p, name), x)[1](jnp.asarray(g, jnp.float32))[0], np.float64)

    want = 0
    f = np.asarray(acts(x, "relu2_1"), np.float64)
    g = f - np.asarray(targets.content["relu2_1"], np.float64)
    want = want + 2.0 * pulled_back("relu2_1", g / (np.abs(g).sum() + 1e-8))
    for w, name in zip((0.3, 0.7), spec.style_layers):
        f = np.asarray(acts(x, name), np.float64)
        h, wd, n = f.shape
        m = h * wd
        flat = f.reshape(m, n)
        g = (flat @ (flat.T @ flat - np.asarray(targets.style[name], np.float64)) / (n**2 * m**2)).reshape(f.shape)
        want = want + 1e3 * w * pulled_back(name, g / (np.abs(g).sum() + 1e-8))
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-4 * np.abs(want).max())
    assert parse(config.compose(["loss.normalize_gradients=true"])).structure.loss.normalize_gradients


# ---------------------------------------------------------------- the normalised VGG


@pytest.mark.slow
def test_normalized_vgg_has_mean_activation_one_and_caches_its_means(synthetic_params, tmp_path, monkeypatch):
    import jax.numpy as jnp
    from PIL import Image

    from nstjax import normalize
    from nstjax.vgg import VGG

    rng = np.random.default_rng(7)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, shape in (("a.png", (48, 40, 3)), ("b.jpg", (40, 48, 3))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    model = VGG(CAFFE, "avg")
    params = jax.tree.map(np.asarray, synthetic_params)
    got = normalize.normalized_params(model, params, "sha", folder, 32, tmp_path / "cache")

    imgs = [build.images.resize_longest(build.images.load_image(folder / n), 32) for n in ("a.png", "b.jpg")]

    def relus(p):  # numpy: each image's mean over positions, then the mean over the images
        acts = [model.apply({"params": p}, jnp.asarray(x)[None], normalize.relu_layers(model.architecture.conv_layers)) for x in imgs]
        return {k: np.mean([np.asarray(a[k][0], np.float64).mean(axis=(0, 1)) for a in acts], axis=0)
                for k in normalize.relu_layers(model.architecture.conv_layers)}, acts

    (before, acts0), (after, acts1) = relus(params), relus(got)
    for name in normalize.relu_layers(model.architecture.conv_layers):
        live = before[name] > 1e-2 * before[name].max()  # rarely active filters: float32 noise
        assert live.mean() > 0.5, name
        np.testing.assert_allclose(after[name][live], 1.0, rtol=1e-4)
        # the same network up to each filter's scale: every activation the original's ÷ its mean
        np.testing.assert_allclose(np.asarray(acts1[0][name][0])[..., live],
                                   np.asarray(acts0[0][name][0])[..., live] / before[name][live],
                                   rtol=1e-3, atol=1e-4)

    cached = list((tmp_path / "cache" / "normalize").iterdir())
    assert len(cached) == 1
    monkeypatch.setattr(normalize, "filter_means", lambda *a: pytest.fail("the cached means were not used"))
    again = normalize.normalized_params(model, params, "sha", folder, 32, tmp_path / "cache")
    for conv in got:
        np.testing.assert_array_equal(again[conv]["kernel"], got[conv]["kernel"])
    with pytest.raises(BaseException, match="cached means were not used"):  # another size: another key
        normalize.normalized_params(model, params, "sha", folder, 40, tmp_path / "cache")
    with pytest.raises(UserError, match="^model.normalize_images"):
        build.validate(parse(config.compose(["model.normalize=true", f"model.normalize_images={tmp_path / 'none'}"])))
