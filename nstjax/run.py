"""Hydra entry point: ``python -m nstjax.run [+experiment=NAME] [key=value ...]``.

Composes configs/ (schema: nstjax/config.py), runs a group of one
(:func:`nstjax.stylize.run_group`) in Hydra's run directory and exits with its
code: 0 finished, 2 a user error (one line, no traceback), 3 diverged, 130/143
interrupted by SIGINT/SIGTERM. ``-m`` sweeps through nstjax's batched sweeper
(hydra_plugins/nstjax_sweeper): each job runs one group of points.
``resume=RUN_DIR`` continues an interrupted run in its own directory with its
saved configuration; ``resume=SWEEP_DIR`` an interrupted sweep.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nstjax import config
from nstjax.errors import UserError

log = logging.getLogger("nstjax")
config.register()


def _expose_sweeper() -> None:
    """Let Hydra's plugin scan (pkgutil over ``hydra_plugins.__path__``) find nstjax's sweeper
    also from an editable install, whose import hook pkgutil cannot list."""
    import hydra_plugins

    folder = str(Path(importlib.util.find_spec("hydra_plugins.nstjax_sweeper").origin).parent.parent)
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


_expose_sweeper()


_NOISE = ("Config search path", "provider=", "reference_type=", "object_type=", "See https://")


def _one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their causes) as one line."""
    parts = [f"malformed override {exc.override!r}"] if isinstance(exc, OverrideParseException) else []
    while exc is not None:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        text = " ".join(ln for ln in lines if ln and not ln.startswith(_NOISE))
        if text and text != "None" and text not in parts:
            parts.append(text)
        exc = exc.__cause__
    return " — ".join(parts)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(UserError.exit_code)


def _resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    run_dir = Path(cfg.resume)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"cannot resume {run_dir}: no config.yaml there; "
                        "resume= takes the directory of an interrupted run or sweep")
    resumed = config.from_container(OmegaConf.load(saved))
    resumed.resume = str(run_dir)
    return resumed, run_dir


def _enable_compilation_cache() -> None:
    """Keep compiled programs across runs (one compile per shape, also in sweeps)."""
    import jax
    from nstjax.weights import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@hydra.main(version_base=None, config_path="pkg://nstjax.configs", config_name="config")
def main(cfg: DictConfig):
    """A single run (a group of one), a group of a batched sweep, or a resumed run or sweep."""
    from nstjax import sweep
    from nstjax.driver import SIGNALS

    for noisy in ("jax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with SIGNALS.installed():
        try:
            _enable_compilation_cache()
            if cfg.sweep_group is not None:
                return sweep.run_group_job(Path(HydraConfig.get().sweep.dir), cfg.sweep_group, log.info)
            if cfg.resume is not None and sweep.is_sweep(cfg.resume):
                code = sweep.resume(Path(cfg.resume), log.info)
                if code:
                    sys.exit(code)
                return None
            _single_run(cfg)
        except UserError as e:
            _fail(str(e))


def _single_run(cfg: DictConfig) -> None:
    from nstjax.stylize import run_group

    if cfg.resume is not None:
        cfg, run_dir = _resumed_config(cfg)
    else:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        from nstjax.atomic import write_text

        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    result = run_group([cfg], [run_dir], run_dir, resume=cfg.resume is not None, log=log.info)[0]
    m = json.loads((run_dir / "metrics.json").read_text())
    log.info("%s: %d steps, %d evaluations, total loss %.6g; compile %.1f s, run %.1f s -> %s",
             result.status, m["steps"], m["loss_evaluations"], m["total"],
             m["compile_seconds"], m["run_seconds"], run_dir)
    if result.status == "interrupted":
        print(f"interrupted at step {m['steps']}: resume with "
              f"python -m nstjax.run resume={run_dir}", file=sys.stderr)
    elif result.status == "diverged":
        print(f"error: the run diverged at step {m['diverged_step']} ({m['reason']}); "
              f"the last finite image is {run_dir / 'result.png'}: lower optim.lr or the loss weights",
              file=sys.stderr)
    if result.exit_code:
        sys.exit(result.exit_code)


def cli() -> None:
    """Run :func:`main`, turning Hydra's composition errors and a sweep's refused point into
    one line and exit 2."""
    from nstjax.driver import SIGNALS

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        with SIGNALS.installed():
            main()
    except (HydraException, OmegaConfBaseException, UserError) as e:
        _fail(_one_line(e))


if __name__ == "__main__":
    cli()
