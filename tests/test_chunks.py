"""No wasted step: a chunk computes the steps it is asked for and no more, and how a run is cut
into chunks (snapshots, checkpoints, chunk_steps) never changes its result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nstjax import config, transfer
from nstjax.losses import HParams
from nstjax.spec import parse
from nstjax.optimize import Loop, OptimSpec
from test_optimize import LR, NO_LIMIT, OBJECTIVE, SPEC, batch, problem  # noqa: F401 (fixture)

EVALUATIONS = []


def counted(pixels, params, targets, hp, key=None):
    """The objective, counting each evaluation the compiled program performs (a host callback
    that runs inside the program, once per evaluation)."""
    jax.debug.callback(lambda total: EVALUATIONS.append(float(total)), jnp.sum(pixels))
    return OBJECTIVE(pixels, params, targets, hp, key)


SPECS = {"adam": OptimSpec("adam"), "lbfgs-none": OptimSpec("lbfgs", linesearch="none"),
         "lbfgs-zoom": OptimSpec("lbfgs", linesearch="zoom")}
COUNTED = {name: Loop(counted, spec, chunk_steps=4) for name, spec in SPECS.items()}
JITTED = {name: (jax.jit(loop.init), jax.jit(loop.chunk)) for name, loop in COUNTED.items()}


def run_in_chunks(name, problem, sizes, max_evaluations=NO_LIMIT):
    """Steps in chunks of the given sizes (each ≤ chunk_steps = 4): the final state, and how many
    evaluations the programs performed."""
    x0, params, targets = problem
    init, chunk = JITTED[name]
    probs = batch(x0, targets, [HParams.create(SPEC, beta=1e4)], [LR[name]])
    EVALUATIONS.clear()
    state = init(probs, params)
    for n in sizes:
        state, _, _ = chunk(state, probs, params, jnp.int32(n), max_evaluations)
    jax.effects_barrier()
    return state, len(EVALUATIONS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_chunk_evaluates_only_the_steps_it_takes(name, problem):
    """7 steps in chunks of 1, 3, 2, 1 of a 4-step program: steps + 1 evaluations (plus the line
    search's, which the state counts), counted as the program runs them."""
    state, performed = run_in_chunks(name, problem, [1, 3, 2, 1])
    assert int(state.step[0]) == 7
    assert performed == int(state.evaluations[0])
    if name != "lbfgs-zoom":
        assert performed == 7 + 1
    # No member active: a chunk asked for 4 steps evaluates nothing.
    _, performed = run_in_chunks(name, problem, [1, 4], max_evaluations=jnp.int32(2))
    assert performed == 2 if name != "lbfgs-zoom" else performed <= 2 + 20


@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunk_sizes_do_not_change_the_result(name, problem):
    """7 steps one at a time and as 4 + 3 give bitwise the same state, optimiser state included."""
    a, _ = run_in_chunks(name, problem, [1] * 7)
    b, _ = run_in_chunks(name, problem, [4, 3])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("optim", ["optim=adam", "optim.linesearch=none", "optim.linesearch=zoom"])
@pytest.mark.slow
def test_snapshots_of_every_step_leave_the_run_as_it_is(optim, tmp_path, synthetic_weights_file):
    """save_every=1 (a chunk per step) against save_every=0 (chunks of chunk_steps), with a
    checkpoint that does not fall on a chunk boundary: the same history, result and checkpoint."""
    from safetensors.numpy import load_file

    def run(name, *extra):
        cfg = config.compose([optim, f"model.weights={synthetic_weights_file}", "image.size=32", "optim.steps=7",
                              "chunk_steps=3", "checkpoint_every=5", "model.conv=direct", "progress=false",
                              "loss.style_layers=[relu1_1,relu2_1]", "loss.content_layers=[relu2_1]", *extra])
        d = tmp_path / name
        transfer.run_group([cfg], [d], d, log=lambda *_: None)
        return d

    every, none = run("every", "save_every=1"), run("none", "save_every=0")
    assert len(list((every / "snapshots").glob("step_*.png"))) == 7 and not (none / "snapshots").exists()
    assert (every / "history.csv").read_text() == (none / "history.csv").read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(every / "result.png")),
                                  np.asarray(Image.open(none / "result.png")))
    a, b = (load_file(str(next((d / "checkpoint").glob("state-*.safetensors")))) for d in (every, none))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_a_run_that_does_not_improve_says_so(tmp_path, synthetic_weights_file):
    """A run whose loss rises (a step far too long) or whose image does not change (no steps)
    warns in one line and records improved: false; a run that works records improved: true."""
    import json

    def run(name, *extra):
        cfg = config.compose([f"model.weights={synthetic_weights_file}", "image.size=32", "model.conv=direct",
                              "progress=false", "loss.style_layers=[relu1_1,relu2_1]",
                              "loss.content_layers=[relu2_1]", *extra])
        lines = []
        transfer.run_group([cfg], [tmp_path / name], tmp_path / name, log=lines.append)
        return json.loads((tmp_path / name / "metrics.json").read_text()), [ln for ln in lines if "warning" in ln]

    good, warned = run("good", "optim.steps=5", "init=noise", "optim.linesearch=none")
    assert good["improved"] is True and good["loss_ratio"] < 1 and good["pixel_change"] > 0.01 and not warned
    still, warned = run("still", "optim.steps=0", "optim.linesearch=none")
    assert still["improved"] is False and still["pixel_change"] == 0.0
    assert len(warned) == 1 and "nearly unchanged" in warned[0] and str(tmp_path / "still") in warned[0]
    rising, warned = run("rising", "optim=adam", "optim.lr=50", "optim.steps=3", "optim.clip=false")
    assert rising["improved"] is False and rising["loss_ratio"] > 1
    assert len(warned) == 1 and "the loss did not fall" in warned[0]


@pytest.mark.slow
def test_ema_of_the_iterates_is_the_bias_corrected_recurrence(problem):
    """optim.ema_decay: a = v / (1 − dᵗ), v ← d·v + (1 − d)·x over x₀ and each step, against a numpy
    recurrence on the iterates; d = 0 is exactly the iterate; the loss history is the iterates'."""
    from nstjax.optimize import average

    x0, params, targets = problem
    loop = Loop(OBJECTIVE, OptimSpec("adam"), chunk_steps=1)
    init, chunk = jax.jit(loop.init), jax.jit(loop.chunk)
    for d in (0.7, 0.0):
        probs = batch(x0, targets, [HParams.create(SPEC, beta=1e4)], [0.05])._replace(ema_decay=jnp.float32([d]))
        state = init(probs, params)
        iterates = [np.asarray(state.pixels[0], np.float64)]
        for _ in range(5):
            state, records, _ = chunk(state, probs, params, jnp.int32(1), NO_LIMIT)
            iterates.append(np.asarray(state.pixels[0], np.float64))
            np.testing.assert_allclose(records.terms.total[0, 0], OBJECTIVE(state.pixels[0], params, targets,
                                                                 HParams.create(SPEC, beta=1e4)).total, rtol=1e-5)
        v, t = np.zeros_like(iterates[0]), 0
        for x in iterates:
            v, t = d * v + (1 - d) * x, t + 1
        want = v / (1 - d**t)
        got = np.asarray(average(state)[0])
        if d:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert np.abs(got - iterates[-1]).max() > 1e-3  # the average is not the last iterate
        else:
            np.testing.assert_array_equal(got, np.asarray(state.pixels[0]))


def test_ema_is_checkpointed_and_a_member_key(problem, tmp_path, synthetic_weights_file):
    """Three steps, a checkpoint written and read back, three more: bitwise the six straight steps,
    the average included; two points differing only in ema_decay share one program."""
    from nstjax import build, checkpoint

    x0, params, targets = problem
    loop = Loop(OBJECTIVE, OptimSpec("adam"), chunk_steps=3)
    init, chunk = jax.jit(loop.init), jax.jit(loop.chunk)
    probs = batch(x0, targets, [HParams.create(SPEC, beta=1e4)], [0.05])._replace(ema_decay=jnp.float32([0.9]))
    straight, _, _ = chunk(chunk(init(probs, params), probs, params, jnp.int32(3), NO_LIMIT)[0], probs, params,
                           jnp.int32(3), NO_LIMIT)
    half, _, _ = chunk(init(probs, params), probs, params, jnp.int32(3), NO_LIMIT)
    checkpoint.save(tmp_path, half, checkpoint.CheckpointMeta(0, 1, 0, [[]], checkpoint.Earlier.none(1), 0.0))
    resumed, _, _ = chunk(checkpoint.load(tmp_path, half), probs, params, jnp.int32(3), NO_LIMIT)
    for a, b in zip(jax.tree.leaves(straight.average), jax.tree.leaves(resumed.average)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(straight.decayed), np.asarray(resumed.decayed))
    cfgs = [config.compose([f"model.weights={synthetic_weights_file}", "image.size=32", f"optim.ema_decay={d}"])
            for d in (0.5, 0.99)]
    keys = {build.group_key(p, build.validate(p)) for p in map(parse, cfgs)}
    assert len(keys) == 1
