"""Coarse to fine (nstjax.pyramid): the levels' sizes and steps, each level starting from the one
below, and a three-level run interrupted at its middle level and resumed."""

import dataclasses
import json
import signal
import subprocess
import time

import numpy as np
import pytest

from cli import ROOT, env, patched_cli_args, run_cli, small_run_args
from nstjax import config, pyramid, transfer
from nstjax.build import validate
from nstjax.errors import UserError
from nstjax.spec import PyramidSpec, parse

SHALLOW = ("loss.content_layers=[relu2_2]", "loss.style_layers=[relu1_1,relu2_1,relu3_1]",
           "loss.style_layer_weights=null")  # three VGG blocks: quick to compile


@pytest.mark.parametrize("size, min_size, factor, want", [
    (64, None, 2.0, [64]), (64, 16, 2.0, [16, 32, 64]), (64, 20, 2.0, [32, 64]), (512, 256, 2 ** 0.5, [256, 362, 512]),
    (64, 64, 2.0, [64])])
def test_level_sizes_divide_by_the_factor_down_to_min_size(size, min_size, factor, want):
    assert pyramid.sizes(PyramidSpec(min_size, factor), size) == want


def test_levels_run_pyramid_steps_below_the_last_level():
    cfg = config.compose(["image.size=64", "pyramid.min_size=16", "pyramid.steps=7", "optim.steps=9"])
    levels = pyramid.levels(parse(cfg).structure)
    assert [(s.image.size, s.steps) for s in levels] == [(16, 7), (32, 7), (64, 9)]
    one = parse(config.compose(["image.size=64"])).structure
    assert pyramid.levels(one) == [one]


def test_upsample_is_bicubic_and_clipped():
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 6, 3)).astype(np.float32)
    up = pyramid.upsample(x, (16, 12))
    assert up.shape == (2, 16, 12, 3) and up.min() >= 0 and up.max() <= 1
    smooth = np.broadcast_to(np.linspace(0.2, 0.8, 6, dtype=np.float32), (1, 8, 6))[..., None]
    np.testing.assert_allclose(pyramid.upsample(smooth, (8, 6)), smooth, atol=1e-6)  # same size: unchanged


@pytest.mark.parametrize("override, message", [
    ("pyramid.min_size=100", "pyramid.min_size = 100 must be between 1 and image.size = 32"),
    ("pyramid.factor=1", "pyramid.factor = 1.0 must be > 1")])
def test_bad_pyramids_are_refused(synthetic_weights_file, tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        validate(parse(config.compose([*small_run_args(synthetic_weights_file, tmp_path)[:-1], "pyramid.min_size=16",
                                       override])))


@pytest.mark.slow
def test_each_level_starts_from_the_level_below_upsampled_and_members_equal_solo_runs(
        synthetic_weights_file, tmp_path):
    """Level 1's step-0 loss is the objective at level 0's result upsampled; two members of a
    batched pyramid each equal their solo run, level by level."""
    import jax

    from nstjax.build import level_inputs

    # Adam: L-BFGS without line search (torch's rule: a tiny first step, then steps of lr 1) amplifies
    # the float32 reduction-order differences of batched and solo runs, to 5e-3 by level 1's third
    # step (tests/test_lbfgs.py has why); Adam keeps them at float32's (≤ 1e-7 measured).
    plain = [a for a in small_run_args(synthetic_weights_file, tmp_path)[:-1] if a != "optim.linesearch=none"]
    base = [*plain, "optim=adam", "optim.lr=0.05", "image.size=64", *SHALLOW, "optim.steps=3",
            "pyramid.min_size=32", "pyramid.steps=3", "init=noise"]  # noise: no zero content loss at step 0
    cfgs = [config.compose([*base, f"loss.beta={b}"]) for b in (1e3, 1e5)]
    both, (solo,) = transfer.optimize(cfgs), transfer.optimize(cfgs[:1])
    assert [r.level for r in solo.history] == [0] * 4 + [1] * 4
    assert [lv.size for lv in solo.levels] == [[24, 32], [48, 64]]
    assert solo.steps == 6 and solo.image.shape == (48, 64, 3)
    np.testing.assert_allclose(np.array(both[0].history), np.array(solo.history), rtol=1e-5)
    assert both[1].history[0].total != solo.history[0].total

    point = parse(cfgs[0])
    low_level, _ = pyramid.levels(point.structure)
    low_point = dataclasses.replace(point, structure=low_level)
    (low,) = transfer.optimize([low_point], [level_inputs(point, low_level, validate(point))])
    np.testing.assert_allclose(np.array(low.history), np.array(solo.history[:4]), rtol=1e-5)
    high = transfer.level_groups([point])[1]
    problem = jax.tree.map(lambda a: a[0], high.problems)
    start = pyramid.upsample(low.image[None], (48, 64))[0]
    terms = high.loop.objective(start, high.params, problem.targets, problem.hp, problem.key)
    np.testing.assert_allclose(float(terms.total), solo.history[4].total, rtol=1e-5)


PAUSE = """
import signal
import nstjax.images as images
real_save = images.save_image
def save_image(path, img, *a, **k):  # once level 1's second snapshot is written, wait for a signal
    real_save(path, img, *a, **k)
    if str(path).endswith("level_1_step_000002.png"):
        signal.pause()
images.save_image = save_image
"""


@pytest.mark.slow
def test_three_levels_interrupted_at_the_middle_level_resume_to_the_uninterrupted_result(
        tmp_path, synthetic_weights_file, nstjax_cache):
    args = [*small_run_args(synthetic_weights_file, tmp_path)[:-1], "image.size=64", *SHALLOW, "optim.steps=4",
            "pyramid.min_size=16", "pyramid.steps=4", "chunk_steps=1", "save_every=1", "checkpoint_every=0",
            "init=noise", "seed=2"]
    reference = tmp_path / "reference"
    proc = run_cli([*args, f"hydra.run.dir={reference}"], nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (reference / "history.csv").read_text().splitlines()
    assert rows[0] == "step,total,content,style,tv,level,temporal,frame,pass"
    assert [r.split(",")[5] for r in rows[1:]] == ["0"] * 5 + ["1"] * 5 + ["2"] * 5
    assert sorted(p.name for p in (reference / "levels").iterdir()) == [f"level_{k}.png" for k in range(3)]
    metrics = json.loads((reference / "metrics.json").read_text())
    assert [lv["size"] for lv in metrics["levels"]] == [[12, 16], [24, 32], [48, 64]]
    assert metrics["steps"] == 12 and metrics["image_size"] == [48, 64]

    run_dir = tmp_path / "interrupted"
    child = subprocess.Popen(patched_cli_args(PAUSE, [*args, f"hydra.run.dir={run_dir}"]), cwd=ROOT,
                             env=env(nstjax_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "snapshots" / "level_1_step_000002.png"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-2000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr[-2000:]
    meta = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert meta["level"] == 1 and meta["step"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "levels" / "level_1.png").exists()

    resumed = run_cli(["progress=false", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'r'}"], nstjax_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "history.csv").read_text() == (reference / "history.csv").read_text()
    for name in ("result.png", "levels/level_0.png", "levels/level_1.png", "levels/level_2.png"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
