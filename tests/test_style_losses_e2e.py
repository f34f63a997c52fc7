"""Every style loss end to end: one batched sweep through the CLI, interrupt and resume of a
sampled loss, the PRNG key of the loop state, and how loss options split or share sweep groups."""

import csv
import json
import math
import signal

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from cli import EXAMPLES, run_cli, start_cli, wait_for_files
from nstjax import config, images, sweeps, transfer
from nstjax.build import build_group, group_key, validate
from nstjax.spec import parse
from nstjax.style_losses import STYLE_LOSSES

LOSSES = tuple(STYLE_LOSSES)
SAMPLED = "sliced_wasserstein"
STEPS = 60


SHALLOW = ["loss.content_layers=[relu2_1]", "loss.style_layers=[relu1_1,relu2_1]", "loss.style_layer_weights=null",
           "model.conv=direct"]  # two VGG blocks, XLA's convolution: quick to compile


def common(weights, *extra):
    """32 px, shallow layers, Adam (robust to each loss's scale), one step a chunk."""
    return [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
            f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", *SHALLOW, "loss.style_positions=64",
            "optim=adam", "optim.lr=0.05", f"optim.steps={STEPS}", "chunk_steps=1", "checkpoint_every=0",
            "progress=false", *extra]


@pytest.mark.slow
def test_every_style_loss_runs_through_the_cli_and_a_sampled_one_resumes_bitwise(
        tmp_path, synthetic_weights_file, nstjax_cache):
    """One batched sweep over every style loss (8 groups: the loss is structure; one process), then
    sliced_wasserstein, which draws directions from the loop state's key at every step, interrupted
    by SIGINT and resumed: the checkpoint keeps the key, so the resumed run reaches bitwise the
    sweep's (uninterrupted) point."""
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", *common(synthetic_weights_file), f"loss.style_loss={','.join(LOSSES)}",
                    f"hydra.sweep.dir={sweep_dir}"], nstjax_cache, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(LOSSES)} points in {len(LOSSES)} group(s)" in proc.stderr
    with open(sweep_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["loss.style_loss"] for r in rows] == list(LOSSES)
    content = images.resize_longest(images.load_image(EXAMPLES / "tubingen.jpg"), 32)
    for r in rows:
        d = sweep_dir / r["n"]
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["steps"] == STEPS, r
        assert OmegaConf.load(d / "config.yaml").loss.style_loss == r["loss.style_loss"]
        history = np.loadtxt(d / "history.csv", delimiter=",", skiprows=1)
        assert history.shape == (STEPS + 1, 9) and np.isfinite(history).all(), r
        assert 0 < history[-1, 3] < history[0, 3], r  # a style term, and the optimiser lowered it
        result = np.asarray(Image.open(d / "result.png"), np.float32) / 255
        assert result.shape == content.shape and np.abs(result - content).max() > 0.01, r  # > PNG rounding

    reference = sweep_dir / str(LOSSES.index(SAMPLED))
    run_dir = tmp_path / "run"
    running = start_cli([*common(synthetic_weights_file, f"loss.style_loss={SAMPLED}", "save_every=1"),
                         f"hydra.run.dir={run_dir}"], nstjax_cache)
    wait_for_files(run_dir / "snapshots", running)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 130, stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 0 < metrics["steps"] < STEPS
    from safetensors.numpy import load_file

    state = load_file(str(next((run_dir / "checkpoint").glob("state-*.safetensors"))))
    assert state[".key"].dtype == np.uint32  # the key's data is part of the checkpoint

    resumed = run_cli(["progress=false", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'r'}"], nstjax_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert (run_dir / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert (run_dir / "result.png").read_bytes() == (reference / "result.png").read_bytes()


def small(weights, *extra):
    """In-process runs: 32 px, shallow layers, two L-BFGS steps without line search."""
    return [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
            f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", *SHALLOW, "optim.steps=2", "optim.linesearch=none", "optim.lr=0.5", "progress=false", *extra]


def assert_history_close(got, want, rtol=1e-5):
    assert [r.step for r in got] == [r.step for r in want]
    got, want = np.array(got)[:, 1:], np.array(want)[:, 1:]
    assert (np.abs(got - want).max(axis=1) <= rtol * np.abs(want[:, 0])).all(), (got, want)


@pytest.mark.slow
def test_members_with_their_own_seeds_and_moment_weights_are_one_group_equal_to_solo_runs(synthetic_weights_file):
    """remd samples positions from each member's key: a batch over seeds and remd_moment_weight is one
    group; the same seed gives the same pixels, another seed others; a member equals its solo run;
    step t's loss is evaluated with the key the member's loop state holds at step t."""
    base = small(synthetic_weights_file, "loss.style_loss=remd", "loss.style_positions=64")
    points = [("0", 0), ("0", 0), ("0", 1), ("4", 1)]  # (remd_moment_weight, seed); w_m = 0: all sampled
    cfgs = [config.compose([*base, f"loss.remd_moment_weight={w}", f"seed={s}"]) for w, s in points]
    assert len({group_key(p, validate(p)) for p in map(parse, cfgs)}) == 1
    batch = transfer.optimize(cfgs)
    np.testing.assert_array_equal(batch[0].image, batch[1].image)  # the same seed: the same pixels
    assert batch[0].history == batch[1].history
    assert not np.array_equal(batch[1].image, batch[2].image)  # init=content: only the samples differ
    assert batch[2].history[-1].style != batch[3].history[-1].style
    assert_history_close(batch[3].history, transfer.optimize([cfgs[3]])[0].history)  # the last member

    # The loop's key chain: k₀ = key(seed); (k_{t+1}, e_t) = split(k_t); row t is evaluated with e_t.
    group = build_group([parse(cfgs[2])])
    problem = jax.tree.map(lambda a: a[0], group.problems)
    keys, k = [], problem.key
    for _ in range(3):
        k, e = jax.random.split(k)
        keys.append(e)
    objective = jax.jit(group.loop.objective)
    style = [float(objective(jnp.asarray(batch[2].image), group.params, problem.targets, problem.hp, e).style)
             for e in keys]
    final = batch[2].history[-1].style
    assert math.isclose(style[2], final, rel_tol=1e-5)
    assert not any(math.isclose(s, final, rel_tol=1e-3) for s in style[:2])


def _point(n, overrides):
    return sweeps.Point(n, overrides, {}, config.compose(overrides))


def test_loss_options_split_groups_and_their_numbers_are_members(synthetic_weights_file):
    """The loss, kernel, degree, counts and strides are structure (LossSpec fields); mmd_c,
    mmd_bandwidth and remd_moment_weight are member keys."""
    base = small(synthetic_weights_file)
    points = [
        ["loss.style_loss=mmd", "loss.mmd_bandwidth=1"], ["loss.style_loss=mmd", "loss.mmd_bandwidth=2"],  # 0, 1
        ["loss.style_loss=mmd", "loss.mmd_kernel=poly"], ["loss.style_loss=mmd", "loss.mmd_kernel=poly",
                                                          "loss.mmd_c=1"],  # 2, 3
        ["loss.style_loss=mmd", "loss.mmd_kernel=poly", "loss.mmd_degree=3"],  # 4
        ["loss.style_loss=remd"], ["loss.style_loss=remd", "loss.remd_moment_weight=4"],  # 5, 6
        ["loss.style_loss=remd", "loss.style_positions=128"],  # 7
        ["loss.style_loss=sliced_wasserstein", "loss.sw_projections=8"],  # 8
        ["loss.style_loss=sliced_wasserstein", "loss.sw_projections=16"],  # 9
        ["loss.style_loss=mrf"], ["loss.style_loss=mrf", "loss.mrf_stride=2"],  # 10, 11
        ["loss.content_loss=self_similarity"],  # 12
    ]
    groups = sweeps.plan([_point(n, base + p) for n, p in enumerate(points)])
    assert [[p.n for p in g] for g in groups] == [[0, 1], [2, 3], [4], [5, 6], [7], [8], [9], [10], [11], [12]]
