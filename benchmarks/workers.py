"""The measurements, each run in its own process by benchmarks.run (so peak RSS is per measurement):

    python -m benchmarks.workers TASK ARGS_JSON OUT_JSON

TASK is one of the functions in ``TASKS``; it writes its result as JSON to OUT_JSON. Exit status 3
means the loss disagreed with the one it was told to expect.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.common import (SETUPS, bench_images, cpu_info, load_params, max_rss_bytes, product_problem,
                               scratch_dir, synthetic_weights_file,
                               write_json)

AGREEMENT_RTOL = 1e-4


class Disagreement(Exception):
    pass


def _cpu():
    """This process's CPU time (user + system), all threads: steadier than wall time on a busy machine."""
    r = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(call, reps: int, first_call_s: float) -> dict:
    """Wall and CPU time of ``reps`` calls: the lists, the best and the median (the first call's
    time when there are no repetitions)."""
    times, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), _cpu()
        call()
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    return {"times_s": times, "cpu_times_s": cpus,
            "eval_s": min(times) if times else first_call_s,
            "eval_median_s": float(np.median(times)) if times else first_call_s}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------- JAX helpers

def _jax_problem(setup, weights, content, style, precision="float32", remat=False, variant="nstjax"):
    """:func:`benchmarks.common.product_problem` of the objective ``setup``: with ``variant`` 'nstjax'
    the default convolution (model.conv=auto), 'direct' (model.conv=direct) or a convolution of
    benchmarks.conv_variants given to the model; '+memsched' (XLA's memory-optimised CPU scheduler)
    is applied by :func:`main` through XLA_FLAGS before jax starts."""
    name = (variant or "nstjax").split("+")[0]
    conv = "auto" if name in ("nstjax", "") else "direct"
    if name not in ("nstjax", "", "direct"):
        from benchmarks.conv_variants import VARIANTS
        conv = VARIANTS[name]
    return product_problem(setup["overrides"], weights, content, style, conv, precision, remat)


def _weights_file(args) -> str:
    """The weights file of ``args`` ('weights'), or the synthetic one :func:`load_params` stands for."""
    if args.get("weights"):
        return args["weights"]
    return str(synthetic_weights_file(scratch_dir() / "synthetic.safetensors"))


MEMSCHED = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def _device_info():
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "jax": jax.__version__}


# --------------------------------------------------------------------------- tasks

def agree(args):
    """Loss (and at ``grad`` sizes the gradient) of both sides on the same inputs, before any timing."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks import torch_gatys as tg

    setup = SETUPS[args["objective"]]()
    params, _ = load_params(args.get("weights"))
    content, style, x = bench_images(args["size"])
    variant = args.get("variant", "nstjax")
    _, obj, jp, targets, hp = _jax_problem(setup, _weights_file(args), content, style, variant=variant)
    h = setup["hp"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tg.set_precision("float32")
    tobj = tg.GatysObjective(tg.params_to_torch(params, device), setup["spec"], setup["prep"], setup["pooling"],
                             content, style, h["alpha"], h["beta"], h["content_layer_weights"],
                             h["style_layer_weights"])
    out = {"size": args["size"], "objective": args["objective"], "variant": variant, "device": device}
    if args.get("grad"):
        lj, gj = jax.jit(jax.value_and_grad(lambda x: obj(x, jp, targets, hp).total))(jnp.asarray(x))
    else:
        lj = jax.jit(lambda x: obj(x, jp, targets, hp).total)(jnp.asarray(x))
    if args.get("grad"):
        lt, gt = tg.loss_and_grad(tobj, x)
        gj = np.asarray(gj)
        out["grad_rel_l2"] = float(np.linalg.norm(gj - gt) / max(np.linalg.norm(gt), 1e-30))
    else:
        lt = tg.loss_only(tobj, x)
    out.update(loss_jax=float(lj), loss_torch=float(lt), rel_diff=_rel(float(lj), float(lt)))
    out["agree"] = bool(out["rel_diff"] <= AGREEMENT_RTOL)
    return out


def _problems(x, targets, hp, lr):
    """A batch of one problem for nstjax's Loop (a leading member axis of 1) starting at ``x``."""
    import jax
    import jax.numpy as jnp

    from nstjax.optimize import Problem

    return jax.tree.map(lambda leaf: leaf[None], Problem(jnp.asarray(x), targets, hp, jnp.float32(lr),
                                                          jax.random.key(0), jnp.float32(0)))


def eval_jax(args):
    """Compile time, then per-evaluation time (loss + gradient, jitted) and peak RSS; optionally the
    per-evaluation time inside nstjax's optimisation loop (Loop.chunk, Adam)."""
    import jax
    import jax.numpy as jnp

    from nstjax.optimize import Loop, OptimSpec

    size, reps = args["size"], args.get("reps", 3)
    setup = SETUPS[args["objective"]]()
    content, style, x = bench_images(size)
    variant = args.get("variant", "nstjax")
    model, obj, jp, targets, hp = _jax_problem(setup, _weights_file(args), content, style,
                                               args.get("precision", "float32"),
                                               args.get("remat", False), variant)
    xs = jnp.asarray(x)
    out = {"size": size, "variant": variant, "precision": args.get("precision", "float32"),
           "remat": args.get("remat", False), **_device_info()}
    vg = jax.jit(jax.value_and_grad(lambda x, p, t, h: obj(x, p, t, h).total))
    t0 = time.perf_counter()
    compiled = vg.lower(xs, jp, targets, hp).compile()
    out["compile_s"] = time.perf_counter() - t0
    try:
        ma = compiled.memory_analysis()
        out["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
        out["xla_argument_bytes"] = int(ma.argument_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        ma = None
    limit = args.get("refuse_over_available")
    if limit and ma is not None:
        import psutil

        need = ma.temp_size_in_bytes + max_rss_bytes()
        avail = psutil.virtual_memory().available + max_rss_bytes()
        out["predicted_peak_bytes"] = int(need)
        if need > limit * avail:
            out["skipped"] = (f"not run: XLA needs {ma.temp_size_in_bytes / 2**30:.1f} GiB of temporaries, "
                              f"predicted peak {need / 2**30:.1f} GiB > {limit:.0%} of the "
                              f"{avail / 2**30:.1f} GiB this process could have")
            out["peak_rss_bytes"] = max_rss_bytes()
            return out
    t0 = time.perf_counter()
    loss, g = compiled(xs, jp, targets, hp)
    jax.block_until_ready(g)
    out["first_call_s"] = time.perf_counter() - t0
    out["loss"] = float(loss)
    expect = args.get("expect_loss")
    if expect is not None and _rel(out["loss"], expect) > AGREEMENT_RTOL:
        raise Disagreement(f"JAX loss {out['loss']} vs expected {expect} at {size}px ({variant})")
    out.update(_timed(lambda: jax.block_until_ready(compiled(xs, jp, targets, hp)), reps,
                      out["first_call_s"]))
    out["rss_after_eval_bytes"] = max_rss_bytes()
    k = args.get("loop_steps", 0)
    if k:
        loop = Loop(obj, OptimSpec("adam"), chunk_steps=k)
        big = jnp.int32(10**9)
        problems = _problems(xs, targets, hp, 1e-3)
        t0 = time.perf_counter()
        program = loop.compile(problems, jp)
        out["loop_compile_s"] = time.perf_counter() - t0
        state = jax.block_until_ready(program.init(problems, jp))
        t0, c0 = time.perf_counter(), _cpu()
        state, rows, valid = program.chunk(state, problems, jp, jnp.int32(k), big)
        jax.block_until_ready(rows)
        out["loop_eval_s"] = (time.perf_counter() - t0) / k
        out["loop_eval_cpu_s"] = (_cpu() - c0) / k
        out["loop_steps"] = k
    out["peak_rss_bytes"] = max_rss_bytes()
    return out


def eval_torch(args):
    """Per-evaluation time (loss + gradient, eager) and peak RSS of the PyTorch side; ``precision``
    'float32' (IEEE, the default) or 'tf32' (TF32 convolutions on CUDA, PyTorch's own default there)."""
    import torch

    from benchmarks import torch_gatys as tg

    size, reps = args["size"], args.get("reps", 3)
    setup = SETUPS[args["objective"]]()
    params, _ = load_params(args.get("weights"))
    content, style, x = bench_images(size)
    device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.get("precision", "float32")
    tg.set_precision(precision)
    h = setup["hp"]
    obj = tg.GatysObjective(tg.params_to_torch(params, device), setup["spec"], setup["prep"], setup["pooling"],
                            content, style, h["alpha"], h["beta"], h["content_layer_weights"],
                            h["style_layer_weights"])
    out = {"size": size, "device": device, "precision": precision, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    t0 = time.perf_counter()
    loss, _ = tg.loss_and_grad(obj, x)
    out["first_call_s"] = time.perf_counter() - t0
    out["loss"] = loss
    expect = args.get("expect_loss")
    if expect is not None and _rel(loss, expect) > AGREEMENT_RTOL:
        raise Disagreement(f"PyTorch loss {loss} vs expected {expect} at {size}px")
    out.update(_timed(lambda: tg.loss_and_grad(obj, x), reps, out["first_call_s"]))
    out["peak_rss_bytes"] = max_rss_bytes()
    return out


def memory_jax(args):
    """Compile and one evaluation at a large size (optionally rematerialised): time and peak RSS.
    Refuses to run (reporting XLA's predicted need) when the compiled program's temporaries would not
    fit in the memory available, rather than being killed by the kernel's OOM killer."""
    args = dict(args, reps=args.get("reps", 0), refuse_over_available=args.get("refuse_over_available", 0.9))
    return eval_jax(args)


# A matrix product in each model.precision: (input dtype, lax precision), accumulating in float32.
GEMM_PRECISIONS = {"float32": ("float32", "highest"), "tf32": ("float32", "default"),
                   "bfloat16": ("bfloat16", "default")}


def machine(args):
    """CPU model and estimated peak, and a measured n×n matmul rate (jnp.dot, best of ``reps``) as a
    practical ceiling: float32, and for each of ``precisions`` (keys of GEMM_PRECISIONS) if given;
    ``n_by_platform`` ({'gpu': n, 'cpu': n}) picks n by jax's default backend."""
    import jax
    import jax.numpy as jnp

    n = args.get("n_by_platform", {}).get(jax.default_backend(), args.get("n", 2048))
    rates = {}
    for name in args.get("precisions", ["float32"]):
        dtype, precision = GEMM_PRECISIONS[name]
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
        f = jax.jit(lambda a: jnp.dot(a, a, precision=precision, preferred_element_type=jnp.float32))
        jax.block_until_ready(f(a))
        best = float("inf")
        for _ in range(args.get("reps", 5)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * n**3 / best / 1e9
    info = cpu_info()
    info["gemm_n"] = n
    info["gemm_gflops_measured"] = rates.get("float32")
    info["gemm_gflops_measured_by_precision"] = rates
    info["loadavg"] = os.getloadavg()
    info.update(_device_info())
    try:
        info["gpus"] = [str(d) for d in jax.devices("gpu")]
    except RuntimeError:
        info["gpus"] = []
    return info


def profile(args):
    """Per-layer convolution profile (benchmarks.profile_layers) in its own process."""
    from benchmarks.profile_layers import profile as run_profile

    return {"size": args["size"], "profile": run_profile(args["size"], args["variants"], log=lambda *a: None),
            "loadavg": os.getloadavg()}


TASKS = {f.__name__: f for f in (agree, eval_jax, eval_torch, memory_jax, machine, profile)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    task, args, out = argv[0], json.loads(argv[1]), Path(argv[2])
    if "memsched" in str(args.get("variant", "")).split("+")[1:]:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMSCHED).strip()
    load_start = os.getloadavg()
    try:
        result = TASKS[task](args)
    except Disagreement as e:
        write_json(out, {"error": str(e), "disagreement": True})
        print(f"benchmarks: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator
        write_json(out, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    result["peak_rss_bytes"] = max_rss_bytes()
    result["loadavg_start"], result["loadavg_end"] = load_start, os.getloadavg()
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
