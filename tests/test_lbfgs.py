"""nstjax.lbfgs.torch_lbfgs against torch.optim.LBFGS itself (line_search_fn=None).

Torch is driven one iteration per ``step(closure)`` (``max_iter=1``): each call
evaluates the closure at the current x, and its state (n_iter, d, t, the pairs,
H_diag, prev_flat_grad) carries the first-step rule and the memory from call to
call; with no line search the only things a call with ``max_iter > 1`` does
besides are evaluations after each update, which the next call's first
evaluation repeats (torch/optim/lbfgs.py, ``step``). Both sides evaluate the same
numpy function at their own iterates, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax.lbfgs import TorchLBFGSState, torch_lbfgs


def _torch_run(x0, value_and_grad, steps, lr, history, **options):
    """torch.optim.LBFGS's iterates, one step() call each, from float64 ``x0``."""
    import torch

    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=history, line_search_fn=None, **options)

    def closure():
        value, grad = value_and_grad(x.detach().numpy().copy())
        x.grad = torch.from_numpy(np.asarray(grad, np.float64).copy())
        return value

    xs = []
    for _ in range(steps):
        opt.step(closure)
        xs.append(x.detach().numpy().copy())
    return np.array(xs), opt.state[x]


def _nstjax_run(x0, value_and_grad, steps, lr, history, **options):
    """torch_lbfgs's iterates x + update, and the states, in float64."""
    with jax.enable_x64(True):
        tx = torch_lbfgs(lr, history, **options)
        update = jax.jit(tx.update)
        x = jnp.asarray(x0, jnp.float64)
        state = tx.init(x)
        xs, states = [], []
        for _ in range(steps):
            _, grad = value_and_grad(np.asarray(x))
            u, state = update(jnp.asarray(grad, jnp.float64), state, x)
            assert u.dtype == jnp.float64 and state.s.dtype == jnp.float64
            x = x + u
            xs.append(np.asarray(x))
            states.append(jax.tree.map(np.asarray, state))
        return np.array(xs), states


def _quadratic(seed=0, shape=(2, 3), scale=1.0, condition=1e3):
    """½ xᵀAx − bᵀx with A's eigenvalues from 1 to ``condition``, over arrays of ``shape``."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T
    b = scale * rng.standard_normal(n)

    def value_and_grad(x):
        flat = x.reshape(-1)
        return 0.5 * flat @ a @ flat - b @ flat, (a @ flat - b).reshape(shape)

    return value_and_grad


def _double_well(x):
    """Σ (x² − 1)² + 0.3 Σ x: negative curvature near 0, so some yᵀs ≤ 0 (pairs skipped)."""
    return float(np.sum((x**2 - 1) ** 2) + 0.3 * np.sum(x)), 4 * x * (x**2 - 1) + 0.3


def _skips(states):
    """Iterations after the first whose pair was skipped (the head of the memory stayed)."""
    heads = [0] + [int(s.head) for s in states]
    return [i for i in range(1, len(states)) if heads[i + 1] == heads[i]]


CASES = {
    # name: (function, x0, lr, history): memory 3, so it wraps within the steps
    "quadratic, lr 1, |g0|_1 > 1": (_quadratic(0, scale=3.0), np.zeros((2, 3)), 1.0, 3),
    "quadratic, lr 0.3, |g0|_1 < 1": (_quadratic(1, scale=0.02, condition=30.0), np.zeros((2, 3)), 0.3, 3),
    "double well, lr 0.5": (_double_well, np.array([[0.1, -0.2, 0.05], [0.3, -0.1, 0.2]]), 0.5, 3),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_iterates_equal_torch_lbfgs(case):
    fn, x0, lr, history = CASES[case]
    steps = 14
    want, torch_state = _torch_run(x0, fn, steps, lr, history)
    got, states = _nstjax_run(x0, fn, steps, lr, history)
    # Float64 rounding only (dot products summed in another order), grown by the condition number
    # over the steps: at most 5e-13 of the scale measured (the 1e3-conditioned quadratic's last step).
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * scale)
    # The first step is −min(1, 1/‖g₀‖₁)·lr·g₀.
    g0 = fn(x0)[1]
    np.testing.assert_allclose(got[0] - x0, -min(1.0, 1.0 / np.abs(g0).sum()) * lr * g0, rtol=1e-15, atol=0)
    # The memory: the pairs torch keeps, in age order, are the newest of nstjax's ring.
    last = states[-1]
    assert int(last.count) == torch_state["n_iter"] == steps
    kept = int(last.kept)
    assert kept == len(torch_state["old_dirs"]) == history
    order = [(int(last.head) - kept + i) % history for i in range(kept)]
    # (y = A s: the iterates' rounding × the condition number; 2e-12 of the largest measured)
    for mine, theirs in ((last.y, torch_state["old_dirs"]), (last.s, torch_state["old_stps"])):
        theirs = np.stack([t.numpy() for t in theirs])
        np.testing.assert_allclose(mine[order].reshape(kept, -1), theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())
    np.testing.assert_allclose(float(last.h_diag), float(torch_state["H_diag"]), rtol=1e-12)
    if case.startswith("double well"):
        assert _skips(states), "the case was meant to skip pairs (yᵀs ≤ 1e-10)"
    else:
        assert not _skips(states)


def _given_gradients(seed=4, shape=(3, 4)):
    """A gradient function with a memory, the same sequence for each side: each call's gradient
    by the plan, from the iterate it is called at and the previous call's."""
    rng = np.random.default_rng(seed)
    plan = ["small", "random", "random", "random", "repeat", "optimal", "random", "random", "ys 5e-11",
            "random", "break", "random", "random", "random", "random"]
    one_hot = np.arange(np.prod(shape)).reshape(shape)
    gradients = {"small": 0.01 * rng.standard_normal(shape),  # ‖g‖₁ < 1
                 "optimal": np.where(one_hot == 5, 1e-8, 0.0),  # max|g| ≤ tolerance_grad (1e-7)
                 "break": np.where(one_hot == 7, 3e-6, 0.0)}  # max|g| > 1e-7, but |gᵀd| < 1e-9
    randoms = [rng.standard_normal(shape) for _ in range(plan.count("random"))]
    seen = []

    def given(x):
        kind = plan[len(seen)]
        if kind == "random":
            g = randoms.pop(0)
        elif kind == "repeat":  # y = 0
            g = seen[-1][1]
        elif kind == "ys 5e-11":  # y = c·s with c‖s‖² = 5e-11: 0 < yᵀs ≤ 1e-10
            s = x - seen[-1][0]
            g = seen[-1][1] + 5e-11 / np.sum(s * s) * s
        else:
            g = gradients[kind]
        seen.append((x, g))
        return 0.0, g

    return given, plan, shape


@pytest.mark.torch
def test_constructed_gradients_exercise_every_branch():
    """Gradients given, not computed: a repeated one (y = 0) and one with 0 < yᵀs ≤ 1e-10 (the pair
    is skipped, H_diag stays); one with max|g| ≤ tolerance_grad (no step and nothing changes: torch
    returns before iterating); one along which gᵀd > −tolerance_change (no step, but the
    iteration's d, t and g are kept); the memory (3) wrapping; the first gradient's ‖g‖₁ < 1."""
    given, plan, shape = _given_gradients()
    want, _ = _torch_run(np.zeros(shape), given, len(plan), 0.7, 3)
    given, plan, shape = _given_gradients()
    got, states = _nstjax_run(np.zeros(shape), given, len(plan), 0.7, 3)
    # Rounding grown by the pair after the break (its s is tiny, ρ = 1/yᵀs ~ 1e6): 5.5e-12 measured.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    steps = np.abs(np.diff(np.concatenate([np.zeros((1, *shape)), want]), axis=0)).max(axis=(1, 2))
    still = [plan.index("optimal"), plan.index("break")]
    assert (steps[still] == 0.0).all() and (np.delete(steps, still) > 0).all()
    counts = [int(s.count) for s in states]
    assert counts == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # the optimal one is no iteration
    skipped = [plan[i] for i in _skips(states)]  # (and random ones where yᵀs < 0)
    assert {"repeat", "optimal", "ys 5e-11"} <= set(skipped)
    assert int(states[-1].kept) == 3 and len(plan) - 1 - len(skipped) > 3  # more pairs kept than slots


@pytest.mark.parametrize("lrs", [(1.0, 1.0), (0.5, 2.0)])
def test_vmapped_members_scale_their_own_first_step(lrs):
    """Two members, ‖g‖₁ < 1 and > 1: each first step is −min(1, 1/‖g‖₁)·lr·g of its own g and lr,
    and the members' later steps are their solo runs'."""
    rng = np.random.default_rng(5)
    grads = jnp.asarray(np.stack([0.001 * rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5, 3))]),
                        jnp.float32)
    lr = jnp.asarray(lrs, jnp.float32)

    def update(lr, g, state, x):
        return torch_lbfgs(lr, 4).update(g, state, x)

    x = jnp.zeros_like(grads)
    state = jax.vmap(torch_lbfgs(1.0, 4).init)(x)
    assert isinstance(state, TorchLBFGSState) and state.count.shape == (2,)
    u, state = jax.jit(jax.vmap(update))(lr, grads, state, x)
    for i in range(2):
        l1 = float(jnp.abs(grads[i]).sum())
        np.testing.assert_allclose(u[i], -min(1.0, 1.0 / l1) * lrs[i] * grads[i], rtol=1e-6)
    assert float(jnp.abs(grads[0]).sum()) < 1 < float(jnp.abs(grads[1]).sum())
    # Later steps (a quadratic per member) equal each member's solo run.
    a = jnp.asarray(np.diag(np.geomspace(1.0, 50.0, 60)).reshape(60, 60), jnp.float32)
    b = jnp.asarray(np.stack([0.002 * rng.standard_normal(60), rng.standard_normal(60)]), jnp.float32)

    def grad_of(x, b):
        return (a @ x.reshape(-1) - b).reshape(x.shape)

    batched = jax.jit(jax.vmap(update))
    xs = jnp.zeros_like(grads)
    state = jax.vmap(torch_lbfgs(1.0, 4).init)(xs)
    for _ in range(7):
        u, state = batched(lr, jax.vmap(grad_of)(xs, b), state, xs)
        xs = xs + u
    for i in range(2):
        tx = torch_lbfgs(lrs[i], 4)
        x, s = jnp.zeros_like(grads[i]), tx.init(grads[i])
        for _ in range(7):
            u, s = jax.jit(tx.update)(grad_of(x, b[i]), s, x)
            x = x + u
        np.testing.assert_allclose(xs[i], x, rtol=1e-5, atol=1e-6 * float(jnp.abs(x).max()))
