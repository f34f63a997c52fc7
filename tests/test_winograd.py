"""Winograd F(4×4, 3×3) convolutions against XLA's direct convolution, and inside VGG19."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax import vgg, winograd
from nstjax.vgg import CAFFE, LAYER_NAMES, VGG, prepare_params


def direct(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape", [(1, 8, 8, 4), (2, 13, 18, 5), (1, 1, 7, 3), (1, 5, 1, 2), (1, 21, 30, 64)])
@pytest.mark.parametrize("prepared", [False, True])
def test_convolution_and_input_gradient_match_direct(shape, prepared):
    """Odd sizes (tiles cut by the border), a single row/column, several images and channels; to
    float32 Winograd's accuracy (rounding in the tile transforms: up to ~1e-4 of the largest output)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 7)), jnp.float32)
    transformed = winograd.prepare(kernel) if prepared else None
    weights = jnp.asarray(rng.standard_normal(shape[:-1] + (7,)), jnp.float32)

    def loss(conv):
        return lambda x: jnp.sum(jnp.sin(conv(x)) * weights)

    want_grad = jax.grad(loss(lambda x: direct(x, kernel)))(x)
    got_grad = jax.jit(jax.grad(loss(lambda x: winograd.conv3x3(x, kernel, transformed))))(x)
    y, y_direct = winograd.conv3x3(x, kernel, transformed), direct(x, kernel)
    assert y.shape == y_direct.shape
    np.testing.assert_allclose(y, y_direct, atol=1e-4 * float(jnp.abs(y_direct).max()))
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4 * float(jnp.abs(want_grad).max()))


def test_kernel_gradient_is_the_direct_convolutions():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 9, 11, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    want = jax.jit(jax.grad(lambda k: jnp.sum(direct(x, k) ** 2)))(kernel)
    got = jax.jit(jax.grad(lambda k: jnp.sum(winograd.conv3x3(x, k) ** 2)))(kernel)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_transformed_kernels_reproduce_a_single_tap():
    """G g Gᵀ then the output transform of a one-hot input recovers the kernel tap by tap."""
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 2, 0, 0].set(1.0)
    x = jnp.zeros((1, 8, 8, 1)).at[0, 3, 3, 0].set(1.0)
    y = winograd.conv3x3(x, kernel)
    # correlation: y[i, j] = x[i - 1 + 0, j - 1 + 2] → the one at (3, 3) lands at (4, 2)
    want = np.zeros((1, 8, 8, 1), np.float32)
    want[0, 4, 2, 0] = 1.0
    np.testing.assert_allclose(y, want, atol=1e-6)


@pytest.fixture(scope="module")
def params():
    import weights_fixtures as wf

    return jax.tree.map(jnp.asarray, wf.synthetic_params(0))


@pytest.mark.parametrize("remat, prepared", [(False, False), (True, True)])
@pytest.mark.slow
def test_vgg_with_winograd_matches_direct_layer_by_layer(params, remat, prepared):
    """conv='winograd' (kernels transformed in the model or beforehand; banded remat or not)
    gives every activation of the direct model to float32 Winograd's accuracy."""
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (2, 37, 53, 3)), jnp.float32)
    want = jax.jit(lambda x: VGG(CAFFE, "max").apply({"params": params}, x, LAYER_NAMES))(x)
    model = VGG(CAFFE, "max", conv="winograd", remat=remat, band_elements=64 * 40 * 4)
    p = prepare_params(params, "winograd") if prepared else params
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, LAYER_NAMES))(p, x)
    for name in LAYER_NAMES:
        scale = float(jnp.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], atol=3e-5 * scale, err_msg=name)


def test_prepare_params_transforms_only_the_winograd_convolutions_a_run_needs(params):
    prepared = prepare_params(params, "winograd", ["relu1_1", "relu4_1"])
    transformed = [name for name, p in prepared.items() if "winograd" in p]
    assert transformed == ["conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4", "conv4_1"]
    assert prepared["conv4_1"]["winograd"].shape == (36, 256, 512)
    assert prepare_params(params, "direct") == params


def test_default_conv_is_winograd_on_cpu_in_float32_only():
    assert vgg.default_conv("float32", "cpu") == "winograd"
    assert vgg.default_conv("bfloat16", "cpu") == "direct"
    assert vgg.default_conv("float32", "gpu") == "xla"  # cuDNN chooses its algorithms
    # small images: Winograd's compile time would outweigh what it saves
    assert vgg.default_conv("float32", "cpu", vgg.WINOGRAD_MIN_PIXELS - 1) == "direct"
    assert vgg.default_conv("float32", "cpu", vgg.WINOGRAD_MIN_PIXELS) == "winograd"
    assert vgg.default_conv("float32", "gpu", 64 * 64) == "xla"


def test_winograd_needs_float32(params):
    with pytest.raises(ValueError, match="precision='float32'"):
        VGG(precision="bfloat16", conv="winograd").apply({"params": params}, jnp.zeros((1, 8, 8, 3)), ["relu1_1"])


def test_prepared_kernels_are_device_arrays_where_the_kernels_are(params):
    """(numpy leaves would be copied to the device at every call of a compiled program)"""
    prepared = prepare_params(params, "winograd", ["relu3_1"])
    assert all(isinstance(prepared["conv3_1"][k], jax.Array) for k in vgg.WINOGRAD_PARAMS)
