"""benchmarks.gpu, the prepared GPU check: its dry run on a CPU (the whole code path at tiny sizes,
in under a minute), its time budget, its JSON rewritten after every part, its refusal of an --out it
cannot write, and its search for the largest size that fits."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("environment", "agreement", "per_evaluation", "batched_loop", "large", "fit")
FINAL = ("done", "cut short", "skipped", "failed")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


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


def test_targets_pass_fail_or_not_measured():
    from benchmarks.gpu import GPU, PARTS as parts, targets

    report = {"parts": {name: {"status": "pending"} for name in parts}}
    assert [t["verdict"] for t in targets(report, GPU)] == ["NOT MEASURED"] * 3
    report["parts"]["per_evaluation"]["result"] = {"measurements": {
        "nstjax float32 direct": {"eval_s": 0.012}, "nstjax float32 xla": {"eval_s": 0.009},
        "pytorch float32": {"eval_s": 0.008}}}
    report["parts"]["batched_loop"]["result"] = {"measurements": {
        "K=1": {"members_steps_per_s": 100.0}, "K=8": {"members_steps_per_s": 300.0},
        "K=32": {"members_steps_per_s": 450.0}}}
    got = targets(report, GPU)
    assert [t["verdict"] for t in got] == ["PASS", "FAIL", "PASS"]
    assert got[0]["measurement"] == "nstjax float32 xla" and got[2]["ratio"] == 4.5


def test_an_unwritable_out_fails_at_once_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.monotonic()
    proc = _check("--out", blocker / "gpu", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot write to --out" in proc.stderr
    assert time.monotonic() - t0 < 20  # before jax, torch or any measurement


@pytest.mark.slow
@pytest.mark.torch
def test_dry_run_reports_every_part_with_numbers_and_rewrites_the_json_after_each(tmp_path):
    out = tmp_path / "check"
    path = out / "gpu.json"
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    versions, last = [], None
    while proc.poll() is None:  # every version of gpu.json the check writes is valid JSON
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        if text is not None and text != last:
            versions.append({n: p["status"] for n, p in json.loads(text)["parts"].items()})
            last = text
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t0
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert wall <= 60, f"the dry run took {wall:.0f} s"
    assert stdout.startswith("no GPU: ")
    assert (out / "gpu.log").read_text() == stdout  # the log, teed
    assert {p: p.stat().st_mtime_ns for p in results} == before  # nothing written outside --out

    # rewritten as the parts went: each part seen running after the ones before it had finished
    for i, name in enumerate(PARTS):
        assert any(v[name] == "running" and all(v[n].startswith(FINAL) for n in PARTS[:i])
                   and all(v[n] == "pending" for n in PARTS[i + 1:]) for v in versions), (name, versions)

    rep = json.loads(path.read_text())
    assert rep["dry_run"] is True and rep["finished"] is True and rep["exit_status"] == 0
    assert rep["budget"]["used_s"] <= rep["budget"]["total_s"] + rep["budget"]["grace_s"]
    # Each part ran and measured; on a busy machine its budget may cut one short (later
    # measurements 'not run (no time)'), and then only what it measured is checked.
    status = {n: rep["parts"][n]["status"] for n in PARTS}
    assert status["environment"] == status["agreement"] == "done", status
    assert all(s in ("done", "cut short") for s in status.values()), status

    def measured(part, keys):
        ms = rep["parts"][part]["result"]["measurements"]
        assert set(keys) <= set(ms), (part, sorted(ms))
        done = [k for k in keys if ms[k]["status"] == "done"]
        assert done and (status[part] == "cut short" or done == keys), (part, {k: ms[k]["status"] for k in keys})
        return {k: ms[k] for k in done}

    env = rep["parts"]["environment"]["result"]
    for name in ("python", "jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        assert env["versions"][name], name
    assert env["device_kind"] and isinstance(env["memory_stats_keys"], list)
    assert {"cudnn_jax", "cudnn_torch", "nvidia_smi"} <= set(env) and env["torch"]["torch"]

    ag = rep["parts"]["agreement"]["result"]
    assert ag["agree"] is True and ag["rel_diff"] <= 1e-4 and _number(ag["grad_rel_l2"]) and ag["grad_rel_l2"] < 1e-3

    for part, keys in (("per_evaluation", [f"nstjax {p} {c}" for p in ("float32", "tf32", "bfloat16")
                                           for c in ("direct", "xla")]
                        + ["pytorch float32", "pytorch tf32", "pytorch tf32 cudnn.benchmark"]),
                       ("large", ["nstjax float32 direct", "pytorch float32", "nstjax float32 xla",
                                  "pytorch tf32 cudnn.benchmark"])):
        for key, r in measured(part, keys).items():
            assert _number(r["eval_s"]) and _number(r["achieved_tflops"]) and _number(r["fraction_of_peak"])
            assert r["loss_rel_diff_vs_nstjax_float32"] < (1e-2 if "bfloat16" in key else 1e-4), (part, key)
            if key.startswith("nstjax"):
                assert _number(r["compile_s"]) and r["conv"] == key.split()[-1]

    for r in measured("batched_loop", ["K=1", "K=2"]).values():
        assert _number(r["members_steps_per_s"]) and _number(r["compile_s"]) and _number(r["program_bytes"])
        assert r["members_steps"] == r["members"] * rep["plan"]["loop_steps"] * rep["plan"]["loop_chunks"]

    fit = rep["parts"]["fit"]["result"]
    assert _number(fit["plain"]["largest"]) and fit["plain_tried"]
    if status["fit"] == "done":
        assert _number(fit["remat"]["largest"]) and fit["remat_tried"]

    assert len(rep["targets"]) == 3 and type(rep["targets"][0]["passed"]) is bool
    assert all(t["verdict"] in ("PASS", "FAIL", "NOT MEASURED") for t in rep["targets"])
    assert sum(ln.startswith(("PASS ", "FAIL ", "NOT MEASURED ")) for ln in stdout.splitlines()) == 3


@pytest.mark.torch
@pytest.mark.slow
def test_a_tiny_budget_cuts_a_part_short_and_skips_the_rest(tmp_path):
    proc = _check("--out", tmp_path, "--budget", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu.json").read_text())
    status = {n: p["status"] for n, p in rep["parts"].items()}
    assert status == {"environment": "done", "agreement": "done", "per_evaluation": "cut short",
                      "batched_loop": "skipped (no time)", "large": "skipped (no time)", "fit": "skipped (no time)"}
    ms = rep["parts"]["per_evaluation"]["result"]["measurements"]
    assert _number(ms["nstjax float32 direct"]["eval_s"])  # the gate's program, measured in any case
    assert all(r == {"status": "not run (no time)"} for k, r in ms.items() if k != "nstjax float32 direct")
    assert [t["verdict"] for t in rep["targets"]] [1:] == ["NOT MEASURED"] * 2


@pytest.mark.torch
@pytest.mark.slow
def test_stop_after_the_gate_leaves_a_valid_json_of_the_parts_run(tmp_path):
    proc = _check("--out", tmp_path, "--stop-after", "agreement")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu.json").read_text())
    assert [rep["parts"][n]["status"] for n in PARTS] == ["done", "done"] + ["skipped (--stop-after agreement)"] * 4
    assert rep["parts"]["agreement"]["result"]["agree"] is True and rep["finished"] is True


def test_a_measurement_that_runs_out_of_memory_is_recorded_and_the_part_goes_on(tmp_path):
    from benchmarks.gpu import DRY_RUN, Check, Part

    check = Check(tmp_path, DRY_RUN, True, 100.0, None, None, tmp_path, "test")
    part = Part(check, "per_evaluation", 50.0)

    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")

    r = part.measure("nstjax float32 direct", oom)
    assert r["status"] == "failed" and r["out_of_memory"] is True and "RESOURCE_EXHAUSTED" in r["error"]
    assert part.measure("pytorch float32", lambda: {"eval_s": 0.5})["status"] == "done"
    part.deadline = 0.0  # no time left: the next is not started, the part is cut short
    assert part.measure("nstjax float32 xla", lambda: {"eval_s": 0.1}) is None and part.cut
    saved = json.loads((tmp_path / "gpu.json").read_text())["parts"]["per_evaluation"]["result"]["measurements"]
    assert [m["status"] for m in saved.values()] == ["failed", "done", "not run (no time)"]


@pytest.mark.slow
@pytest.mark.torch
def test_a_check_stopped_by_sigterm_after_the_gate_records_the_part_cut_short(tmp_path):
    path = tmp_path / "gpu.json"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            rep = json.loads(path.read_text()) if path.exists() else None
            if rep and rep["parts"]["agreement"]["status"] == "done":
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.terminate()  # SIGTERM, as a lease that ends
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3
    rep = json.loads(path.read_text())
    status = [rep["parts"][n]["status"] for n in PARTS]
    assert status[:2] == ["done", "done"] and rep["finished"] is False and rep["exit_status"] == 3
    stopped = status.index("cut short (SIGTERM)")
    assert all(s == "skipped (stopped by SIGTERM)" for s in status[stopped + 1:]), status
