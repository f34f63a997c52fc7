"""The research studies in experiments/ run end to end on synthetic weights."""

import subprocess
import sys

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
