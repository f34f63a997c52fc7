"""The same K points through nstjax's batched sweeper and through Hydra's basic sweeper.

    python -m benchmarks.sweep                     # CPU: 64, 128, 256 px with K = 8 (~10 min on 2 cores)
    python -m benchmarks.sweep --sizes 32 --points 2 --steps 2    # a quick check that it works

Each side is one ``python -m nstjax.run -m`` command over K values of β (every
point one group member for the batched sweeper, one job each for
``hydra/sweeper=basic``), with an empty compilation cache, synthetic weights
(the cost does not depend on their values) and L-BFGS without line search.
Measured: the wall time of the whole command (start-up and compiling included)
and members·steps per second of the optimisation alone (K·steps over the
run_seconds the points' metrics.json record: one program's run time shared by
its members, or the sum over the one-by-one jobs). On a GPU (picked when jax
sees one) the defaults are K = 1, 8, 64 at 512 px. Writes
benchmarks/results/sweep-<platform>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, run_killable, synthetic_weights_file, write_json

EXAMPLES = ROOT / "examples"


class SweepFailed(SystemExit):
    """A sweep command exited with an error (its message is the command's stderr)."""


def one_side(sweeper: str, size: int, points: int, steps: int, weights: Path, work: Path, extra=(),
             timeout: float | None = None) -> dict:
    """One sweep command of ``points`` values of β through ``sweeper`` ('nstjax' or 'basic'), with
    ``extra`` overrides; killed after ``timeout`` seconds (subprocess.TimeoutExpired)."""
    betas = ",".join(f"{10 ** (2 + 4 * i / max(1, points - 1)):.4g}" for i in range(points))
    sweep_dir = work / f"{sweeper}-{size}-{points}"
    cache = work / f"cache-{sweeper}-{size}-{points}"
    cmd = [sys.executable, "-m", "nstjax.run", "-m", f"hydra/sweeper={sweeper}", f"model.weights={weights}",
           f"content={EXAMPLES / 'tubingen.jpg'}", f"style={EXAMPLES / 'starry_night.jpg'}",
           f"image.size={size}", f"optim.steps={steps}", "optim.linesearch=none", "optim.lr=0.5",
           "optim.memory_size=30", "progress=false", "checkpoint_every=0", f"loss.beta={betas}",
           f"hydra.sweep.dir={sweep_dir}", *extra]
    env = dict(os.environ, NSTJAX_CACHE=str(cache), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = run_killable(cmd, timeout=timeout, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SweepFailed(f"{sweeper} sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    metrics = [json.loads((sweep_dir / str(n) / "metrics.json").read_text()) for n in range(points)]
    # One entry per compiled program run: a wave of a group (its members share its run_seconds),
    # or one job of the basic sweeper.
    programs = {((m["group"], m["run_seconds"]) if sweeper == "nstjax" else n): m for n, m in enumerate(metrics)}
    run_s = sum(m["run_seconds"] for m in programs.values())
    return {"wall_s": wall, "run_s": run_s, "members_steps_per_s": points * steps / run_s,
            "compile_s": sum(m["compile_seconds"] for m in programs.values()),
            "device": metrics[0]["device"], "totals": [m["total"] for m in metrics]}


def compare(row: dict) -> dict:
    """Add the batched side over the one-by-one side: wall-time and throughput ratios."""
    row["wall_ratio"] = row["nstjax"]["wall_s"] / row["basic"]["wall_s"]
    row["throughput_ratio"] = row["nstjax"]["members_steps_per_s"] / row["basic"]["members_steps_per_s"]
    return row


def main(argv=None) -> int:
    import jax

    gpu = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512" if gpu else "64,128,256")
    p.add_argument("--points", default="1,8,64" if gpu else "8", help="K values, comma-separated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS / f"sweep-{jax.default_backend()}.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = synthetic_weights_file(Path(tmp) / "synthetic-vgg19.safetensors")
        for size in map(int, args.sizes.split(",")):
            for k in map(int, args.points.split(",")):
                row = {"size": size, "points": k, "steps": args.steps}
                for sweeper in ("nstjax", "basic"):
                    row[sweeper] = one_side(sweeper, size, k, args.steps, weights, Path(tmp))
                    print(f"{size} px, K={k}, {sweeper}: {row[sweeper]['wall_s']:.1f} s wall, "
                          f"{row[sweeper]['members_steps_per_s']:.2f} members·steps/s", flush=True)
                rows.append(compare(row))
    write_json(args.out, {"platform": jax.default_backend(), "rows": rows})
    print("| px | K | batched wall s | basic wall s | wall ratio | batched m·s/s | basic m·s/s | throughput × |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b, s = r["nstjax"], r["basic"]
        print(f"| {r['size']} | {r['points']} | {b['wall_s']:.1f} | {s['wall_s']:.1f} | {r['wall_ratio']:.2f} "
              f"| {b['members_steps_per_s']:.2f} | {s['members_steps_per_s']:.2f} | {r['throughput_ratio']:.2f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
