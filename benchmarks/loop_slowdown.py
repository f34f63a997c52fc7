"""Why an evaluation inside nstjax's Loop costs 2-3× a jitted evaluation on XLA:CPU, and the fix.

    python -m benchmarks.loop_slowdown [--size 256] [--steps 4]

Inside a while loop (``lax.scan`` / ``fori_loop``, as ``Loop.chunk`` runs its steps) XLA:CPU leaves the
input-gradient convolutions with a flipped kernel in '01oi' dimension order (in a top-level program
it inserts a transpose so the kernel is '01io'); those convolutions then miss the Eigen fast path.
:func:`benchmarks.conv_variants.explicit_bwd` (a custom VJP computing dL/dx as an ordinary HWIO
convolution of a materialised flipped, transposed kernel behind an optimisation barrier) restores it.
This prints, for nstjax's convolution and the variant: the number of '01oi' convolutions in the
compiled scan, and the per-step wall and CPU time of a Python loop of jitted steps, a scan, and an
unrolled scan.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from benchmarks.common import EXAMPLES, SETUPS, load_image, random_params
    from benchmarks.conv_variants import VARIANTS
    from nstjax.losses import compute_targets, make_objective
    from nstjax.vgg import VGG

    setup = SETUPS["tutorial"]()
    params = jax.tree.map(jnp.asarray, random_params(0))
    content = jnp.asarray(load_image(EXAMPLES / "tubingen.jpg", a.size))
    style = jnp.asarray(load_image(EXAMPLES / "starry_night.jpg", a.size))
    hp = setup["make_hp"]()
    n = a.steps

    def stepper(model):
        obj = make_objective(model, setup["spec"])

        def step(x, p, t, h):
            g = jax.grad(lambda x: obj(x, p, t, h).total)(x)
            return jnp.clip(x - 0.01 * jnp.sign(g), 0, 1)
        return step

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    for variant in ("lax_nhwc", "explicit_bwd"):
        model = VGG(setup["prep"], "max", conv=VARIANTS[variant])
        targets = compute_targets(model, params, content, style, setup["spec"])
        step = stepper(model)
        one = jax.jit(step).lower(content, params, targets, hp).compile()
        scan = jax.jit(lambda x, p, t, h: jax.lax.scan(lambda x, _: (step(x, p, t, h), None), x, None,
                                                       length=n)[0]).lower(content, params, targets, hp).compile()
        unrolled = jax.jit(lambda x, p, t, h: jax.lax.scan(lambda x, _: (step(x, p, t, h), None), x, None,
                                                           length=n, unroll=True)[0]
                           ).lower(content, params, targets, hp).compile()
        oi = scan.as_text().count("_01oi->")
        res = {}
        for name, f, calls in (("python loop of jitted steps", one, n), ("lax.scan", scan, 1),
                               ("lax.scan unroll=True", unrolled, 1)):
            jax.block_until_ready(f(content, params, targets, hp))
            best = (float("inf"), float("inf"))
            for _ in range(2):
                t0, c0 = time.perf_counter(), cpu()
                y = content
                for _ in range(calls):
                    y = f(y, params, targets, hp)
                jax.block_until_ready(y)
                best = min(best, ((time.perf_counter() - t0) / n, (cpu() - c0) / n))
            res[name] = best
        print(f"{variant}: {oi} convolutions with '01oi' kernels in the compiled scan")
        for name, (w, c) in res.items():
            print(f"  {name:28s} {w:.3f} s/step wall, {c:.3f} s/step CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
