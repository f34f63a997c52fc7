"""Shared pieces of the benchmarks: weights, images, the two objectives, FLOP counts, CPU peak."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).resolve().parent / "results"

def conv_table():
    """The VGG19 convolutions (nstjax.vgg's layer table): (name, Cin, Cout, downsampling factor of its input)."""
    from nstjax.vgg import architecture

    return [(name, kernel[2], kernel[3], 2 ** (int(name[4]) - 1))
            for name, (kernel, _) in architecture("vgg19").conv_shapes().items()]


CONVS = conv_table()


# --------------------------------------------------------------------------- objectives

def gatys_setup():
    """Each setup: the objective's spec, preprocessing, pooling and numbers for the PyTorch side, and
    the same as config overrides for nstjax's (``overrides``).

    (a): relu1_1…relu5_1 style, relu4_2 content (the network runs to relu5_1), Caffe preprocessing,
    max pooling; the seed's normalisations (Gram unnormalised, Σ/(4N²M²), ½Σ)."""
    from nstjax.losses import HParams, LossSpec
    from nstjax.vgg import CAFFE

    spec = LossSpec()
    return dict(spec=spec, prep=CAFFE, pooling="max",
                overrides=["model.pooling=max", "loss.beta=1e3", "loss.content_layer_weights=[1.0]",
                           "loss.style_layer_weights=[0.2,0.2,0.2,0.2,0.2]"],
                hp=dict(alpha=1.0, beta=1e3, content_layer_weights=[1.0], style_layer_weights=[0.2] * 5),
                make_hp=lambda: HParams.create(spec, alpha=1.0, beta=1e3, content_layer_weights=[1.0],
                                               style_layer_weights=[0.2] * 5))


def tutorial_setup():
    """(b): the PyTorch tutorial's objective (torchvision preprocessing, max pooling, conv2_2 content,
    conv1_1…conv3_1 style before the ReLUs, Gram/(N·M), mse means, α = 1, β = 1e6, layer weights 1)."""
    from nstjax.losses import HParams, LossSpec
    from nstjax.vgg import TORCHVISION

    spec = LossSpec(content_layers=("conv2_2",),
                    style_layers=("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"),
                    gram_norm="NM", style_reduction="mean", content_reduction="mean")
    return dict(spec=spec, prep=TORCHVISION, pooling="max",
                overrides=["model.pooling=max", "model.preprocessing={channel_order:RGB,scale:1.0,"
                           "mean:[0.485,0.456,0.406],std:[0.229,0.224,0.225]}", "loss.content_layers=[conv2_2]",
                           "loss.style_layers=[conv1_1,conv1_2,conv2_1,conv2_2,conv3_1]", "loss.gram_norm=NM",
                           "loss.style_reduction=mean", "loss.content_reduction=mean", "loss.beta=1e6",
                           "loss.content_layer_weights=[1.0]", "loss.style_layer_weights=[1.0,1.0,1.0,1.0,1.0]"],
                hp=dict(alpha=1.0, beta=1e6, content_layer_weights=[1.0], style_layer_weights=[1.0] * 5),
                make_hp=lambda: HParams.create(spec, alpha=1.0, beta=1e6, content_layer_weights=[1.0],
                                               style_layer_weights=[1.0] * 5))


SETUPS = {"gatys": gatys_setup, "tutorial": tutorial_setup}


# --------------------------------------------------------------------------- weights and images

def random_params(seed: int = 0, arch: str = "vgg19") -> dict:
    """``arch``'s params with He-normal kernels and small random biases, float32 numpy, HWIO: the tests'
    synthetic weights (tests/weights_fixtures.py). The cost of an evaluation does not depend on the
    values."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("weights_fixtures", ROOT / "tests" / "weights_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    return fixtures.synthetic_params(seed, arch)


def synthetic_weights_file(path: Path, seed: int = 0, arch: str = "vgg19") -> Path:
    """:func:`random_params` as a canonical weights file (Caffe preprocessing) at ``path``."""
    from nstjax.vgg import CAFFE
    from nstjax.weights import VGGWeights, save_canonical

    save_canonical(path, VGGWeights(random_params(seed, arch), CAFFE, "synthetic", "", arch))
    return path


def scratch_dir() -> Path:
    """A temporary folder of this process, removed when it exits."""
    import atexit
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="nstjax-bench-"))
    atexit.register(shutil.rmtree, work, True)
    return work


def product_problem(overrides: list[str], weights, content, style, conv="auto", precision: str = "float32",
                    remat: bool = False):
    """(model, objective, params, targets, hp) of one problem as the CLI builds it (config.compose +
    build.build_group) from config ``overrides``, the weights file ``weights`` and the square images
    ``content`` and ``style`` (written as PNG files: their 8-bit values read back exactly); ``conv``
    a model.conv choice, or a convolution given to the model (``VGG(conv=fn)``)."""
    import dataclasses

    import jax

    from nstjax import build, config
    from nstjax.images import save_image
    from nstjax.spec import parse

    work = scratch_dir()
    files = []
    for what, img in (("content", content), ("style", style)):
        save_image(work / f"{what}.png", img)
        files.append(work / f"{what}.png")
    cfg = config.compose([f"model.weights={weights}", f"content={files[0]}", f"style={files[1]}",
                          f"image.size={max(content.shape[:2])}", f"model.precision={precision}",
                          f"model.conv={conv if isinstance(conv, str) else 'direct'}",
                          f"model.remat={'on' if remat else 'off'}", "progress=false", *overrides])
    group = build.build_group([parse(cfg)])
    if not isinstance(conv, str):
        group = dataclasses.replace(group, model=group.model.clone(conv=conv))

    def first(tree):  # the one member's
        return jax.tree.map(lambda leaf: leaf[0], tree)

    return group.model, group.loop.objective, group.params, first(group.problems.targets), first(group.problems.hp)


def load_params(weights: str | None, seed: int = 0) -> tuple[dict, str]:
    """Random params, or the VGG19 params of a weights file (any format nstjax reads: a torchvision
    state dict, Keras .h5, .safetensors, ...) if given."""
    if not weights:
        return random_params(seed), f"random He-normal (seed {seed})"
    from nstjax.weights import load_weights

    return load_weights(weights).params, f"weights file {weights}"


def load_image(path: Path, longest: int) -> np.ndarray:
    """An (H, W, 3) float32 RGB image in [0, 1], longest side ``longest``: nstjax.images if present, else PIL."""
    try:
        from nstjax.images import load_image as _load, resize_longest
        return resize_longest(_load(path), longest)
    except ImportError:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = longest / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
            return np.asarray(im, np.float32) / 255


def bench_images(size: int, seed: int = 0):
    """(content, style, x) for the per-evaluation benchmark at size×size: the bundled pair resized to a
    square (as the PyTorch tutorial does) and a noisy start image."""
    from PIL import Image

    def square(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255

    content, style = square(EXAMPLES / "tubingen.jpg"), square(EXAMPLES / "starry_night.jpg")
    rng = np.random.default_rng(seed)
    x = np.clip(content + 0.1 * rng.standard_normal(content.shape).astype(np.float32), 0, 1)
    return content, style, x


# --------------------------------------------------------------------------- FLOPs and the machine

def deepest_conv(layers) -> str:
    """The last convolution a loss reading ``layers`` runs (the network stops after the deepest layer)."""
    from nstjax.vgg import LAYER_NAMES

    deepest = max(layers, key=LAYER_NAMES.index)
    if deepest.startswith("pool"):
        b = int(deepest[4])
        from nstjax.vgg import architecture
        return f"conv{b}_{architecture('vgg19').block_sizes[b - 1]}"
    return "conv" + deepest[4:]


def conv_flops(height: int, width: int, last_conv: str) -> dict:
    """Forward FLOPs per convolution up to ``last_conv``: 2·H·W·Cin·Cout·9 at that layer's resolution
    (floor-halved per pooling)."""
    out = {}
    for name, c_in, c_out, down in CONVS:
        h, w = height, width
        for _ in range(int(np.log2(down))):
            h, w = h // 2, w // 2
        out[name] = 2 * h * w * c_in * c_out * 9
        if name == last_conv:
            break
    return out


def flop_counts(height: int, width: int, last_conv: str) -> dict:
    """Forward FLOPs, and per evaluation (loss + gradient): 'nominal' = 3× forward (backward ≈ 2×
    forward, the usual training count) and 'executed' = forward + input gradient only (the weights
    are frozen so no weight gradient is computed; conv1_1's input gradient is counted too)."""
    per = conv_flops(height, width, last_conv)
    fwd = sum(per.values())
    return {"forward": fwd, "nominal_eval": 3 * fwd, "executed_eval": 2 * fwd, "per_conv_forward": per}


def cpu_info() -> dict:
    """Model name, cores, clock and estimated fp32 peak from /proc/cpuinfo.

    peak = cores × GHz × FLOPs/cycle/core, FLOPs/cycle = 64 with AVX-512F (2 FMA units × 16 lanes × 2),
    32 with AVX2+FMA (2 × 8 × 2: Zen 2/3/4, Haswell onwards), 16 with AVX only. The clock is the
    'cpu MHz' line (the nominal/base clock a VM reports; turbo may be higher, so the fraction of peak is
    an estimate). Cores = the CPUs this process may run on (os.sched_getaffinity).
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)]
    flags = set(flags.group(1).split()) if flags else set()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512F"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA"
    elif "avx" in flags:
        per_cycle, isa = 16, "AVX"
    else:
        per_cycle, isa = 8, "SSE"
    ghz = (max(mhz) / 1000) if mhz else None
    return {
        "model_name": model.group(1).strip() if model else platform.processor(),
        "cores": cores, "ghz": ghz, "isa": isa, "flops_per_cycle_per_core": per_cycle,
        "peak_gflops_fp32": cores * ghz * per_cycle if ghz else None,
        "how": f"{cores} cores × {ghz} GHz ('cpu MHz' in /proc/cpuinfo) × {per_cycle} fp32 FLOPs/cycle ({isa})",
    }


def max_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def run_killable(cmd, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own: on a timeout (or
    an interrupt of this process) the whole process group is killed before the exception propagates,
    so no child is left holding a device. Raises ``subprocess.TimeoutExpired`` on a timeout."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
