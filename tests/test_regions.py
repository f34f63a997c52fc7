"""Spatial control with masks (nstjax.regions): guided Gram matrices, mask propagation and the
regions' style loss against numpy, banded remat, bad masks, and runs of the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cli import EXAMPLES, run_cli, small_run_args
from nstjax import build, config, regions
from nstjax.errors import UserError
from nstjax.spec import parse
from nstjax.vgg import LAYER_NAMES, gram_matrix, layer_stride

STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1"]


def _mask_file(path, array) -> str:
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """Left and right halves of a 40×60 image, an all-white and an all-black mask, a file that is
    not an image."""
    folder = tmp_path_factory.mktemp("masks")
    half = np.zeros((40, 60), np.uint8)
    half[:, :30] = 255
    (folder / "notes.png").write_text("not an image")
    return {"left": _mask_file(folder / "left.png", half), "right": _mask_file(folder / "right.png", 255 - half),
            "white": _mask_file(folder / "white.png", np.full((10, 10), 255)),
            "black": _mask_file(folder / "black.png", np.zeros((10, 10))), "bad": str(folder / "notes.png")}


def _cfg(weights, *extra):
    return config.compose([f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
                           f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=48",
                           f"loss.style_layers=[{','.join(STYLE_LAYERS)}]", "loss.style_layer_weights=null",
                           "optim.linesearch=none", *extra])


def _regions(*entries) -> str:
    return "regions=[" + ",".join("{" + ",".join(f"{k}:{v}" for k, v in e.items()) + "}" for e in entries) + "]"


def test_guided_gram_matrices_weight_each_position_by_the_guide_squared(rng):
    f = rng.standard_normal((2, 5, 7, 4)).astype(np.float32)
    t = rng.random((3, 5, 7)).astype(np.float32)
    want = np.einsum("nhwi,rhw,nhwj->nrij", f.astype(np.float64), t.astype(np.float64) ** 2, f.astype(np.float64))
    got = gram_matrix(jnp.asarray(f), jnp.asarray(t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ft = f[:, None] * t[None, :, :, :, None]  # (F ∘ T_r)ᵀ (F ∘ T_r), as the paper writes it
    np.testing.assert_allclose(got, np.einsum("nrhwi,nrhwj->nrij", ft, ft), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ceil", [False, True])
def test_simple_propagation_averages_the_mask_over_each_layers_cells(rng, ceil):
    """At a layer of stride s, each position's guide is the mean of its s×s cell of the mask (a
    size divisible by 16: no edge windows); in ceil mode an odd size keeps its last row."""
    mask = rng.random((32, 48))
    layers = ["conv1_2", "pool1", "relu2_1", "relu3_4", "relu4_1", "pool4"]
    got = regions.propagate(mask, layers, "simple", ceil)
    for name in layers:
        s = layer_stride(name)
        want = mask.reshape(32 // s, s, 48 // s, s).mean(axis=(1, 3))
        np.testing.assert_allclose(got[name], want, rtol=1e-6, err_msg=name)
    odd = regions.propagate(mask[:31, :47], ["pool1"], "simple", ceil)["pool1"]
    assert odd.shape == ((16, 24) if ceil else (15, 23))
    if ceil:
        np.testing.assert_allclose(odd[-1, :-1], mask[30, :46].reshape(23, 2).mean(axis=1), rtol=1e-6)


def _receptive_field(name: str, i: int, j: int, shape) -> tuple[slice, slice]:
    """The input rectangle that position (i, j) of layer ``name`` sees: each 3×3 convolution widens
    it by one pixel each way, each 2×2 stride-2 pooling maps [a, b] to [2a, 2b + 1]."""
    lo_i, hi_i, lo_j, hi_j = i, i, j, j
    for layer in reversed(LAYER_NAMES[:LAYER_NAMES.index(name) + 1]):
        if layer.startswith("conv"):
            lo_i, hi_i, lo_j, hi_j = lo_i - 1, hi_i + 1, lo_j - 1, hi_j + 1
        elif layer.startswith("pool"):
            lo_i, hi_i, lo_j, hi_j = 2 * lo_i, 2 * hi_i + 1, 2 * lo_j, 2 * hi_j + 1
    return (slice(max(lo_i, 0), min(hi_i, shape[0] - 1) + 1), slice(max(lo_j, 0), min(hi_j, shape[1] - 1) + 1))


def test_inside_propagation_keeps_the_positions_whose_receptive_field_is_inside(rng):
    """Against the receptive fields written out: a position is inside iff every pixel it sees is."""
    mask = np.zeros((48, 64))
    mask[2:46, 2:62] = 1.0
    mask[4:7, 50:53] = 0.0  # a hole
    layers = ["relu1_1", "relu1_2", "pool1", "relu2_2", "relu3_1"]
    got = regions.propagate(mask, layers, "inside")
    for name in layers:
        want = np.array([[mask[_receptive_field(name, i, j, mask.shape)].min() for j in range(got[name].shape[1])]
                         for i in range(got[name].shape[0])])
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert 0 < got[name].sum() < got[name].size


def _loss_of(cfg, inputs=None):
    """(objective terms, gradient) at the initial image, as the run computes them."""
    group = build.build_group([parse(cfg)], inputs)
    problem = jax.tree.map(lambda a: a[0], group.problems)
    objective = group.loop.objective

    def total(x):
        return objective(x, group.params, problem.targets, problem.hp, problem.key).total

    terms = objective(problem.pixels, group.params, problem.targets, problem.hp, problem.key)
    return terms, jax.grad(total)(problem.pixels), group, problem


@pytest.mark.parametrize("gram_norm, reduction", [("none", "gatys"), ("NM", "mean")])
@pytest.mark.slow
def test_a_region_covering_everything_is_the_plain_gram_loss(synthetic_weights_file, masks, gram_norm, reduction):
    """One all-white region styled by the run's style: G_r = G and M_r = M, so the objective is
    the one without regions (an independent path: the unguided Gram loss)."""
    base = (f"loss.gram_norm={gram_norm}", f"loss.style_reduction={reduction}", "model.conv=direct")
    plain, plain_grad, *_ = _loss_of(_cfg(synthetic_weights_file, *base))
    guided, guided_grad, *_ = _loss_of(_cfg(synthetic_weights_file, *base, _regions({"mask": masks["white"]})))
    np.testing.assert_allclose(guided.style, plain.style, rtol=1e-5)
    np.testing.assert_allclose(guided_grad, plain_grad, rtol=1e-4, atol=1e-5 * float(jnp.abs(plain_grad).max()))


@pytest.mark.slow
def test_two_regions_style_loss_matches_numpy(synthetic_weights_file, synthetic_params, masks):
    """E_l = Σ_r λ_r Σ(G_r/M_r − A_r/M'_r)²/(4N²M_r²) (gram_norm M, Gatys's reduction) in numpy
    from the network's activations, each region with its own style, the second under a style mask."""
    cfg = _cfg(synthetic_weights_file, "loss.gram_norm=M", "model.conv=direct",
               _regions({"mask": masks["left"], "weight": 0.5},
                        {"mask": masks["right"], "style": EXAMPLES / "the_scream.jpg", "style_mask": masks["left"],
                         "weight": 2.0}))
    terms, _, group, problem = _loss_of(cfg)
    model = group.model
    inputs = build.validate(parse(cfg))
    acts = model.apply({"params": group.params}, problem.pixels[None], STYLE_LAYERS)
    weights = np.asarray(problem.hp.style_layer_weights, np.float64)
    want = 0.0
    for w_l, name in zip(weights, STYLE_LAYERS):
        f = np.asarray(acts[name][0], np.float64)
        n = f.shape[-1]
        for region, lam in zip(inputs.regions, (0.5, 2.0)):
            t = region.guides[name].astype(np.float64)
            s_acts = np.asarray(model.apply({"params": group.params}, jnp.asarray(region.style)[None], [name])[name][0],
                                np.float64)
            ts = region.style_guides[name].astype(np.float64)
            m, ms = (t ** 2).sum(), (ts ** 2).sum()
            g = np.einsum("hwi,hw,hwj->ij", f, t ** 2, f) / m
            a = np.einsum("hwi,hw,hwj->ij", s_acts, ts ** 2, s_acts) / ms
            want += w_l * lam * ((g - a) ** 2).sum() / (4.0 * n ** 2 * m ** 2)
    beta = float(cfg.loss.beta)
    np.testing.assert_allclose(float(terms.style), beta * want, rtol=1e-4)


@pytest.mark.slow
def test_banded_remat_gives_the_regions_loss_and_gradient(synthetic_weights_file, masks):
    """The guides cut into bands as the features: the same loss and gradient as the whole pass."""
    region = _regions({"mask": masks["left"]}, {"mask": masks["right"], "style": EXAMPLES / "the_scream.jpg"})
    whole, whole_grad, *_ = _loss_of(_cfg(synthetic_weights_file, region, "model.conv=direct"))
    cfg = _cfg(synthetic_weights_file, region, "model.conv=direct", "model.remat=on")
    group = build.build_group([parse(cfg)])
    group = dataclasses.replace(group, model=group.model.clone(band_elements=64 * 12 * 4))  # several bands a block
    problem = jax.tree.map(lambda a: a[0], group.problems)
    objective = group.loop.objective

    def total(x):
        return objective(x, group.params, problem.targets, problem.hp, problem.key).total

    banded = objective(problem.pixels, group.params, problem.targets, problem.hp, problem.key)
    np.testing.assert_allclose(banded.style, whole.style, rtol=1e-5)
    grad = jax.grad(total)(problem.pixels)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-4, atol=1e-5 * float(jnp.abs(whole_grad).max()))


def test_bad_masks_and_weights_are_refused_naming_the_key(synthetic_weights_file, masks):
    def refused(*extra):
        with pytest.raises(UserError) as info:
            build.validate(parse(_cfg(synthetic_weights_file, *extra)))
        return str(info.value)

    assert refused(_regions({"mask": masks["bad"]})).startswith("regions[0].mask: ")
    assert "no white pixel" in refused(_regions({"mask": masks["white"]}, {"mask": masks["black"]}))
    assert refused(_regions({"mask": masks["white"], "weight": -1})).startswith("regions[0].weight = -1.0")
    assert refused(_regions({"mask": masks["white"], "style_mask": masks["black"]})).startswith(
        "regions[0].style_mask: ")
    nothing = refused("mask_propagation=inside", "loss.style_layers=[relu1_1,relu4_1]",
                      _regions({"mask": masks["white"]}, {"mask": masks["left"]}))
    assert nothing.startswith("regions[1].mask covers nothing at relu4_1 with mask_propagation=inside")
    assert "loss.style_loss=gram" in refused("loss.style_loss=mean_std", _regions({"mask": masks["white"]}))


@pytest.mark.slow
def test_two_regions_through_the_cli_and_a_sweep_over_their_weights(tmp_path, synthetic_weights_file,
                                                                      nstjax_cache, masks):
    """Two regions, each its own style: one run, then a sweep over the second region's weight
    (members of one group) whose members equal the solo run; a bad mask exits 2 with one line."""
    two = [{"mask": masks["left"]}, {"mask": masks["right"], "style": EXAMPLES / "the_scream.jpg", "weight": 3}]
    # Adam: torch's L-BFGS rule amplifies float32 reduction order from step to step (as in test_pyramid)
    args = [a for a in small_run_args(synthetic_weights_file, tmp_path / "solo", "image.size=48", "model.conv=direct",
                                      "optim=adam", "optim.lr=0.05") if a != "optim.linesearch=none"]
    solo = run_cli([*args, _regions(*two)], nstjax_cache)
    assert solo.returncode == 0, solo.stderr[-3000:]
    assert (tmp_path / "solo" / "result.png").is_file()
    sweep_dir = tmp_path / "multirun"
    other = [two[0], {**two[1], "weight": 1}]
    sweep = run_cli(["-m", *[a for a in args if not a.startswith("hydra.run")],
                     _regions(*two) + "," + _regions(*other)[len("regions="):], f"hydra.sweep.dir={sweep_dir}"],
                    nstjax_cache)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "2 points in 1 group(s) of 2 member(s)" in sweep.stderr
    rows = [(sweep_dir / str(n) / "history.csv").read_text().splitlines() for n in range(2)]
    solo_rows = (tmp_path / "solo" / "history.csv").read_text().splitlines()
    got, want = np.loadtxt(rows[0][1:], delimiter=","), np.loadtxt(solo_rows[1:], delimiter=",")
    # float32 reduction order (a member of two against a run alone): each term within 1e-5 of the row's total
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    assert (np.abs(got[:, 1:5] - want[:, 1:5]).max(axis=1) <= 1e-5 * want[:, 1]).all(), (got, want)
    assert rows[0][1] != rows[1][1]  # another weight, another style loss at step 0
    assert json.loads((sweep_dir / "1" / "metrics.json").read_text())["members"] == 2
    bad = run_cli([*small_run_args(synthetic_weights_file, tmp_path / "bad"), _regions({"mask": masks["black"]})],
                  nstjax_cache)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: regions[0].mask"), bad.stderr
    assert not (tmp_path / "bad").exists()
