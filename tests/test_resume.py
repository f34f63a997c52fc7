"""Crashes lose nothing that was written, and resume continues only what it can.

Faults are injected into the real CLI by a wrapper that replaces ``os.fsync``
before calling ``nstjax.run.cli()``: a write that fails after part of its bytes,
a full disk, a process killed (SIGKILL) inside a checkpoint write. Runs killed
mid-run, then resumed and interrupted and resumed again, reach bitwise the
uninterrupted result, for Adam and L-BFGS with and without the zoom line search.
A checkpoint that is missing, damaged or does not fit its config.yaml is refused.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from safetensors.numpy import load_file

from cli import ROOT, env, patched_cli_args, run_cli, small_run_args, tree_digest
from nstjax import checkpoint

FAULT = """
import errno, os, sys, time
fault, name, nth, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
del sys.argv[1:5]
real_fsync, real_replace, seen = os.fsync, os.replace, []

def nth_write(target):  # the nth atomic write of a file named like `name`
    if os.path.basename(str(target)).startswith(name):
        seen.append(target)
        return len(seen) == nth
    return False

def fsync(fd):  # flushing an atomic write's temporary file, .NAME.XXXX.tmp.SUFFIX
    path = os.readlink(f"/proc/self/fd/{fd}")
    if fault != "pause" and nth_write(os.path.basename(path)[1:]):
        if fault == "midway":  # only part of the bytes made it, then the write fails
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        open(marker, "w").close()  # "kill": wait inside the write for SIGKILL
        while True:
            time.sleep(1)
    real_fsync(fd)

def replace(src, dst):  # "pause": once the file is in place, wait for a signal
    real_replace(src, dst)
    if fault == "pause" and nth_write(dst):
        from nstjax.status import SIGNALS
        open(marker, "w").close()
        while SIGNALS.received is None:
            time.sleep(0.01)

os.fsync, os.replace = fsync, replace
"""

LBFGS = ["optim.steps=8", "chunk_steps=1", "checkpoint_every=2", "init=noise", "seed=5", "model.conv=direct"]
"""L-BFGS without line search (small_run_args), a checkpoint every 2 of its 8 steps."""


@pytest.fixture(scope="module")
def lbfgs_run(tmp_path_factory, synthetic_weights_file, nstjax_cache):
    """A finished run of LBFGS: the reference of the crashed runs, the original of the damaged ones."""
    run_dir = tmp_path_factory.mktemp("lbfgs") / "run"
    proc = run_cli(small_run_args(synthetic_weights_file, run_dir, *LBFGS), nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def faulty(fault, name, nth, marker, args, cache, wait=True):
    """The CLI with the ``nth`` atomic write of a file named ``name…`` failing midway (EIO), failing
    with ENOSPC, stopping inside for SIGKILL ("kill"), or done and pausing until a signal ("pause");
    ``marker`` appears once it stops."""
    cmd = patched_cli_args(FAULT, [fault, name, str(nth), str(marker), *args])
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def one_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def temporaries(run_dir):
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def checkpoint_files(run_dir):
    return sorted(os.listdir(run_dir / "checkpoint"))


def assert_same_run(run_dir, reference):
    done, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert done["status"] == "finished" and done["steps"] == want["steps"]
    assert done["total"] == want["total"] and done["loss_evaluations"] == want["loss_evaluations"]
    assert (run_dir / "history.csv").read_text() == (reference / "history.csv").read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(run_dir / "result.png")),
                                  np.asarray(Image.open(reference / "result.png")))


@pytest.mark.parametrize("fault,name,nth,kept", [
    ("midway", "state-", 2, 2),  # the second checkpoint's state file: half its bytes, then EIO
    ("enospc", "checkpoint.json", 2, 2),  # the disk fills up writing the second checkpoint.json
    ("enospc", "result.png", 1, 8),  # ... writing result.png, after the last checkpoint
], ids=["midway-state", "enospc-checkpoint-json", "enospc-result"])
@pytest.mark.slow
def test_a_failed_write_keeps_what_was_written_and_exits_74(fault, name, nth, kept, tmp_path,
                                                              synthetic_weights_file, nstjax_cache):
    run_dir = tmp_path / "run"
    proc = faulty(fault, name, nth, tmp_path / "marker", small_run_args(synthetic_weights_file, run_dir, *LBFGS),
                  nstjax_cache)
    assert proc.returncode == 74, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith("error: cannot write ") and name in line, line
    assert os.strerror({"midway": 5, "enospc": 28}[fault]) in line
    assert f"resume={run_dir}" in line
    # The last checkpoint is whole and loadable; nothing half-written or temporary is left.
    meta = checkpoint.verify(run_dir).to_json()
    assert meta["step"] == kept
    assert checkpoint_files(run_dir) == [checkpoint.META, f"state-{kept:08d}.safetensors"]
    assert int(load_file(str(run_dir / "checkpoint" / meta["state_file"]))[".step"].max()) == kept
    assert temporaries(run_dir) == []
    assert not (run_dir / "result.png").exists()


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_then_resume_reaches_the_uninterrupted_result(
        lbfgs_run, tmp_path, synthetic_weights_file, nstjax_cache):
    run_dir, marker = tmp_path / "run", tmp_path / "inside"
    child = faulty("kill", "state-", 2, marker, small_run_args(synthetic_weights_file, run_dir, *LBFGS),
                   nstjax_cache, wait=False)
    try:
        _wait(lambda: marker.exists(), child)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    assert checkpoint.verify(run_dir).step == 2  # the previous checkpoint, whole
    assert [p.name.split(".")[1] for p in temporaries(run_dir)] == ["state-00000004"]
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli(["progress=false", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"], nstjax_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run_dir} at step 2" in resumed.stdout
    assert_same_run(run_dir, lbfgs_run)
    assert temporaries(run_dir) == []  # the killed write's temporary file is removed
    assert not (tmp_path / "hydra").exists()


def _wait(condition, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("the condition never held")


def _checkpoint_step(run_dir):
    try:
        return json.loads((run_dir / "checkpoint" / checkpoint.META).read_text())["step"]
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adam", "lbfgs-zoom"])
def test_sigkill_then_sigint_then_resume_reaches_the_uninterrupted_result(
        optim, tmp_path, synthetic_weights_file, nstjax_cache):
    """SIGKILL once the first periodic checkpoint is there (step 4); resume from it, and stop that
    with SIGINT once its second snapshot is there (step 6); resume from the interrupt to the end.
    The runs pause at those points until the signal comes, so no race decides the steps."""
    chosen = {"adam": ["optim=adam", "optim.lr=0.05"], "lbfgs-zoom": ["optim=lbfgs", "optim.linesearch=zoom"]}
    common = [*chosen[optim], "optim.steps=12", "chunk_steps=1", "checkpoint_every=4", "save_every=1",
              "init=noise", "seed=2", "model.conv=direct"]
    resume = ["progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]

    def args(run_dir):
        return [a for a in small_run_args(synthetic_weights_file, run_dir, *common) if "linesearch=none" not in a]

    reference = tmp_path / "reference"
    proc = run_cli(args(reference), nstjax_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]

    run_dir = tmp_path / "run"
    killed = faulty("pause", "checkpoint.json", 1, tmp_path / "m1", args(run_dir), nstjax_cache, wait=False)
    _wait(lambda: _checkpoint_step(run_dir) > 0, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert checkpoint.verify(run_dir).step == 4
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "result.png").exists()

    resumed = faulty("pause", "step_", 2, tmp_path / "m2", [f"resume={run_dir}", *resume], nstjax_cache,
                     wait=False)
    _wait(lambda: (run_dir / "snapshots" / "step_000006.png").exists(), resumed)
    resumed.send_signal(signal.SIGINT)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, err[-2000:]
    assert f"resuming {run_dir} at step 4" in out
    interrupted = json.loads((run_dir / "metrics.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 6
    assert checkpoint.verify(run_dir).step == 6

    final = run_cli([f"resume={run_dir}", *resume], nstjax_cache)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"resuming {run_dir} at step 6" in final.stdout
    assert_same_run(run_dir, reference)
    assert not (tmp_path / "hydra").exists()


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_config(key, value):
    def edit(run_dir):
        cfg = OmegaConf.load(run_dir / "config.yaml")
        OmegaConf.update(cfg, key, value)
        OmegaConf.save(cfg, run_dir / "config.yaml")
    return edit


def _state(run_dir):
    return run_dir / "checkpoint" / json.loads((run_dir / "checkpoint" / checkpoint.META).read_text())["state_file"]


RESUME_CASES = [
    # name, what is done to a copy of a run killed after its last checkpoint, extra overrides, code, words
    ("no checkpoint", lambda d: shutil.rmtree(d / "checkpoint"), [], 2, ["no checkpoint"]),
    ("truncated state", lambda d: _cut(_state(d)), [], 2, ["damaged", "sha256"]),
    ("changed state", lambda d: _flip(_state(d)), [], 2, ["damaged", "sha256"]),
    ("truncated checkpoint.json", lambda d: _cut(d / "checkpoint" / checkpoint.META), [], 2,
     ["checkpoint.json", "unreadable"]),
    ("another image size", _edit_config("image.size", 40), [], 2, ["shape", "own settings"]),
    ("overrides beside resume=", lambda d: None, ["image.size=64", "++seed=3"], 2,
     ["image.size, seed", "beside resume="]),
    ("finished", None, [], 0, ["has finished", "nothing to resume"]),
]


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue_and_changes_nothing(lbfgs_run, tmp_path, nstjax_cache):
    for i, (name, damage, extra, code, words) in enumerate(RESUME_CASES):
        run_dir = tmp_path / f"case{i}"
        shutil.copytree(lbfgs_run, run_dir)
        if damage is not None:  # what a run killed after its last checkpoint leaves
            (run_dir / "metrics.json").unlink()
            (run_dir / "result.png").unlink()
            damage(run_dir)
        before = tree_digest(run_dir)
        proc = run_cli(["progress=false", f"resume={run_dir}", *extra, f"hydra.run.dir={tmp_path / 'hydra' / 'x'}"],
                       nstjax_cache)
        assert proc.returncode == code, (name, proc.stderr[-2000:])
        line = one_line(proc.stderr)
        assert line.startswith("error: ") == (code == 2), (name, line)
        for word in words:
            assert word in line, (name, word, line)
        assert tree_digest(run_dir) == before, name
        assert not (tmp_path / "hydra").exists(), name


def test_checkpoint_of_another_optimiser_is_refused(tmp_path):
    """Leaf names differ (Adam's moments against L-BFGS's history): refused, naming the directory."""
    import jax.numpy as jnp
    import optax

    from nstjax.errors import UserError
    from nstjax.losses import Terms
    from nstjax.optimize import LoopState

    def state(tx):
        x = jnp.zeros((1, 8, 8, 3))
        terms = Terms(*(jnp.zeros(1) for _ in Terms._fields))
        return LoopState(x, tx.init(x), terms, x, jnp.zeros((1, 2), jnp.uint32), jnp.zeros(1, jnp.int32),
                         jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32), jnp.ones(1), x, jnp.ones(1))

    checkpoint.save(tmp_path, state(optax.adam(0.1)), checkpoint.CheckpointMeta(0, 1, 0, [[]], checkpoint.Earlier.none(1), 0.0))
    with pytest.raises(UserError, match="does not match this configuration"):
        checkpoint.load(tmp_path, state(optax.lbfgs()))
