"""Running ``python -m nstjax.run`` as a subprocess in tests."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def env(cache: Path) -> dict:
    e = dict(os.environ)
    e.update(NSTJAX_CACHE=str(cache), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    return e


def quick_conv(extra) -> list[str]:
    """XLA's direct convolution (a third of Winograd's compile time) unless ``extra`` picks one."""
    return [] if any(e.startswith("model.conv=") for e in extra) else ["model.conv=direct"]


def small_run_args(weights: Path, run_dir: Path, *extra: str) -> list[str]:
    """A fast run: synthetic weights, 32 px, a few L-BFGS steps, a fixed run dir."""
    return [
        f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}",
        f"style={EXAMPLES / 'starry_night.jpg'}", "image.size=32", "optim.steps=4",
        "optim.linesearch=none", "progress=false", f"hydra.run.dir={run_dir}", *quick_conv(extra), *extra,
    ]


def run_cli(args, cache: Path, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nstjax.run", *args], cwd=cwd or ROOT, env=env(cache),
        capture_output=True, text=True, timeout=timeout,
    )


def start_cli(args, cache: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nstjax.run", *args], cwd=cwd or ROOT, env=env(cache),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_files(folder: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until ``folder`` holds a file (a snapshot, a checkpoint) while ``proc`` runs."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if folder.exists() and any(folder.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{folder} never appeared")


def patched_cli_args(patch: str, args) -> list[str]:
    """The command of ``python -m nstjax.run ARGS`` with ``patch`` (Python source: a fault to
    inject, a function replaced) run first in the same process."""
    code = f"{patch}\nimport sys\nsys.argv = ['nstjax.run', *sys.argv[1:]]\nfrom nstjax.run import cli\ncli()\n"
    return [sys.executable, "-c", code, *args]


def tree_digest(root: Path) -> dict:
    """Every file under ``root`` (hidden ones included) with the sha256 of its bytes."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
