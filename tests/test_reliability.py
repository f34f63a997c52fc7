"""Reliability through the real CLI: bad input, divergence, interrupt and resume, determinism."""

import json
import signal

import numpy as np
import pytest
from PIL import Image

from cli import EXAMPLES, run_cli, small_run_args, start_cli, tree_digest, wait_for_files

RESULT_FILES = ("result.png", "metrics.json", "history.csv")


def _png(path, size=(40, 30), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _cut(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def bad_inputs(tmp):
    """(name, overrides, words the message must contain) for each kind of bad input."""
    text = tmp / "notes.png"
    text.write_text("these are not pixels\n")
    empty = tmp / "empty.jpg"
    empty.write_bytes(b"")
    one = _png(tmp / "one.png", (1, 1))
    big = _png(tmp / "big.png", (64, 64))
    wrong_weights = tmp / "weights.txt"
    wrong_weights.write_text("not weights")
    return [
        ("missing file", [f"content={tmp / 'nope.jpg'}"], ["nope.jpg", "not found"]),
        ("directory", [f"style={tmp}"], [str(tmp), "directory"]),
        ("not an image", [f"content={text}"], ["notes.png", "not an image"]),
        ("truncated png", [f"content={_cut(_png(tmp / 'full.png', (64, 64)), tmp / 'cut.png')}"],
         ["cut.png", "truncated or corrupt"]),
        ("truncated jpeg", [f"style={_cut(EXAMPLES / 'the_scream.jpg', tmp / 'cut.jpg')}"],
         ["cut.jpg", "truncated or corrupt"]),
        ("zero-byte file", [f"content={empty}"], ["empty.jpg", "empty"]),
        ("over the pixel limit", [f"content={big}", "image.max_pixels=1000"],
         ["big.png", "image.max_pixels"]),
        ("1x1 image", [f"content={one}"], ["one.png", "too small"]),
        ("too small after resizing", ["image.size=8"], ["too small", "image.size"]),
        ("unknown layer", ["loss.content_layers=[relu9_9]"], ["relu9_9", "relu4_2", "valid names"]),
        ("negative weight", ["loss.beta=-1"], ["loss.beta", "≥ 0"]),
        ("nan weight", ["loss.alpha=nan"], ["loss.alpha", "finite"]),
        ("zero learning rate", ["optim.lr=0"], ["optim.lr", "positive"]),
        ("nan learning rate", ["optim.lr=nan"], ["optim.lr", "positive"]),
        ("negative steps", ["optim.steps=-1"], ["optim.steps", "≥ 0"]),
        ("zero chunk_steps", ["chunk_steps=0"], ["chunk_steps", "≥ 1"]),
        ("zero style scale", ["image.style_scale=0"], ["image.style_scale", "positive"]),
        ("a preprocessing mean of 2 values", ["model.preprocessing.mean=[1,2]"],
         ["model.preprocessing", "3 values"]),
        ("unknown optimiser", ["optim=sgd"], ["optim/sgd", "adam", "lbfgs"]),
        ("unknown preset", ["+experiment=gatys2099"], ["experiment/gatys2099", "gatys2016"]),
        ("unknown weights name", ["model.weights=vgg99"], ["vgg99", "vgg19"]),
        ("malformed override", ["loss.style_layers=[relu1_1"], ["loss.style_layers"]),
        ("unknown key", ["loss.bta=1"], ["loss.bta"]),
        ("wrong type", ["image.size=big"], ["image.size"]),
        ("weights of the wrong format", [f"model.weights={wrong_weights}"], ["weights.txt"]),
        ("winograd in bfloat16", ["model.conv=winograd", "model.precision=bfloat16"],
         ["model.conv=winograd", "model.precision=float32", "model.conv=direct"]),
        ("more memory than is free", ["optim=lbfgs", "optim.memory_size=100000000"],
         ["GiB is free", "optim.memory_size", "memory_check=false"]),
        ("unknown style loss", ["loss.style_loss=wasserstein"],
         ["loss.style_loss", "wasserstein", "gram", "sliced_wasserstein", "remd"]),
        ("unknown mmd kernel", ["loss.mmd_kernel=rbf"], ["loss.mmd_kernel", "rbf", "linear", "poly", "gaussian"]),
        ("non-positive bandwidth", ["loss.style_loss=mmd", "loss.mmd_bandwidth=0"],
         ["loss.mmd_bandwidth", "must be positive"]),
        ("non-positive projection count", ["loss.style_loss=sliced_wasserstein", "loss.sw_projections=0"],
         ["loss.sw_projections", "≥ 1"]),
        ("style_positions below 2", ["loss.style_loss=remd", "loss.style_positions=1"],
         ["loss.style_positions", "≥ 2"]),
        ("a safeguard below 1", ["optim.max_increase=0.5"], ["optim.max_increase", "≥ 1", "null"]),
        ("an average's decay of 1", ["optim.ema_decay=1.0"], ["optim.ema_decay", "[0, 1)"]),
        ("a nan average's decay", ["optim.ema_decay=nan"], ["optim.ema_decay", "[0, 1)"]),
        ("weights of another network", ["model.arch=vgg16"], ["holds a VGG19", "model.arch is vgg16",
                                                              "model.arch=vgg19"]),
        ("an ONNX file that is no VGG", [f"model.weights={_onnx_of_one_conv(tmp / 'one.onnx')}"],
         ["one.onnx", "1 Conv nodes", "not a VGG conv base"]),
    ]


def _onnx_of_one_conv(path):
    """An ONNX graph with a single 3×3 convolution: not a VGG conv base."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def _case_names():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return [c[0] for c in bad_inputs(Path(d))]


@pytest.mark.slow
@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, synthetic_weights_file,
                                                        nstjax_cache):
    name, overrides, words = next(c for c in bad_inputs(tmp_path) if c[0] == case)
    run_dir = tmp_path / "new" / "run"  # Hydra makes both; a refused run removes both again
    args = small_run_args(synthetic_weights_file, run_dir)
    keys = {o.split("=")[0].lstrip("+") for o in overrides}
    args = [a for a in args if a.split("=")[0] not in keys] + overrides
    proc = run_cli(args, nstjax_cache)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "new").exists()  # no directory, no .hydra/, no run.log


@pytest.mark.slow
def test_divergence_keeps_the_last_finite_image(tmp_path, synthetic_weights_file, nstjax_cache):
    """A learning rate that overflows float32 makes the first step NaN: stop, keep step 0's image."""
    run_dir = tmp_path / "run"
    args = [a for a in small_run_args(synthetic_weights_file, run_dir) if "linesearch" not in a]
    proc = run_cli(args + ["optim=adam", "optim.lr=1e39"], nstjax_cache)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "diverged at step 1" in proc.stderr and "Traceback" not in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_step"] == 1
    assert "NaN" in metrics["reason"]
    assert np.isfinite(metrics["total"])
    kept = np.asarray(Image.open(run_dir / "result.png"), np.float32) / 255
    assert kept.std() > 0.05  # the content image, not a black or constant one
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 2  # header and step 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_reaches_the_uninterrupted_result(
        signum, tmp_path, synthetic_weights_file, nstjax_cache):
    common = ["optim.steps=60", "chunk_steps=1", "save_every=1", "checkpoint_every=0",
              "init=noise", "seed=3"]
    reference = tmp_path / "reference"
    proc = run_cli(small_run_args(synthetic_weights_file, reference, *common), nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]

    run_dir = tmp_path / "run"
    running = start_cli(small_run_args(synthetic_weights_file, run_dir, *common), nstjax_cache)
    wait_for_files(run_dir / "snapshots", running)
    running.send_signal(signum)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr[-2000:]
    assert "Traceback" not in stderr
    assert "resume=" in stderr and str(run_dir) in stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 0 < metrics["steps"] < 60
    assert (run_dir / "checkpoint" / "checkpoint.json").is_file()
    assert (run_dir / "result.png").is_file()

    resumed = run_cli(["progress=false", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'r2'}"],
                      nstjax_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = json.loads((run_dir / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert done["status"] == "finished" and done["steps"] == 60
    assert done["total"] == want["total"]  # bitwise: the same float
    assert (run_dir / "history.csv").read_text() == (reference / "history.csv").read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(run_dir / "result.png")),
                                  np.asarray(Image.open(reference / "result.png")))


@pytest.mark.slow
def test_same_config_and_seed_give_an_identical_result(tmp_path, synthetic_weights_file,
                                                       nstjax_cache):
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        proc = run_cli(small_run_args(synthetic_weights_file, run_dir, "init=noise", "seed=11"),
                       nstjax_cache)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(run_dir)
    a, b = ((d / "result.png").read_bytes() for d in runs)
    assert a == b
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["seed"] == 11 and len(metrics["weights_sha256"]) == 64
    for lib in ("jax", "flax", "optax"):
        assert metrics["versions"][lib]


@pytest.mark.slow
def test_a_run_leaves_no_temporary_files_and_a_run_into_it_changes_nothing(
        tmp_path, synthetic_weights_file, nstjax_cache):
    run_dir = tmp_path / "run"
    proc = run_cli(small_run_args(synthetic_weights_file, run_dir, "checkpoint_every=2"),
                   nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    assert len(list((run_dir / "checkpoint").glob("state-*.safetensors"))) == 1
    for name in (*RESULT_FILES, "config.yaml", "run.log", ".hydra/config.yaml", ".hydra/hydra.yaml",
                 ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    assert "finished: 4 steps" in (run_dir / "run.log").read_text()

    before = tree_digest(run_dir)
    again = run_cli(small_run_args(synthetic_weights_file, run_dir, "seed=1"), nstjax_cache)
    assert again.returncode == 2, again.stderr[-2000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not empty" in lines[0] and "resume=" in lines[0], again.stderr
    assert tree_digest(run_dir) == before


def test_memory_check_compares_xla_plan_with_free_memory():
    import jax
    import jax.numpy as jnp

    from nstjax.errors import UserError
    from nstjax.driver import check_memory, program_bytes

    compiled = jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.zeros((256, 256))).compile()
    need = program_bytes(compiled)
    assert need >= 2 * 256 * 256 * 4  # at least the argument and the result
    check_memory([compiled], 0, remat=False, free=need)
    with pytest.raises(UserError, match=r"needs about 0\.0 GiB \(0\.0 GiB of it optimiser state\)") as e:
        check_memory([compiled], 0, remat=False, free=need - 1)
    assert "model.remat=on" in str(e.value)
    with pytest.raises(UserError) as e:
        check_memory([compiled], 0, remat=True, free=need - 1)
    assert "model.remat" not in str(e.value)
