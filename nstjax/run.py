"""Hydra entry point: ``python -m nstjax.run [+experiment=NAME] [key=value ...]``.

Composes configs/ (schema: nstjax/config.py), runs a group of one
(:func:`nstjax.transfer.run_group`) in Hydra's run directory and exits with its
code: 0 finished, 2 a user error (one line, no traceback), 3 diverged, 74 a
file could not be written (a full disk, an I/O error: one line; the file keeps
its previous content and the last checkpoint is intact), 130/143 interrupted by
SIGINT/SIGTERM. ``-m`` sweeps through nstjax's batched sweeper
(hydra_plugins/nstjax_sweeper): each job runs one group of points.
``resume=RUN_DIR`` continues an interrupted run in its own directory with its
saved configuration; ``resume=SWEEP_DIR`` an interrupted sweep.

A run writes only into a new or empty directory, and only once everything is
checked (inputs, weights, memory, the checkpoint to resume): its config.yaml,
Hydra's ``.hydra/`` files (configs/config.yaml sets ``hydra.output_subdir:
null``) and ``run.log`` (Hydra's job logging without its file handler) are
written then, by this module. A refused run leaves nothing: the directory Hydra
made for it is removed again (:mod:`nstjax.rundir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nstjax import config, rundir
from nstjax.atomic import write_text
from nstjax.errors import UserError, WriteError
from nstjax.status import RunStatus

log = logging.getLogger("nstjax")


def _fail(message: str, code: int = UserError.exit_code) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _cannot_write(e: WriteError, run_dir: Path | None) -> str:
    from nstjax import checkpoint, sweeps

    hint = "free space there"
    if run_dir is not None and (sweeps.is_sweep(run_dir)
                                or (run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.META).is_file()):
        hint += f", then continue with python -m nstjax.run resume={run_dir}"
    return f"cannot write {e.filename} ({e.strerror}); the file keeps its previous content, if any: {hint}"


RESUMABLE = ("resume", "progress")
"""The keys that may be given beside resume= (and hydra.*): the rest is the run's saved config."""


def _check_resume_overrides(overrides) -> None:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    others = [k for k in keys if k not in RESUMABLE and not k.startswith(("hydra.", "hydra/"))]
    if others:
        raise UserError(f"{', '.join(others)} cannot be given beside resume=: a resumed run continues with "
                        "its saved config.yaml (only progress= and hydra.* may be given); start a new run "
                        "to change it")


def _resumed_config(cfg: DictConfig) -> tuple[DictConfig | None, Path]:
    """The saved config of the run to resume (None if it has finished or diverged) and its
    directory; a directory it cannot continue is a UserError."""
    from nstjax import checkpoint, sweeps

    run_dir = Path(cfg.resume)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"cannot resume {run_dir}: no config.yaml there; "
                        "resume= takes the directory of an interrupted run or sweep")
    if sweeps.status(run_dir).final:
        return None, run_dir
    resumed = config.from_container(OmegaConf.load(saved))
    checkpoint.verify(run_dir)
    resumed.resume, resumed.progress = str(run_dir), cfg.progress
    return resumed, run_dir


def _record_job(job_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written before the task: ``.hydra/`` and ``run.log``."""
    hydra_cfg = HydraConfig.instance().cfg
    write_text(job_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(job_dir / ".hydra" / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    write_text(job_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))
    _log_to(job_dir)


def _log_to(job_dir: Path) -> None:
    """Log into ``job_dir/run.log`` too, formatted as on the console."""
    path = job_dir / f"{HydraConfig.get().job.name}.log"
    try:
        handler = logging.FileHandler(path)
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)


def share_the_device(launcher) -> bool:
    """Whether the group jobs of a sweep run at the same time on one machine, sharing its
    accelerator: joblib's launcher with ``n_jobs`` other than 1, or submitit's with several tasks
    per node and no GPU of their own. JAX preallocates 75 % of a GPU's memory per process; such jobs
    allocate as they go instead (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, unless set), and the memory
    check reads what the GPU really has free."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        return launcher.get("n_jobs", -1) != 1
    if "submitit" in target.lower():
        return (launcher.get("tasks_per_node") or 1) > 1 and not launcher.get("gpus_per_task")
    return False


@contextlib.contextmanager
def _reported(run_dir: Path, discard: Callable[[], None] = lambda: None) -> Iterator[None]:
    """A user error as one line and exit 2, once ``discard()`` has removed what Hydra made for
    the refused run; a file that could not be written as one line and exit 74."""
    try:
        yield
    except (UserError, OmegaConfBaseException) as e:
        discard()
        _fail(config.one_line(e))
    except WriteError as e:
        _fail(_cannot_write(e, run_dir), WriteError.exit_code)


@hydra.main(version_base=None, config_path="pkg://nstjax.configs", config_name="config")
def main(cfg: DictConfig):
    """A single run (a group of one), a group of a batched sweep, or a resumed run or sweep."""
    from nstjax import programs, sweeps
    from nstjax.status import SIGNALS

    for noisy in ("jax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    with SIGNALS.installed():
        if cfg.sweep_group is not None:
            if share_the_device(HydraConfig.get().launcher):
                os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            sweep_dir = Path(HydraConfig.get().sweep.dir)
            with _reported(sweep_dir, lambda: rundir.discard(hydra_dir, keep=sweep_dir)):
                programs.enable_compilation_cache()
                return sweeps.run_group_job(sweep_dir, cfg.sweep_group, log.info,
                                           start=lambda: _record_job(hydra_dir, cfg))
        if cfg.resume is None:
            with _reported(hydra_dir, lambda: rundir.discard_hydra_run_dir(hydra_dir)):
                programs.enable_compilation_cache()
                return _single_run(cfg, hydra_dir)
        rundir.discard_hydra_run_dir(hydra_dir)  # a resumed run works in its own directory
        with _reported(Path(cfg.resume)):
            _check_resume_overrides(HydraConfig.get().overrides.task)
            programs.enable_compilation_cache()
            if sweeps.is_sweep(cfg.resume):
                code = sweeps.resume(Path(cfg.resume), log.info)
                if code:
                    sys.exit(code)
                return None
            return _single_run(cfg, hydra_dir)


def _single_run(cfg: DictConfig, hydra_dir: Path) -> None:
    from nstjax import sweeps
    from nstjax.transfer import run_group

    if cfg.resume is not None:
        cfg, run_dir = _resumed_config(cfg)
        if cfg is None:
            print(f"{run_dir} has {sweeps.status(run_dir)}: nothing to resume", file=sys.stderr)
            return

        def start() -> None:
            _log_to(run_dir)
    else:
        run_dir = hydra_dir
        rundir.require_empty(run_dir)

        def start() -> None:
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            _record_job(run_dir, cfg)
    result = run_group([cfg], [run_dir], run_dir, resume=cfg.resume is not None, start=start,
                       log=log.info)[0]
    m = json.loads((run_dir / "metrics.json").read_text())
    log.info("%s: %d steps, %d evaluations, total loss %.6g; compile %.1f s, run %.1f s -> %s",
             result.status, m["steps"], m["loss_evaluations"], m["total"],
             m["compile_seconds"], m["run_seconds"], run_dir)
    if result.status is RunStatus.INTERRUPTED:
        print(f"interrupted at step {m['steps']}: resume with "
              f"python -m nstjax.run resume={run_dir}", file=sys.stderr)
    elif result.status is RunStatus.DIVERGED:
        print(f"error: the run diverged at step {m['diverged_step']} ({m['reason']}); "
              f"the last finite image is {run_dir / 'result.png'}: lower optim.lr or the loss weights",
              file=sys.stderr)
    if result.exit_code:
        sys.exit(result.exit_code)


def cli() -> None:
    """Run :func:`main`, turning Hydra's composition errors and a sweep's refused point into
    one line and exit 2 (a sweep's file that could not be written: exit 74)."""
    from nstjax.status import SIGNALS

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    config.register()
    try:
        with SIGNALS.installed():
            main()
    except (HydraException, OmegaConfBaseException, UserError) as e:
        _fail(config.one_line(e))
    except WriteError as e:
        _fail(_cannot_write(e, None), WriteError.exit_code)


if __name__ == "__main__":
    cli()
