"""The one prepared GPU check: nstjax against eager PyTorch CUDA in one command, within a time budget.

    pip install --no-deps --no-build-isolation -e . && python -m benchmarks.gpu

On a machine whose jax sees a GPU it measures, in this order and in at most ``--budget`` seconds
(default 480):

- agreement: both sides' Gatys losses (VGG19 to relu5_1) agree to 1e-4 relative in float32 at each
  size before anything is timed, else exit status 2 and no report;
- per evaluation (loss + gradient) at 512 and 1024 px in float32, tf32 and bfloat16
  (``model.precision``; Gram matrices in float32), eager PyTorch CUDA (IEEE float32 and TF32) beside
  it on the same weights, and a step of nstjax's Loop (Adam) at 512 px in float32;
- the batched sweep: members·steps/s for K = 1, 8, 64 at 512 px through ``hydra/sweeper=nstjax``
  against the same K points one by one (``hydra/sweeper=basic``; for K = 64 estimated from K = 8's
  per-point time); it runs nstjax's CLI, so it needs nstjax and all its dependencies installed;
- time to quality at 512 px against the PyTorch tutorial's loop on the GPU;
- the largest square image whose evaluation fits, without and with remat (doubling from 1024 px,
  then once halfway between the last fit and the first failure if time allows);
- compile times apart, and the achieved FLOP rate beside the device's peak (PEAK_TFLOPS).

It prints a table with a PASS/FAIL line per target (ITERATION_S, SWEEP_RATIO) and writes
benchmarks/results/gpu.json. Each part gets a share of the budget (SHARES; time a part leaves goes to
the next) and every measurement runs in its own process (benchmarks.workers), killed when its part's
time runs out: a part that runs out is recorded as such, a size that runs out of device memory is
recorded as the size that failed, and the check goes on.

On a machine without a GPU it says so in one line and dry-runs the same code on the CPU at tiny
sizes (DRY_RUN), writing benchmarks/results/gpu-dryrun.json (or --out; never gpu.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, SETUPS, deepest_conv, flop_counts, run_killable, write_json
from benchmarks.run import (TTQ_SETTINGS, _ttq_line, _tutorial_line, check_agreement, fmt, log, table, ttq_args,
                            ttq_ratios, worker)

PRECISIONS = ("float32", "tf32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: tuple  # per-evaluation sizes; the first is the targets' size
    reps: int  # timed evaluations per measurement
    loop_steps: int  # steps of nstjax's Loop timed at the first size in float32
    torch_precisions: tuple
    fit_start: int  # the fit search doubles from here ...
    fit_cap: int  # ... up to here
    sweep_size: int
    sweep_points: tuple  # K values
    sweep_steps: int
    sweep_overrides: tuple  # extra CLI overrides for both sweep sides
    ttq_size: int
    ttq_evaluations: int  # the tutorial loop's
    ttq_settings: tuple  # names in benchmarks.run.TTQ_SETTINGS
    gemm_n: int  # the matmul that measures the device's rate
    variant: str  # nstjax as the CLI runs it ('nstjax'), or 'direct' (model.conv=direct)
    budget_s: float


GPU = Plan(sizes=(512, 1024), reps=10, loop_steps=10, torch_precisions=("float32", "tf32"), fit_start=1024,
           fit_cap=32768, sweep_size=512, sweep_points=(1, 8, 64), sweep_steps=20, sweep_overrides=(),
           ttq_size=512, ttq_evaluations=300, ttq_settings=("lbfgs-none-m30-lr0.5", "lbfgs-zoom-m10"),
           gemm_n=8192, variant="nstjax", budget_s=480)
# The dry run uses model.conv=direct, the convolution nstjax uses on GPUs (on a CPU it picks Winograd).
DRY_RUN = Plan(sizes=(32,), reps=2, loop_steps=2, torch_precisions=("float32",), fit_start=128, fit_cap=128,
               sweep_size=32, sweep_points=(1, 2), sweep_steps=2, sweep_overrides=("model.conv=direct",),
               ttq_size=32, ttq_evaluations=20, ttq_settings=("lbfgs-none-m30-lr0.5",), gemm_n=256,
               variant="direct", budget_s=300)

# Shares of the budget, in the order the parts run.
SHARES = {"machine": 0.04, "agreement": 0.08, "per_evaluation": 0.27, "sweep": 0.31, "ttq": 0.12, "fit": 0.18}
MIN_START_S = 5.0  # a measurement is not started with less than this left in its part
FIT_MEMORY_FRACTION = "0.95"  # XLA_PYTHON_CLIENT_MEM_FRACTION for the fit search (jax's default is 0.75)

# Dense peak TFLOP/s by jax device_kind (first substring that matches; vendors' datasheets); other
# devices: the measured matmul rate.
PEAK_TFLOPS = (("H100 PCIe", {"float32": 51.2, "tf32": 378, "bfloat16": 756}),
               ("H200", {"float32": 67, "tf32": 495, "bfloat16": 989}),
               ("H100", {"float32": 67, "tf32": 495, "bfloat16": 989}),
               ("A100", {"float32": 19.5, "tf32": 156, "bfloat16": 312}))

# The targets on an H200 (checked at the plan's sizes, see targets()): a float32 iteration at 512 px
# within ITERATION_S; faster than eager PyTorch CUDA per evaluation; a batched sweep of 64 at 512 px
# with SWEEP_RATIO × the throughput of the same points one by one.
ITERATION_S, SWEEP_RATIO = 0.010, 4.0

OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory", re.I)


class Budget:
    """The check's time, ``total_s`` from its start, shared among the parts in order: a part gets the
    time left × its share / the shares of the parts not begun yet."""

    def __init__(self, total_s: float, shares: dict):
        self.t0, self.total_s, self.waiting, self.parts = time.monotonic(), total_s, dict(shares), {}

    def left(self) -> float:
        return max(0.0, self.total_s - (time.monotonic() - self.t0))

    def begin(self, name: str) -> Part:
        for part in self.parts.values():
            part.finish()
        share = self.waiting.pop(name)
        part = Part(name, self.left() * share / (share + sum(self.waiting.values())))
        self.parts[name] = part
        return part

    def record(self) -> dict:
        for part in self.parts.values():
            part.finish()
        return {"total_s": self.total_s, "used_s": time.monotonic() - self.t0,
                "parts": {n: p.record() for n, p in self.parts.items()}}


class Part:
    """One part's time: its measurements get what is left of it as their timeout."""

    def __init__(self, name: str, allowance_s: float):
        self.name, self.allowance_s, self.t0 = name, allowance_s, time.monotonic()
        self.deadline, self.out_of_time, self.used_s = self.t0 + allowance_s, False, None

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def can_start(self) -> bool:
        if self.left() < MIN_START_S:
            self.out_of_time = True
        return not self.out_of_time

    def out_of_time_error(self) -> dict:
        self.out_of_time = True
        return {"error": f"out of time: not run ({self.left():.0f} s left of the {self.name} part's "
                         f"{self.allowance_s:.0f} s)", "out_of_time": True}

    def run(self, task: str, args: dict, env_extra: dict | None = None) -> dict:
        """benchmarks.run.worker with the part's time left as its timeout."""
        if not self.can_start():
            return self.out_of_time_error()
        r = worker(task, args, timeout=self.left(), env_extra=env_extra)
        if r.get("rc") is None:
            r["out_of_time"] = self.out_of_time = True
        elif "error" in r and OOM.search(r["error"]):
            r["out_of_memory"] = True
        return r

    def finish(self) -> None:
        if self.used_s is None:
            self.used_s = time.monotonic() - self.t0

    def record(self) -> dict:
        return {"allowance_s": self.allowance_s, "used_s": self.used_s, "out_of_time": self.out_of_time}


# --------------------------------------------------------------------------- the parts

def per_evaluation(plan: Plan, run, common: dict, agreement: list | None = None) -> list:
    """One loss + gradient per size: nstjax in each precision, PyTorch beside it, through ``run``.
    With ``agreement`` (check_agreement's rows) the float32 losses must match it (a result marked
    'disagreement' otherwise)."""
    last = deepest_conv(SETUPS["gatys"]()["spec"].layers)
    rows = []
    for i, s in enumerate(plan.sizes):
        ag = agreement[i] if agreement else {}
        row = {"size": s, "executed_flops": flop_counts(s, s, last)["executed_eval"], "jax": {}, "torch": {}}
        for prec in PRECISIONS:
            args = {"size": s, "objective": "gatys", "reps": plan.reps, "precision": prec, "variant": plan.variant,
                    **common}
            if prec == "float32":
                args.update(loop_steps=plan.loop_steps if i == 0 else 0, **_expect(ag, "loss_jax"))
            row["jax"][prec] = run("eval_jax", args)
        for prec in plan.torch_precisions:
            row["torch"][prec] = run("eval_torch", {"size": s, "objective": "gatys", "reps": plan.reps,
                                                    "precision": prec, **common,
                                                    **(_expect(ag, "loss_torch") if prec == "float32" else {})})
        f32 = row["jax"]["float32"].get("loss")
        for side in [*row["jax"].values(), *row["torch"].values()]:
            if f32 and "loss" in side:
                side["loss_rel_diff_vs_jax_float32"] = abs(side["loss"] - f32) / abs(f32)
        rows.append(row)
        log(f"{s}px: " + ", ".join(f"{side} {p} {_seconds(r)}" for side in ("jax", "torch")
                                   for p, r in row[side].items()))
    return rows


def _expect(agreement_row: dict, key: str) -> dict:
    return {"expect_loss": agreement_row[key]} if key in agreement_row else {}


def _seconds(r: dict) -> str:
    return f"{r['eval_s'] * 1e3:.1f} ms" if "eval_s" in r else "failed: " + _why(r)


def _why(r: dict) -> str:
    if r.get("out_of_time"):
        return "out of time"
    if r.get("out_of_memory"):
        return "out of memory"
    return (r.get("error") or "?")[-160:]


def fit_search(probe, start: int, cap: int, can_try) -> dict:
    """The largest square size whose evaluation fits: ``probe(size)`` (a result with 'fits', and
    'out_of_time' when it was stopped) from ``start``, doubling while it fits, the size is at most
    ``cap`` and ``can_try()``, then, if ``can_try()``, once halfway (a multiple of 64) between the last
    size that fit and the first that did not."""
    tried, largest, failed, size = [], None, None, start
    while True:
        if size > cap:
            stopped = f"cap {cap} px"
            break
        if not can_try():
            stopped = "out of time"
            break
        r = probe(size)
        tried.append(r)
        if r.get("out_of_time"):  # killed at the end of its time: neither a fit nor a failure
            stopped = f"out of time at {size} px"
            break
        if not r["fits"]:
            failed, stopped = size, f"{size} px failed"
            break
        largest, size = size, size * 2
    bisect = None
    if largest and failed:
        mid = (largest + failed) // 2 // 64 * 64
        if largest < mid < failed:
            if can_try():
                r = probe(mid)
                tried.append(r)
                if not r.get("out_of_time"):
                    largest, failed = (mid, failed) if r["fits"] else (largest, mid)
                    bisect = mid
            else:
                stopped += f"; no time to try {mid} px"
    return {"largest": largest, "first_failure": failed, "stopped": stopped, "bisected_at": bisect, "tried": tried}


def fit_part(plan: Plan, part: Part, common: dict) -> dict:
    """fit_search without and with remat, each given half of what is left of the part."""
    out = {"memory_fraction": FIT_MEMORY_FRACTION}
    for remat in (False, True):
        end = time.monotonic() + part.left() / (1 if remat else 2)

        def probe(size):
            r = part.run("gpu_fit", {"size": size, "objective": "gatys", "remat": remat, "variant": plan.variant,
                                **common}, env_extra={"XLA_PYTHON_CLIENT_MEM_FRACTION": FIT_MEMORY_FRACTION})
            r.update(size=size, fits="error" not in r)
            log(f"fit {size}px remat={remat}: " + ("fits" if r["fits"] else _why(r)))
            return r

        out["remat" if remat else "plain"] = fit_search(probe, plan.fit_start, plan.fit_cap,
                                                        lambda: end - time.monotonic() >= MIN_START_S
                                                        and part.can_start())
    return out


def estimate_one_by_one(measured: list, k: int) -> dict:
    """The one-by-one side of K = ``k`` points from measured (K, side) pairs: each point is a job of
    its own, so its run time is k × the last measured per-point time (the same members·steps/s); wall
    and compile time extrapolate linearly in K from the last two measured (proportionally from one)."""
    (k1, s1), (k0, s0) = measured[-1], (measured[-2] if len(measured) > 1 else (0, {"wall_s": 0, "compile_s": 0}))
    out = {"estimated": True, "estimated_from_points": [k for k, _ in measured[-2:]],
           "run_s": s1["run_s"] / k1 * k, "members_steps_per_s": s1["members_steps_per_s"], "device": s1["device"]}
    for key in ("wall_s", "compile_s"):
        out[key] = s1[key] + (s1[key] - s0[key]) / (k1 - k0) * (k - k1)
    return out


def not_installed() -> list:
    """nstjax (as an installed package) and its declared dependencies (pyproject.toml) not installed here."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = []
    for name in ["nstjax"] + [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in deps]:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


# What `python -m nstjax.run -m hydra/sweeper=...` imports and reads before it runs a point.
CLI_PROBE = ("import importlib.resources, nstjax.run, nstjax.sweep, nstjax.weights, hydra_plugins.nstjax_sweeper; "
             "assert importlib.resources.files('nstjax.configs').joinpath('config.yaml').is_file()")


def cli_problem() -> str | None:
    """Why nstjax's CLI cannot run here (its imports fail, nstjax is not installed), or None."""
    try:
        proc = run_killable([sys.executable, "-c", CLI_PROBE], timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "importing nstjax's CLI timed out"
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


def sweep_part(plan: Plan, part: Part) -> dict:
    """benchmarks.sweep's measurement (the same K points through both sweepers) for plan.sweep_points,
    the last K's one-by-one side estimated from the K before it."""
    from benchmarks import sweep

    out = {"size": plan.sweep_size, "steps": plan.sweep_steps, "overrides": list(plan.sweep_overrides),
           "one_by_one_estimated_for": plan.sweep_points[-1:] if len(plan.sweep_points) > 1 else [], "rows": []}
    problem = cli_problem()
    if problem:
        out["error"] = (f"not run: the sweep runs nstjax's CLI, which fails to start here ({problem}); not "
                        f"installed: {', '.join(not_installed()) or 'none'} (carry their wheels, pip install "
                        "--no-deps them, and pip install --no-deps --no-build-isolation -e .)")
        log(out["error"])
        return out
    with tempfile.TemporaryDirectory() as tmp:
        weights = sweep.synthetic_weights(Path(tmp) / "synthetic-vgg19.safetensors")
        for k in plan.sweep_points:
            row = {"size": plan.sweep_size, "points": k, "steps": plan.sweep_steps}
            for side in ("nstjax", "basic"):
                measured = [(r["points"], r["basic"]) for r in out["rows"]
                            if "members_steps_per_s" in r["basic"] and not r["basic"].get("estimated")]
                if side == "basic" and k in out["one_by_one_estimated_for"] and measured:
                    row[side] = estimate_one_by_one(measured, k)
                elif not part.can_start():
                    row[side] = part.out_of_time_error()
                else:
                    try:
                        row[side] = sweep.one_side(side, plan.sweep_size, k, plan.sweep_steps, weights, Path(tmp),
                                                   plan.sweep_overrides, timeout=part.left())
                    except subprocess.TimeoutExpired:
                        row[side] = {"error": f"timed out after {part.left():.0f} s", "out_of_time": True}
                        part.out_of_time = True
                    except sweep.SweepFailed as e:
                        row[side] = {"error": str(e)[-2000:], "out_of_memory": bool(OOM.search(str(e)))}
            if all("members_steps_per_s" in row[side] for side in ("nstjax", "basic")):
                sweep.compare(row)
            out["rows"].append(row)
            log(f"K={k}: " + ", ".join(
                f"{side} " + (f"{row[side]['members_steps_per_s']:.2f} members·steps/s, {row[side]['wall_s']:.1f} s "
                              f"wall" + (" (estimated)" if row[side].get("estimated") else "")
                              if "members_steps_per_s" in row[side] else "failed: " + _why(row[side]))
                for side in ("nstjax", "basic")))
    return out


def ttq_part(plan: Plan, part: Part, common: dict) -> dict:
    """Time to quality: the PyTorch tutorial's loop, then each nstjax setting until its best loss."""
    tut = part.run("ttq_torch", {"size": plan.ttq_size, "evaluations": plan.ttq_evaluations, **common})
    out = {"size": plan.ttq_size, "torch": tut, "jax": []}
    if "error" in tut:
        log("tutorial loop failed:", _why(tut))
        return out
    log(_tutorial_line(tut))
    settings = dict(TTQ_SETTINGS)
    for name in plan.ttq_settings:
        r = part.run("ttq_jax", ttq_args(name, settings[name], plan.ttq_size, tut["best_loss"], tut["run_s"],
                                         2 * plan.ttq_evaluations, plan.variant, common))
        r.setdefault("name", name)
        out["jax"].append(r)
        log(_ttq_line(r, tut))
    ttq_ratios(out["jax"], tut)
    return out


# --------------------------------------------------------------------------- peaks, rates, targets

def peaks(machine: dict) -> dict:
    kind = machine.get("device_kind", "")
    for key, tflops in PEAK_TFLOPS:
        if key in kind:
            return {"source": f"datasheet ({key})", "tflops": tflops}
    measured = machine.get("gemm_gflops_measured_by_precision", {})
    return {"source": f"measured: {machine.get('gemm_n')}² matmul on {kind or '?'}",
            "tflops": {p: v / 1e3 for p, v in measured.items()}}


def add_rates(rows: list, peak: dict) -> None:
    """Achieved TFLOP/s (executed convolution FLOPs / time) and its fraction of the peak, per side."""
    for row in rows:
        for side in (*row["jax"].values(), *row["torch"].values()):
            if "eval_s" in side:
                side["achieved_tflops"] = row["executed_flops"] / side["eval_s"] / 1e12
                p = peak["tflops"].get(side.get("precision", "float32"))
                side["fraction_of_peak"] = side["achieved_tflops"] / p if p else None


def compile_times(report: dict) -> dict:
    out = {"eval": {}, "loop": {}, "ttq": {}, "sweep": {}, "fit": {}}
    for row in report.get("per_evaluation", []):
        for prec, r in row["jax"].items():
            out["eval"][f"{row['size']} {prec}"] = r.get("compile_s")
            if "loop_compile_s" in r:
                out["loop"][f"{row['size']} {prec}"] = r["loop_compile_s"]
    for r in report.get("ttq", {}).get("jax", []):
        out["ttq"][r["name"]] = r.get("compile_s")
    for row in report.get("sweep", {}).get("rows", []):
        for side in ("nstjax", "basic"):
            if not row[side].get("estimated"):
                out["sweep"][f"K={row['points']} {side}"] = row[side].get("compile_s")
    for mode, res in report.get("fit", {}).items():
        if isinstance(res, dict):
            for r in res["tried"]:
                out["fit"][f"{r['size']} {mode}"] = r.get("compile_s")
    return out


def targets(report: dict, plan: Plan) -> list:
    """Each target with its value and 'passed' (None where it was not measured)."""
    rows = report.get("per_evaluation", [])
    out = []
    f32 = rows[0]["jax"]["float32"] if rows else {}
    value = f32.get("loop_eval_s", f32.get("eval_s"))
    how = "a step of nstjax's Loop (Adam)" if "loop_eval_s" in f32 else "one evaluation"
    out.append({"target": f"float32 per iteration at {plan.sizes[0]} px ≤ {ITERATION_S * 1e3:g} ms",
                "value_s": value, "measured": how,
                "passed": None if value is None else value <= ITERATION_S})
    ratios = {r["size"]: r["jax"]["float32"]["eval_s"] / r["torch"]["float32"]["eval_s"] for r in rows
              if "eval_s" in r["jax"]["float32"] and "eval_s" in r["torch"].get("float32", {})}
    out.append({"target": "nstjax float32 faster than eager PyTorch CUDA float32 per evaluation at "
                          + "/".join(map(str, plan.sizes)) + " px",
                "jax_over_torch": ratios,
                "passed": all(v < 1 for v in ratios.values()) if len(ratios) == len(plan.sizes) else None})
    last = (report.get("sweep", {}).get("rows") or [{}])[-1]
    ratio = last.get("throughput_ratio") if last.get("points") == plan.sweep_points[-1] else None
    out.append({"target": f"batched sweep of {plan.sweep_points[-1]} at {plan.sweep_size} px ≥ {SWEEP_RATIO:g}× "
                          "the throughput of one-by-one runs",
                "throughput_ratio": ratio, "one_by_one_estimated": bool(last.get("basic", {}).get("estimated")),
                "passed": None if ratio is None else ratio >= SWEEP_RATIO})
    return out


# --------------------------------------------------------------------------- the table

def summary(rep: dict) -> str:
    m, peak = rep["machine"], rep["peak"]
    head = (f"{'DRY RUN on the CPU (not a measurement)' if rep['dry_run'] else 'GPU check'}: {m.get('device_kind')}, "
            f"jax {m.get('jax')}; peak TFLOP/s ({peak['source']}): "
            + ", ".join(f"{p} {v:.4g}" for p, v in peak["tflops"].items())
            + f"; budget {rep['budget']['total_s']:.0f} s, used {rep['budget']['used_s']:.0f} s"
            + "".join(f"; {n} ran out of time" for n, p in rep["budget"]["parts"].items() if p["out_of_time"]))
    parts = [head]
    rows = []
    for row in rep.get("per_evaluation", []):
        for side in ("jax", "torch"):
            for prec, r in row[side].items():
                rows.append([row["size"], "nstjax" if side == "jax" else "PyTorch", prec,
                             fmt(r.get("eval_s") and r["eval_s"] * 1e3, ".2f") if "eval_s" in r else _why(r)[:40],
                             fmt(r.get("loop_eval_s") and r["loop_eval_s"] * 1e3, ".2f"),
                             fmt(r.get("compile_s"), ".1f"), fmt(r.get("achieved_tflops"), ".3g"),
                             fmt(r.get("fraction_of_peak"), ".0%"), fmt(r.get("loss_rel_diff_vs_jax_float32"), ".1e")])
    if rows:
        parts.append("(a) one loss + gradient, Gatys objective (min of reps; 'Loop ms' = a step of nstjax's Loop; "
                     "TFLOP/s = executed conv FLOPs / time)\n"
                     + table(["px", "side", "precision", "ms", "Loop ms", "compile s", "TFLOP/s", "of peak",
                              "loss vs f32"], rows))
    sw = rep.get("sweep", {})
    rows = [[r["points"]] + [fmt(r[s].get("members_steps_per_s"), ".2f") + ("*" if r[s].get("estimated") else "")
                             if "members_steps_per_s" in r[s] else _why(r[s])[:40] for s in ("nstjax", "basic")]
            + [fmt(r.get("throughput_ratio"), ".2f"), fmt(r["nstjax"].get("wall_s"), ".1f"),
               fmt(r["basic"].get("wall_s"), ".1f") + ("*" if r["basic"].get("estimated") else "")]
            for r in sw.get("rows", [])]
    parts.append(f"(b) batched sweep at {sw.get('size')} px, {sw.get('steps')} steps: members·steps/s "
                 "(* estimated from the K before)\n"
                 + (table(["K", "batched", "one by one", "×", "batched wall s", "one-by-one wall s"], rows)
                    if rows else sw.get("error", "not run")))
    tq = rep.get("ttq", {})
    tut = tq.get("torch", {})
    rows = [["PyTorch tutorial loop", tut.get("evaluations", "-"), fmt(tut.get("run_s"), ".2f"), "-",
             "target" if "best_loss" in tut else _why(tut)[:40], "1.00"]]
    for r in tq.get("jax", []):
        re_ = r.get("reached")
        rows.append([r["name"], re_["evaluations"] if re_ else r.get("evaluations", "-"),
                     fmt(re_["time_s"], ".2f") if re_ else f"({fmt(r.get('run_s'), '.2f')})",
                     fmt(r.get("compile_s"), ".1f"), "reached" if re_ else ("no" if "run_s" in r else _why(r)[:40]),
                     fmt(r.get("ratio_vs_tutorial_run"), ".2f")])
    parts.append(f"(c) time to quality at {tq.get('size')} px: the tutorial loop's best loss "
                 f"{fmt(tut.get('best_loss'), '.6g')} as the target\n"
                 + table(["setting", "evals", "seconds", "compile s", "target", "× tutorial"], rows))
    rows = [[mode, fmt(res.get("largest"), "d"), fmt(res.get("first_failure"), "d"), res.get("stopped"),
             ", ".join(f"{r['size']} {'ok' if r['fits'] else _why(r)[:30]}" for r in res["tried"])]
            for mode, res in rep.get("fit", {}).items() if isinstance(res, dict)]
    parts.append("(d) largest square image whose evaluation fits (float32)\n"
                 + table(["remat", "largest px", "failed px", "stopped", "tried"], rows))
    parts.append("compile s, apart from the times above: " + "; ".join(
        f"{what} " + ", ".join(f"{k} {fmt(v, '.1f')}" for k, v in times.items())
        for what, times in rep["compile_s"].items() if times))
    note = " (dry run: these say nothing about a GPU)" if rep["dry_run"] else ""
    lines = []
    for t in rep["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[t["passed"]]
        detail = {k: v for k, v in t.items() if k not in ("target", "passed")}
        lines.append(f"{verdict:12s} {t['target']}: " + ", ".join(f"{k} {_short(v)}" for k, v in detail.items()))
    parts.append(f"targets (H200){note}\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu.json; dry run: gpu-dryrun.json)")
    p.add_argument("--budget", type=float, help=f"seconds in all (default {GPU.budget_s:.0f}; dry run "
                                                f"{DRY_RUN.budget_s:.0f})")
    a = p.parse_args(argv)
    budget = Budget(a.budget or GPU.budget_s, SHARES)
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    part = budget.begin("machine")
    m = part.run("machine", {"n_by_platform": {"gpu": GPU.gemm_n, "cpu": DRY_RUN.gemm_n}, "reps": 5,
                             "precisions": list(PRECISIONS)})
    if "error" in m:
        log("machine probe failed:", _why(m))
        return 1
    dry = not m["gpus"]
    plan = DRY_RUN if dry else GPU
    out_path = a.out or RESULTS / ("gpu-dryrun.json" if dry else "gpu.json")
    if dry:
        log(f"no GPU: jax.devices('gpu') is empty here; dry run of the check on the CPU at tiny sizes "
            f"(not a measurement) → {out_path}")
        budget.total_s = a.budget or DRY_RUN.budget_s
        os.environ["OMP_NUM_THREADS"] = "1"  # PyTorch's CPU threads spin on a busy machine; not a measurement
        if out_path.resolve() == (RESULTS / "gpu.json").resolve():
            log("error: a dry run does not write gpu.json (the GPU's results): give another --out")
            return 2
    peak = peaks(m)
    log(f"{m['device_kind']} ({', '.join(m['gpus']) or 'cpu'}), jax {m['jax']}; peak TFLOP/s ({peak['source']}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in peak["tflops"].items()))
    report = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu"] + sys.argv[1:]),
              "started": started, "dry_run": dry, "plan": dataclasses.asdict(plan), "machine": m, "peak": peak,
              "not_installed": not_installed()}
    common = {}

    part = budget.begin("agreement")
    log(f"\n== agreement of the two sides in float32 at {', '.join(map(str, plan.sizes))} px")
    report["agreement"], status = check_agreement(plan.sizes, common, plan.variant, run=part.run)
    if status:
        return status

    part = budget.begin("per_evaluation")
    log("\n== (a) per evaluation: one loss + gradient")
    report["per_evaluation"] = per_evaluation(plan, part.run, common, report["agreement"])
    for row in report["per_evaluation"]:
        for side in (*row["jax"].values(), *row["torch"].values()):
            if side.get("disagreement"):
                log("REFUSING TO REPORT:", side["error"])
                return 2
    add_rates(report["per_evaluation"], peak)

    part = budget.begin("sweep")
    log(f"\n== (b) batched sweep at {plan.sweep_size} px, K = {', '.join(map(str, plan.sweep_points))}")
    report["sweep"] = sweep_part(plan, part)

    part = budget.begin("ttq")
    log(f"\n== (c) time to quality at {plan.ttq_size} px")
    report["ttq"] = ttq_part(plan, part, common)

    part = budget.begin("fit")
    log(f"\n== (d) largest square image that fits, from {plan.fit_start} px")
    report["fit"] = fit_part(plan, part, common)

    report["compile_s"] = compile_times(report)
    report["targets"] = targets(report, plan)
    report["budget"] = budget.record()
    log("\n" + summary(report))
    write_json(out_path, report)
    log(f"\nwrote {out_path} ({report['budget']['used_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
