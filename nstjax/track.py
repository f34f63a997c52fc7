"""Experiment tracking: each run, and each point of a sweep, as one TensorBoard run (tensorboardX,
no TensorFlow) and/or one MLflow run, live or after the fact.

    python -m nstjax.run ... tracking=[tensorboard]                  # event files beside the run's files
    python -m nstjax.run ... tracking=[tensorboard,mlflow]           # and RUN_DIR/mlflow.db (or MLFLOW_TRACKING_URI)
    python -m nstjax.track RUN_OR_SWEEP_DIR --to tensorboard         # the same records from finished files
    tensorboard --logdir multirun/DATE/TIME                          # a whole sweep, a run per point
    mlflow ui --backend-store-uri sqlite:///multirun/DATE/TIME/mlflow.db   # a sweep's run, a nested run per point

A run's records, in its own directory: a scalar per history row and term (``loss/total``,
``loss/content``, ``loss/style``, ``loss/tv``, ``loss/temporal``; with a pyramid or a video also
``level``, ``frame``, ``pass``) at the row's index in the run (levels and frames continue the count);
the snapshots as they are written and the result (``image/...``); and, at the end, its
hyperparameters (the config's member keys and a sweep's swept keys) with its final metrics
(``final/...``: the terms, yardsticks, steps, evaluations, seconds, temporal error; the status as a
hyperparameter), so that TensorBoard's HParams dashboard compares the points of a sweep. MLflow
(:class:`MLflow`) gets the same scalars as metrics at the same steps, the hyperparameters as params,
the final metrics, the status as a tag and the run's files (result.png, loss_curve.png, metrics.json,
snapshots/) as artifacts.

Tracking never costs a result: a backend that fails during a run logs one warning and is dropped,
and the run goes on writing its own files. A backend whose package is missing is refused when the
config is parsed (one line naming the extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nstjax.errors import UserError
from nstjax.optimize import HistoryRow

BACKENDS = ("tensorboard", "mlflow")
"""``tracking``'s choices."""
EXTRAS = {"tensorboard": (("tensorboardX",), "tensorboard"), "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow")}
"""Each backend's packages (MLflow's SQLite store needs SQLAlchemy and Alembic) and the nstjax extra that
installs them."""
TERMS = ("total", "content", "style", "tv", "temporal")
FINAL = ("total", "content", "style", "tv", "temporal", "steps", "loss_evaluations", "run_seconds",
         "compile_seconds", "temporal_error")


def check(backends: Sequence[str]) -> None:
    """Refuse an unknown backend or one whose package is not installed."""
    import importlib.util

    for name in backends:
        if name not in BACKENDS:
            raise UserError(f"tracking={list(backends)}: {name!r} is not a tracking backend; choose from "
                            f"{', '.join(BACKENDS)}")
        packages, extra = EXTRAS[name]
        for package in packages:
            if importlib.util.find_spec(package) is None:
                raise UserError(f"tracking=[{name}] needs {package}: pip install 'nstjax[{extra}]'")


def hparams_of(member, swept: dict | None = None) -> dict:
    """The hyperparameters a run records: its :class:`~nstjax.spec.MemberSpec`'s values by config key
    (None left out; tuples as text) and a sweep's swept values (metrics.json's ``swept``)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(member):
        value = getattr(member, f.name)
        if value is not None and value != ():
            out[f.metadata["key"]] = value if isinstance(value, (int, float, str, bool)) else str(value)
    for key, value in (swept or {}).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def scalars(row: HistoryRow, extra: Sequence[str]) -> dict[str, float]:
    """A history row's scalars by tag: ``loss/TERM`` and the position columns ``extra``."""
    out = {f"loss/{name}": float(getattr(row, name)) for name in TERMS}
    out.update({name: float(getattr(row, "pass_" if name == "pass" else name)) for name in extra})
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """A run's final metrics by tag (``final/...``), from its metrics.json."""
    final = {f"final/{k}": float(metrics[k]) for k in FINAL if isinstance(metrics.get(k), (int, float))}
    final["final/yardstick_content"] = float(metrics["yardstick"]["final"]["content"])
    final["final/yardstick_style"] = float(metrics["yardstick"]["final"]["style_mean"])
    return final


class TensorBoard:
    """One run's TensorBoard records, in ``run_dir``."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(run_dir))
        self.count = 0  # rows logged: the next row's global step

    def rows(self, rows: Sequence[HistoryRow], first: int, extra: Sequence[str] = ()) -> None:
        """History rows, the first of them row ``first`` of the run."""
        for k, row in enumerate(rows, first):
            for tag, value in scalars(row, extra).items():
                self.writer.add_scalar(tag, value, k)
            self.count = k + 1

    def image(self, tag: str, img: np.ndarray) -> None:
        self.writer.add_image(f"image/{tag}", np.clip(img, 0, 1), max(self.count - 1, 0), dataformats="HWC")

    def finish(self, hparams: dict, metrics: dict, result: np.ndarray) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        self.image("result", result)
        final = final_metrics(metrics)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, self.count)
        for summary in hparams_summary({**hparams, "status": metrics["status"]}, final):
            self.writer._get_file_writer().add_summary(summary)
        self.close()

    def close(self) -> None:
        self.writer.close()


EXPERIMENT = "nstjax"
"""The MLflow experiment of nstjax's runs, unless ``MLFLOW_EXPERIMENT_NAME`` names another."""
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "interrupted": "KILLED"}
"""The MLflow run status of each run status (metrics.json's ``status``)."""


class MLflow:
    """One run's MLflow run, through an ``MlflowClient`` of its own; a point of a sweep (a directory
    ``SWEEP_DIR/N``) is nested in the sweep's run (``mlflow.parentRunId``). The store is
    ``MLFLOW_TRACKING_URI``, else ``sqlite:///ROOT/mlflow.db`` with the artifacts in ``ROOT/mlartifacts``,
    ROOT the sweep's directory or the run's. Each run is found again by its directory (the tag
    ``nstjax.dir``): a resumed run continues its records."""

    def __init__(self, run_dir: Path):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read at mlflow's import: no usage reports
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        from nstjax import sweeps

        self.run_dir = Path(run_dir).resolve()
        self.sweep = self.run_dir.parent if sweeps.is_sweep(self.run_dir.parent) else None
        root = self.sweep or self.run_dir
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{root / 'mlflow.db'}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        with FileLock(root / "mlflow.lock"):  # a sweep's jobs at once: the store, experiment and sweep run made once
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                name, artifact_location=None if uri else (root / "mlartifacts").as_uri())
            self.parent = self._run(experiment_id, self.sweep, None) if self.sweep else None
            self.run_id = self._run(experiment_id, self.run_dir, self.parent)
        self.count = 0  # rows logged: the final metrics' step

    def _run(self, experiment_id: str, folder: Path, parent: str | None) -> str:
        """The id of ``folder``'s MLflow run: found by its tag (and running again) or made, named by the
        point's number in a sweep, else by the directory's last two parts (Hydra's DATE/TIME)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        path = str(folder)
        quote = '"' if "'" in path else "'"
        found = self.client.search_runs([experiment_id], f"tags.`nstjax.dir` = {quote}{path}{quote}", max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {"nstjax.dir": path, **({MLFLOW_PARENT_RUN_ID: parent} if parent else {})}
        name = folder.name if parent else "/".join(folder.parts[-2:])
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def rows(self, rows: Sequence[HistoryRow], first: int, extra: Sequence[str] = ()) -> None:
        """History rows, the first of them row ``first`` of the run: one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, k) for k, row in enumerate(rows, first)
                                                    for tag, value in scalars(row, extra).items()])
        self.count = first + len(rows)

    def image(self, tag: str, img: np.ndarray) -> None:
        """The snapshot the run has just written (``snapshots/TAG.png``), as it is."""
        self.client.log_artifact(self.run_id, str(self.run_dir / "snapshots" / f"{tag}.png"), "snapshots")

    def finish(self, hparams: dict, metrics: dict, result: np.ndarray) -> None:
        """Params, final metrics, the status tag and the run's files; the run ended with its status, and
        the sweep's once each of its points has ended on its own."""
        from mlflow.entities import Metric, Param, RunTag

        from nstjax import sweeps

        now = int(time.time() * 1000)
        final = [Metric(tag, value, now, self.count) for tag, value in final_metrics(metrics).items()]
        params = [Param(key, str(value)) for key, value in hparams.items()]
        self.client.log_batch(self.run_id, metrics=final, params=params, tags=[RunTag("status", metrics["status"])])
        for name in ("result.png", "loss_curve.png", "metrics.json"):
            self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[metrics["status"]])
        if self.sweep is not None and all(sweeps.status(sweeps.member_dir(self.sweep, m.n)).final
                                          for group in sweeps.read_plan(self.sweep).groups for m in group):
            self.client.set_terminated(self.parent, "FINISHED")

    def close(self) -> None:
        """A run whose tracking failed ends FAILED."""
        self.client.set_terminated(self.run_id, "FAILED")


MAKERS = {"tensorboard": TensorBoard, "mlflow": MLflow}


class Tracker:
    """The backends of one run, opened at their first record; a backend that raises is dropped
    with one warning."""

    def __init__(self, backends: Sequence[str], run_dir: Path, log: Callable[[str], None] = print,
                 extra: Sequence[str] = ()):
        self.run_dir, self.log, self.extra = Path(run_dir), log, list(extra)
        self.backends = {name: None for name in backends}

    def _each(self, call: Callable) -> None:
        for name in list(self.backends):
            try:
                if self.backends[name] is None:
                    self.backends[name] = MAKERS[name](self.run_dir)
                call(self.backends[name])
            except Exception as e:  # a full disk, a server gone: the run's own files come first
                self.log(f"warning: tracking={name} failed for {self.run_dir} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); the run goes on without it")
                self._close(self.backends.pop(name))

    @staticmethod
    def _close(backend) -> None:
        """A failed backend closed as far as it still can (its writer thread stopped now, not at exit)."""
        try:
            if backend is not None:
                backend.close()
        except Exception:  # it has failed already; its warning is out
            pass

    def rows(self, rows: Sequence[HistoryRow], first: int) -> None:
        self._each(lambda b: b.rows(rows, first, self.extra))

    def image(self, tag: str, img: np.ndarray) -> None:
        self._each(lambda b: b.image(tag, img))

    def finish(self, hparams: dict, metrics: dict, result: np.ndarray) -> None:
        self._each(lambda b: b.finish(hparams, metrics, result))


class Observer:
    """The trackers of a group's members (one per member directory), fed by the driver as the rows
    and snapshots come (:class:`nstjax.driver.Driver` ``observer``)."""

    def __init__(self, backends: Sequence[str], member_dirs: Sequence[Path], log: Callable[[str], None],
                 extra: Sequence[str] = ()):
        self.trackers = [Tracker(backends, d, log, extra) for d in member_dirs]

    def rows(self, n: int, rows: Sequence[HistoryRow], first: int) -> None:
        self.trackers[n].rows(rows, first)

    def image(self, n: int, name: str, img: np.ndarray) -> None:
        self.trackers[n].image(name, img)

    def finish(self, n: int, hparams: dict, metrics: dict, result: np.ndarray) -> None:
        self.trackers[n].finish(hparams, metrics, result)


def extra_columns(history: Sequence[HistoryRow]) -> list[str]:
    """The position columns a run's scalars include: level with a pyramid, frame and pass with a video."""
    out = []
    if any(r.level for r in history):
        out.append("level")
    if any(r.frame or r.pass_ for r in history):
        out += ["frame", "pass"]
    return out


def export_run(run_dir: Path, backends: Sequence[str], swept: dict | None = None,
               log: Callable[[str], None] = print) -> None:
    """The records of a finished run, from its files (history.csv, snapshots/, result.png, config.yaml, metrics.json)."""
    from omegaconf import OmegaConf

    from nstjax import images
    from nstjax.outputs import read_history, snapshot_name

    from nstjax import config
    from nstjax.spec import parse

    history = read_history(run_dir / "history.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tracker = Tracker(backends, run_dir, log, extra_columns(history))
    pyramid, start = "level" in tracker.extra, 0
    for k, row in enumerate(history):  # the rows up to each snapshot in one call, the snapshot after them
        snapshot = run_dir / "snapshots" / snapshot_name(row.step, row.level if pyramid else None)
        if row.step > 0 and snapshot.is_file():
            tracker.rows(history[start:k + 1], start)
            tracker.image(snapshot.stem, images.load_image(snapshot))
            start = k + 1
    if start < len(history):
        tracker.rows(history[start:], start)
    member = parse(config.from_container(OmegaConf.load(run_dir / "config.yaml"))).member
    tracker.finish(hparams_of(member, metrics.get("swept", swept)), metrics, images.load_image(run_dir / "result.png"))


def export(path: Path, backends: Sequence[str], log: Callable[[str], None] = print) -> int:
    """A run's or a sweep's records; returns the number of runs exported."""
    from nstjax import sweeps

    path = Path(path)
    if sweeps.is_sweep(path):
        plan = sweeps.read_plan(path)
        done = 0
        for members in plan.groups:
            for m in members:
                d = sweeps.member_dir(path, m.n)
                if (d / "metrics.json").is_file():
                    export_run(d, backends, {k: m["values"][k] for k in plan.swept}, log)
                    done += 1
        return done
    if all((path / name).is_file() for name in ("metrics.json", "history.csv", "config.yaml")):
        export_run(path, backends, None, log)
        return 1
    raise UserError(f"{path} is neither a run directory (metrics.json, history.csv, config.yaml) nor a sweep directory "
                    "(groups.yaml): give the directory of a finished run or sweep")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nstjax.track", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a run's or a sweep's directory")
    p.add_argument("--to", required=True, help=f"the backend: {', '.join(BACKENDS)}")
    a = p.parse_args(argv)
    try:
        check([a.to])
        n = export(a.path, [a.to])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    print(f"{n} run(s) of {a.path} exported to {a.to}")


if __name__ == "__main__":
    main()
