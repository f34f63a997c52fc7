"""Checks of tests/neural_style_reference.py (the port of neural_style.lua's feval) against independent things.

A tiny network: He-scaled random float64 weights in VGG-19's real shapes, only
conv1_1 … conv3_1; odd image sizes, so that the ceil-mode max pooling matters
(21 -> 11 -> 6). The independent side here is written with plain torch autograd
(F.conv2d, F.relu, F.max_pool2d(ceil_mode=True)) and its own preprocessing; it
shares no code with the reference.
"""

import numpy as np
import pytest


class _Reference:
    """tests/neural_style_reference.py, imported when first used: it needs torch, and this module
    is collected without it too (pytest -m "not torch")."""

    def __getattr__(self, name):
        import neural_style_reference

        return getattr(neural_style_reference, name)


ref = _Reference()

CHANNELS = {1: 64, 2: 128, 3: 256}
LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")
CONTENT_LAYERS = ("relu2_1", "relu3_1")
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1")
MEAN_BGR = np.array([103.939, 116.779, 123.68])


def _params(seed=0):
    rng = np.random.default_rng(seed)
    params, c_in = {}, 3
    for name in LAYERS:
        c_out = CHANNELS[int(name[4])]
        params[name] = {"kernel": rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in)),
                        "bias": rng.standard_normal(c_out) * 0.01}
        c_in = c_out
    return params


def _images(seed=1):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (21, 23, 3))
    content = rng.uniform(0, 1, (21, 23, 3))
    styles = [rng.uniform(0, 1, (19, 17, 3)), rng.uniform(0, 1, (24, 20, 3))]
    return image, content, styles


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _caffe(rgb):
    """Independent preprocessing of a torch (H, W, 3) RGB tensor: BGR, ×256, minus the mean."""
    import torch

    bgr = rgb.flip(-1).permute(2, 0, 1) * 256.0
    return bgr - torch.tensor(MEAN_BGR, dtype=torch.float64).view(3, 1, 1)


def _features(params, x):
    """{relu1_1: …, relu2_1: …, relu3_1: …} of a (3, H, W) Caffe-space tensor, plain autograd."""
    import torch
    import torch.nn.functional as F

    def conv(h, name):
        w = torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy())
        return F.conv2d(h, w, torch.from_numpy(params[name]["bias"]), padding=1)

    h = x[None]
    acts = {}
    h = F.relu(conv(h, "conv1_1")); acts["relu1_1"] = h[0]
    h = F.relu(conv(h, "conv1_2"))
    h = F.max_pool2d(h, 2, 2, ceil_mode=True)
    h = F.relu(conv(h, "conv2_1")); acts["relu2_1"] = h[0]
    h = F.relu(conv(h, "conv2_2"))
    h = F.max_pool2d(h, 2, 2, ceil_mode=True)
    h = F.relu(conv(h, "conv3_1")); acts["relu3_1"] = h[0]
    return acts


def _gram(f):
    flat = f.reshape(f.shape[0], -1)
    return flat @ flat.T / f.numel()


def _terms(params, image_rgb, content, styles, blend, cw, sw):
    """Per-layer (content terms, style terms, image features) of an RGB torch image."""
    return _terms_at_caffe(params, _caffe(image_rgb), content, styles, blend, cw, sw)


def _tv(x, weight):
    """weight · ½Σ over the (H−1)×(W−1) block of the two squared differences, Caffe space."""
    d = x[:, :-1, :-1]
    return weight * 0.5 * (((d - x[:, :-1, 1:]) ** 2).sum() + ((d - x[:, 1:, :-1]) ** 2).sum())


def _run(params, image, content, styles, blend, **kw):
    kw.setdefault("content_layers", CONTENT_LAYERS)
    kw.setdefault("style_layers", STYLE_LAYERS)
    return ref.neural_style_eval(params, image, content, styles, blend, **kw)


@pytest.mark.torch
def test_gradient_is_autograd_of_the_summed_loss():
    """(a) normalize_gradients off, no TV: the gradient is that of content + style, the losses equal."""
    import torch

    params, (image, content, styles) = _params(), _images()
    blend = (1.0, 3.0)
    out = _run(params, image, content, styles, blend, content_weight=5.0, style_weight=100.0, tv_weight=0.0)

    x = _caffe(torch.from_numpy(image)).detach().requires_grad_(True)
    c_terms, s_terms, _ = _terms_at_caffe(params, x, content, styles, blend, 5.0, 100.0)
    (g,) = torch.autograd.grad(sum(c_terms) + sum(s_terms), x)
    np.testing.assert_allclose(out["content"], float(sum(c_terms).detach()), rtol=1e-12)
    np.testing.assert_allclose(out["style"], float(sum(s_terms).detach()), rtol=1e-12)
    assert out["grad_caffe"].shape == (3, 21, 23) and out["grad_caffe"].dtype == np.float64
    np.testing.assert_allclose(out["grad_caffe"], g.numpy(), rtol=1e-10, atol=1e-12 * np.abs(g.numpy()).max())
    # equal blend weights by default (None), and the weights are normalised: (2, 6) == (1, 3)
    np.testing.assert_allclose(_run(params, image, content, styles, (2.0, 6.0), tv_weight=0.0)["style"],
                               out["style"], rtol=1e-12)
    equal = _run(params, image, content, styles, None, tv_weight=0.0)
    np.testing.assert_allclose(equal["style"], _run(params, image, content, styles, (7.0, 7.0),
                                                    tv_weight=0.0)["style"], rtol=1e-12)


def _terms_at_caffe(params, x, content, styles, blend, cw, sw):
    """_terms with the image given in Caffe space already."""
    import torch

    content_f = _features(params, _caffe(torch.from_numpy(content)))
    style_f = [_features(params, _caffe(torch.from_numpy(s))) for s in styles]
    w = np.asarray(blend, dtype=np.float64) / np.sum(blend)
    feats = _features(params, x)
    c_terms = [cw * torch.mean((feats[n] - content_f[n]) ** 2) for n in CONTENT_LAYERS]
    s_terms = [sw * torch.mean((_gram(feats[n]) - sum(wi * _gram(sf[n]) for wi, sf in zip(w, style_f))) ** 2)
               for n in STYLE_LAYERS]
    return c_terms, s_terms, feats


@pytest.mark.torch
def test_tv_gradient_is_that_of_half_the_squared_differences():
    """(b) TV adds weight·∇½Σ(x_diff² + y_diff²) on the (H−1)×(W−1) block, no loss, never normalised."""
    import torch

    params, (image, content, styles) = _params(), _images()
    tv = 1e-3
    for normalize in (False, True):
        with_tv = _run(params, image, content, styles, None, tv_weight=tv, normalize_gradients=normalize)
        without = _run(params, image, content, styles, None, tv_weight=0.0, normalize_gradients=normalize)
        assert with_tv["content"] == without["content"] and with_tv["style"] == without["style"]
        x = _caffe(torch.from_numpy(image)).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_tv(x, tv), x)
        np.testing.assert_allclose(with_tv["grad_caffe"] - without["grad_caffe"], g.numpy(),
                                   rtol=1e-7, atol=1e-9 * np.abs(with_tv["grad_caffe"]).max())
    # alone (zero content and style weights): exactly the TV gradient
    alone = _run(params, image, content, styles, None, tv_weight=tv, content_weight=0.0, style_weight=0.0)
    assert alone["content"] == 0.0 and alone["style"] == 0.0
    np.testing.assert_allclose(alone["grad_caffe"], g.numpy(), rtol=1e-12, atol=1e-15)
    # the bottom-right pixel is in no difference of the (H−1)×(W−1) block
    assert np.abs(alone["grad_caffe"][:, -1, -1]).max() == 0.0


@pytest.mark.torch
def test_max_pooling_is_ceil_mode_and_avg_pooling_floor_mode():
    """(c) loadcaffe's max pooling keeps the odd last row/column (ceil); neural_style's avg drops it (floor)."""
    import torch

    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 21, 23)))
    mx, av = ref.pool2x2(x, "max"), ref.pool2x2(x, "avg")
    assert mx.shape == (3, 11, 12) and av.shape == (3, 10, 11)
    # the ceil window at the border is clipped to the image: row 20 alone, column 22 alone
    np.testing.assert_array_equal(mx[:, -1, :-1].numpy(),
                                  np.maximum(x[:, 20, 0:22:2].numpy(), x[:, 20, 1:22:2].numpy()))
    assert mx[:, -1, -1].tolist() == x[:, 20, 22].tolist()
    np.testing.assert_allclose(av.numpy(), x[:, :20, :22].numpy().reshape(3, 10, 2, 11, 2).mean(axis=(2, 4)),
                               rtol=1e-12, atol=1e-15)
    # in the network: the 21×23 image gives 11×12 after pool1 and 6×6 after pool2 (max), 10×11 and 5×5 (avg)
    params = _params()
    for pooling, shapes in (("max", {"pool1": (64, 11, 12), "pool2": (128, 6, 6)}),
                            ("avg", {"pool1": (64, 10, 11), "pool2": (128, 5, 5)})):
        net, _, _ = ref.build_net(params, content_layers=(), style_layers=("relu3_1",), content_weight=1.0,
                                  style_weight=1.0, tv_weight=0.0, pooling=pooling)
        with torch.no_grad():
            net.forward(ref.preprocess(_images()[0]))
        got = {m.name: tuple(m.output.shape) for m in net.modules if m.name in shapes}
        assert got == shapes


@pytest.mark.torch
def test_grad_rgb_is_the_gradient_through_the_preprocessing():
    """(d) grad_rgb: autograd from the RGB [0, 1] image through ×256, BGR and the mean; and finite differences."""
    import torch

    params, (image, content, styles) = _params(), _images()
    blend, tv = (2.0, 1.0), 1e-3
    out = _run(params, image, content, styles, blend, tv_weight=tv)
    rgb = torch.from_numpy(image.copy()).requires_grad_(True)
    c_terms, s_terms, _ = _terms(params, rgb, content, styles, blend, 5.0, 100.0)
    (g,) = torch.autograd.grad(sum(c_terms) + sum(s_terms) + _tv(_caffe(rgb), tv), rgb)
    assert out["grad_rgb"].shape == (21, 23, 3) and out["grad_rgb"].dtype == np.float64
    np.testing.assert_allclose(out["grad_rgb"], g.numpy(), rtol=1e-10, atol=1e-12 * np.abs(g.numpy()).max())

    # central differences of the reference's own loss (no TV: feval's loss leaves TV out)
    plain = _run(params, image, content, styles, blend, tv_weight=0.0)
    scale = np.abs(plain["grad_rgb"]).max()
    h = 1e-6
    for (i, j, c) in ((0, 0, 0), (10, 11, 1), (20, 22, 2), (13, 3, 0)):
        up, down = image.copy(), image.copy()
        up[i, j, c] += h
        down[i, j, c] -= h
        f_up = _run(params, up, content, styles, blend, tv_weight=0.0)
        f_down = _run(params, down, content, styles, blend, tv_weight=0.0)
        fd = ((f_up["content"] + f_up["style"]) - (f_down["content"] + f_down["style"])) / (2 * h)
        assert abs(fd - plain["grad_rgb"][i, j, c]) <= 1e-5 * scale


@pytest.mark.torch
def test_normalize_gradients_divides_each_terms_own_gradient_by_its_l1_norm():
    """Each loss term's gradient w.r.t. its layer, g / (‖g‖₁ + 1e-8) × weight, carried back to the image."""
    import torch

    params, (image, content, styles) = _params(), _images()
    out = _run(params, image, content, styles, None, tv_weight=0.0, normalize_gradients=True)
    plain = _run(params, image, content, styles, None, tv_weight=0.0)
    assert out["content"] == plain["content"] and out["style"] == plain["style"]  # losses unchanged

    x = _caffe(torch.from_numpy(image)).detach().requires_grad_(True)
    c_terms, s_terms, feats = _terms_at_caffe(params, x, content, styles, (1.0, 1.0), 1.0, 1.0)
    total = torch.zeros_like(x)
    for term, name, weight in ([(t, n, 5.0) for t, n in zip(c_terms, CONTENT_LAYERS)]
                               + [(t, n, 100.0) for t, n in zip(s_terms, STYLE_LAYERS)]):
        (gf,) = torch.autograd.grad(term, feats[name], retain_graph=True)
        gf = gf / (gf.abs().sum() + 1e-8) * weight
        (gx,) = torch.autograd.grad(feats[name], x, gf, retain_graph=True)
        total = total + gx
    np.testing.assert_allclose(out["grad_caffe"], total.numpy(), rtol=1e-9,
                               atol=1e-11 * np.abs(total.numpy()).max())
    assert not np.allclose(out["grad_caffe"], plain["grad_caffe"])


@pytest.mark.torch
def test_layers_out_of_network_order_are_refused():
    with pytest.raises(ValueError, match="network order"):
        _run(_params(), *_images()[:2], _images()[2], None, style_layers=("relu2_1", "relu1_1"))


@pytest.mark.torch
def test_loss_on_a_conv_layer_sees_the_in_place_relu_on_the_backward_pass():
    """loadcaffe's nn.ReLU(true) overwrites the conv output a loss module placed there passes on: its loss is
    of the conv output F, its gradient 2/N·(relu(F) − T) (MSECriterion:backward on the rectified tensor)."""
    import torch
    import torch.nn.functional as F

    params, (image, content, styles) = _params(), _images()
    # a later loss layer (weight 0) so that relu1_2 is in the net: the net stops after the last loss module,
    # where no ReLU follows and the gradient is the true one
    last = ref.neural_style_eval(params, image, content, styles, content_layers=("conv1_2",),
                                 style_layers=(), tv_weight=0.0)
    out = ref.neural_style_eval(params, image, content, styles, content_layers=("conv1_2",),
                                style_layers=("relu2_1",), style_weight=0.0, tv_weight=0.0)

    def conv1_2(x):
        h = x[None]
        for name in ("conv1_1", "conv1_2"):
            w = torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy())
            h = F.conv2d(h if name == "conv1_1" else F.relu(h), w, torch.from_numpy(params[name]["bias"]),
                         padding=1)
        return h[0]

    target = conv1_2(_caffe(torch.from_numpy(content)))
    x = _caffe(torch.from_numpy(image)).detach().requires_grad_(True)
    f = conv1_2(x)
    np.testing.assert_allclose(out["content"], float(5.0 * torch.mean((f - target) ** 2).detach()), rtol=1e-12)
    np.testing.assert_allclose(last["content"], out["content"], rtol=1e-12)
    for got, seen in ((out, F.relu(f)), (last, f)):
        (g,) = torch.autograd.grad(f, x, (5.0 * 2.0 / f.numel() * (seen - target)).detach(), retain_graph=True)
        np.testing.assert_allclose(got["grad_caffe"], g.numpy(), rtol=1e-10,
                                   atol=1e-12 * np.abs(g.numpy()).max())
    assert not np.allclose(out["grad_caffe"], last["grad_caffe"])


@pytest.mark.torch
def test_feval_is_a_function_of_the_image_and_float32_its_rounding():
    """neural_style_feval's net, built once, gives at an image what a fresh neural_style_eval does,
    whatever it was called at before; with dtype=float32 (what the Lua computes in) the same to
    float32's accuracy."""
    import torch

    params, (image, content, styles) = _params(), _images()
    layers = {"content_layers": CONTENT_LAYERS, "style_layers": STYLE_LAYERS}
    feval = ref.neural_style_feval(params, content, styles, **layers)
    first = feval(image)
    feval(np.random.default_rng(3).uniform(0, 1, image.shape))
    again, fresh = feval(image), ref.neural_style_eval(params, image, content, styles, **layers)
    for out in (again, fresh):
        assert out["content"] == first["content"] and out["style"] == first["style"]
        np.testing.assert_array_equal(out["grad_rgb"], first["grad_rgb"])
    single = ref.neural_style_feval(params, content, styles, dtype=torch.float32, **layers)(image)
    np.testing.assert_allclose([single["content"], single["style"]], [first["content"], first["style"]], rtol=1e-5)
    assert single["grad_rgb"].dtype == np.float64
    assert np.linalg.norm(single["grad_rgb"] - first["grad_rgb"]) <= 1e-5 * np.linalg.norm(first["grad_rgb"])
