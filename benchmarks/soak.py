"""Load held: the resident memory of a long run and of a many-wave sweep stays flat.

    python -m benchmarks.soak                               # ~10 min on 2 CPU cores
    python -m benchmarks.soak --steps 200 --points 4 --sweep-steps 100    # a quick check

Two ``python -m nstjax.run`` processes with synthetic weights (the memory does not
depend on their values), L-BFGS without line search (lr 0.5, memory 30), at 64 px:
(a) one run of 2,000 steps with a checkpoint every 50 steps; (b) a batched sweep of
20 points (20 values of β) in waves of 5 members (``max_members=5``), 100 steps each,
a checkpoint every 50. A thread in this process samples the child's resident set
size (psutil, every 0.1 s). The baseline is the RSS when the first checkpoint has
been written (50 steps: the programs are compiled and have run several chunks); the
growth is (peak after it − baseline) / baseline, which must stay under 10 %. Prints
the table and writes benchmarks/results/soak.json; exits 1 if a growth is 10 % or more.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import EXAMPLES, RESULTS, ROOT, synthetic_weights_file, write_json

LIMIT = 0.10
"""The largest growth of RSS after the baseline that counts as flat."""


class Sampler(threading.Thread):
    """RSS of process ``pid`` every ``interval`` seconds, with the time of each sample, until it ends."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        t0 = time.perf_counter()
        while True:
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            if rss:  # 0 once the process has exited (a zombie until it is reaped)
                self.samples.append((time.perf_counter() - t0, rss))
            time.sleep(self.interval)


def soak(name: str, args: list[str], first_checkpoint: Path, cache: Path) -> dict:
    """Run ``python -m nstjax.run ARGS``, sampling its RSS; the baseline is taken once
    ``first_checkpoint`` exists."""
    env = dict(os.environ, NSTJAX_CACHE=str(cache), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "nstjax.run", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(child.pid)
    sampler.start()
    baseline_at = None
    while child.poll() is None:
        if baseline_at is None and first_checkpoint.is_file():
            baseline_at = time.perf_counter() - t0
        time.sleep(0.05)
    sampler.join()
    stderr = child.stderr.read()
    if child.returncode != 0:
        raise SystemExit(f"{name} failed ({child.returncode}): {stderr[-2000:]}")
    if baseline_at is None:
        raise SystemExit(f"{name}: {first_checkpoint} never appeared")
    samples = sampler.samples
    before = [rss for t, rss in samples if t <= baseline_at]
    after = [rss for t, rss in samples if t > baseline_at]
    baseline, peak = before[-1], max(after)
    mib = 2.0**20
    return {"name": name, "wall_s": time.perf_counter() - t0, "samples": len(samples),
            "baseline_at_s": baseline_at, "baseline_mib": baseline / mib, "peak_after_mib": peak / mib,
            "last_mib": after[-1] / mib, "growth": (peak - baseline) / baseline,
            "rss_mib": [[round(t, 2), round(rss / mib, 1)] for t, rss in samples]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000, help="steps of the single run")
    p.add_argument("--points", type=int, default=20, help="points of the sweep")
    p.add_argument("--sweep-steps", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = synthetic_weights_file(tmp / "synthetic-vgg19.safetensors")
        common = [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
                  f"style={EXAMPLES / 'starry_night.jpg'}", f"image.size={args.size}", "optim.linesearch=none",
                  "optim.lr=0.5", "optim.memory_size=30", "progress=false", "checkpoint_every=50"]
        betas = ",".join(f"{10 ** (2 + 4 * i / max(1, args.points - 1)):.4g}" for i in range(args.points))
        rows = [
            soak(f"run: {args.steps} steps", [*common, f"optim.steps={args.steps}", f"hydra.run.dir={tmp / 'run'}"],
                 tmp / "run" / "checkpoint" / "checkpoint.json", tmp / "cache"),
            soak(f"sweep: {args.points} points in waves of 5, {args.sweep_steps} steps",
                 ["-m", *common, f"optim.steps={args.sweep_steps}", "max_members=5", f"loss.beta={betas}",
                  f"hydra.sweep.dir={tmp / 'sweep'}"],
                 tmp / "sweep" / "groups" / "0" / "checkpoint" / "checkpoint.json", tmp / "cache"),
        ]
    write_json(args.out, {"size": args.size, "limit": LIMIT, "rows": rows})
    print("| soak | wall s | RSS at first checkpoint | peak after | last | growth |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['wall_s']:.0f} | {r['baseline_mib']:.0f} MiB | {r['peak_after_mib']:.0f} MiB "
              f"| {r['last_mib']:.0f} MiB | {100 * r['growth']:.1f} % |")
    print(f"wrote {args.out}")
    flat = all(r["growth"] < LIMIT for r in rows)
    if not flat:
        print(f"resident memory grew by {LIMIT:.0%} or more after the first checkpoint", file=sys.stderr)
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
