"""Batched sweeps: grouping, members equal to their solo runs, outputs, bad points, divergence,
signals and resume, waves, sharding over devices, Hydra's submitit launcher, yardsticks."""

import csv
import json
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cli import EXAMPLES, ROOT, env, quick_conv, run_cli, start_cli, tree_digest, wait_for_files
from nstjax import config, sweeps, transfer
from nstjax.optimize import HistoryRow
from nstjax.outputs import read_history
from nstjax.sheet import grid_sheet
from nstjax.spec import parse
from nstjax.vgg import CAFFE, VGG
from nstjax.yardstick import CONTENT_LAYER, STYLE_LAYERS, yardstick, yardstick_targets


def small(weights, *extra):
    """Overrides of a fast run: synthetic weights, 32 px, a few L-BFGS steps without line search."""
    return [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
            f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", "optim.steps=4",
            "optim.linesearch=none", "optim.lr=0.5", "progress=false", *quick_conv(extra), *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_history_close(got, want, rtol=1e-5):
    """Equal rows up to float32 reduction order: each term within ``rtol`` of the row's total."""
    assert [r.step for r in got] == [r.step for r in want]
    got, want = np.array(got)[:, 1:], np.array(want)[:, 1:]
    assert (np.abs(got - want).max(axis=1) <= rtol * np.abs(want[:, 0])).all(), (got, want)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, synthetic_weights_file, nstjax_cache):
    """One batched sweep through the CLI: 2 β × 2 learning rates."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    args = [a for a in small(synthetic_weights_file) if not a.startswith("optim.lr")]
    proc = run_cli(["-m", *args, "loss.beta=1e3,1e5", "optim.lr=0.5,0.25",
                    f"hydra.sweep.dir={sweep_dir}"], nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_sweep_is_one_group_numbered_as_the_basic_sweeper(swept):
    sweep_dir, proc = swept
    assert "4 points in 1 group(s)" in proc.stderr
    expected = [("1000.0", "0.5"), ("1000.0", "0.25"), ("100000.0", "0.5"), ("100000.0", "0.25")]  # product
    for n, (beta, lr) in enumerate(expected):
        d = sweep_dir / str(n)
        cfg = OmegaConf.load(d / "config.yaml")
        assert (cfg.loss.beta, cfg.optim.lr) == (float(beta), float(lr))
        assert OmegaConf.load(d / ".hydra" / "overrides.yaml")[-2:] == [f"loss.beta={beta}", f"optim.lr={lr}"]
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["members"] == 4
        assert metrics["n"] == n and metrics["group"] == 0
        for name in ("result.png", "history.csv", "loss_curve.png"):
            assert (d / name).is_file()
    assert len(OmegaConf.load(sweep_dir / "groups.yaml").groups) == 1


@pytest.mark.parametrize("n", [0, 3])
def test_each_member_equals_its_solo_run(swept, n):
    sweep_dir, _ = swept
    cfg = config.from_container(OmegaConf.load(sweep_dir / str(n) / "config.yaml"))
    solo = transfer.optimize([cfg])[0]
    assert_history_close(read_history(sweep_dir / str(n) / "history.csv"), solo.history)


def test_sweep_csv_sheet_and_tradeoff(swept):
    sweep_dir, _ = swept
    rows = read_csv(sweep_dir / "sweep.csv")
    assert list(rows[0]) == ["n", "loss.beta", "optim.lr", *sweeps.SUMMARY_COLUMNS]
    assert [int(r["n"]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        metrics = json.loads((sweep_dir / r["n"] / "metrics.json").read_text())
        for key in ("total", "content", "style", "tv", "run_seconds"):
            assert float(r[key]) == pytest.approx(metrics[key], rel=1e-12)
        assert float(r["yardstick_content"]) == pytest.approx(metrics["yardstick"]["final"]["content"])
        assert float(r["yardstick_style"]) == pytest.approx(metrics["yardstick"]["final"]["style_mean"])
        assert (r["status"], int(r["steps"]), int(r["loss_evaluations"]), r["group"]) == ("finished", 4, 5, "0")
    # The sheet: a column per β, a row per learning rate, each tile the point's result (upscaled).
    tiles = [Image.open(sweep_dir / r["n"] / "result.png").convert("RGB") for r in rows]
    made = grid_sheet(tiles, rows, ["loss.beta", "optim.lr"])
    assert np.array_equal(np.asarray(Image.open(sweep_dir / "sheet.png").convert("RGB")), np.asarray(made.image))
    where = {}
    for r, tile, box in zip(rows, tiles, made.tiles):
        shown = made.image.crop(box).resize(tile.size, Image.LANCZOS)
        assert np.abs(np.asarray(shown, int) - np.asarray(tile, int)).mean() < 6, r["n"]
        where[int(r["n"])] = (box[1], box[0])
    assert where[0][0] == where[2][0] and where[1][0] == where[3][0]  # same lr, same row
    assert where[0][1] == where[1][1] and where[2][1] == where[3][1]  # same β, same column
    assert where[0][1] < where[2][1] and where[0][0] < where[1][0]
    assert Image.open(sweep_dir / "tradeoff.png").size[0] > 100


@pytest.mark.slow
def test_a_sweep_into_an_earlier_sweep_changes_nothing(swept, synthetic_weights_file, nstjax_cache):
    sweep_dir, _ = swept
    digest = tree_digest(sweep_dir)
    args = [a for a in small(synthetic_weights_file) if not a.startswith("optim.lr")]
    proc = run_cli(["-m", *args, "loss.beta=1e3,1e5", "optim.lr=0.5,0.25", f"hydra.sweep.dir={sweep_dir}"],
                   nstjax_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not empty" in lines[0] and f"resume={sweep_dir}" in lines[0], proc.stderr
    assert tree_digest(sweep_dir) == digest


@pytest.mark.slow
def test_a_bad_point_is_refused_before_anything_runs(tmp_path, synthetic_weights_file, nstjax_cache):
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", *small(synthetic_weights_file), "loss.beta=1e3,-1", f"hydra.sweep.dir={sweep_dir}"],
                   nstjax_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sweep point 1 "), proc.stderr
    assert "loss.beta" in lines[0]
    assert not sweep_dir.exists()


@pytest.mark.slow
def test_a_group_refused_by_the_memory_check_leaves_no_sweep(tmp_path, synthetic_weights_file, nstjax_cache):
    sweep_dir = tmp_path / "new" / "multirun"
    proc = run_cli(["-m", *small(synthetic_weights_file), "optim.memory_size=100000000",
                    "loss.beta=1e3,1e5", f"hydra.sweep.dir={sweep_dir}"], nstjax_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " points in " not in ln]
    assert len(lines) == 1 and "GiB is free" in lines[0], proc.stderr
    assert not (tmp_path / "new").exists()


def _point(n, overrides):
    cfg = config.compose(overrides)
    return sweeps.Point(n, overrides, {}, cfg)


def test_points_are_grouped_by_structure(synthetic_weights_file):
    base = [o for o in small(synthetic_weights_file) if "linesearch" not in o]
    lbfgs = ["optim=lbfgs", "optim.linesearch=none"]
    points = [base + [f"image.size={size}", f"loss.beta={beta}"] + (lbfgs if optim == "lbfgs" else ["optim=adam"])
              for size in (32, 48) for optim in ("adam", "lbfgs") for beta in (1.0, 2.0)]
    # Layer weights, seed, learning rate and another style image: a member of the (32, lbfgs) group.
    points.append(base + lbfgs + ["loss.style_layer_weights=[0,0,0,0,1]", "seed=4", "optim.lr=0.3",
                                  f"style={EXAMPLES / 'the_scream.jpg'}"])
    # A content image of another aspect ratio: another resized shape, another group.
    points.append(base + lbfgs + [f"content={EXAMPLES / 'the_scream.jpg'}"])
    groups = sweeps.plan([_point(n, p) for n, p in enumerate(points)])
    assert [[p.n for p in g] for g in groups] == [[0, 1], [2, 3, 8], [4, 5], [6, 7], [9]]


@pytest.mark.slow
def test_a_diverging_member_stops_alone(tmp_path, synthetic_weights_file, nstjax_cache):
    sweep_dir = tmp_path / "multirun"
    args = [a for a in small(synthetic_weights_file) if "linesearch" not in a]
    proc = run_cli(["-m", *args, "optim=adam", "optim.lr=0.05,1e39", f"hydra.sweep.dir={sweep_dir}"],
                   nstjax_cache)
    assert proc.returncode == 3, proc.stderr[-2000:]
    ok, bad = (json.loads((sweep_dir / n / "metrics.json").read_text()) for n in ("0", "1"))
    assert ok["status"] == "finished" and ok["steps"] == 4
    assert bad["status"] == "diverged" and bad["steps"] == 0 and "NaN" in bad["reason"]
    kept = np.asarray(Image.open(sweep_dir / "1" / "result.png"), np.float32) / 255
    assert kept.std() > 0.05  # the content image, its last finite image
    assert [r["status"] for r in read_csv(sweep_dir / "sweep.csv")] == ["finished", "diverged"]


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_uninterrupted_result(tmp_path, synthetic_weights_file,
                                                               nstjax_cache):
    """Two groups (two image sizes) of two β each; SIGINT during the first group."""
    args = ["-m", *small(synthetic_weights_file), "image.size=32,40", "loss.beta=1e3,1e5", "optim.steps=30",
            "chunk_steps=1", "save_every=1", "checkpoint_every=0", "init=noise", "seed=3"]
    reference = tmp_path / "reference"
    proc = run_cli(args + [f"hydra.sweep.dir={reference}"], nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]

    sweep_dir = tmp_path / "interrupted"
    running = start_cli(args + [f"hydra.sweep.dir={sweep_dir}"], nstjax_cache)
    wait_for_files(sweep_dir / "0" / "snapshots", running)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and f"resume={sweep_dir}" in stderr
    statuses = [r["status"] for r in read_csv(sweep_dir / "sweep.csv")]
    assert statuses == ["interrupted", "interrupted", "pending", "pending"]
    assert (sweep_dir / "groups" / "0" / "checkpoint" / "checkpoint.json").is_file()
    steps = json.loads((sweep_dir / "0" / "metrics.json").read_text())["steps"]
    assert 0 < steps < 30

    resumed = run_cli(["progress=false", f"resume={sweep_dir}", f"hydra.run.dir={tmp_path / 'r'}"],
                      nstjax_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for n in range(4):
        assert (sweep_dir / str(n) / "history.csv").read_text() == (reference / str(n) / "history.csv").read_text()
        assert (sweep_dir / str(n) / "result.png").read_bytes() == (reference / str(n) / "result.png").read_bytes()
    assert [r["status"] for r in read_csv(sweep_dir / "sweep.csv")] == ["finished"] * 4

    before = {n: (sweep_dir / str(n) / "result.png").stat().st_mtime_ns for n in range(4)}
    again = run_cli(["progress=false", f"resume={sweep_dir}", f"hydra.run.dir={tmp_path / 'r2'}"], nstjax_cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert before == {n: (sweep_dir / str(n) / "result.png").stat().st_mtime_ns for n in range(4)}


@pytest.mark.slow
def test_waves_equal_one_program(synthetic_weights_file):
    cfgs = [config.compose(small(synthetic_weights_file, f"loss.beta={b}", "max_members=2"))
            for b in (1e2, 1e3, 1e4)]
    logged = []
    waves = transfer.optimize(cfgs, log=logged.append)
    assert any("3 members in 2 waves of at most 2" in m for m in logged)
    for cfg in cfgs:
        cfg.max_members = None
    together = transfer.optimize(cfgs, log=logged.append)
    for a, b in zip(waves, together):
        assert_history_close(a.history, b.history)


@pytest.mark.slow
def test_members_may_differ_in_their_images(synthetic_weights_file, tmp_path):
    """A folder of photos styled in one program: members equal their solo runs."""
    flipped = tmp_path / "flipped.png"
    Image.open(EXAMPLES / "tubingen.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    cfgs = [config.compose(small(synthetic_weights_file, f"content={c}", f"style={s}"))
            for c, s in ((EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg"),
                         (flipped, EXAMPLES / "the_scream.jpg"))]
    both = transfer.optimize(cfgs)
    for cfg, member in zip(cfgs, both):
        assert_history_close(member.history, transfer.optimize([cfg])[0].history)
    assert both[0].history[-1].total != both[1].history[-1].total


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    from nstjax import config, transfer
    assert jax.local_device_count() == 4
    out = {}
    for mode in ("vmap", "map"):
        cfgs = [config.compose(json.loads(sys.argv[1]) + [f"loss.beta={b}", f"member_batching={mode}"])
                for b in (1e2, 1e3, 1e4)]
        out[mode] = [[list(r) for r in m.history] for m in transfer.optimize(cfgs)]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_members_sharded_over_four_devices_equal_unsharded(synthetic_weights_file, nstjax_cache):
    overrides = small(synthetic_weights_file)
    e = env(nstjax_cache)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    proc = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(overrides)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.splitlines()[-1])
    cfgs = [config.compose(overrides + [f"loss.beta={b}"]) for b in (1e2, 1e3, 1e4)]
    for mode in ("vmap", "map"):  # shardings of the whole program; shard_map over lax.map
        for got, want in zip(sharded[mode], transfer.optimize(cfgs)):
            assert_history_close([HistoryRow(*r) for r in got], want.history)


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_group_as_a_job(tmp_path, synthetic_weights_file, nstjax_cache):
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", *small(synthetic_weights_file), "image.size=32,40", "loss.beta=1e3,1e5",
                    "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"], nstjax_cache, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(sweep_dir / "sweep.csv")
    assert [(r["status"], r["group"]) for r in rows] == [("finished", "0"), ("finished", "0"),
                                                          ("finished", "1"), ("finished", "1")]
    jobs = [d.name for d in (sweep_dir / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2  # one submitit job (a process of its own) per group


@pytest.mark.slow
def test_yardsticks_follow_the_formulas(synthetic_params):
    rng = np.random.default_rng(5)
    model = VGG(CAFFE, "avg")
    content, style, x = (jnp.asarray(rng.random(s), jnp.float32) for s in ((32, 24, 3), (40, 32, 3), (32, 24, 3)))
    got = yardstick(model, synthetic_params, x, yardstick_targets(model, synthetic_params, content, style))

    def feats(img, name):
        return np.asarray(model.apply({"params": synthetic_params}, img[None], (name,))[name][0], np.float64)

    f, p = feats(x, CONTENT_LAYER), feats(content, CONTENT_LAYER)
    np.testing.assert_allclose(float(got["content"]), 0.5 * np.sum((f - p) ** 2), rtol=1e-4)
    for i, name in enumerate(STYLE_LAYERS):
        fx, fs = feats(x, name), feats(style, name)
        n, m = fx.shape[-1], fx.shape[0] * fx.shape[1]
        g = fx.reshape(m, n).T @ fx.reshape(m, n)
        a = fs.reshape(-1, n).T @ fs.reshape(-1, n)
        np.testing.assert_allclose(float(got["style"][i]), np.sum((g - a) ** 2) / (4 * n**2 * m**2), rtol=1e-4)


@pytest.mark.slow
def test_a_group_larger_than_free_memory_runs_in_waves_that_fit(synthetic_weights_file, monkeypatch):
    from nstjax import driver
    from nstjax.build import build_group

    cfgs = [config.compose(small(synthetic_weights_file, f"loss.beta={b}")) for b in (1e2, 1e3, 1e4, 1e5)]
    logged = []
    d = driver.Driver(build_group([parse(c) for c in cfgs]), None, [None] * 4, log=logged.append)
    last = len(d.levels) - 1
    need = {k: max(driver.program_bytes(p) for p in (d.programs(last, k).program.init, d.programs(last, k).program.chunk,
                                                     d.programs(last, k).yardstick)) for k in (4, 2)}
    assert need[2] < need[4]
    monkeypatch.setattr(driver, "free_memory_bytes", lambda: (need[2] + need[4]) // 2)
    assert d.wave_size() == 2
    results = d.run(lambda *_: None)
    assert sorted(results) == [0, 1, 2, 3] and {r.status for r in results.values()} == {"finished"}
    assert any("4 members in 2 waves of at most 2" in m for m in logged)
    monkeypatch.setattr(driver, "free_memory_bytes", lambda: need[2] // 4)  # not even one device's worth
    with pytest.raises(driver.UserError, match="GiB is free"):
        driver.Driver(build_group([parse(c) for c in cfgs[:2]]), None, [None] * 2).wave_size()
