"""End to end through the real CLI: outputs, history, presets' keys, multirun, defaults."""

import csv
import json

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cli import EXAMPLES, run_cli, small_run_args
from nstjax import config
from nstjax.losses import compute_targets, make_objective
from nstjax.build import initial_image, validate
from nstjax.spec import parse
from nstjax.vgg import VGG
from nstjax.weights import load_weights

config.register()


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, synthetic_weights_file, nstjax_cache):
    """One Adam and one L-BFGS run of the real CLI, shared by the tests below."""
    runs = {}
    for optim in ("adam", "lbfgs"):
        run_dir = tmp_path_factory.mktemp(optim) / "run"
        extra = [f"optim={optim}", "save_every=2", "model.conv=winograd"]
        if optim == "lbfgs":
            extra.append("optim.linesearch=none")
        args = small_run_args(synthetic_weights_file, run_dir, *extra)
        if optim == "adam":
            args = [a for a in args if a != "optim.linesearch=none"] + ["optim.lr=0.05"]
        proc = run_cli(args, nstjax_cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[optim] = run_dir
    return runs


@pytest.mark.parametrize("optim", ["adam", "lbfgs"])
def test_run_finishes_lowers_the_loss_and_writes_its_outputs(finished_runs, optim):
    run_dir = finished_runs[optim]
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "total", "content", "style", "tv", "level", "temporal", "frame", "pass"]
    assert {r["temporal"] for r in rows} == {"0.0"} and {r["frame"] for r in rows} == {"0"} == {r["pass"] for r in rows}
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert float(rows[-1]["total"]) < float(rows[0]["total"])
    for r in rows:
        assert float(r["total"]) == pytest.approx(
            float(r["content"]) + float(r["style"]) + float(r["tv"]), rel=1e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("steps", "loss_evaluations", "compile_seconds", "run_seconds", "total", "content",
                "style", "tv", "image_size", "weights", "device", "seed", "versions"):
        assert key in metrics, key
    assert metrics["steps"] == 4 and metrics["loss_evaluations"] == 5
    assert metrics["total"] == pytest.approx(float(rows[-1]["total"]), rel=1e-6)
    assert metrics["status"] == "finished"
    assert metrics["conv"] == "winograd"
    for lib in ("jax", "flax", "optax"):
        assert metrics["versions"][lib] != "unknown"
    result = Image.open(run_dir / "result.png")
    h, w = metrics["image_size"]
    assert result.size == (w, h) and max(h, w) == 32
    src = Image.open(EXAMPLES / "tubingen.jpg")
    assert abs(w / h - src.width / src.height) < 0.05  # the content's aspect ratio
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        "step_000002.png", "step_000004.png"]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.optim.name == optim and resolved.image.size == 32


def test_history_step0_is_the_objective_at_the_initial_image(finished_runs):
    run_dir = finished_runs["lbfgs"]
    cfg = OmegaConf.merge(OmegaConf.structured(config.Config(optim=config.LBFGSConfig())),
                          OmegaConf.load(run_dir / "config.yaml"))
    point = parse(cfg)
    spec = point.structure.loss
    weights = load_weights(cfg.model.weights)
    inputs = validate(point)
    content, style = inputs.content, inputs.style
    x0 = initial_image(point, content, [style], weights.preprocessing, jax.random.key(cfg.seed))
    model = VGG(weights.preprocessing, cfg.model.pooling.value)
    targets = compute_targets(model, weights.params, content, style, spec)
    terms = make_objective(model, spec)(x0, weights.params, targets, point.member.hparams(spec))
    with open(run_dir / "history.csv", newline="") as f:
        row0 = next(csv.DictReader(f))
    for name in ("total", "content", "style", "tv"):
        assert float(row0[name]) == pytest.approx(float(getattr(terms, name)), rel=1e-4, abs=1e-3)


@pytest.mark.slow
def test_basic_sweeper_runs_one_job_per_point(tmp_path, synthetic_weights_file, nstjax_cache):
    sweep = tmp_path / "sweep"
    args = [a for a in small_run_args(synthetic_weights_file, tmp_path / "unused")
            if not a.startswith("hydra.run.dir")]
    proc = run_cli(["-m", "hydra/sweeper=basic", *args, "optim.steps=2", "loss.beta=1e3,1e5",
                    f"hydra.sweep.dir={sweep}"], nstjax_cache, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "result.png").exists())
    assert [d.name for d in dirs] == ["0", "1"]
    betas = [OmegaConf.load(d / "config.yaml").loss.beta for d in dirs]
    assert betas == [1e3, 1e5]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    assert metrics[0]["style"] != metrics[1]["style"]
    assert [m["members"] for m in metrics] == [1, 1]  # one job, one program, per point
    assert not (sweep / "sweep.csv").exists()


@pytest.mark.slow
def test_no_argument_run_uses_the_bundled_images(tmp_path, synthetic_weights_file):
    """With no content/style the run takes examples/ and the default weights from the cache."""
    from nstjax.weights import SOURCES

    cache = tmp_path / "cache"
    cache.mkdir()
    # The default weights as the cache keeps them after a download (here: synthetic values).
    (cache / SOURCES["vgg19"].canonical_filename).write_bytes(synthetic_weights_file.read_bytes())
    run_dir = tmp_path / "run"
    proc = run_cli(["image.size=32", "optim.steps=1", "optim.linesearch=none", "progress=false",
                    f"hydra.run.dir={run_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["content_image"].endswith("tubingen.jpg")
    assert metrics["style_image"].endswith("starry_night.jpg")
    assert metrics["weights"] == "vgg19"
    assert np.asarray(Image.open(run_dir / "result.png")).std() > 0
