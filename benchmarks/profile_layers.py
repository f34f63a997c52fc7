"""Per-layer profile of one evaluation on the JAX side: each VGG19 convolution's forward and
forward + input gradient (what one loss + gradient evaluation runs), timed alone, and the GFLOP/s.

    python -m benchmarks.profile_layers --size 512 [--variants direct,winograd] [--last conv5_1]

Each layer is jitted on its own ((1, H, W, Cin) input at that layer's resolution, the VGG19 kernel
shape, a ones cotangent); the minimum of ``--reps`` runs is reported. Variants are 'winograd'
(nstjax.winograd at every layer, its kernels transformed beforehand as nstjax does) and the
convolutions of :mod:`benchmarks.conv_variants` ('direct' is nstjax's direct convolution).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _time(f, *args, reps=3):
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def profile(size: int, variants=("direct",), last: str = "conv5_1", reps: int = 3, precision="float32",
            log=print) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.common import CONVS, conv_flops, random_params
    from benchmarks.conv_variants import VARIANTS
    from nstjax import winograd

    params = random_params(0)
    flops = conv_flops(size, size, last)
    rng = np.random.default_rng(0)
    out = {}
    def winograd_conv(x, k, b, precision, transformed):
        return winograd.conv3x3(x, k, transformed) + b

    for variant in variants:
        conv = winograd_conv if variant == "winograd" else VARIANTS[variant]
        rows, total = [], 0.0
        for name, c_in, c_out, down in CONVS:
            if name not in flops:
                break
            s = size // down
            x = jnp.asarray(rng.random((1, s, s, c_in), np.float32))
            k = jnp.asarray(params[name]["kernel"])
            b = jnp.asarray(params[name]["bias"])
            ct = jnp.ones((1, s, s, c_out), jnp.float32)
            extra = (winograd.prepare(k),) if variant == "winograd" else ()
            fwd = jax.jit(lambda x, k, b, *e, conv=conv: conv(x, k, b, precision, *e))

            def fb(x, k, b, ct, *e, conv=conv):
                y, vjp = jax.vjp(lambda x: conv(x, k, b, precision, *e), x)
                return y, vjp(ct)[0]

            t_f = _time(fwd, x, k, b, *extra, reps=reps)
            t_fb = _time(jax.jit(fb), x, k, b, ct, *extra, reps=reps)
            total += t_fb
            row = {"layer": name, "hw": s, "cin": c_in, "cout": c_out, "fwd_ms": 1e3 * t_f,
                   "fwd_bwd_ms": 1e3 * t_fb, "fwd_gflops": flops[name] / t_f / 1e9,
                   "fwd_bwd_gflops": 2 * flops[name] / t_fb / 1e9}
            rows.append(row)
            log(f"  {variant:15s} {name:8s} {s:5d}² {c_in:4d}→{c_out:<4d} fwd {row['fwd_ms']:8.1f} ms "
                f"({row['fwd_gflops']:6.1f} GF/s)   fwd+dgrad {row['fwd_bwd_ms']:8.1f} ms "
                f"({row['fwd_bwd_gflops']:6.1f} GF/s)")
        log(f"  {variant:15s} convolutions fwd+dgrad total {total:.3f} s")
        out[variant] = {"layers": rows, "total_fwd_bwd_s": total}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--variants", default="direct,winograd")
    p.add_argument("--last", default="conv5_1")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precision", default="float32")
    p.add_argument("--json", default=None, help="write the profile here")
    a = p.parse_args(argv)
    res = profile(a.size, a.variants.split(","), a.last, a.reps, a.precision)
    if a.json:
        from pathlib import Path

        from benchmarks.common import write_json
        write_json(Path(a.json), {"size": a.size, "profile": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
