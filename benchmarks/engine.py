"""The engine without waste, measured through the CLI: a chunk costs only its steps, and a run
starts in seconds. One command, a table and benchmarks/results/engine-cpu.json.

    python -m benchmarks.engine [--quick] [--before CHECKOUT]

(1) seconds per step of a 20-step Adam run at 256 px with ``save_every=1`` (a snapshot of every
    step: a chunk per step) against ``save_every=0`` (chunks of ``chunk_steps``), and a 7-step
    run's ``run_seconds`` per evaluation against a 70-step run's (``metrics.json``; compile apart);
(2) where the wall time of a 1-step 64 px run goes, with an empty cache dir (cold) and with the
    programs of an earlier run in it (warm): the process's own timeline under cProfile
    (imports, composing the config, validating, reading the weights, building the group, loading
    or compiling the programs, the steps, writing the outputs, the loss curve) and, apart, the wall
    time without the profiler.

With ``--before CHECKOUT`` (another checkout of nstjax, e.g. ``git worktree add /tmp/old REV``)
both are run the same way in this one command, that checkout's CLI first, side by side in the
table; ``--before-path DIR`` puts packages in DIR first on that checkout's path (the versions its
pins resolved to, e.g. ``pip install --target DIR ml_dtypes==0.7.0``). Each ``--also KEY=VALUE``
measures this checkout once more with that environment variable set (e.g.
``NSTJAX_CPU_XLA_CACHE=1``), as its own column. Synthetic weights
(benchmarks.common.synthetic_weights_file): the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, write_json

PHASES = (  # (label, the function whose cumulative time it is: file suffix, function name)
    ("the whole run (nstjax.run as __main__, under the profiler)", "nstjax/run.py", "<module>"),
    ("compose the config (Hydra)", "hydra/_internal/config_loader_impl.py", "load_configuration"),
    ("validate: images, layers, numbers", "nstjax/build.py", "validate"),
    ("read and hash the weights", "nstjax/weights/__init__.py", "load_weights"),
    ("build the group: targets, Winograd kernels", "nstjax/build.py", "build_group"),
    ("compile or load the programs", "nstjax/driver.py", "programs"),
    ("the steps (first evaluation, chunks)", "nstjax/driver.py", "_drive"),
    ("write result.png, history.csv, metrics.json", "nstjax/transfer.py", "write_outputs"),
    ("of which the loss curve (matplotlib)", "nstjax/outputs.py", "plot_history"),
)


def cli(args: list[str], cache: Path, profile: Path | None = None, root: Path = ROOT,
        env: dict | None = None) -> tuple[float, dict]:
    """Wall seconds of ``python -m nstjax.run ARGS`` run in the checkout ``root`` (under cProfile
    into ``profile`` if given; ``env``: variables set on top, PYTHONPATH's entries before
    ``root``) and the run's metrics.json."""
    run_dir = Path(tempfile.mkdtemp(prefix="engine-")) / "run"
    extra = dict(env or {})
    path = os.pathsep.join([*filter(None, [extra.pop("PYTHONPATH", None)]), str(root)])
    env = dict(os.environ, **extra, NSTJAX_CACHE=str(cache), JAX_PLATFORMS="cpu", PYTHONPATH=path)
    prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
    t0 = time.perf_counter()
    proc = subprocess.run([*prefix, "-m", "nstjax.run", *args, f"hydra.run.dir={run_dir}", "progress=false"],
                          cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(args)} failed: {proc.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return wall, metrics


def phases(profile: Path) -> dict[str, float]:
    """Cumulative seconds of each of PHASES in a cProfile file."""
    stats = pstats.Stats(str(profile)).stats
    out = {}
    for label, file, name in PHASES:
        out[label] = sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name)
    return out


def measure(root: Path, base: list[str], work: Path, quick: bool, env: dict | None = None) -> dict:
    """(1) and (2) of the module for the CLI of the checkout ``root`` (``env``: see :func:`cli`)."""
    run = functools.partial(cli, root=root, env=env)
    size, steps = (64, 6) if quick else (256, 20)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    chunks = {}
    for every in (0, 1):
        run([*base, "optim=adam", f"image.size={size}", "optim.steps=2", f"save_every={every}"], cache)
        _, m = run([*base, "optim=adam", f"image.size={size}", f"optim.steps={steps}", f"save_every={every}"], cache)
        chunks[every] = m["run_seconds"] / m["steps"]
    per_eval = {}
    for n in (7, 70) if not quick else (3, 9):
        _, m = run([*base, "optim=adam", f"image.size={size}", f"optim.steps={n}"], cache)
        per_eval[n] = m["run_seconds"] / m["loss_evaluations"]
    report = {"chunks": {"size": size, "steps": steps, "s_per_step_save_every_0": chunks[0],
                         "s_per_step_save_every_1": chunks[1], "ratio": chunks[1] / chunks[0],
                         "s_per_evaluation": {str(k): v for k, v in per_eval.items()},
                         "short_over_long": per_eval[min(per_eval)] / per_eval[max(per_eval)]}}
    print(f"(1) {root}: {size} px Adam, seconds a step: save_every=0 {chunks[0]:.3f}, save_every=1 "
          f"{chunks[1]:.3f} ({chunks[1] / chunks[0]:.2f}×); seconds an evaluation: " +
          ", ".join(f"{k} steps {v:.3f}" for k, v in per_eval.items()), flush=True)
    startup = {}
    args = [*base, "image.size=64", "optim.steps=1"]
    for state in ("cold", "warm"):
        cache = work / f"startup-{state}"
        runs = {}
        for what, profile in (("wall", None), ("profile", work / f"{state}.prof")):
            shutil.rmtree(cache, ignore_errors=True)
            if state == "warm":
                run(args, cache)  # an earlier run of the same structure fills the cache
            runs[what], _ = run(args, cache, profile)
        startup[state] = {"wall_s": runs["wall"], "phases": phases(work / f"{state}.prof")}
        print(f"(2) {root}: 1-step 64 px run, {state} caches: {runs['wall']:.1f} s wall", flush=True)
    report["startup"] = startup
    return report


def main(argv=None) -> int:
    from benchmarks.common import synthetic_weights_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 px and fewer steps: checks that it works")
    p.add_argument("--before", type=Path, help="another checkout of nstjax, measured the same way first")
    p.add_argument("--before-path", type=Path, help="packages put first on the --before checkout's path")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                   help="measure this checkout again with this environment variable (repeatable)")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nstjax-engine-"))
    weights = synthetic_weights_file(work / "weights.safetensors")
    base = [f"model.weights={weights}"]
    roots = {"before": (a.before.resolve(), {"PYTHONPATH": str(a.before_path.resolve())} if a.before_path else {})
             } if a.before else {}
    roots["now"] = (ROOT, {})
    for also in a.also:
        key, _, value = also.partition("=")
        roots[f"now, {also}"] = (ROOT, {key: value})
    report: dict = {"machine": os.uname().machine, "cpus": os.cpu_count(), "before_path": str(a.before_path or ""),
                    **{name: measure(root, base, work / name.replace(", ", "-"), a.quick, env)
                       for name, (root, env) in roots.items()}}
    columns = [(name, state, max(11, len(f"{name} {state}"))) for name in roots for state in ("cold", "warm")]
    print(f"\n{'where the seconds go (cProfile, cumulative)':48s} " + " ".join(f"{n + ' ' + s:>{w}s}"
                                                                          for n, s, w in columns))
    for label, *_ in PHASES:
        print(f"{label:48s} " + " ".join(f"{report[n]['startup'][s]['phases'][label]:{w}.2f}" for n, s, w in columns))
    print(f"{'wall time without the profiler':48s} " + " ".join(f"{report[n]['startup'][s]['wall_s']:{w}.2f}"
                                                             for n, s, w in columns))
    write_json(RESULTS / ("engine-quick.json" if a.quick else "engine-cpu.json"), report)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
