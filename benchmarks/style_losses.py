"""Seconds per evaluation of each style loss, relative to Gatys et al.'s Gram loss.

    python -m benchmarks.style_losses                          # 256 and 512 px (CPU: ~5 min on 2 cores)
    python -m benchmarks.style_losses --sizes 64 --reps 1      # a quick check that it works

One evaluation is the objective's value and its gradient with respect to the
pixels, ``jax.jit(jax.value_and_grad(...))`` compiled ahead of time (the
compile time is reported apart), the minimum over ``--reps`` calls. The
objective is Gatys et al.'s (content relu4_2, style relu1_1 … relu5_1, w_l =
1/5, α = 1, β = 10⁴, average pooling, Caffe preprocessing, model.conv as the
CLI picks it) with ``loss.style_loss`` switched, each loss at its defaults
(mmd: the Gaussian kernel on 1024 sampled positions, and the exact linear
kernel; sliced_wasserstein: N directions; remd: 1024 positions). mrf is
measured on Li & Wand's layers relu3_1, relu4_1 (and beside gram on the same
layers): on relu1_1 its matching scores (one per pair of 3×3 patches of the
image and of the style) would be 4·10⁹ values at 256 px. Random He-normal
weights (the cost does not depend on the values), the bundled pair resized to
a square. Writes benchmarks/results/style_losses-<platform>.json and prints the
table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.common import (RESULTS, bench_images, cpu_info, product_problem, scratch_dir,
                               synthetic_weights_file, write_json)

MRF_LAYERS = ("relu3_1", "relu4_1")
CASES = {  # name: (LossSpec options, the gram case it is compared with)
    "gram": ({}, "gram"),
    "mean_std": ({"style_loss": "mean_std"}, "gram"),
    "mmd": ({"style_loss": "mmd"}, "gram"),
    "mmd linear": ({"style_loss": "mmd", "mmd_kernel": "linear"}, "gram"),
    "gaussian_w2": ({"style_loss": "gaussian_w2"}, "gram"),
    "sliced_wasserstein": ({"style_loss": "sliced_wasserstein"}, "gram"),
    "histogram": ({"style_loss": "histogram"}, "gram"),
    "remd": ({"style_loss": "remd"}, "gram"),
    "gram (relu3_1 + relu4_1)": ({"style_layers": MRF_LAYERS}, "gram (relu3_1 + relu4_1)"),
    "mrf (relu3_1 + relu4_1)": ({"style_loss": "mrf", "style_layers": MRF_LAYERS}, "gram (relu3_1 + relu4_1)"),
}


def measure(options: dict, size: int, reps: int, weights: Path) -> dict:
    """Compile and time one loss + gradient of the objective with these loss options, built as the
    CLI builds it (benchmarks.common.product_problem)."""
    import jax
    import jax.numpy as jnp

    content, style, x = bench_images(size)
    overrides = [f"loss.{k}=[{','.join(v)}]" if isinstance(v, tuple) else f"loss.{k}={v}" for k, v in options.items()]
    _, objective, params, targets, hp = product_problem(overrides, weights, content, style)
    x = jnp.asarray(x)
    step = jax.jit(jax.value_and_grad(lambda px, p, t, h, k: objective(px, p, t, h, k).total))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(x, params, targets, hp, key).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        value, grad = jax.block_until_ready(compiled(x, params, targets, hp, key))
        times.append(time.perf_counter() - t0)
    if not (jnp.isfinite(value) and jnp.all(jnp.isfinite(grad))):
        raise SystemExit(f"{options}: the loss or its gradient is not finite at {size} px")
    return {"eval_s": min(times), "times_s": times, "compile_s": compile_s, "loss": float(value)}


def table(rows: list[dict], sizes: list[int]) -> str:
    head = ["`loss.style_loss`"] + [f"{s} px: s, × gram" for s in sizes] + ["compile s (largest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["name"]]
        for s in sizes:
            m = r["sizes"][str(s)]
            cells.append(f"{m['eval_s']:.3g} s, {m['relative']:.2f}×")
        cells.append(f"{r['sizes'][str(sizes[-1])]['compile_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import jax

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512", help="image sizes (square), comma-separated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--losses", default=",".join(CASES), help="cases, comma-separated: " + ", ".join(CASES))
    p.add_argument("--out", type=Path, default=RESULTS / f"style_losses-{jax.default_backend()}.json")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.losses.split(",")
    wanted = list(dict.fromkeys(n2 for n in names for n2 in (CASES[n][1], n)))  # each reference first
    weights = synthetic_weights_file(scratch_dir() / "synthetic.safetensors")
    load_before = os.getloadavg()
    results = {name: {"name": name, "options": CASES[name][0], "sizes": {}} for name in wanted}
    for size in sizes:
        for name in wanted:
            m = results[name]["sizes"][str(size)] = measure(CASES[name][0], size, args.reps, weights)
            m["relative"] = m["eval_s"] / results[CASES[name][1]]["sizes"][str(size)]["eval_s"]
            print(f"{size} px {name}: {m['eval_s']:.3f} s ({m['relative']:.2f}× gram), compile "
                  f"{m['compile_s']:.1f} s", flush=True)
    rows = [results[n] for n in wanted]
    device = jax.devices()[0]
    write_json(args.out, {"platform": jax.default_backend(), "device": device.device_kind,
                          "jax": jax.__version__, "reps": args.reps, "cpu": cpu_info(),
                          "load_average_before_after": [load_before, os.getloadavg()], "rows": rows})
    print(table(rows, sizes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
