"""The research studies in experiments/ run end to end on synthetic weights."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from PIL import Image

from cli import EXAMPLES, ROOT, env


def test_beta_sweep_writes_its_table_and_sheet(tmp_path, synthetic_weights_file, nstjax_cache):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "beta_sweep" / "sweep.py"),
         "--betas", "1e2,1e6", "--out", str(out), f"model.weights={synthetic_weights_file}",
         f"content={EXAMPLES / 'chelsea.png'}", f"style={EXAMPLES / 'the_scream.jpg'}",
         "image.size=32", "optim.steps=3", "save_every=0", "progress=false"],
        cwd=tmp_path, env=env(nstjax_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "table.md").read_text().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["1e+02", "1e+06"]
    styles = [float(r.split("|")[3]) for r in rows]
    assert styles[0] != styles[1]
    sheet = Image.open(out / "sheet.png")
    assert sheet.width == 2 * max(Image.open(p).width for p in (out / "runs").glob("*/result.png"))


def test_style_losses_study_scales_beta_so_style_terms_start_equal(tmp_path, synthetic_weights_file, nstjax_cache):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "style_losses" / "sweep.py"), "--losses", "gram,mean_std",
         "--out", str(out), f"model.weights={synthetic_weights_file}", f"content={EXAMPLES / 'chelsea.png'}",
         f"style={EXAMPLES / 'the_scream.jpg'}", "image.size=32", "optim.steps=1", "model.conv=direct",
         "loss.content_layers=[relu2_1]", "loss.style_layers=[relu1_1,relu2_1]", "loss.style_layer_weights=null",
         "progress=false"],
        cwd=tmp_path, env=env(nstjax_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    betas = json.loads((out / "betas.json").read_text())
    assert betas["beta_gram"] == 1e4 and betas["betas"]["gram"] == 1e4  # the preview preset's β
    starts = []
    for n, name in enumerate(("gram", "mean_std")):
        cfg = OmegaConf.load(out / "runs" / str(n) / "config.yaml")
        assert cfg.loss.style_loss == name and cfg.loss.beta == pytest.approx(betas["betas"][name], rel=1e-12)
        starts.append(float((out / "runs" / str(n) / "history.csv").read_text().splitlines()[1].split(",")[3]))
    assert betas["betas"]["mean_std"] != 1e4 and starts[1] == pytest.approx(starts[0], rel=1e-5)
    rows = (out / "table.md").read_text().splitlines()
    assert rows[0].split("|")[2:4] == [" `loss.style_loss` ", " β "] and "s / evaluation" in rows[0]
    assert [r.split("|")[2].strip() for r in rows[2:]] == ["gram", "mean_std"]
    assert Image.open(out / "sheet.png").width >= 2 * 32
