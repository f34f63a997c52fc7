"""Tracking in MLflow (nstjax.track.MLflow): a sweep's SQLite store read back with MlflowClient holds
a run for the sweep with a nested run per point, whose metrics equal history.csv step by step, whose
params are the config's and the swept values and whose artifacts are the point's files; the export
from finished files (python -m nstjax.track DIR --to mlflow) gives the same records; a backend that
fails mid-run costs no result; a missing package is one line."""

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from omegaconf import OmegaConf

from nstjax import config, sweeps, track, transfer
from nstjax.errors import UserError
from nstjax.outputs import read_history, write_history
from nstjax.spec import parse
from test_track import records, small

BETAS = ("1e3", "1e5")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Each run's own SQLite store whatever the environment names, and no usage reports."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DO_NOT_TRACK", "true")
        yield


@pytest.fixture(scope="module")
def sweep(synthetic_weights_file, tmp_path_factory):
    """A sweep of two points (β 1e3 and 1e5, one group), as the batched sweeper plans it, run with
    tracking=[tensorboard,mlflow] from an empty working directory, where nothing is written."""
    root, cwd = tmp_path_factory.mktemp("sweep"), tmp_path_factory.mktemp("cwd")
    points = [sweeps.Point(n, [f"loss.beta={b}"], {"loss.beta": b},
                           config.compose(small(synthetic_weights_file, f"loss.beta={b}", "tracking=[tensorboard,mlflow]")))
              for n, b in enumerate(BETAS)]
    sweeps.write_plan(root, ["loss.beta"], [points])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert sweeps.run_group_job(root, 0) == ["finished", "finished"]
    assert not any(cwd.iterdir())
    return root


def store(folder: Path) -> dict:
    """The runs of ``folder``/mlflow.db read with MlflowClient, by name: the parent's name, status, status
    tag, params, metric histories [(step, value)] and artifacts (path → bytes, from where they lie)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nstjax").experiment_id])
    names = {r.info.run_id: r.info.run_name for r in runs}
    out = {}
    for r in runs:
        artifacts = Path(urlparse(r.info.artifact_uri).path)
        assert folder / "mlartifacts" in artifacts.parents
        out[r.info.run_name] = {
            "parent": names.get(r.data.tags.get("mlflow.parentRunId")), "status": r.info.status,
            "tag": r.data.tags.get("status"), "params": r.data.params,
            "metrics": {key: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
                        for key in r.data.metrics},
            "artifacts": {str(p.relative_to(artifacts)): p.read_bytes() for p in artifacts.rglob("*") if p.is_file()}}
    return out


@pytest.mark.slow
def test_a_sweep_is_a_run_with_a_nested_run_per_point_equal_to_its_files(sweep):
    runs = store(sweep)
    parent = "/".join(sweep.parts[-2:])
    assert runs.keys() == {parent, "0", "1"}
    assert runs[parent]["parent"] is None and runs[parent]["status"] == "FINISHED" and not runs[parent]["metrics"]
    for n, beta in enumerate(BETAS):
        d, run = sweep / str(n), runs[str(n)]
        history = read_history(d / "history.csv")
        metrics = json.loads((d / "metrics.json").read_text())
        assert run["parent"] == parent and run["status"] == "FINISHED" and run["tag"] == "finished"
        for name in ("total", "content", "style", "tv", "temporal"):
            assert run["metrics"][f"loss/{name}"] == [(k, getattr(r, name)) for k, r in enumerate(history)]
        assert run["metrics"]["final/steps"] == [(len(history), 3.0)]
        assert run["metrics"]["final/yardstick_style"] == [(len(history), metrics["yardstick"]["final"]["style_mean"])]
        assert run["metrics"]["final/run_seconds"] == [(len(history), metrics["run_seconds"])]
        cfg = OmegaConf.load(d / "config.yaml")
        assert run["params"]["loss.beta"] == beta and run["params"]["seed"] == "0"
        assert run["params"]["content"] == cfg.content and run["params"]["loss.tv_weight"] == str(cfg.loss.tv_weight)
        assert {*run["params"], "status"} == records(d)[2].keys()  # TensorBoard's HParams session, beside it
        assert len(records(d)[0]["loss/total"]) == len(history)
        files = ["result.png", "loss_curve.png", "metrics.json", "snapshots/step_000001.png", "snapshots/step_000003.png"]
        assert run["artifacts"].keys() == {*files, "snapshots/step_000002.png"}
        for name in files:
            assert run["artifacts"][name] == (d / name).read_bytes()


@pytest.mark.slow
def test_the_export_from_the_files_gives_the_same_records(sweep, tmp_path):
    copy = tmp_path.joinpath(*sweep.parts[-2:])  # the sweep's run is named by its directory's last two parts
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("mlflow.*", "mlartifacts", "events.out.tfevents*"))
    track.main([str(copy), "--to", "mlflow"])
    live = store(sweep)
    assert store(copy) == live
    run = tmp_path / "runs" / "0"  # a point's files alone: a run of its own
    shutil.copytree(sweep / "0", run, ignore=shutil.ignore_patterns("events.out.tfevents*"))
    assert track.export(run, ["mlflow"]) == 1
    assert store(run) == {"runs/0": {**live["0"], "parent": None}}


def test_a_pyramid_run_exports_its_levels_and_their_snapshots(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweep / "0", run, ignore=shutil.ignore_patterns("events.out.tfevents*"))
    history = read_history(run / "history.csv")  # read as a run of two levels, the second from its row 2
    rows = history[:2] + [r._replace(step=k, level=1) for k, r in enumerate(history[2:])]
    write_history(run / "history.csv", rows)
    (run / "snapshots" / "step_000001.png").rename(run / "snapshots" / "level_0_step_000001.png")
    (run / "snapshots" / "step_000002.png").rename(run / "snapshots" / "level_1_step_000001.png")
    (run / "snapshots" / "step_000003.png").unlink()
    assert track.export(run, ["tensorboard", "mlflow"]) == 1
    exported = store(run)[f"{tmp_path.name}/run"]
    assert exported["metrics"]["level"] == [(k, float(r.level)) for k, r in enumerate(rows)]
    assert {"snapshots/level_0_step_000001.png", "snapshots/level_1_step_000001.png"} <= exported["artifacts"].keys()
    assert {"image/level_0_step_000001", "image/level_1_step_000001"} <= records(run)[1]


@pytest.mark.slow
def test_a_backend_failing_mid_run_warns_once_and_the_runs_go_on(synthetic_weights_file, tmp_path, monkeypatch):
    real = track.MLflow.rows

    def server_gone(self, *args):  # for point 1, after its first rows
        if self.run_dir.name == "1" and self.count:
            raise ConnectionError("the tracking server has gone")
        real(self, *args)

    monkeypatch.setattr(track.MLflow, "rows", server_gone)
    logged = []
    cfgs = [config.compose(small(synthetic_weights_file, f"loss.beta={b}", "tracking=[tensorboard,mlflow]"))
            for b in BETAS]
    dirs = [tmp_path / "0", tmp_path / "1"]
    results = transfer.run_group(cfgs, dirs, tmp_path / "group", log=logged.append)
    assert [r.status.value for r in results.values()] == ["finished", "finished"]
    warnings = [line for line in logged if "tracking=mlflow failed" in line]
    assert len(warnings) == 1 and str(dirs[1]) in warnings[0] and "the tracking server has gone" in warnings[0]
    for d in dirs:
        for name in ("result.png", "metrics.json", "history.csv", "loss_curve.png"):
            assert (d / name).is_file()
        history = read_history(d / "history.csv")
        assert len(records(d)[0]["loss/total"]) == len(history)  # TensorBoard went on
        (run,) = store(d).values()
        logged_rows = len(history) if d.name == "0" else 1
        assert run["status"] == ("FINISHED" if d.name == "0" else "FAILED")
        assert run["metrics"]["loss/total"] == [(k, r.total) for k, r in enumerate(history[:logged_rows])]


@pytest.mark.parametrize("package", ["mlflow", "sqlalchemy"])
def test_a_missing_package_is_one_line(package, synthetic_weights_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    message = f"tracking=[mlflow] needs {package}: pip install 'nstjax[mlflow]'"
    with pytest.raises(UserError) as e:
        parse(config.compose(small(synthetic_weights_file, "tracking=[tensorboard,mlflow]")))
    assert str(e.value) == message
    with pytest.raises(SystemExit) as e:
        track.main([str(tmp_path), "--to", "mlflow"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
