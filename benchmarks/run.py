"""nstjax vs plain eager PyTorch on the Gatys objective: one command, a table and a JSON file.

    python -m benchmarks.run            # full run (~20 min on 2 cores), writes benchmarks/results/cpu.json
    python -m benchmarks.run --quick    # small sizes, a few evaluations (< 2 min): checks that it works

(a) per evaluation (loss + gradient), (c) peak RSS of each side, (d) compile time apart from run
time, the FLOP rate as a fraction of the CPU's peak. (b), time to quality against the PyTorch
tutorial's loop, is python -m benchmarks.quality (the product's objective and loop, on real
features). Every measurement runs in its own process. On a GPU, python -m benchmarks.gpu is the
check to run (float32, tf32 and bfloat16, PyTorch CUDA beside them, the batched loop, the largest
image that fits). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, SETUPS, deepest_conv, flop_counts, run_killable, write_json
from benchmarks.report import fmt, gib, log, table

def worker(task: str, args: dict, timeout: float = 1800, env_extra: dict | None = None) -> dict:
    """Run one measurement in a fresh process, killed after ``timeout`` seconds; return its JSON (with
    'rc', None on a timeout, and 'error' on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        try:
            p = run_killable([sys.executable, "-m", "benchmarks.workers", task, json.dumps(args), str(out)],
                             cwd=ROOT, env=env, timeout=timeout)
            rc, stderr = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            return {"rc": None, "error": f"timed out after {timeout:.0f} s"}
        res = json.loads(out.read_text()) if out.exists() else {}
        res["rc"] = rc
        if rc != 0 and "error" not in res:
            res["error"] = f"exit status {rc}: " + (stderr.strip().splitlines() or [""])[-1][-300:]
        return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few evaluations (< 2 min)")
    p.add_argument("--sizes", help="per-evaluation sizes (default 256,512,1024; quick: 64,128)")
    p.add_argument("--reps", type=int, help="timed evaluations per size and side (default 3; quick: 1)")
    p.add_argument("--loop-sizes", help="sizes at which to time an evaluation inside nstjax's Loop "
                                        "(default 256,512; quick: 64)")
    p.add_argument("--variants", default="",
                   help="prototype fixes to measure beside nstjax as is (comma-separated; '' for none): a "
                        "benchmarks.conv_variants convolution, '+memsched' (XLA's memory-optimised CPU "
                        "scheduler); the last is also used "
                        "for the large-size memory runs")
    p.add_argument("--memory", help="size[:remat] list for the one-evaluation memory runs "
                                    "(default 2048,2048:remat,4096:remat; quick: 256,512:remat)")
    p.add_argument("--profile-size", type=int, help="per-layer profile size (default 512; quick: 64)")
    p.add_argument("--profile-variants", help="convolutions to profile (default direct,winograd)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: eval,memory,profile")
    p.add_argument("--weights", help="a torchvision VGG19 state dict (.pth) instead of random weights")
    p.add_argument("--out", help="JSON path (default benchmarks/results/cpu.json, quick: quick.json, "
                                 "run-gpu.json on a GPU)")
    a = p.parse_args(argv)

    quick = a.quick
    sizes = [int(s) for s in (a.sizes or ("64,128" if quick else "256,512,1024")).split(",")]
    reps = a.reps if a.reps is not None else (1 if quick else 3)
    loop_sizes = [int(s) for s in (a.loop_sizes or ("64" if quick else "256,512")).split(",") if s]
    variants = [v for v in a.variants.split(",") if v]
    memory = [m for m in (a.memory or ("256:remat" if quick else "2048,2048:remat,4096:remat")).split(",") if m]
    skip = set(a.skip.split(",")) - {""}
    common = {"weights": a.weights} if a.weights else {}
    t_begin = time.time()

    report = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run"] + sys.argv[1:]),
              "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "weights": a.weights or "random"}

    log("== machine")
    m = worker("machine", {})
    report["machine"] = m
    if "error" in m:
        log("machine probe failed:", m["error"])
        return 1
    peak = m.get("peak_gflops_fp32")
    log(f"{m['model_name']}: {m['how']} = {fmt(peak, '.0f')} GFLOP/s fp32 peak (estimate); measured "
        f"{m['gemm_n']}² matmul {m['gemm_gflops_measured']:.0f} GFLOP/s; load average {m['loadavg'][0]:.2f}; "
        f"jax {m['jax']} on {m['platform']}")
    on_gpu = bool(m.get("gpus"))
    out_path = Path(a.out) if a.out else RESULTS / ("quick.json" if quick else
                                                    ("run-gpu.json" if on_gpu else "cpu.json"))

    gatys = SETUPS["gatys"]()
    last = deepest_conv(gatys["spec"].layers)

    # ---------------------------------------------------------------- (a) agreement, then timing
    if "eval" not in skip:
        log(f"\n== (a) agreement of the two sides (Gatys objective, VGG19 up to {last}, {report['weights']} weights)")
        agreement, status = check_agreement(sizes, common)
        if status:
            return status
        report["agreement"] = agreement

        log("\n== (a) per evaluation: one loss + gradient")
        evals = []
        for s, ag in zip(sizes, agreement):
            fl = flop_counts(s, s, last)
            row = {"size": s, "flops": {k: v for k, v in fl.items() if k != "per_conv_forward"}}
            row["torch"] = worker("eval_torch", {"size": s, "objective": "gatys", "reps": reps,
                                                 "expect_loss": ag["loss_torch"], **common})
            row["jax"] = {}
            # nstjax as the CLI runs it, and on a CPU (where that is Winograd) with model.conv=direct
            for v in dict.fromkeys(["nstjax"] + ([] if on_gpu else ["direct"])
                                   + (variants if s in loop_sizes else [])):
                row["jax"][v] = worker("eval_jax", {"size": s, "objective": "gatys", "reps": reps, "variant": v,
                                                    "loop_steps": 3 if s in loop_sizes else 0,
                                                    "expect_loss": ag["loss_jax"], **common})
            for side in [row["torch"], *row["jax"].values()]:
                if side.get("rc") == 3 or side.get("disagreement"):
                    log("REFUSING TO REPORT:", side["error"])
                    return 2
                if "eval_s" in side:
                    side["gflops_executed"] = fl["executed_eval"] / side["eval_s"] / 1e9
                    side["gflops_nominal"] = fl["nominal_eval"] / side["eval_s"] / 1e9
                    on_cpu = side.get("device") == "cpu" or side.get("platform") == "cpu"
                    if peak and on_cpu:
                        side["fraction_of_peak_executed"] = side["gflops_executed"] / peak
                        side["fraction_of_peak_nominal"] = side["gflops_nominal"] / peak
            j, t = row["jax"]["nstjax"], row["torch"]
            if "eval_s" in j and "eval_s" in t:
                row["ratio_jax_over_torch"] = j["eval_s"] / t["eval_s"]
            for v, r in row["jax"].items():
                if "error" in r:
                    log(f"{s}px jax[{v}] failed: {r['error']}")
            if "error" in t:
                log(f"{s}px torch failed: {t['error']}")
            evals.append(row)
            log(f"{s}px: torch {fmt(t.get('eval_s'))} s, nstjax {fmt(j.get('eval_s'))} s "
                f"(ratio {fmt(row.get('ratio_jax_over_torch'), '.2f')}), compile {fmt(j.get('compile_s'), '.1f')} s"
                + (f", in Loop {fmt(j.get('loop_eval_s'))} s" if "loop_eval_s" in j else ""))
        report["per_evaluation"] = evals

    # ---------------------------------------------------------------- (c) memory at large sizes
    if "memory" not in skip:
        log("\n== (c) one evaluation at large sizes (nstjax, Gatys objective): compile, time, peak RSS")
        mems = []
        for spec in memory:
            size, _, flag = spec.partition(":")
            for v in dict.fromkeys(["nstjax"] + variants[-1:]):
                args = {"size": int(size), "objective": "gatys", "remat": flag == "remat", "variant": v, **common}
                r = worker("memory_jax", args, timeout=3600)
                r.update(size=int(size), remat=flag == "remat", variant=v)
                mems.append(r)
                what = (r["error"] if "error" in r else r["skipped"] if "skipped" in r else
                        f"compile {r['compile_s']:.1f} s, one evaluation {r['first_call_s']:.1f} s, "
                        f"peak RSS {gib(r['peak_rss_bytes'])} GiB")
                log(f"{size}px remat={flag == 'remat'} [{v}]: XLA temporaries "
                    f"{gib(r.get('xla_temp_bytes'))} GiB; {what}")
        report["memory"] = mems

    # ---------------------------------------------------------------- per-layer profile (JAX side)
    if "profile" not in skip:
        psize = a.profile_size or (64 if quick else 512)
        pvars = (a.profile_variants or "direct,winograd").split(",")
        log(f"\n== per-layer profile at {psize}px: each convolution alone, forward and forward + input gradient")
        r = worker("profile", {"size": psize, "variants": pvars}, timeout=1800)
        report["profile"] = r
        if "error" in r:
            log("profile failed:", r["error"])
        else:
            for v, res in r["profile"].items():
                for row in res["layers"]:
                    log(f"  {v:10s} {row['layer']:8s} {row['hw']:5d}² {row['cin']:4d}→{row['cout']:<4d} "
                        f"fwd {row['fwd_ms']:7.1f} ms  fwd+dgrad {row['fwd_bwd_ms']:7.1f} ms "
                        f"({row['fwd_bwd_gflops']:5.0f} GF/s)")
                log(f"  {v:10s} total fwd+dgrad {res['total_fwd_bwd_s']:.3f} s")

    # ---------------------------------------------------------------- GPU
    if "gpu" not in skip:
        if not on_gpu:
            log("\n== GPU: no GPU visible to jax (jax.devices('gpu') is empty): GPU section skipped")
            report["gpu"] = {"skipped": "no GPU"}
        else:
            log("\n== GPU: measured by the prepared GPU check, python -m benchmarks.gpu --out DIR")
            report["gpu"] = {"skipped": "see python -m benchmarks.gpu --out DIR"}

    report["wall_s"] = time.time() - t_begin
    report["loadavg_end"] = os.getloadavg()
    log("\n" + summary(report))
    write_json(out_path, report)
    log(f"\nwrote {out_path} ({report['wall_s'] / 60:.1f} min)")
    return 0


def check_agreement(sizes, common, variant="nstjax", run=worker) -> tuple[list, int | None]:
    """The gate before any timing: both sides' losses on the same inputs at every size (the gradient
    too at the first), through ``run`` (``worker`` or one with a time budget). Returns the checks and
    None, or the checks so far and the exit status: 1 when a check could not run, 2 when the sides
    disagree by more than 1e-4 relative (the caller then writes no report)."""
    checks = []
    for i, s in enumerate(sizes):
        r = run("agree", {"size": s, "objective": "gatys", "grad": i == 0, "variant": variant, **common})
        checks.append(r)
        if "error" in r:
            log(f"agreement check at {s}px failed to run: {r['error']}")
            return checks, 1
        log(f"{s}px: loss jax {r['loss_jax']:.7g}  torch {r['loss_torch']:.7g}  rel diff {r['rel_diff']:.2e}"
            + (f"  grad rel L2 {r['grad_rel_l2']:.2e}" if "grad_rel_l2" in r else ""))
        if not r["agree"]:
            log(f"REFUSING TO REPORT: the losses differ by {r['rel_diff']:.2e} relative at {s}px "
                f"(> 1e-4): the two sides do not compute the same objective.")
            return checks, 2
    return checks, None


def summary(rep) -> str:
    parts = []
    m = rep["machine"]
    peak = m.get("peak_gflops_fp32")
    if "per_evaluation" in rep:
        extra = list(dict.fromkeys(v for r in rep["per_evaluation"] for v in r["jax"] if v != "nstjax"))
        rows = []
        for r in rep["per_evaluation"]:
            t, j = r["torch"], r["jax"]["nstjax"]
            cells = [r["size"], fmt(t.get("eval_s")), fmt(j.get("eval_s")), fmt(r.get("ratio_jax_over_torch"), ".2f"),
                     fmt(j.get("compile_s"), ".1f"), fmt(j.get("loop_eval_s"))]
            for v in extra:
                jv = r["jax"].get(v, {})
                cells += [fmt(jv.get("eval_s")), fmt(jv.get("loop_eval_s"))]
            cells += [f"{fmt(j.get('gflops_executed'), '.0f')} ({fmt(j.get('fraction_of_peak_executed'), '.0%')})",
                      f"{fmt(t.get('gflops_executed'), '.0f')} ({fmt(t.get('fraction_of_peak_executed'), '.0%')})",
                      gib(t.get("peak_rss_bytes")), gib(j.get("peak_rss_bytes"))]
            rows.append(cells)
        heads = ["px", "torch s", "nstjax s", "jax/torch", "compile s", "in Loop s"]
        for v in extra:
            heads += [f"{v} s", f"{v} Loop s"]
        heads += ["jax GF/s (peak)", "torch GF/s (peak)", "torch RSS GiB", "jax RSS GiB"]
        parts.append("(a) one loss + gradient, Gatys objective (min of reps; 'in Loop' = per evaluation inside "
                     "nstjax's Loop.chunk; GF/s = executed conv FLOPs fwd + input-grad / time; peak "
                     f"{fmt(peak, '.0f')} GFLOP/s)\n" + table(heads, rows))
    if "memory" in rep:
        rows = [[r["size"], r["remat"], r.get("variant", "nstjax"), fmt(r.get("compile_s"), ".1f"),
                 fmt(None if "skipped" in r else r.get("first_call_s"), ".1f"), gib(r.get("xla_temp_bytes")),
                 gib(None if "skipped" in r else r.get("peak_rss_bytes")),
                 (r.get("error") or ("not run: would not fit" if "skipped" in r else "ok"))[:60]]
                for r in rep["memory"]]
        parts.append("(c) one evaluation at large sizes (Gatys objective); XLA temp = the compiled program's "
                     "temporaries (memory_analysis)\n"
                     + table(["px", "remat", "variant", "compile s", "eval s", "XLA temp GiB", "peak RSS GiB",
                              "status"], rows))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
