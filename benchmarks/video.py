"""Frames per minute of the two video schedules to the same temporal error, side by side in one run.

    python -m benchmarks.video [--weights FILE --arch vgg16] [--size 256] [--frames 6] [--gamma 1e12]
        [--steps 40] [--passes 6] [--pass-steps 10] [--label cpu]

Both runs go through the CLI (``python -m nstjax.run``, the product's path) on the bundled clip
(examples/tubingen_pan.mp4, its first ``--frames`` frames) with the preview preset and γ =
``--gamma``: ``sequential`` with ``--steps`` a frame; ``parallel`` with ``--passes`` passes of
``--pass-steps`` steps, the temporal term from pass 2. The sequential run's temporal error is the
target; the parallel run reaches it after the first pass whose mean error is at most that (its
time: the run's time × that pass / the passes). Frames per minute = frames / minutes of run time
(compile apart, which both report). Without ``--weights``, random weights (the speeds are the
same; the errors are not those of real features). Writes benchmarks/results/video-LABEL.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import EXAMPLES, RESULTS, cpu_info, scratch_dir, synthetic_weights_file, write_json


def run(name: str, overrides: list[str], out) -> dict:
    """One CLI run; its metrics, per-pass mean temporal errors and wall time."""
    run_dir = out / name
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nstjax.run", *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{name} failed: {done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "frames.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    passes = sorted({int(r["pass"]) for r in rows})
    errors = [float(np.mean([float(r["temporal_error"]) for r in rows if int(r["pass"]) == p and r["temporal_error"]]))
              for p in passes]
    return {"run_seconds": metrics["run_seconds"], "compile_seconds": metrics["compile_seconds"], "wall_seconds": wall,
            "temporal_error": metrics["temporal_error"], "pass_errors": errors, "steps": metrics["steps"],
            "yardstick_style": metrics["yardstick"]["final"]["style_mean"], "frames": metrics["frames"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights")
    p.add_argument("--arch", default="vgg19")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--gamma", type=float, default=1e12)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--pass-steps", type=int, default=10)
    p.add_argument("--label", default="cpu")
    a = p.parse_args()
    out = scratch_dir()
    weights = a.weights or str(synthetic_weights_file(out / "synthetic.safetensors", arch=a.arch))
    common = ["+experiment=preview", f"video.input={EXAMPLES / 'tubingen_pan.mp4'}", f"video.frames=[0,{a.frames},1]",
              f"image.size={a.size}", f"video.temporal_weight={a.gamma}", f"model.weights={weights}",
              f"model.arch={a.arch}", "save_every=0", "progress=false"]
    sequential = run("sequential", [*common, "video.schedule=sequential", f"optim.steps={a.steps}"], out)
    parallel = run("parallel", [*common, "video.schedule=parallel", f"video.passes={a.passes}",
                                f"optim.steps={a.pass_steps}", "video.temporal_from_pass=2"], out)
    target = sequential["temporal_error"]
    reached = next((k + 1 for k, e in enumerate(parallel["pass_errors"]) if e <= target), None)
    per_pass = parallel["run_seconds"] / a.passes
    result = {
        "cpu": cpu_info(), "size": a.size, "frames": a.frames, "gamma": a.gamma,
        "weights": "real" if a.weights else "random", "sequential": sequential, "parallel": parallel,
        "target_temporal_error": target, "parallel_passes_to_target": reached,
        "frames_per_minute": {
            "sequential": 60 * a.frames / sequential["run_seconds"],
            "parallel": None if reached is None else 60 * a.frames / (per_pass * reached),
        },
    }
    write_json(RESULTS / f"video-{a.label}.json", result)
    print(json.dumps({k: result[k] for k in ("target_temporal_error", "parallel_passes_to_target",
                                               "frames_per_minute")}, indent=1))


if __name__ == "__main__":
    main()
