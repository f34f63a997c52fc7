"""One style-transfer run from a config to the files in its run directory.

config ─► weights, images ─► targets (once) ─► optax loop in chunks ─► outputs.
Between chunks: progress bar, history, snapshots, checkpoints, and SIGINT /
SIGTERM (which write the current image and a checkpoint, then stop).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from omegaconf import DictConfig, OmegaConf

from nstjax import checkpoint, images, outputs
from nstjax.errors import UserError
from nstjax.losses import HParams, LossSpec, compute_targets, make_objective
from nstjax.optimize import RUNNING, STATUS_REASONS, Loop, OptimSpec, history_row
from nstjax.vgg import VGG19, Preprocessing, UnknownLayerError, default_conv, layer_stride, prepare_params
from nstjax.weights import load_weights

DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"
EXIT_DIVERGED = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class RunResult:
    status: str  # finished | diverged | interrupted
    exit_code: int
    metrics: dict = field(default_factory=dict)


def example_image(name: str) -> Path:
    """Path of a bundled example image (examples/, shipped as nstjax.examples)."""
    return Path(str(resources.files("nstjax.examples").joinpath(name)))


def _enum_value(v):
    return getattr(v, "value", v)


def loss_spec(cfg: DictConfig) -> LossSpec:
    c = cfg.loss
    try:
        return LossSpec(
            content_layers=tuple(c.content_layers), style_layers=tuple(c.style_layers),
            gram_norm=_enum_value(c.gram_norm), style_reduction=_enum_value(c.style_reduction),
            content_reduction=_enum_value(c.content_reduction), tv_norm=_enum_value(c.tv_norm),
        )
    except UnknownLayerError as e:
        raise UserError(f"loss.content_layers / loss.style_layers: {e}") from e


def hparams(cfg: DictConfig, spec: LossSpec) -> HParams:
    """α, β, layer weights and TV weight as arrays; each must be finite and ≥ 0."""
    c = cfg.loss
    for key in ("alpha", "beta", "tv_weight", "content_layer_weights", "style_layer_weights"):
        values = c[key]
        values = [] if values is None else (list(values) if not isinstance(values, (int, float)) else [values])
        for v in values:
            if not math.isfinite(v) or v < 0:
                raise UserError(f"loss.{key} = {v} is not allowed: loss weights must be finite and ≥ 0")
    try:
        return HParams.create(spec, c.alpha, c.beta, c.content_layer_weights,
                              c.style_layer_weights, c.tv_weight)
    except ValueError as e:
        raise UserError(str(e)) from e


def optim_spec(cfg: DictConfig) -> OptimSpec:
    o = cfg.optim
    if o.name == "adam":
        return OptimSpec("adam", b1=o.b1, b2=o.b2, eps=o.eps, epsilon_hat=o.epsilon_hat)
    if o.name == "lbfgs":
        return OptimSpec("lbfgs", memory_size=o.memory_size, linesearch=_enum_value(o.linesearch),
                         max_linesearch_steps=o.max_linesearch_steps)
    raise UserError(f"optim.name {o.name!r} is unknown: use optim=adam or optim=lbfgs")


def _check_numbers(cfg: DictConfig) -> None:
    o = cfg.optim
    if math.isnan(o.lr) or o.lr <= 0:
        raise UserError(f"optim.lr = {o.lr} must be a positive number")
    for key, value, least in (("optim.steps", o.steps, 0), ("image.size", cfg.image.size, 1),
                              ("chunk_steps", cfg.chunk_steps, 1), ("save_every", cfg.save_every, 0),
                              ("checkpoint_every", cfg.checkpoint_every, 0)):
        if value < least:
            raise UserError(f"{key} = {value} must be ≥ {least}")
    if not (cfg.image.style_scale > 0 and math.isfinite(cfg.image.style_scale)):
        raise UserError(f"image.style_scale = {cfg.image.style_scale} must be a positive number")


def _preprocessing_override(cfg: DictConfig) -> Preprocessing | None:
    p = cfg.model.preprocessing
    if p is None:
        return None
    return Preprocessing(_enum_value(p.channel_order), p.scale, tuple(p.mean), tuple(p.std))


def input_paths(cfg: DictConfig) -> tuple[str, str]:
    """The content and style files: as given, or the bundled examples."""
    return (str(cfg.content or example_image(DEFAULT_CONTENT)),
            str(cfg.style or example_image(DEFAULT_STYLE)))


def load_inputs(cfg: DictConfig, spec: LossSpec) -> tuple[np.ndarray, np.ndarray]:
    """Content resized to longest side image.size; style to size × style_scale.

    An input file, or a resized image, smaller than the deepest layer needs is refused.
    """
    limit = cfg.image.max_pixels
    deepest = max(spec.layers, key=layer_stride)
    least = layer_stride(deepest)
    sizes = {"content": cfg.image.size, "style": max(1, round(cfg.image.size * cfg.image.style_scale))}
    keys = {"content": "image.size", "style": "image.style_scale"}
    loaded = []
    for what, path in zip(("content", "style"), input_paths(cfg)):
        img = images.load_image(path, limit)
        if min(img.shape[:2]) < least:
            raise UserError(
                f"the {what} image {path} is {img.shape[1]}×{img.shape[0]} px, too small for layer "
                f"{deepest}, which needs at least {least} px on each side: use a larger image"
            )
        img = images.resize_longest(img, sizes[what])
        if min(img.shape[:2]) < least:
            raise UserError(
                f"the {what} image is {img.shape[1]}×{img.shape[0]} px after resizing, too small for "
                f"layer {deepest}, which needs at least {least} px on each side: raise {keys[what]} "
                "or use shallower layers"
            )
        loaded.append(img)
    return loaded[0], loaded[1]


def initial_image(cfg: DictConfig, content: np.ndarray, style: np.ndarray,
                  preprocessing: Preprocessing, key: jax.Array) -> np.ndarray:
    """init: content (Gatys et al.), noise (mean pixel + seeded Gaussian), style, or a file."""
    h, w = content.shape[:2]
    if cfg.init == "content":
        return content
    if cfg.init == "noise":
        mean = np.asarray(preprocessing.mean_rgb(), np.float32)
        noise = np.asarray(jax.random.normal(key, content.shape, jnp.float32))
        return np.clip(mean + cfg.init_noise_std * noise, 0.0, 1.0).astype(np.float32)
    if cfg.init == "style":
        return images.resize_to(style, h, w)
    return images.resize_to(images.load_image(cfg.init, cfg.image.max_pixels), h, w)


def _use_remat(cfg: DictConfig, shape) -> bool:
    mode = _enum_value(cfg.model.remat)
    return mode == "on" or (mode == "auto" and shape[0] * shape[1] >= cfg.model.remat_pixels)


def conv_algorithm(cfg: DictConfig) -> str:
    """model.conv with 'auto' resolved for this backend; Winograd needs float32."""
    conv, precision = _enum_value(cfg.model.conv), _enum_value(cfg.model.precision)
    if conv == "auto":
        return default_conv(precision)
    if conv == "winograd" and precision != "float32":
        raise UserError(f"model.conv=winograd computes in float32: use model.precision=float32 or "
                        f"model.conv=direct (model.precision is {precision})")
    return conv


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag read between chunks."""

    def __init__(self):
        self.received: int | None = None

    def _handle(self, signum, frame):
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


@dataclass
class _Compiled:
    """What the loop needs: compiled functions and their array arguments."""

    chunk: object
    params: dict
    targets: object
    hp: HParams
    lr: jax.Array
    max_evaluations: jax.Array


def program_bytes(compiled) -> int:
    """Memory a compiled program needs while it runs: arguments, temporaries and
    outputs not aliased to (donated) arguments, as XLA plans them."""
    ma = compiled.memory_analysis()
    if ma is None:
        return 0
    return (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
            - ma.alias_size_in_bytes)


def free_memory_bytes() -> int | None:
    """Memory free for this run on the default device: available RAM on a CPU,
    the allocator's limit less what is in use on an accelerator."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return psutil.virtual_memory().available
    stats = device.memory_stats()
    return stats["bytes_limit"] - stats["bytes_in_use"] if stats and "bytes_limit" in stats else None


def check_memory(programs, optimizer_state_bytes: int, remat: bool, free: int | None = None) -> None:
    """Refuse, before it starts, a run that needs more memory than is free."""
    need = max(program_bytes(p) for p in programs)
    free = free_memory_bytes() if free is None else free
    if free is None or need <= free:
        return
    gib = 2.0**30
    remedies = "lower image.size, " + ("" if remat else "set model.remat=on, ")
    raise UserError(
        f"this run needs about {need / gib:.1f} GiB ({optimizer_state_bytes / gib:.1f} GiB of it "
        f"optimiser state) but {free / gib:.1f} GiB is free: {remedies}use a smaller "
        "optim.memory_size (L-BFGS keeps 2·memory_size images) or optim=adam; "
        "memory_check=false runs it anyway"
    )


def stylize(cfg: DictConfig, run_dir: Path, log=print) -> RunResult:
    """Run style transfer as ``cfg`` says, writing everything into ``run_dir``."""
    run_dir = Path(run_dir)
    result_path = run_dir / "result.png"
    if result_path.exists() and cfg.resume is None:
        raise UserError(f"{result_path} exists: every run needs its own directory")
    _check_numbers(cfg)
    spec = loss_spec(cfg)
    hp = hparams(cfg, spec)
    ospec = optim_spec(cfg)
    weights = load_weights(cfg.model.weights, preprocessing=_preprocessing_override(cfg))
    content, style = load_inputs(cfg, spec)
    init_key = jax.random.key(cfg.seed)
    x0 = initial_image(cfg, content, style, weights.preprocessing, init_key)

    model = VGG19(weights.preprocessing, _enum_value(cfg.model.pooling), _enum_value(cfg.model.precision),
                  _use_remat(cfg, content.shape), conv=conv_algorithm(cfg))
    loop = Loop(make_objective(model, spec), ospec, cfg.chunk_steps)
    lr = jnp.float32(cfg.optim.lr)
    params = prepare_params(jax.tree.map(jnp.asarray, weights.params), model.conv, spec.layers)
    content_j, style_j, x0_j = (jnp.asarray(a) for a in (content, style, x0))
    max_evals = jnp.int32(min(cfg.optim.max_evaluations or 2**31 - 1, 2**31 - 1))

    t0 = time.perf_counter()
    targets_jit = jax.jit(functools.partial(compute_targets, model, spec=spec))
    targets_fn = targets_jit.lower(params, content_j, style_j).compile()
    targets_shape = jax.eval_shape(targets_jit, params, content_j, style_j)
    init_fn, chunk_fn = loop.compile(x0_j, params, targets_shape, hp, lr, max_evals)
    compile_seconds = time.perf_counter() - t0
    if cfg.memory_check:
        opt_state = jax.eval_shape(ospec.transformation(lr).init, x0_j)
        check_memory((targets_fn, init_fn, chunk_fn),
                     sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(opt_state)), model.remat)

    t_run = time.perf_counter()
    targets = targets_fn(params, content_j, style_j)
    state = init_fn(x0_j, params, targets, hp, lr)
    history, rng_key, seconds_before = [history_row(state)], init_key, 0.0
    if cfg.resume is not None:
        state, rng_key, meta = checkpoint.load(Path(cfg.resume), state)
        history, seconds_before = meta["history"], meta.get("run_seconds", 0.0)
        log(f"resuming {cfg.resume} at step {int(state.step)}")

    def save_checkpoint(state):
        checkpoint.save(run_dir, state, rng_key, history, {
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "run_seconds": seconds_before + time.perf_counter() - t_run})

    compiled = _Compiled(chunk_fn, params, targets, hp, lr, max_evals)
    state, signum = _optimise(cfg, compiled, state, history, run_dir, save_checkpoint)
    run_seconds = seconds_before + time.perf_counter() - t_run

    status, exit_code, reason = "finished", 0, None
    if int(state.status) != RUNNING:
        status, exit_code = "diverged", EXIT_DIVERGED
        reason = STATUS_REASONS[int(state.status)]
    elif signum is not None and int(state.step) < cfg.optim.steps:
        status, exit_code = "interrupted", EXIT_SIGNAL[signum]
        reason = f"stopped by {signal.Signals(signum).name}"
        save_checkpoint(state)

    images.save_image(result_path, np.asarray(state.pixels))
    outputs.write_history(run_dir / "history.csv", history)
    metrics = {
        **dict(zip(("total", "content", "style", "tv"), history[-1][1:])),
        "status": status,
        "reason": reason,
        "steps": int(state.step),
        "loss_evaluations": int(state.evaluations),
        "compile_seconds": compile_seconds,
        "run_seconds": run_seconds,
        "image_size": [int(content.shape[0]), int(content.shape[1])],
        "style_size": [int(style.shape[0]), int(style.shape[1])],
        "optimizer": cfg.optim.name,
        "conv": model.conv,
        **dict(zip(("content_image", "style_image"), input_paths(cfg))),
        "weights": cfg.model.weights,
        "weights_sha256": weights.sha256,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "seed": cfg.seed,
        "versions": outputs.versions(),
    }
    if status == "diverged":
        metrics["diverged_step"] = int(state.step) + 1
    outputs.write_json(run_dir / "metrics.json", metrics)
    outputs.plot_history(run_dir / "loss_curve.png", history, title=str(cfg.model.weights))
    return RunResult(status, exit_code, metrics)


def _optimise(cfg: DictConfig, c: _Compiled, state, history: list, run_dir: Path,
              save_checkpoint) -> tuple[object, int | None]:
    """Run chunks until the steps or evaluations are spent, the run diverges or a
    signal arrives; between chunks: progress, history, snapshots, checkpoints.

    Chunks end on multiples of ``save_every`` and ``checkpoint_every``. Returns
    the last state and the signal received, if any.
    """
    steps = cfg.optim.steps
    events = [e for e in (cfg.save_every, cfg.checkpoint_every) if e > 0]
    stopper = _StopSignals()
    with stopper.installed(), _progress(steps, int(state.step), cfg.progress) as bar:
        while (int(state.step) < steps and int(state.status) == RUNNING
               and int(state.evaluations) < int(c.max_evaluations) and stopper.received is None):
            step = int(state.step)
            n = min(cfg.chunk_steps, steps - step, *[e - step % e for e in events])
            state, rows, valid = c.chunk(state, c.params, c.targets, c.hp, c.lr, jnp.int32(n),
                                         c.max_evaluations)
            new_rows = [[int(r[0]), *map(float, r[1:5])]
                        for r, v in zip(np.asarray(rows), np.asarray(valid)) if v]
            history += new_rows
            bar.update(int(state.step) - step)
            t = state.terms
            bar.set_postfix(total=f"{float(t.total):.4g}", content=f"{float(t.content):.3g}",
                            style=f"{float(t.style):.3g}", tv=f"{float(t.tv):.3g}", refresh=False)
            step = int(state.step)
            if new_rows and cfg.save_every and step % cfg.save_every == 0:
                images.save_image(run_dir / "snapshots" / f"step_{step:06d}.png",
                                  np.asarray(state.pixels))
            if (new_rows and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    and int(state.status) == RUNNING):
                save_checkpoint(state)
    return state, stopper.received
