"""The Flax VGG networks against an independent PyTorch reference, layer by layer, and their contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import weights_fixtures as wf
from nstjax.vgg import ARCHITECTURES, CAFFE, LAYER_NAMES, TORCHVISION, VGG, UnknownLayerError, gram_matrix


@pytest.fixture(scope="module")
def params():
    return wf.synthetic_params(0)


def torch_reference(params, rgb: np.ndarray, preprocessing, pooling: str, ceil: bool = False) -> dict:
    """VGG19 in float64 PyTorch (NCHW, OIHW), every named activation as NHWC numpy."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rgb.astype(np.float64)).permute(0, 3, 1, 2)
    if preprocessing.channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float64).view(1, 3, 1, 1)
    x = (x * preprocessing.scale - mean) / std
    pool = F.max_pool2d if pooling == "max" else F.avg_pool2d
    out = {}
    for block, n in enumerate((2, 2, 4, 4, 4), 1):
        for i in range(1, n + 1):
            p = params[f"conv{block}_{i}"]
            weight = torch.from_numpy(p["kernel"].transpose(3, 2, 0, 1).astype(np.float64))
            x = F.conv2d(x, weight, torch.from_numpy(p["bias"].astype(np.float64)), padding=1)
            out[f"conv{block}_{i}"] = x
            x = F.relu(x)
            out[f"relu{block}_{i}"] = x
        x = pool(x, 2, 2, ceil_mode=ceil)
        out[f"pool{block}"] = x
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_layer_table_is_torchvisions_module_structure(arch):
    """Each network's convolutions, in order, have the shapes of torchvision's ``features``; a
    pooling follows each block, and the layer names count the convolutions within each block."""
    import torch.nn as nn

    features, table = wf.torch_features(arch), ARCHITECTURES[arch]
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    shapes = table.conv_shapes()
    assert len(convs) == len(table.conv_layers) == len(shapes)
    for conv, name in zip(convs, table.conv_layers):
        o, i, h, w = conv.weight.shape
        assert shapes[name] == ((h, w, i, o), (o,)), name
    blocks, run = [], 0
    for m in features:
        run += isinstance(m, nn.Conv2d)
        if isinstance(m, nn.MaxPool2d):
            blocks, run = blocks + [run], 0
    assert tuple(blocks) == table.block_sizes
    assert [n for n in table.layer_names if n.startswith("pool")] == [f"pool{b}" for b in range(1, 6)]


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["vgg11", "vgg13", "vgg16"])
def test_shallower_networks_match_torch_layer_by_layer(arch):
    """VGG11/13/16 with synthetic weights against torchvision's ``features`` (float64) loaded
    with the same weights in its own layout: every ReLU and pooling output."""
    import torch

    params = wf.synthetic_params(1, arch)
    features = wf.load_torch_features(wf.torch_features(arch), params)
    rgb = np.random.default_rng(2).uniform(0, 1, (1, 40, 56, 3)).astype(np.float32)
    x = torch.from_numpy(TORCHVISION(rgb).__array__().astype(np.float64)).permute(0, 3, 1, 2)
    want = []
    with torch.no_grad():
        for m in features:
            x = m(x)
            if not isinstance(m, torch.nn.Conv2d):
                want.append(x.permute(0, 2, 3, 1).numpy())
    names = [n for n in ARCHITECTURES[arch].layer_names if not n.startswith("conv")]
    got = VGG(TORCHVISION, "max", arch=arch).apply({"params": params}, jnp.asarray(rgb), names)
    assert len(want) == len(names)
    for name, w in zip(names, want):
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=name)
    with pytest.raises(UnknownLayerError, match=f"unknown {arch.upper()} layer 'relu5_4'"):
        VGG(arch=arch).apply({"params": params}, jnp.zeros((1, 32, 32, 3)), ["relu5_4"])


@pytest.mark.parametrize("preprocessing, pooling, size, ceil", [
    (CAFFE, "max", (40, 56), False), (CAFFE, "avg", (37, 53), False),
    (TORCHVISION, "max", (37, 53), False), (TORCHVISION, "avg", (40, 56), False),
    (CAFFE, "max", (37, 53), True), (CAFFE, "avg", (37, 53), True),
], ids=["caffe-max-even", "caffe-avg-odd", "torchvision-max-odd", "torchvision-avg-even", "caffe-max-odd-ceil",
        "caffe-avg-odd-ceil"])
@pytest.mark.torch
def test_matches_torch_reference_layer_by_layer(params, preprocessing, pooling, size, ceil):
    """Every activation, both conventions, both poolings, even and odd sizes, floor mode and
    ceil mode (torch's ``ceil_mode=True``: Caffe's)."""
    rgb = np.random.default_rng(1).uniform(0, 1, (2, *size, 3)).astype(np.float32)
    model = VGG(preprocessing, pooling, ceil_mode=ceil)
    got = model.apply({"params": params}, jnp.asarray(rgb), LAYER_NAMES)
    want = torch_reference(params, rgb, preprocessing, pooling, ceil)
    assert list(got) == list(LAYER_NAMES)
    for name in LAYER_NAMES:
        assert got[name].shape == want[name].shape, name
        scale = np.abs(want[name]).max()
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=name)


def test_pooling_floors_odd_sizes_or_ceils_them_in_ceil_mode(params):
    layers = ["pool1", "pool2", "relu3_1", "pool5"]
    for ceil, want in ((False, [(18, 26), (9, 13), (9, 13), (1, 1)]), (True, [(19, 27), (10, 14), (10, 14), (2, 2)])):
        model = VGG(ceil_mode=ceil)
        out = model.apply({"params": params}, jnp.zeros((1, 37, 53, 3)), layers)
        assert [out[name].shape[1:3] for name in layers] == want
        assert [model.layer_shape(name, 37, 53)[:2] for name in layers] == want


def test_unknown_layer_lists_valid_names(params):
    with pytest.raises(UnknownLayerError) as e:
        VGG().apply({"params": params}, jnp.zeros((1, 16, 16, 3)), ["relu1_1", "relu6_1"])
    message = str(e.value)
    assert "'relu6_1'" in message and "valid names" in message
    assert all(name in message for name in ("conv1_1", "relu5_4", "pool5"))


def test_returns_only_the_requested_layers_in_order(params):
    layers = ["relu4_1", "conv1_1", "pool2"]
    out = VGG().apply({"params": params}, jnp.zeros((1, 32, 32, 3)), layers)
    assert list(out) == layers
    assert out["conv1_1"].shape == (1, 32, 32, 64)
    assert out["pool2"].shape == (1, 8, 8, 128)
    assert out["relu4_1"].shape == (1, 4, 4, 512)


def _convolutions(params, layers, remat=False) -> list[int]:
    """Output channels of each convolution in the traced program."""
    jaxpr = jax.make_jaxpr(lambda p, x: VGG(remat=remat).apply({"params": p}, x, layers))(
        params, jnp.zeros((1, 32, 32, 3)))
    channels = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                channels.append(eqn.outvars[0].aval.shape[-1])
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(item, "jaxpr", item)  # a ClosedJaxpr or a Jaxpr
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return channels


@pytest.mark.parametrize("remat", [False, True])
def test_nothing_computed_past_the_deepest_layer(params, remat):
    assert _convolutions(params, ["relu1_1"], remat) == [64]
    assert _convolutions(params, ["pool1"], remat) == [64, 64]
    assert _convolutions(params, ["conv1_2", "relu3_1"], remat) == [64, 64, 128, 128, 256]
    assert len(_convolutions(params, ["relu5_4"], remat)) == 16


@pytest.mark.parametrize("pooling, ceil, shape", [
    ("max", False, (1, 24, 40, 3)), ("avg", False, (1, 24, 40, 3)), ("max", False, (2, 37, 29, 3)),
    ("avg", False, (2, 37, 29, 3)), ("max", True, (2, 37, 29, 3)), ("avg", True, (1, 37, 29, 3))])
@pytest.mark.slow
def test_banded_remat_gives_the_same_activations_grams_and_gradients(params, pooling, ceil, shape):
    """Remat in bands of a few rows (several bands per block, odd sizes, floor and ceil mode)
    changes nothing but the summation order: activations, Gram matrices and the input gradient
    agree with the plain pass."""
    layers, grams = ["conv1_1", "relu1_2", "pool2", "relu4_2"], ["relu1_1", "conv2_2", "pool3", "relu5_1"]
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, shape), jnp.float32)

    def run(remat):
        model = VGG(pooling=pooling, remat=remat, ceil_mode=ceil, band_elements=64 * 40 * 4)

        def loss(x):
            out = model.apply({"params": params}, x, layers, grams, method=VGG.features)
            # each term scaled to about 1 (the random weights make deep activations large)
            return sum(jnp.mean(v) / jax.lax.stop_gradient(jnp.abs(v).max())
                       for v in jax.tree.leaves(out)), out

        (value, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        return value, out, grad

    plain, remat = run(False), run(True)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    scale = float(jnp.abs(plain[2]).max())
    assert scale > 0
    np.testing.assert_allclose(remat[2], plain[2], rtol=1e-4, atol=1e-5 * scale)


def test_banded_remat_uses_several_bands_when_asked(params):
    jaxpr = jax.make_jaxpr(lambda p, x: VGG(remat=True, band_elements=64 * 32 * 4).apply(
        {"params": p}, x, ["relu1_1"]))(params, jnp.zeros((1, 32, 32, 3)))
    lengths = [eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert lengths == [8]


def test_features_grams_are_gram_matrices_of_the_activations(params):
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (2, 20, 28, 3)), jnp.float32)
    out = VGG().apply({"params": params}, x, ["relu2_1"], ["relu1_1", "relu2_1"], method=VGG.features)
    acts = VGG().apply({"params": params}, x, ["relu1_1", "relu2_1"])
    for name in ("relu1_1", "relu2_1"):
        f = np.asarray(acts[name], np.float64).reshape(2, -1, acts[name].shape[-1])
        np.testing.assert_allclose(out.grams[name], np.einsum("nmi,nmj->nij", f, f), rtol=1e-5)
    np.testing.assert_array_equal(out.acts["relu2_1"], acts["relu2_1"])


def test_gram_matrix_gradient_is_f_times_dg_plus_its_transpose():
    """gram_matrix's gradient against the formula F (dG + dGᵀ) in float64 numpy."""
    rng = np.random.default_rng(4)
    f = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 6, 6)), jnp.float32)  # not symmetric
    got = jax.jit(jax.grad(lambda f: jnp.sum(gram_matrix(f) * w)))(f)
    f64, w64 = np.asarray(f, np.float64).reshape(2, 35, 6), np.asarray(w, np.float64)
    want = np.einsum("nmj,nji->nmi", f64, w64 + np.swapaxes(w64, 1, 2)).reshape(f.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_synthetic_params_have_the_module_structure(params):
    abstract = jax.eval_shape(lambda key, x: VGG().init(key, x, ["relu1_1"]),
                              jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract["params"])
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert got == want


@pytest.mark.slow
def test_gradients_match_plain_autodiff(params):
    """The convolutions' custom backward (conv='direct') gives autodiff's gradients (conv='xla'),
    for pixels and kernels."""
    rgb = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (1, 20, 24, 3)), jnp.float32)
    small = {k: v for k, v in params.items() if k in ("conv1_1", "conv1_2", "conv2_1")}
    weights = jnp.asarray(np.random.default_rng(6).standard_normal((1, 10, 12, 128)), jnp.float32)

    def loss(conv):
        def f(x, p):
            out = VGG(CAFFE, "max", conv=conv).apply({"params": {**params, **p}}, x, ["relu2_1"])
            return jnp.sum(out["relu2_1"] * weights)
        return f

    got_x, got_p = jax.grad(loss("direct"), argnums=(0, 1))(rgb, small)
    want_x, want_p = jax.grad(loss("xla"), argnums=(0, 1))(rgb, small)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-4, atol=1e-6 * float(jnp.abs(want_x).max()))
    for name in small:
        for part in ("kernel", "bias"):
            np.testing.assert_allclose(got_p[name][part], want_p[name][part], rtol=1e-4,
                                       atol=1e-6 * float(jnp.abs(want_p[name][part]).max()))


@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.torch
def test_pool_gradient_matches_torch_with_ties_and_odd_sizes(kind, ceil):
    """The gradient of 2×2 max pooling goes to the first maximum of each window, as torch's; in
    ceil mode the edge windows' too, and average pooling divides by the values a window holds."""
    import torch
    import torch.nn.functional as F

    from nstjax import vgg

    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, (2, 9, 7, 5)).astype(np.float32)  # many ties
    dy = rng.standard_normal((2, 5, 4, 5) if ceil else (2, 4, 3, 5)).astype(np.float32)
    got = jax.jit(jax.grad(lambda x: jnp.sum(vgg.pool(x, kind, ceil) * dy)))(jnp.asarray(x))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    (pool(xt, 2, 2, ceil_mode=ceil) * torch.from_numpy(dy).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_array_equal(got, xt.grad.permute(0, 2, 3, 1).numpy())


def test_xlas_convolution_equals_the_direct_one_with_its_own_gradient(params):
    """model.conv=xla (XLA's convolution and autodiff, the GPU default) against direct (the custom
    input gradient): activations and d(Σ relu3_1)/d pixels to float32's accuracy; auto picks xla off
    the CPU, Winograd on it in float32 and direct in bfloat16."""
    from nstjax.vgg import default_conv

    rgb = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (1, 24, 32, 3)).astype(np.float32))

    def run(conv):
        def f(x):
            return jnp.sum(VGG(CAFFE, "max", conv=conv).apply({"params": params}, x, ["relu3_1"])["relu3_1"])
        return jax.jit(jax.value_and_grad(f))(rgb)

    (va, ga), (vb, gb) = run("xla"), run("direct")
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=0, atol=1e-5 * np.abs(np.asarray(gb)).max())
    assert [default_conv(p, b) for p, b in (("float32", "gpu"), ("bfloat16", "tpu"), ("float32", "cpu"),
                                             ("bfloat16", "cpu"))] == ["xla", "xla", "winograd", "direct"]
