"""Each preset in configs/experiment/ holds the values its comment states (from its source)."""

import pytest
from omegaconf import OmegaConf

from nstjax import config
from nstjax.spec import parse
from nstjax.vgg import CAFFE, TORCHVISION
from nstjax.weights import SOURCES

GATYS_STYLE = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
GATYS_LOSS = {"loss.content_layers": ["relu4_2"], "loss.style_layers": GATYS_STYLE,
              "loss.style_layer_weights": [1 / 5] * 5, "loss.alpha": 1.0, "loss.beta": 1e4,
              "loss.content_reduction": "half_sum", "loss.content_loss": "mse", "loss.style_loss": "gram",
              "loss.gram_norm": "none", "loss.style_reduction": "gatys", "loss.tv_weight": 0.0}

COMMENTS = {
    # Oxford VGG19, average pooling; ½Σ(F−P)² at relu4_2; Σ(G−A)²/(4N²M²), w_l = 1/5; α = 1,
    # β = 10⁴; L-BFGS from the content image (with the zoom line search, 500 steps: the README).
    "gatys2016": {"model.weights": "vgg19", "model.pooling": "avg", **GATYS_LOSS, "init": "content",
                  "optim.name": "lbfgs", "optim.linesearch": "zoom", "optim.steps": 500, "image.size": 512},
    # The Gatys et al. 2016 objective at 256 px, 100 L-BFGS steps without line search, lr 1, memory 100,
    # the safeguard on (max_increase 10).
    "preview": {"model.weights": "vgg19", "model.pooling": "avg", **GATYS_LOSS, "init": "content",
                "image.size": 256, "optim.name": "lbfgs", "optim.steps": 100, "optim.linesearch": "none",
                "optim.lr": 1.0, "optim.memory_size": 100, "optim.max_increase": 10.0},
    # Caffe VGG-19, max pooling in ceil mode, ×256 in Caffe space; content relu4_2, style
    # relu1_1…relu5_1; content_weight 5 and style_weight 100 on every layer; MSE (mean) content;
    # Gram ÷ N·M, MSE (mean); tv_weight 1e-3 on ½Σ(Δx² + Δy²) over the (H−1)×(W−1) block of the
    # ×256 image; randn × 0.001 in Caffe space; no clamping; L-BFGS lr 1, nCorrection 100, no line
    # search, 1000 iterations; image_size 512.
    "neural_style": {"model.weights": "vgg19", "model.pooling": "max", "model.ceil_mode": True,
                     "model.preprocessing.scale": 256.0, "model.preprocessing.channel_order": "BGR",
                     "model.preprocessing.mean": list(CAFFE.mean), "optim.clip": False,
                     "loss.content_layers": ["relu4_2"],
                     "loss.style_layers": GATYS_STYLE, "loss.alpha": 5.0, "loss.beta": 100.0,
                     "loss.content_layer_weights": [1.0], "loss.style_layer_weights": [1.0] * 5,
                     "loss.content_reduction": "mean", "loss.gram_norm": "NM", "loss.style_reduction": "mean",
                     "loss.tv_weight": 1e-3 * 256**2, "loss.tv_norm": "neural_style", "init": "noise",
                     "init_noise_std": 0.001 / 256, "optim.name": "lbfgs", "optim.lr": 1.0,
                     "optim.memory_size": 100, "optim.linesearch": "none", "optim.steps": 1000, "image.size": 512},
    # torchvision's VGG19 (max pooling, ImageNet mean/std); conv2_2 content, conv1_1, conv1_2, conv2_1,
    # conv2_2, conv3_1 style (before the ReLUs); Gram ÷ N·M; F.mse_loss (means); content 1, style 1e6,
    # every layer weight 1; input = content; LBFGS lr 1, history 100, no line search, 300 evaluations; 512.
    "pytorch_tutorial": {"model.weights": "vgg19-torchvision", "model.pooling": "max",
                         "loss.content_layers": ["conv2_2"],
                         "loss.style_layers": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"],
                         "loss.gram_norm": "NM", "loss.content_reduction": "mean", "loss.style_reduction": "mean",
                         "loss.alpha": 1.0, "loss.beta": 1e6, "loss.content_layer_weights": [1.0],
                         "loss.style_layer_weights": [1.0] * 5, "loss.tv_weight": 0.0, "init": "content",
                         "optim.name": "lbfgs", "optim.lr": 1.0, "optim.memory_size": 100,
                         "optim.linesearch": "none", "optim.max_evaluations": 300, "image.size": 512},
    # Keras VGG19 (Caffe weights, BGR, mean pixel), max pooling; relu5_2 content, relu{1..5}_1 style;
    # Gram ÷ M; reduce_mean; style × 1/num_style_layers, content × 1/num_content_layers; content 1e4,
    # style 1e-2; Adam lr 0.02, β₁ 0.99, ε 0.1 beside √v; 10 epochs × 100 steps; image = content; 512;
    # its TV section is loss.tv_weight=30 with the abs norm (off by default).
    "tf_tutorial": {"model.weights": "vgg19", "model.pooling": "max", "loss.content_layers": ["relu5_2"],
                    "loss.style_layers": GATYS_STYLE, "loss.gram_norm": "M", "loss.content_reduction": "mean",
                    "loss.style_reduction": "mean", "loss.style_layer_weights": [1 / 5] * 5,
                    "loss.content_layer_weights": [1.0], "loss.alpha": 1e4, "loss.beta": 1e-2,
                    "loss.tv_weight": 0.0, "loss.tv_norm": "abs", "optim.name": "adam", "optim.lr": 0.02,
                    "optim.b1": 0.99, "optim.eps": 0.1, "optim.epsilon_hat": True, "optim.steps": 10 * 100,
                    "init": "content", "image.size": 512},
}


def _plain(value):
    value = getattr(value, "value", value)
    return list(value) if OmegaConf.is_list(value) else value


def _effective(cfg, key):
    """The value a key has in the run: layer weights left null are 1/L each (the schema's rule)."""
    value = _plain(OmegaConf.select(cfg, key, throw_on_missing=True))
    if value is None and key.endswith("_layer_weights"):
        layers = OmegaConf.select(cfg, key.replace("_weights", "s"))
        return [1 / len(layers)] * len(layers)
    return value


@pytest.mark.parametrize("preset", COMMENTS)
def test_preset_holds_what_its_comment_states(preset):
    cfg = config.compose([f"+experiment={preset}"])
    for key, want in COMMENTS[preset].items():
        got = _effective(cfg, key)
        numbers = isinstance(want, float) or (isinstance(want, list) and isinstance(want[0], float))
        assert got == (pytest.approx(want, rel=1e-12) if numbers else want), (key, got)


def test_preset_weights_carry_the_preprocessing_their_comments_name():
    assert SOURCES["vgg19"].preprocessing == CAFFE  # BGR, 0–255, the mean pixel (Caffe, Keras)
    assert SOURCES["vgg19-torchvision"].preprocessing == TORCHVISION  # ImageNet mean and std


@pytest.mark.parametrize("normalize_gradients", [False, True])
@pytest.mark.torch
@pytest.mark.slow
def test_neural_style_step_0_equals_neural_style_lua(synthetic_weights_file, normalize_gradients):
    """The preset's loss terms and gradient at step 0 against a float64 port of neural_style.lua's
    feval (tests/neural_style_reference.py): ×256 Caffe input, ceil-mode max pooling at odd sizes
    (45×34 px: 23×17, 12×9, ... at the pools), MSE content and Gram losses, its TVLoss gradient,
    and with -normalize_gradients each term's gradient ÷ its L1 norm. At a seeded uniform image
    (init=uniform): the preset's own init (the mean pixel + noise of std 0.001/256) is so nearly
    constant that its max-pool windows tie to float32 rounding, and neural-style's -init image has
    a zero content loss whose normalised gradient is 0/0, so float32 and float64 route them apart."""
    import jax
    import numpy as np

    import neural_style_reference
    import weights_fixtures
    from cli import EXAMPLES
    from nstjax.build import build_group

    cfg = config.compose(["+experiment=neural_style", f"model.weights={synthetic_weights_file}",
                          f"content={EXAMPLES / 'tubingen.jpg'}", f"style={EXAMPLES / 'starry_night.jpg'}",
                          "image.size=45", "model.conv=direct", f"loss.normalize_gradients={normalize_gradients}",
                          "init=uniform"])
    group = build_group([parse(cfg)])
    problem = jax.tree.map(lambda a: a[0], group.problems)
    objective = group.loop.objective
    terms = objective(problem.pixels, group.params, problem.targets, problem.hp, problem.key)
    grad = jax.grad(lambda x: objective(x, group.params, problem.targets, problem.hp, problem.key).total)(
        problem.pixels)
    member = group.members[0]
    assert member.content.shape[:2] == (34, 45)
    want = neural_style_reference.neural_style_eval(
        weights_fixtures.synthetic_params(0), np.asarray(problem.pixels, np.float64), member.content,
        member.styles, normalize_gradients=normalize_gradients)
    np.testing.assert_allclose(float(terms.content), want["content"], rtol=1e-5)
    np.testing.assert_allclose(float(terms.style), want["style"], rtol=1e-5)
    got = np.asarray(grad, np.float64)
    assert np.linalg.norm(got - want["grad_rgb"]) <= 1e-5 * np.linalg.norm(want["grad_rgb"])
    np.testing.assert_allclose(got, want["grad_rgb"], rtol=1e-3, atol=1e-5 * np.abs(want["grad_rgb"]).max())
