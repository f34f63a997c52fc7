"""What the documentation promises about the keys of a run, each checked where it shows.

Through the CLI (few processes, several keys each): model.remat=on, model.conv=direct,
optim.max_evaluations, image.max_pixels=null, image.style_scale, memory_check=false, the
progress bar, metrics.json's style_size, platform and weights_sha256; a sweep over init=style,
init=PATH, init=noise and seeds. In one process: model.precision=tf32 and bfloat16 on a CPU,
model.preprocessing, and divergence from an infinite loss.
"""

import hashlib
import json
import re
import subprocess

import pytest
import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from cli import EXAMPLES, ROOT, env, patched_cli_args, run_cli, small_run_args
from nstjax import config, transfer
from nstjax.vgg import CAFFE, TORCHVISION

NO_FREE_MEMORY = """
import nstjax.driver
assert callable(nstjax.driver.free_memory_bytes)
nstjax.driver.free_memory_bytes = lambda: 0  # with memory_check=true every run would be refused
"""


@pytest.mark.slow
def test_run_keys_metrics_and_progress_bar(tmp_path, synthetic_weights_file, nstjax_cache):
    run_dir = tmp_path / "run"
    args = [a for a in small_run_args(synthetic_weights_file, run_dir) if a != "progress=false"]
    args += ["progress=true", "model.remat=on", "optim.steps=10", "optim.max_evaluations=3",
             "image.max_pixels=null", "image.style_scale=1.5", "memory_check=false"]
    proc = subprocess.run(patched_cli_args(NO_FREE_MEMORY, args), cwd=ROOT, env=env(nstjax_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert (m["status"], m["conv"], m["remat"], m["precision"]) == ("finished", "direct", True, "float32")
    # L-BFGS without line search: one evaluation at the start and one a step, so 3 allow 2 steps.
    assert (m["steps"], m["loss_evaluations"]) == (2, 3)
    assert max(m["image_size"]) == 32 and max(m["style_size"]) == 48  # size × style_scale
    assert m["platform"] == "cpu"
    assert m["weights_sha256"] == hashlib.sha256(synthetic_weights_file.read_bytes()).hexdigest()
    # The bar: steps done of optim.steps, and the current terms.
    bar = [ln for ln in proc.stderr.splitlines() if " 2/10 [" in ln][-1]
    for term in ("total", "content", "style", "tv"):
        assert re.search(rf"\b{term}=[0-9]", bar), (term, bar)


def _rgb(path, size=None):
    img = Image.open(path).convert("RGB")
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS) if size else img, np.float32) / 255


@pytest.mark.slow
def test_init_style_path_noise_and_seeds(tmp_path, synthetic_weights_file, nstjax_cache):
    """optim.steps=0: each point's result is its initial image."""
    flipped = tmp_path / "flipped.png"
    Image.open(EXAMPLES / "the_scream.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    sweep_dir = tmp_path / "sweep"
    args = [a for a in small_run_args(synthetic_weights_file, tmp_path / "unused") if not a.startswith("hydra.")]
    proc = run_cli(["-m", *args, "optim.steps=0", f"init=style,{flipped},noise", "seed=1,2",
                    f"hydra.sweep.dir={sweep_dir}"], nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 points in 1 group(s)" in proc.stderr
    results = [_rgb(sweep_dir / str(n) / "result.png") for n in range(6)]
    inits = [(OmegaConf.load(sweep_dir / str(n) / "config.yaml").init,
              OmegaConf.load(sweep_dir / str(n) / "config.yaml").seed) for n in range(6)]
    assert inits == [("style", 1), ("style", 2), (str(flipped), 1), (str(flipped), 2), ("noise", 1), ("noise", 2)]
    h, w = results[0].shape[:2]
    content = _rgb(EXAMPLES / "tubingen.jpg", (w, h))
    for n, source in ((0, EXAMPLES / "starry_night.jpg"), (2, flipped)):
        expected = _rgb(source, (w, h))  # the image resized to the content's shape
        assert np.abs(results[n] - expected).mean() < 0.05, n
        assert np.abs(results[n] - content).mean() > 0.1, n
    np.testing.assert_array_equal(results[0], results[1])  # the seed only draws the noise
    np.testing.assert_array_equal(results[2], results[3])
    assert np.abs(results[4] - results[5]).mean() > 0.1  # another seed, other noise
    for noise in results[4:]:  # mean pixel + 0.25·N(0, 1), clipped
        np.testing.assert_allclose(noise.mean(axis=(0, 1)), CAFFE.mean_rgb(), atol=0.05)
        assert 0.15 < noise.std() < 0.3


def _overrides(weights, *extra):
    return [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
            f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", "optim.steps=2", "optim.linesearch=none",
            "optim.lr=0.5", "progress=false", "model.conv=direct", *extra]


def _preprocessing(p):
    return (f"model.preprocessing={{channel_order:{p.channel_order},scale:{p.scale},"
            f"mean:[{','.join(map(str, p.mean))}],std:[{','.join(map(str, p.std))}]}}")


@pytest.mark.slow
def test_precision_preprocessing_and_an_infinite_loss(synthetic_weights_file):
    variants = {
        "float32": [],
        "beta 1e38": ["loss.beta=1e38"],  # β·E_l overflows float32: the loss is Inf at the start
        "tf32": ["model.precision=tf32"],
        "bfloat16": ["model.precision=bfloat16"],
        "its own preprocessing": [_preprocessing(CAFFE)],  # what the weights file says itself
        "torchvision preprocessing": [_preprocessing(TORCHVISION)],
    }
    cfgs = [config.compose(_overrides(synthetic_weights_file, *extra)) for extra in variants.values()]
    results = dict(zip(variants, transfer.optimize(cfgs)))
    f32 = results["float32"]
    assert f32.status == "finished" and f32.steps == 2

    nan = results["beta 1e38"]
    assert (nan.status, nan.steps) == ("diverged", 0)
    assert nan.reason == "the loss or its gradient became NaN or Inf"
    assert np.isfinite(nan.image).all()

    def totals(r):
        return np.array([row.total for row in r.history])

    for name, rtol in (("tf32", 1e-3), ("bfloat16", 5e-2)):
        r = results[name]
        assert r.status == "finished" and r.steps == 2, name
        np.testing.assert_allclose(totals(r), totals(f32), rtol=rtol, err_msg=name)
    assert totals(results["bfloat16"])[0] != totals(f32)[0]  # the convolutions did run in bfloat16
    np.testing.assert_allclose(totals(results["its own preprocessing"]), totals(f32), rtol=1e-6)  # f32: 2 members
    other = totals(results["torchvision preprocessing"])[0]
    assert abs(other - totals(f32)[0]) > 0.01 * totals(f32)[0]

