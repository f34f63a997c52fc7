"""benchmarks.gpu, the prepared GPU check: its dry run on a CPU (the whole code path at tiny sizes)
and its search for the largest size that fits."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_fit_search_doubles_until_a_failure_then_bisects_once():
    from benchmarks.gpu import fit_search

    probed = []

    def probe(size):
        probed.append(size)
        return {"size": size, "fits": size <= 5000}

    res = fit_search(probe, 1024, 32768, lambda: True)
    assert probed == [1024, 2048, 4096, 8192, 6144]
    assert (res["largest"], res["first_failure"], res["bisected_at"]) == (4096, 6144, 6144)
    probed.clear()
    res = fit_search(probe, 1024, 32768, lambda: len(probed) < 2)
    assert probed == [1024, 2048] and res["largest"] == 2048 and res["stopped"] == "out of time"


@pytest.mark.torch
def test_dry_run_on_a_cpu_reports_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("no GPU: ")
    rep = json.loads(out.read_text())
    assert rep["dry_run"] is True

    [row] = rep["per_evaluation"]
    for prec in ("float32", "tf32", "bfloat16"):
        side = row["jax"][prec]
        assert _number(side["eval_s"]) and _number(side["achieved_tflops"]) and _number(side["fraction_of_peak"])
    assert _number(row["jax"]["float32"]["loop_eval_s"])
    assert _number(row["torch"]["float32"]["eval_s"]) and _number(row["torch"]["float32"]["achieved_tflops"])

    for mode in ("plain", "remat"):
        assert _number(rep["fit"][mode]["largest"]) and rep["fit"][mode]["tried"]

    rows = rep["sweep"]["rows"]
    assert [r["points"] for r in rows] == [1, 2]
    for r in rows:
        assert _number(r["nstjax"]["members_steps_per_s"]) and _number(r["basic"]["members_steps_per_s"])
        assert _number(r["throughput_ratio"])
    assert rows[-1]["basic"]["estimated"] and not rows[0]["basic"].get("estimated")

    assert _number(rep["ttq"]["torch"]["run_s"]) and _number(rep["ttq"]["torch"]["best_loss"])
    assert rep["ttq"]["jax"] and all(_number(r["compile_s"]) and _number(r["run_s"]) for r in rep["ttq"]["jax"])

    for what in ("eval", "loop", "ttq", "sweep", "fit"):
        assert rep["compile_s"][what] and all(_number(v) for v in rep["compile_s"][what].values()), what
    assert set(rep["peak"]["tflops"]) == {"float32", "tf32", "bfloat16"}
    assert all(_number(v) and v > 0 for v in rep["peak"]["tflops"].values())
    assert [type(t["passed"]) for t in rep["targets"]] == [bool] * 3
    assert sum(ln.startswith(("PASS ", "FAIL ")) for ln in proc.stdout.splitlines()) == 3
