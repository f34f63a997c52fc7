"""Tracking (nstjax.track): TensorBoard event files read back with TensorBoard's own reader equal
history.csv step by step, with the snapshots, the result and the HParams session; the export from
finished files gives the same records; a failing backend costs no result; bad settings are one line."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cli import EXAMPLES
from nstjax import config, track, transfer
from nstjax.errors import UserError
from nstjax.outputs import read_history
from nstjax.spec import parse


def small(weights, *extra):
    return [f"model.weights={weights}", f"content={EXAMPLES / 'tubingen.jpg'}", f"style={EXAMPLES / 'starry_night.jpg'}",
            "image.size=32", "optim.steps=3", "optim.linesearch=none", "model.conv=direct", "progress=false",
            "save_every=1", "checkpoint_every=0", *extra]


def records(folder):
    """Scalars (tag → [(step, value)]), image tags and the HParams session's values of a TensorBoard run."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    hparams = {}
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
    return scalars, set(acc.Tags()["images"]), hparams


@pytest.fixture(scope="module")
def tracked(synthetic_weights_file, tmp_path_factory):
    """Two members (β 1e3 and 1e5) of one group run with tracking=[tensorboard]."""
    root = tmp_path_factory.mktemp("tracked")
    cfgs = [config.compose(small(synthetic_weights_file, f"loss.beta={b}", "tracking=[tensorboard]"))
            for b in (1e3, 1e5)]
    dirs = [root / "0", root / "1"]
    transfer.run_group(cfgs, dirs, root / "group", extra_metrics=[{"swept": {"loss.beta": b}} for b in (1e3, 1e5)])
    for cfg, d in zip(cfgs, dirs):  # as the CLI writes it
        (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return dirs


def test_live_records_equal_the_run_files(tracked):
    for d, beta in zip(tracked, (1e3, 1e5)):
        scalars, images, hparams = records(d)
        history = read_history(d / "history.csv")
        for name in ("total", "content", "style", "tv", "temporal"):
            assert [step for step, _ in scalars[f"loss/{name}"]] == list(range(len(history)))
            np.testing.assert_allclose([v for _, v in scalars[f"loss/{name}"]], [getattr(r, name) for r in history],
                                       rtol=1e-6)
        assert {"image/step_000001", "image/step_000003", "image/result"} <= images
        metrics = json.loads((d / "metrics.json").read_text())
        assert hparams["loss.beta"] == beta and hparams["status"] == "finished" and hparams["seed"] == 0
        assert scalars["final/yardstick_style"][0][1] == pytest.approx(metrics["yardstick"]["final"]["style_mean"])
        assert scalars["final/steps"][0][1] == metrics["steps"] == 3


def test_export_from_the_files_gives_the_same_records(tracked, tmp_path):
    import shutil

    live = records(tracked[1])
    copy = tmp_path / "run"
    shutil.copytree(tracked[1], copy, ignore=shutil.ignore_patterns("events.out.tfevents*"))
    assert track.export(copy, ["tensorboard"]) == 1
    exported = records(copy)
    assert exported[0].keys() == live[0].keys() and exported[1] == live[1] and exported[2] == live[2]
    for tag in live[0]:
        np.testing.assert_allclose(exported[0][tag], live[0][tag], rtol=1e-6)


def test_a_failing_backend_warns_once_and_the_run_writes_its_files(synthetic_weights_file, tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(track.TensorBoard, "rows", full_disk)
    logged = []
    cfg = config.compose(small(synthetic_weights_file, "tracking=[tensorboard]"))
    result = transfer.run_group([cfg], [tmp_path / "run"], tmp_path / "run", log=logged.append)[0]
    assert result.status.value == "finished"
    for name in ("result.png", "metrics.json", "history.csv"):
        assert (tmp_path / "run" / name).is_file()
    warnings = [line for line in logged if "tracking=tensorboard failed" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_bad_tracking_settings_are_one_line(synthetic_weights_file, tmp_path, monkeypatch):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        config.compose(small(synthetic_weights_file, "tracking=[wandb]"))
    assert "tensorboard" in config.one_line(e.value) and "\n" not in config.one_line(e.value)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'nstjax\[tensorboard\]'"):
        parse(config.compose(small(synthetic_weights_file, "tracking=[tensorboard]")))
    with pytest.raises(UserError, match="neither a run directory"):
        track.export(tmp_path, ["tensorboard"])
