"""The optax loop: descent, history, evaluation counts, divergence, vmap, chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nstjax.losses import HParams, LossSpec, compute_targets, make_objective
from nstjax.optimize import (NONFINITE_LOSS, NONFINITE_PIXELS, RUNNING, Loop, OptimSpec,
                             scale_by_adam_epsilon_hat)
from nstjax.vgg import CAFFE, VGG19

SPEC = LossSpec(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
MODEL = VGG19(CAFFE, "avg")
OBJECTIVE = make_objective(MODEL, SPEC)
NO_LIMIT = jnp.int32(2**31 - 1)
LOOPS = {  # shared compiled loops: one compile per optimiser for the module
    "adam": Loop(OBJECTIVE, OptimSpec("adam"), chunk_steps=4),
    "lbfgs-none": Loop(OBJECTIVE, OptimSpec("lbfgs", linesearch="none"), chunk_steps=4),
    "lbfgs-zoom": Loop(OBJECTIVE, OptimSpec("lbfgs", linesearch="zoom"), chunk_steps=4),
}
LR = {"adam": 0.05, "lbfgs-none": 1.0, "lbfgs-zoom": 1.0}


@pytest.fixture(scope="module")
def problem(synthetic_params):
    rng = np.random.default_rng(3)
    content = jnp.asarray(rng.random((32, 32, 3)), jnp.float32)
    style = jnp.asarray(rng.random((32, 32, 3)), jnp.float32)
    targets = compute_targets(MODEL, synthetic_params, content, style, SPEC)
    return content, synthetic_params, targets


def run(name, problem, steps, hp=None, lr=None):
    x0, params, targets = problem
    loop = LOOPS[name]
    hp = hp or HParams.create(SPEC, beta=1e4)
    lr = jnp.float32(LR[name] if lr is None else lr)
    state = loop.init(x0, params, targets, hp, lr)
    rows = []
    while int(state.step) < steps and int(state.status) == RUNNING:
        state, r, valid = loop.chunk(state, params, targets, hp, lr,
                                     jnp.int32(min(4, steps - int(state.step))), NO_LIMIT)
        rows += [row for row, v in zip(np.asarray(r), np.asarray(valid)) if v]
    return state, np.array(rows)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loop_lowers_the_loss_and_keeps_pixels_valid(name, problem):
    x0, params, targets = problem
    hp = HParams.create(SPEC, beta=1e4)
    start = float(OBJECTIVE(x0, params, targets, hp).total)
    state, rows = run(name, problem, 8)
    assert int(state.step) == 8 and int(state.status) == RUNNING
    assert rows[:, 0].tolist() == list(range(1, 9))
    assert rows[-1, 1] < 0.7 * start
    px = np.asarray(state.pixels)
    assert px.min() >= 0.0 and px.max() <= 1.0
    # The row's loss is the objective at the state's pixels.
    np.testing.assert_allclose(rows[-1, 1], OBJECTIVE(state.pixels, params, targets, hp).total,
                               rtol=1e-5)


def test_evaluations_are_counted_apart_from_steps(problem):
    adam, _ = run("adam", problem, 4)
    plain, _ = run("lbfgs-none", problem, 4)
    zoom, rows = run("lbfgs-zoom", problem, 4)
    assert int(adam.evaluations) == int(plain.evaluations) == 5  # step 0 + one a step
    assert int(zoom.evaluations) >= 4 * 2 + 1  # line search evaluations + one a step
    assert rows[-1, 5] == int(zoom.evaluations)


def test_init_state_is_the_objective_at_the_initial_image(problem):
    x0, params, targets = problem
    hp = HParams.create(SPEC, beta=1e3, tv_weight=0.1)
    state = LOOPS["adam"].init(x0, params, targets, hp, jnp.float32(0.1))
    direct = OBJECTIVE(x0, params, targets, hp)
    for got, want in zip(state.terms, direct):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(direct.total))
    assert int(state.step) == 0 and int(state.evaluations) == 1


def test_max_evaluations_stops_inside_a_chunk(problem):
    x0, params, targets = problem
    loop, hp, lr = LOOPS["lbfgs-none"], HParams.create(SPEC), jnp.float32(1.0)
    state = loop.init(x0, params, targets, hp, lr)
    state, _, valid = loop.chunk(state, params, targets, hp, lr, jnp.int32(4), jnp.int32(3))
    assert int(state.evaluations) == 3 and int(state.step) == 2
    assert np.asarray(valid).tolist() == [True, True, False, False]


def test_nonfinite_loss_stops_and_keeps_the_last_finite_image(problem):
    x0, params, targets = problem
    hp = HParams.create(SPEC, beta=1e4)
    state, _ = run("adam", problem, 4)
    good = np.asarray(state.pixels)
    # An infinite learning rate makes the next step's pixels NaN (0 · inf).
    loop, lr = LOOPS["adam"], jnp.float32(np.inf)
    state, _, valid = loop.chunk(state, params, targets, hp, lr, jnp.int32(4), NO_LIMIT)
    assert int(state.status) == NONFINITE_PIXELS
    assert not np.asarray(valid).any()
    np.testing.assert_array_equal(np.asarray(state.pixels), good)
    # A weight that overflows float32 makes the loss Inf at the initial image.
    huge = HParams.create(SPEC, beta=3e38, style_layer_weights=[1.0, 1.0])
    state = loop.init(x0, params, targets, huge, jnp.float32(0.1))
    assert int(state.status) == NONFINITE_LOSS


def test_chunking_does_not_change_the_result(problem):
    """Six steps in one call or as 2 + 4 give bitwise the same image (resume relies on it)."""
    x0, params, targets = problem
    loop, hp, lr = LOOPS["lbfgs-none"], HParams.create(SPEC), jnp.float32(1.0)
    a = loop.init(x0, params, targets, hp, lr)
    a, _, _ = loop.chunk(a, params, targets, hp, lr, jnp.int32(4), NO_LIMIT)
    a, _, _ = loop.chunk(a, params, targets, hp, lr, jnp.int32(2), NO_LIMIT)
    b = loop.init(x0, params, targets, hp, lr)
    b, _, _ = loop.chunk(b, params, targets, hp, lr, jnp.int32(2), NO_LIMIT)
    b, _, _ = loop.chunk(b, params, targets, hp, lr, jnp.int32(4), NO_LIMIT)
    np.testing.assert_array_equal(np.asarray(a.pixels), np.asarray(b.pixels))


def test_vmap_over_two_betas_equals_two_separate_runs(problem):
    x0, params, targets = problem
    loop, lr = LOOPS["adam"], jnp.float32(0.05)
    hps = [HParams.create(SPEC, beta=b) for b in (1e2, 1e5)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    init = jax.vmap(loop._init, in_axes=(None, None, None, 0, None))
    chunk = jax.jit(jax.vmap(loop._chunk, in_axes=(0, None, None, 0, None, None, None)))
    state = init(x0, params, targets, stacked, lr)
    state, rows, _ = chunk(state, params, targets, stacked, lr, jnp.int32(4), NO_LIMIT)
    for i, hp in enumerate(hps):
        single, single_rows = run("adam", problem, 4, hp=hp, lr=0.05)
        np.testing.assert_allclose(np.asarray(state.pixels[i]), np.asarray(single.pixels),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(rows[i])[:, 1:5], single_rows[:, 1:5], rtol=1e-4)
    assert not np.allclose(np.asarray(state.pixels[0]), np.asarray(state.pixels[1]))


def test_adam_epsilon_hat_is_the_keras_update():
    """Keras: θ -= lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε); differs from optax.adam for large ε."""
    b1, b2, eps, lr = 0.99, 0.999, 0.1, 0.02
    tx = optax.chain(scale_by_adam_epsilon_hat(b1, b2, eps), optax.scale_by_learning_rate(lr))
    ref = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    x, state, ref_state = jnp.array([1.0, -2.0]), None, None
    state, ref_state = tx.init(x), ref.init(x)
    m = v = np.zeros(2)
    for t in range(1, 4):
        g = 2 * np.asarray(x)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected = -lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        u, state = tx.update(jnp.asarray(g, jnp.float32), state, x)
        u_ref, ref_state = ref.update(jnp.asarray(g, jnp.float32), ref_state, x)
        np.testing.assert_allclose(u, expected, rtol=1e-5)
        assert not np.allclose(u, u_ref, rtol=1e-3)
        x = x + u
