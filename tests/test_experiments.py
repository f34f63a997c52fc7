"""The research studies in experiments/ run end to end on synthetic weights."""

import csv
import subprocess
import sys

import pytest
from PIL import Image

from cli import EXAMPLES, ROOT, env

pytestmark = pytest.mark.slow  # the studies end to end

STUDIES = {
    "beta_sweep": (["--betas", "1e2,1e6"], [("β", ["100.0", "1000000.0"])]),  # as Hydra writes them
    "alpha_beta": (["--betas", "1e2,1e4", "--depths", "2"],
                   [("β (α = 1)", ["100.0", "100.0", "10000.0", "10000.0"]),
                    ("w_l (relu1_1 … relu5_1)", ["[1.0,0,0,0,0]", "[0.5,0.5,0,0,0]"] * 2)]),
    "layer_ablation": ([], [("w_l (relu1_1 … relu5_1)",
                             ["[1,0,0,0,0]", "[0,1,0,0,0]", "[0,0,1,0,0]", "[0,0,0,1,0]", "[0,0,0,0,1]",
                              "[0.2,0.2,0.2,0.2,0.2]"])]),
}


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_writes_its_table_and_sheet(name, tmp_path, synthetic_weights_file, nstjax_cache):
    options, columns = STUDIES[name]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name / "sweep.py"), *options, "--out", str(out),
         f"model.weights={synthetic_weights_file}", f"content={EXAMPLES / 'chelsea.png'}",
         f"style={EXAMPLES / 'the_scream.jpg'}", "image.size=32", "optim.steps=1", "save_every=0",
         "progress=false", "model.conv=direct"],
        cwd=tmp_path, env=env(nstjax_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 group(s)" in proc.stderr  # every point a member of one program
    lines = (out / "table.md").read_text().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    for column, values in columns:
        got = [r[head.index(column)] for r in rows]
        assert [v.replace(" ", "") for v in got] == values, (column, got)
    assert {r[head.index("status")] for r in rows} == {"finished"}
    assert all(float(r[head.index("style yardstick")]) > 0 for r in rows)
    with open(out / "runs" / "sweep.csv", newline="") as f:
        totals = [float(r["total"]) for r in csv.DictReader(f)]
    assert len(set(totals)) == len(rows)  # the points differ
    sheet = Image.open(out / "sheet.png")
    tile = Image.open(out / "runs" / "0" / "result.png")
    assert sheet.width > len({r[head.index(columns[0][0])] for r in rows}) * tile.width
