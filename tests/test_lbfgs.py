"""nstjax.lbfgs.torch_lbfgs against torch.optim.LBFGS itself (line_search_fn=None).

The transformation alone, in float64, on functions both sides evaluate with the
same numpy code at their own iterates; nstjax's Loop in float64 on a toy
objective; and the neural_style and pytorch_tutorial presets as the product
builds them (float32) against torch on a float64 port of their objectives.

Torch is driven one iteration per ``step(closure)`` (``max_iter=1``): each call
evaluates the closure at the current x, and its state (n_iter, d, t, the pairs,
H_diag, prev_flat_grad) carries the first-step rule and the memory from call to
call (torch/optim/lbfgs.py, ``step``). Without line search a call with
``max_iter > 1`` differs only in evaluating the closure after each update within
the call (a ``max_iter=1`` call does it at its start, at the same x) and in its
checks that end the call early (iterations, evaluations, progress), after which
the next call goes on from the same state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax.lbfgs import TorchLBFGSState, torch_lbfgs


@pytest.fixture
def one_thread():
    """torch on one thread (faster here than two on a shared machine, and deterministic)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """14 steps of torch_lbfgs (memory 3) are torch.optim.LBFGS's, as are the pairs it keeps, in
    their order, and H_diag; the first step is −min(1, 1/‖g₀‖₁)·lr·g₀."""
    fn, x0, lr, history = CASES[case]
    steps = 14
    g0 = fn(x0)[1]
    if "|g0|_1" in case:
        assert (np.abs(g0).sum() > 1) == ("|g0|_1 > 1" in case)
    want, torch_state = _torch_run(x0, fn, steps, lr, history)
    got, states = _nstjax_run(x0, fn, steps, lr, history)
    # Float64 rounding only (dot products summed in another order), grown by the condition number
    # over the steps: at most 5e-13 of the scale measured (the 1e3-conditioned quadratic's last step).
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * scale)
    # The first step is −min(1, 1/‖g₀‖₁)·lr·g₀.
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


def test_vmapped_members_scale_their_own_first_step():
    """Two members, ‖g‖₁ < 1 and > 1, lr 0.5 and 2: each first step is −min(1, 1/‖g‖₁)·lr·g of its
    own g and lr (nothing global), and later steps (a quadratic each) are each member's solo run's."""
    rng = np.random.default_rng(5)
    shape = (4, 5, 3)
    grads = jnp.asarray(np.stack([0.001 * rng.standard_normal(shape), rng.standard_normal(shape)]), jnp.float32)
    lrs = jnp.asarray([0.5, 2.0], jnp.float32)
    l1 = np.abs(np.asarray(grads)).sum(axis=(1, 2, 3))
    assert l1[0] < 1 < l1[1]

    def step(lr, x, b, state, g=None):
        g = (x.reshape(-1) * jnp.geomspace(1.0, 50.0, x.size) - b).reshape(x.shape) if g is None else g
        u, state = torch_lbfgs(lr, 4).update(g, state, x)
        return x + u, state

    solo, batched = jax.jit(step), jax.jit(jax.vmap(step))
    x = jnp.zeros_like(grads)
    state = jax.vmap(torch_lbfgs(1.0, 4).init)(x)
    assert isinstance(state, TorchLBFGSState) and state.count.shape == (2,) and state.s.shape == (2, 4, *shape)
    b = jnp.asarray(np.stack([0.002 * rng.standard_normal(x[0].size), rng.standard_normal(x[0].size)]), jnp.float32)
    first, _ = batched(lrs, x, b, state, grads)
    for i in range(2):
        np.testing.assert_allclose(first[i], -min(1.0, 1.0 / l1[i]) * float(lrs[i]) * grads[i], rtol=1e-6)
    for _ in range(7):
        x, state = batched(lrs, x, b, state)
    for i in range(2):
        xi, si = jnp.zeros_like(x[i]), torch_lbfgs(1.0, 4).init(x[i])
        for _ in range(7):
            xi, si = solo(lrs[i], xi, b[i], si)
        np.testing.assert_allclose(x[i], xi, rtol=1e-5, atol=1e-6 * float(jnp.abs(xi).max()))
    assert not np.allclose(x[0], x[1])


def _toy_problem(seed, shape=(4, 5, 3)):
    """A coupled quadratic ½·w·(x − c)ᵀA(x − c) over an image, its minimum c partly outside [0, 1]."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, 100.0, n)) @ q.T
    c = rng.uniform(-0.5, 1.5, shape)
    x0 = rng.uniform(0.2, 0.8, shape)
    return a, c, x0


def _toy_objective(x, params, targets, hp, key):
    from nstjax.losses import Terms

    r = (x - targets).reshape(-1)
    total = 0.5 * hp * (r @ params @ r)
    return Terms(total, total, jnp.zeros_like(total), jnp.zeros_like(total), jnp.zeros_like(total))


def _torch_toy(a, c, w, x0, lr, steps, clamp):
    """torch.optim.LBFGS on the toy, float64; with ``clamp`` the image is clamped to [0, 1] inside the
    closure before the forward (the PyTorch tutorial's closure). Losses at x₀ … x_steps, final x."""
    import torch

    a, c = torch.tensor(a), torch.tensor(c)
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=3, line_search_fn=None)
    losses = []

    def closure():
        if clamp:
            with torch.no_grad():
                x.clamp_(0, 1)
        opt.zero_grad()
        r = (x - c).reshape(-1)
        loss = 0.5 * w * (r @ a @ r)
        loss.backward()
        losses.append(loss.item())
        return loss

    for _ in range(steps):
        opt.step(closure)
    closure()  # the loss at the last image (and, with clamp, the tutorial's final clamp)
    return np.array(losses), x.detach().numpy()


@pytest.mark.torch
@pytest.mark.parametrize("clip", [True, False])
def test_loop_in_float64_equals_torch_lbfgs(clip):
    """nstjax's Loop (two vmapped members of different lr, weight and target, memory 3, chunks of 4)
    in float64 against torch.optim.LBFGS: the same losses after every step and the same image. With
    ``clip`` the loop clips after each step, torch's closure clamps before each evaluation (as the
    PyTorch tutorial's): both evaluate at the same clamped images, and torch's s is the update as
    computed, not the clamped difference, which nstjax's s is too."""
    from nstjax.build import stack
    from nstjax.optimize import Loop, OptimSpec, Problem

    steps, members = 12, [(0, 1.0, 3.0), (1, 0.5, 1e-4)]  # (seed, lr, w): ‖g₀‖₁ 2e3 and 0.1
    with jax.enable_x64(True):
        loop = Loop(_toy_objective, OptimSpec("lbfgs", memory_size=3, linesearch="none", clip=clip), chunk_steps=4)
        problems = []
        for seed, lr, w in members:
            _, c, x0 = _toy_problem(seed)
            problems.append(Problem(jnp.asarray(x0), jnp.asarray(c), jnp.float64(w), jnp.float32(lr),
                                    jax.random.key(seed), jnp.float32(0)))
        a = _toy_problem(0)[0]  # the VGG params' place: shared by the members
        problems, params = stack(problems), jnp.asarray(a)
        l1 = [np.abs(w * a @ (x0 - c).reshape(-1)).sum() for (_, _, w), x0, c in
              zip(members, np.asarray(problems.pixels), np.asarray(problems.targets))]
        assert l1[0] > 1 > l1[1]
        state = jax.jit(loop.init)(problems, params)
        rows = [np.asarray(state.terms.total)[:, None]]
        chunk = jax.jit(loop.chunk)
        for _ in range(steps // 4):
            state, r, valid = chunk(state, problems, params, jnp.int32(4), jnp.int32(2**31 - 1))
            assert np.asarray(valid).all()
            rows.append(np.asarray(r.terms.total))
        got, pixels = np.concatenate(rows, axis=1), np.asarray(state.pixels)
    assert pixels.dtype == np.float64
    for i, (seed, lr, w) in enumerate(members):
        _, c, x0 = _toy_problem(seed)
        want, x = _torch_toy(a, c, w, x0, lr, steps, clamp=clip)
        # (float64 rounding: ≤ 1e-12 measured, losses relative, pixels absolute)
        np.testing.assert_allclose(got[i], want, rtol=1e-11)
        np.testing.assert_allclose(pixels[i], np.clip(x, 0, 1) if clip else x, rtol=0, atol=1e-11)
    if clip:  # the bounds were hit, so the clip mattered
        assert ((pixels == 0) | (pixels == 1)).any(axis=(1, 2, 3)).all()
    else:
        assert ((pixels < 0) | (pixels > 1)).any(axis=(1, 2, 3)).all()


# --- The presets through nstjax's product path against torch.optim.LBFGS on the same objective -------------

STEPS = 10
NO_LIMIT = 2**31 - 1
TORCHVISION_PREPROCESSING = [  # the tutorial's Normalization, for the synthetic (Caffe-layout) weights file
    "model.preprocessing.channel_order=RGB", "model.preprocessing.scale=1.0",
    "model.preprocessing.mean=[0.485,0.456,0.406]", "model.preprocessing.std=[0.229,0.224,0.225]"]


def _nstjax_steps(weights_file, *overrides):
    """A preset as the product runs it: composed, its group built (build_group), its Loop compiled,
    at 32 px; chunks of one step. Returns the group, the terms (total, content, style) at x₀ … x₁₀
    and the images x₀ … x₁₀ (float32)."""
    from cli import EXAMPLES
    from nstjax import config
    from nstjax.build import build_group
    from nstjax.spec import parse

    cfg = config.compose([f"model.weights={weights_file}", f"content={EXAMPLES / 'tubingen.jpg'}",
                          f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", "model.conv=direct",
                          "seed=0", f"optim.steps={STEPS}", "chunk_steps=1", *overrides])
    group = build_group([parse(cfg)])
    assert group.structure.optim.linesearch == "none" and group.structure.optim.memory_size == 100
    program = group.loop.compile(group.problems, group.params)
    state = program.init(group.problems, group.params)
    terms = [[float(state.terms.total[0]), float(state.terms.content[0]), float(state.terms.style[0])]]
    pixels = [np.asarray(state.pixels[0])]
    for _ in range(STEPS):
        state, records, valid = program.chunk(state, group.problems, group.params, jnp.int32(1), jnp.int32(NO_LIMIT))
        assert np.asarray(valid).all()
        t = records.terms
        terms.append([float(t.total[0, 0]), float(t.content[0, 0]), float(t.style[0, 0])])
        pixels.append(np.asarray(state.pixels[0]))
    return group, np.array(terms), np.array(pixels)


def _torch_loop(x0, value_and_grad, clamp, at=None):
    """torch.optim.LBFGS(lr 1, history 100, no line search), one iteration a step() call, float64.
    With ``clamp`` the closure clamps the image to [0, 1] first (the PyTorch tutorial's closure).
    With ``at`` (images x₀ … x₉) each step starts from ``at[k]`` instead of torch's own iterate (its
    state, pairs and all, is its own). Returns the losses at x₀ … x₁₀ (the last one after the
    steps) and the images after each step (clamped with ``clamp``)."""
    import torch

    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=100, line_search_fn=None)
    losses, images, step = [], [], [0]

    def closure():
        with torch.no_grad():
            if at is not None and step[0] < len(at):
                x.copy_(torch.from_numpy(np.asarray(at[step[0]], np.float64)))
            if clamp:
                x.clamp_(0, 1)
        loss, grad = value_and_grad(x.detach().numpy().copy())
        x.grad = torch.from_numpy(np.ascontiguousarray(grad, np.float64))
        losses.append(loss)
        return loss

    for step[0] in range(STEPS):
        opt.step(closure)
        images.append(np.clip(x.detach().numpy(), 0, 1) if clamp else x.detach().numpy().copy())
    closure()
    return np.array(losses), np.array(images)


def _compare_with_torch(losses, pixels, value_and_grad, clamp):
    """(a) torch's own loop from nstjax's x₀: the losses step by step and the image after 10 steps, to
    what float32 allows; (b) torch stepping from each of nstjax's images in turn (``at``): each
    of nstjax's updates equals torch's. Returns the measured differences (for the record)."""
    want, images = _torch_loop(pixels[0].astype(np.float64), value_and_grad, clamp)
    free = np.abs(losses - want) / want
    # (a) Float32 rounding (~1e-7 in the loss and gradient at x₀) is amplified from step to step by
    # torch's rule itself: lr 1 steps taken from pairs whose first y = g(x₁) − g(x₀) is a difference
    # of nearly equal gradients (x₁ − x₀ has ‖·‖₁ = 1 over thousands of pixels). torch.optim.LBFGS
    # in float32 departs from its float64 run as much (measured at 24–48 px: ≤ 1.2e-7 at steps 0–1,
    # up to 3.5e-3 by step 5 and 0.2 by step 10), and two float32 runs differ from each other by
    # factors of up to 300. The bands: the first step (min(1, 1/‖g‖₁)·lr) to float32's accuracy; the
    # later ones to 10× what was measured for nstjax at this size (≤ 1.4e-4 by step 5, 1e-2 after).
    assert (free[:2] <= 1e-6).all() and (free[2:6] <= 1e-3).all() and (free[6:] <= 1e-1).all(), free
    final = np.abs(pixels[-1] - images[-1])
    # (b) From the same image, nstjax's update is torch's: float32's accuracy (the gradient's, and
    # x rounded to float32: the first update, ~1e-4 a pixel, carries 3e-8 of rounding) and no
    # amplification from step to step: measured ≤ 1e-4 relative for neural_style at 32–45 px, ≤ 2.3e-5
    # for the tutorial at 32 px (at 48 px 5.9e-4: its first pair's y is more cancelled there).
    _, shadow = _torch_loop(pixels[0].astype(np.float64), value_and_grad, clamp, at=pixels[:-1])
    steps = pixels[1:] - pixels[:-1]
    per_step = np.linalg.norm((steps - (shadow - pixels[:-1])).reshape(STEPS, -1), axis=1)
    per_step /= np.linalg.norm((shadow - pixels[:-1]).reshape(STEPS, -1), axis=1)
    assert (per_step <= 1e-3).all(), per_step
    return free, final, per_step


@pytest.mark.torch
@pytest.mark.slow
def test_neural_style_preset_follows_torch_lbfgs(synthetic_weights_file, one_thread):
    """The neural_style preset's objective and L-BFGS (lr 1, 100 pairs, no clamping) against
    torch.optim.LBFGS on tests/neural_style_reference.py's float64 feval (neural_style.lua's). The
    Lua's loss leaves TV out: content + style are compared. From a seeded uniform image (init=uniform:
    no max-pool ties, see tests/test_presets.py)."""
    import neural_style_reference
    import weights_fixtures

    group, terms, pixels = _nstjax_steps(synthetic_weights_file, "+experiment=neural_style", "init=uniform",
                                         "optim.max_increase=null")
    assert not group.structure.optim.clip
    member = group.members[0]
    feval = neural_style_reference.neural_style_feval(weights_fixtures.synthetic_params(0), member.content,
                                                      member.styles)

    def value_and_grad(x):
        out = feval(x)
        return out["content"] + out["style"], out["grad_rgb"]

    free, final, per_step = _compare_with_torch(terms[:, 1] + terms[:, 2], pixels, value_and_grad, clamp=False)
    assert np.abs(pixels[-1] - pixels[0]).max() > 0.5  # (the image did move)
    assert final.max() <= 0.1 and np.sqrt(np.mean(final**2)) <= 0.02, final


def _tutorial_objective(content, style, dtype):
    """The PyTorch tutorial's loss and its gradient (autograd) on an (H, W, 3) RGB image, torch
    written: Normalization by the ImageNet mean and std; conv1_1 … conv3_1 of the synthetic VGG19
    (torchvision layout: OIHW, RGB), ReLUs and 2×2 max pools (floor mode) between; ContentLoss
    F.mse_loss at conv2_2 (weight 1), StyleLoss F.mse_loss of Gram matrices ÷ (a·b·c·d) at
    conv1_1, conv1_2, conv2_1, conv2_2, conv3_1 (weight 1e6)."""
    import torch
    import torch.nn.functional as F
    import weights_fixtures

    params = weights_fixtures.synthetic_params(0)
    convs = {name: (torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy()).to(dtype),
                    torch.from_numpy(params[name]["bias"]).to(dtype))
             for name in ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")}
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=dtype)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=dtype)

    def features(image):
        h = ((image - mean) / std).permute(2, 0, 1)[None]
        out = {}
        for name in convs:
            if name in ("conv2_1", "conv3_1"):
                h = F.max_pool2d(h, 2, 2)
            h = out[name] = F.conv2d(h, *convs[name], padding=1)
            h = F.relu(h)
        return out

    def gram(f):
        a, b, c, d = f.shape
        flat = f.view(a * b, c * d)
        return flat @ flat.T / (a * b * c * d)

    with torch.no_grad():
        content_target = features(torch.from_numpy(content).to(dtype))["conv2_2"]
        style_targets = {n: gram(f) for n, f in features(torch.from_numpy(style).to(dtype)).items()}

    def value_and_grad(x):
        x = torch.from_numpy(x).to(dtype).requires_grad_(True)
        f = features(x)
        loss = 1.0 * F.mse_loss(f["conv2_2"], content_target) + 1e6 * sum(
            F.mse_loss(gram(f[n]), t) for n, t in style_targets.items())
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad.numpy()

    return value_and_grad


@pytest.mark.torch
@pytest.mark.slow
def test_pytorch_tutorial_preset_follows_torch_lbfgs(synthetic_weights_file, one_thread):
    """The pytorch_tutorial preset's objective and L-BFGS (lr 1, 100 pairs; the image clipped to
    [0, 1] after each step) against torch.optim.LBFGS on the tutorial's loss in float64 whose closure
    clamps the image before the forward, as the tutorial's: both evaluate at the same clamped images
    and torch's s is its update as computed, as nstjax's. Weights: the synthetic file with the
    tutorial's Normalization given as the preprocessing."""
    import torch

    group, terms, pixels = _nstjax_steps(synthetic_weights_file, "+experiment=pytorch_tutorial",
                                         *TORCHVISION_PREPROCESSING, "optim.max_increase=null")
    assert group.structure.optim.clip
    member = group.members[0]
    np.testing.assert_array_equal(pixels[0], member.content)  # init = content
    value_and_grad = _tutorial_objective(member.content, member.styles[0], torch.float64)
    free, final, per_step = _compare_with_torch(terms[:, 0], pixels, value_and_grad, clamp=True)
    bounds = (pixels == 0) | (pixels == 1)
    assert not bounds[0].any() and bounds[1:].any()  # the clip mattered (on the steps that overshoot)
    assert final.max() <= 0.1 and np.sqrt(np.mean(final**2)) <= 0.02, final


# --- The safeguard (optim.max_increase): a step that multiplies the loss is taken back, shorter ------------

HAT = 1000.0


def _hat(x, params, targets, hp, key=None):
    """f(x) = (‖x − c‖² − a)²: near c the loss falls outwards with negative curvature (as a Gram
    loss near a flat image), so torch's second step, the raw gradient (the first pair has yᵀs < 0
    and is skipped), lands far out on the quartic wall."""
    from nstjax.losses import Terms

    total = jnp.square(jnp.sum(jnp.square(x - targets)) - HAT)
    return Terms(total, total, jnp.zeros_like(total), jnp.zeros_like(total), jnp.zeros_like(total))


def _guarded_numpy(x0, c, lr, kappa, steps, grow=10.0, shrink=0.1, reach=0.05):
    """The safeguard written out in float64 numpy over torch's rule (memory 100, no clip): a step
    that raises the loss more than ``kappa``× is taken back and the step length scaled by
    min(shrink, reach / max|step|); after a step taken, the scale grows ``grow``× up to 1. Returns
    the losses after each step, which steps were taken back, and the step-length factors."""
    shape, c = x0.shape, c.reshape(-1)

    def f(x):
        r = x - c
        return (r @ r - HAT) ** 2, 4 * (r @ r - HAT) * r

    x = x0.reshape(-1).copy()
    loss, g = f(x)
    pairs, h_diag, prev_g, prev_u, count, scale = [], 1.0, None, None, 0, 1.0
    losses, back, scales = [loss], [], [scale]
    for _ in range(steps):
        if count:
            y, s = g - prev_g, prev_u
            if y @ s > 1e-10:
                pairs.append((s, y, 1 / (y @ s)))
                h_diag = (y @ s) / (y @ y)
        q, al = -g.copy(), []
        for s, y, rho in reversed(pairs):
            al.append(rho * (s @ q))
            q -= al[-1] * y
        d = q * h_diag
        for (s, y, rho), a in zip(pairs, reversed(al)):
            d += (a - rho * (y @ d)) * s
        t = (min(1.0, 1.0 / np.abs(g).sum()) if count == 0 else 1.0) * lr * scale
        prev_g, prev_u, count = g, t * d, count + 1
        new_loss, new_g = f(x + t * d)
        if new_loss > kappa * loss:  # taken back: the image, loss and gradient stay
            back.append(True)
            scale *= min(shrink, reach / np.abs(t * d).max())
        else:
            back.append(False)
            x, loss, g, scale = x + t * d, new_loss, new_g, min(1.0, scale * grow)
        losses.append(loss)
        scales.append(scale)
    return np.array(losses), back, np.array(scales), x.reshape(shape)


def test_safeguard_takes_back_a_step_that_raises_the_loss_tenfold():
    """Loop with optim.max_increase=10 against the rule written out in numpy (float64): the same
    losses, the same steps taken back, the same step-length factors; without it, torch's second
    step raises the loss by orders of magnitude."""
    from nstjax.build import stack
    from nstjax.optimize import Loop, OptimSpec, Problem

    rng = np.random.default_rng(4)
    x0 = rng.uniform(0.0, 1.0, (4, 4, 3))
    c = x0 - 0.01 * rng.uniform(-1, 1, x0.shape)
    with jax.enable_x64(True):
        results = {}
        for kappa in (10.0, None):
            loop = Loop(_hat, OptimSpec("lbfgs", linesearch="none", clip=False, max_increase=kappa), chunk_steps=6)
            problems = stack([Problem(jnp.asarray(x0), jnp.asarray(c), jnp.float64(1), jnp.float32(1.0),
                                      jax.random.key(0), jnp.float32(0))])
            state = jax.jit(loop.init)(problems, None)
            state, rows, valid = jax.jit(loop.chunk)(state, problems, None, jnp.int32(6), jnp.int32(2**31 - 1))
            results[kappa] = np.asarray(rows.terms.total[0]), np.asarray(state.pixels[0]), float(state.scale[0])
    losses, back, scales, x = _guarded_numpy(x0, c, 1.0, 10.0, 6)
    assert back[1] and not back[0], back  # the second step is the one torch overshoots
    guarded, pixels, scale = results[10.0]
    np.testing.assert_allclose(guarded, losses[1:], rtol=1e-10)
    np.testing.assert_allclose(pixels, x, rtol=0, atol=1e-12)
    assert scale == pytest.approx(scales[-1])
    unguarded = results[None][0]
    assert unguarded[1] > 100 * losses[1] and guarded[-1] < losses[0]  # torch's overshoot; the guarded run descends
