"""Video (nstjax.video, nstjax.flow, nstjax.frames): flows on clips of known motion, the consistency
weights against a loop port of consistencyChecker.cpp, the temporal term against numpy and a
float64 port of artistic-videos, both schedules against solo runs, sweeps, interrupt and resume."""

import json
import signal

import numpy as np
import pytest
from PIL import Image

from cli import EXAMPLES, run_cli
from consistency_reference import reference_consistency
from nstjax import config, flow, frames, images, transfer, video
from nstjax.build import validate
from nstjax.driver import Driver
from nstjax.errors import UserError
from nstjax.losses import Temporal, temporal_loss
from nstjax.outputs import read_history
from nstjax.spec import parse
from nstjax.status import SIGNALS

SHIFT = (2, 1)
"""The synthetic clip's camera moves (dx, dy) pixels a frame: frame k's pixel (x, y) is frame k − 1's (x + dx, y + dy)."""


def pan(count: int = 4, size: tuple[int, int] = (40, 48), shift=SHIFT) -> list[np.ndarray]:
    """Crops of a photo moving by whole pixels: the content leaves at one edge, a strip enters at the other."""
    big = images.resize_longest(images.load_image(EXAMPLES / "tubingen.jpg"), 96)
    h, w = size
    return [big[k * shift[1]: k * shift[1] + h, k * shift[0]: k * shift[0] + w] for k in range(count)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    for k, img in enumerate(pan()):
        images.save_image(folder / f"{k:04d}.png", img)
    return folder


def overrides(weights, clip, *extra) -> list[str]:
    """A small video run: synthetic weights, 32 px, 3 L-BFGS steps a frame (unless ``extra`` picks an optimiser)."""
    optim = [e for e in extra if e.startswith("optim=")] or ["optim.linesearch=none"]
    return [*optim, f"model.weights={weights}", f"video.input={clip}", "image.size=32", "optim.steps=3",
            "progress=false", "model.conv=direct", "checkpoint_every=0", f"style={EXAMPLES / 'starry_night.jpg'}",
            *(e for e in extra if not e.startswith("optim="))]


@pytest.mark.parametrize("method, size", [("dis", (40, 48)), ("farneback", (64, 80))])  # Farnebäck's windows need more
def test_flow_of_a_known_shift_is_within_half_a_pixel(method, size):
    a, b = pan(2, size)[1], pan(2, size)[0]  # frame 1 → frame 0: (+dx, +dy) wherever the pixel stays inside
    if True:
        f = flow.optical_flow(a, b, method)
        inner = f[4:-4 - SHIFT[1], 4:-4 - SHIFT[0]]
        error = np.linalg.norm(inner - np.asarray(SHIFT, np.float32), axis=-1)
        assert error.mean() < 0.5, (method, error.mean())


def _flows_with_an_occlusion_and_a_boundary(h=20, w=24):
    forward = np.zeros((h, w, 2))
    forward[:, : w // 2] = (1.0, 0.0)  # the left half moves right: a motion boundary at w/2
    backward = -forward
    backward[5:11, 3:9] = (4.0, 3.0)  # an occluded block: its backward flow does not return
    return backward, forward


@pytest.mark.parametrize("case", ["shift", "occlusion_and_boundary", "fractional"])
def test_consistency_weights_equal_a_loop_port_of_the_checker(case):
    h, w = 20, 24
    if case == "shift":
        ab, ba = np.full((h, w, 2), (2.0, 0.0)), np.full((h, w, 2), (-2.0, 0.0))
    elif case == "fractional":
        ab, ba = np.full((h, w, 2), (0.5, -0.25)), np.full((h, w, 2), (-0.5, 0.25))
        ba[:, 10:13] = (3.0, 0.0)
    else:
        ab, ba = _flows_with_an_occlusion_and_a_boundary(h, w)
    got = flow.consistency(ab, ba)
    np.testing.assert_allclose(got, reference_consistency(ab, ba), atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_consistency_marks_what_the_frame_cannot_see():
    backward, forward = _flows_with_an_occlusion_and_a_boundary()
    c = flow.consistency(backward, forward)
    assert c[7:9, 5:7].max() == 0  # inside the occluded block
    assert c[:, 11:13].max() < 0.3  # on the motion boundary (two zero columns, smoothed)
    assert c[:, -1].max() < 0.3  # the flow leaves the frame (x + 1 has no right neighbour), smoothed
    assert c[2:4, 16:20].min() == 1  # elsewhere, away from all three
    a, b = pan(2)[1], pan(2)[0]  # a strip enters at the right and bottom edges: its pixels are not in frame 0
    weights = flow.consistency(flow.optical_flow(a, b), flow.optical_flow(b, a))
    assert weights[:, -1].max() < 0.05 and weights[:, -2].max() < 0.3 and weights[-1, :].max() < 0.3
    assert weights[10:-10, 10:-10].mean() > 0.9


def test_warp_samples_bilinearly_and_fills_outside():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    img = rng.random((12, 14, 3))
    f = rng.uniform(-3, 3, (12, 14, 2))
    got = flow.warp(img, f, (0.1, 0.2, 0.3))
    gy, gx = np.mgrid[0:12, 0:14]
    x, y = gx + f[..., 0], gy + f[..., 1]
    want = np.stack([map_coordinates(img[..., c], [y, x], order=1, mode="nearest") for c in range(3)], -1)
    outside = (x < 0) | (x > 13) | (y < 0) | (y > 11)
    want[outside] = (0.1, 0.2, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_temporal_loss_and_long_term_weights_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.random((6, 7, 3)).astype(np.float32)
    omega = rng.random((3, 6, 7, 3)).astype(np.float32)
    raw = [(rng.random((6, 7)) > 0.4).astype(np.float64) * rng.random((6, 7)) for _ in range(3)]
    weights = flow.long_term_weights(raw)
    expected = [raw[0]]  # artistic-videos' closestFirst, as its loop: c_j -= c_{j-k} (already processed)
    for j in range(1, 3):
        c = raw[j].copy()
        for k in range(1, j + 1):
            c = c - expected[j - k]
        expected.append(np.maximum(c, 0))
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want)
    c = np.stack(weights)[..., None].astype(np.float32)
    want = sum(np.sum(c[j] * (x - omega[j]) ** 2) / x.size for j in range(3))
    got = float(temporal_loss(x, Temporal(omega, c)))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_video_settings_are_one_line_user_errors(synthetic_weights_file, clip_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a video")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k, shape in enumerate([(32, 40), (32, 40), (30, 40)]):
        images.save_image(mixed / f"{k}.png", np.zeros(shape + (3,)))
    single = tmp_path / "single"
    single.mkdir()
    images.save_image(single / "0.png", np.zeros((32, 40, 3)))
    cases = {
        f"video.input={tmp_path / 'notes.txt'}": "not a video ffmpeg can read",
        f"video.input={single}": "at least two",
        f"video.input={mixed}": "different sizes",
        "video.frames=[0,9,1]": "outside the video",
        "video.frames=[3,4,1]": "at least two",
        "video.temporal_weight=-1": "video.temporal_weight",
        "video.blend=nan": "video.blend",
        "video.long_term=[0]": "video.long_term",
        "video.long_term=[1,5]": "reaches back 5 frames",
        f"content={EXAMPLES / 'tubingen.jpg'}": "a video run's content is its frames",
    }
    for extra, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            validate(parse(config.compose(overrides(synthetic_weights_file, clip_dir, extra))))
        assert "\n" not in str(e.value)


def test_the_missing_video_extra_names_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def without_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'", name="cv2")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_cv2)
    with pytest.raises(UserError, match=r"pip install 'nstjax\[video\]'"):
        frames.require_video_extra()


def test_a_video_file_is_read_back_with_its_frames_and_rate(tmp_path):
    clip = pan(5)
    frames.write_video(tmp_path / "clip.mp4", clip, 12)
    got, fps = frames.read_frames(str(tmp_path / "clip.mp4"), (1, None, 2))
    assert fps == 12 and [i for i, _ in got] == [1, 3]
    assert got[0][1].shape == (40, 48, 3)
    assert np.abs(got[0][1] - clip[1]).mean() < 0.03  # H.264 is lossy


@pytest.fixture(scope="module")
def gamma_pair(synthetic_weights_file, clip_dir, tmp_path_factory):
    """A sequential run of two members, γ = 0 and γ = 1e10, into files (Adam, 6 steps a frame)."""
    root = tmp_path_factory.mktemp("gamma")
    cfgs = [config.compose(overrides(synthetic_weights_file, clip_dir, f"video.temporal_weight={g}", "optim=adam",
                                     "optim.steps=6", "optim.lr=0.05")) for g in (0, 1e10)]
    dirs = [root / "0", root / "1"]
    transfer.run_group(cfgs, dirs, root / "group")
    return cfgs, dirs


@pytest.mark.slow
def test_the_temporal_term_lowers_the_temporal_error(gamma_pair):
    _, dirs = gamma_pair
    errors = [json.loads((d / "metrics.json").read_text())["temporal_error"] for d in dirs]
    assert errors[1] < 0.75 * errors[0], errors  # measured: about half
    rows = read_history(dirs[1] / "history.csv")
    assert [r.frame for r in rows if r.step == 0] == [0, 1, 2, 3]
    assert all(r.temporal == 0 for r in rows if r.frame == 0) and any(r.temporal > 0 for r in rows if r.frame == 2)


@pytest.mark.slow
def test_a_member_of_a_gamma_sweep_equals_its_solo_run(gamma_pair):
    cfgs, dirs = gamma_pair
    points = [parse(c) for c in cfgs]
    assert points[0].structure == points[1].structure  # γ is a member key: one group
    solo = transfer.optimize([cfgs[1]])[0]
    got = read_history(dirs[1] / "history.csv")
    assert [(r.frame, r.step) for r in got] == [(r.frame, r.step) for r in solo.history]
    first = [i for i, r in enumerate(got) if r.frame == 0]
    np.testing.assert_allclose([got[i].total for i in first], [solo.history[i].total for i in first], rtol=1e-5)
    # later frames start from their predecessor's result: float32 reduction-order differences between the
    # batched and the solo program grow through Adam's normalised steps (measured: 1.4e-3 at frame 3)
    np.testing.assert_allclose([r.total for r in got], [r.total for r in solo.history], rtol=5e-3)
    frame = np.asarray(Image.open(dirs[1] / "frames" / "000003.png"))
    assert np.abs(frame.astype(int) - images.to_uint8(solo.image).astype(int)).mean() < 0.5


def test_the_outputs_of_a_video_run(gamma_pair):
    _, dirs = gamma_pair
    d = dirs[1]
    assert sorted(p.name for p in (d / "frames").iterdir()) == [f"{k:06d}.png" for k in range(4)]
    assert frames.count_frames(d / "video.mp4") == 4
    with open(d / "frames.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert [r["frame"] for r in rows] == ["0", "1", "2", "3"] and rows[0]["temporal_error"] == ""
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["frames"] == 4 and metrics["schedule"] == "sequential" and metrics["fps"] == frames.FOLDER_FPS
    assert metrics["temporal_error"] == pytest.approx(np.mean([float(r["temporal_error"]) for r in rows[1:]]))


@pytest.mark.slow
def test_a_diverging_member_stops_its_chain_and_the_others_go_on(synthetic_weights_file, clip_dir, tmp_path):
    """Adam's lr 1e39 overflows float32 at the first step: that member keeps frame 0's initial image."""
    cfgs = [config.compose(overrides(synthetic_weights_file, clip_dir, "optim=adam", "optim.steps=6",
                                     f"optim.lr={lr}")) for lr in (0.05, 1e39)]
    dirs = [tmp_path / "0", tmp_path / "1"]
    results = transfer.run_group(cfgs, dirs, tmp_path / "group")
    assert [r.status.value for r in results.values()] == ["finished", "diverged"]
    assert len(list((dirs[0] / "frames").iterdir())) == 4 and [p.name for p in (dirs[1] / "frames").iterdir()] == [
        "000000.png"]
    metrics = json.loads((dirs[1] / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["frames"] == 1 and np.isfinite(results[1].image).all()


@pytest.mark.slow
def test_a_parallel_member_equals_its_frame_run_alone_with_the_same_targets(synthetic_weights_file, clip_dir,
                                                                              tmp_path):
    cfg = config.compose(overrides(synthetic_weights_file, clip_dir, "video.schedule=parallel", "video.passes=2",
                                   "video.temporal_from_pass=2", "video.temporal_weight=1e9", "video.blend=0.5"))
    transfer.run_group([cfg], [tmp_path / "run"], tmp_path / "run")
    passes = [np.load(tmp_path / "run" / "video" / f"pass_00{p}.npz") for p in (1, 2)]
    run = video.VideoRun([parse(cfg)], [validate(parse(cfg))], [None], None, [{}], print)
    for f in (1, 2):
        run.chains[0].pixels = {k: passes[0][f"0_{k}"] for k in range(4)}
        x, n = run.chains[0].pixels[f], f + 1  # pass 2 looks ahead
        omega, c = run.warped(run.chains[0].pixels[n], f, n), run.flows(f, n)[1][..., None]
        start = (x + 0.5 * c * omega) / (1 + 0.5 * c)
        group = run.with_problems(run.frame_group(f, [0]), [start], [run.temporal(0, f, [n], run.chains[0].pixels)])
        alone = Driver(group, None, [None]).run(lambda *_: None)[0]
        # float32 reduction order of an 8-member program against a solo one, through 3 L-BFGS steps:
        # measured up to 2.5e-4 on jax 0.12 (2e-5 on 0.10)
        np.testing.assert_allclose(alone.pixels, passes[1][f"0_{f}"], atol=1e-3)
        assert np.abs(alone.pixels - passes[1][f"0_{f}"]).mean() < 1e-4


@pytest.mark.parametrize("schedule, where, shown", [("sequential", "frame_000002", 3), ("parallel", "pass_002", 4)])
@pytest.mark.slow
def test_interrupted_at_a_frame_or_pass_resumes_bitwise(schedule, where, shown, synthetic_weights_file, clip_dir,
                                                        tmp_path, monkeypatch):
    """SIGINT at step 2 of frame 2 of 4 (sequential) or of pass 2 of 3 (parallel), then resume=True: the
    files equal the uninterrupted run's byte for byte."""
    cfg = config.compose(overrides(synthetic_weights_file, clip_dir, "video.temporal_weight=1e9", "optim.steps=4",
                                   "chunk_steps=2", f"video.schedule={schedule}", "video.passes=3",
                                   "video.temporal_from_pass=2"))
    transfer.run_group([cfg], [tmp_path / "whole"], tmp_path / "whole")
    snapshots = Driver._snapshots

    def stop_there(self, group, index, level, state, step, new):
        if self.group_dir is not None and self.group_dir.name == where and step == 2:
            SIGNALS.received = signal.SIGINT
        return snapshots(self, group, index, level, state, step, new)

    monkeypatch.setattr(Driver, "_snapshots", stop_there)
    try:
        result = transfer.run_group([cfg], [tmp_path / "cut"], tmp_path / "cut")[0]
    finally:
        SIGNALS.received = None
    assert result.status.value == "interrupted"
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["frames"] == shown  # what is done, and the frame(s) so far
    monkeypatch.setattr(Driver, "_snapshots", snapshots)
    transfer.run_group([cfg], [tmp_path / "cut"], tmp_path / "cut", resume=True)
    for name in ("history.csv", "frames.csv", "result.png", "frames/000003.png"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    keys = [f"frame_{k:06d}" for k in range(4)] if schedule == "sequential" else ["pass_002", "pass_003"]
    assert not (tmp_path / "cut" / "video" / "pass_001.npz").exists()  # the last two passes are kept
    for key in keys:
        with np.load(tmp_path / "cut" / "video" / f"{key}.npz") as a, np.load(tmp_path / "whole" / "video" /
                                                                          f"{key}.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.slow
def test_ruder2016_temporal_term_at_step_0_equals_a_float64_port_of_artistic_videos(synthetic_weights_file,
                                                                                     clip_dir, tmp_path):
    """artistic-videos' WeightedContentLoss on the ×256 BGR Caffe image: temporal_weight · mean((√c x − √c ω)²),
    ω the previous result warped (bilinear, the mean pixel outside), c the reliable weights."""
    from scipy.ndimage import map_coordinates

    cfg = config.compose(["+experiment=ruder2016", f"video.input={clip_dir}", f"model.weights={synthetic_weights_file}",
                          "image.size=32", "optim.steps=2", "video.first_frame_steps=2", "video.init=init",
                          "init=content", "progress=false", "model.conv=direct", "checkpoint_every=0"])
    transfer.run_group([cfg], [tmp_path / "run"], tmp_path / "run")
    got = next(r.temporal for r in read_history(tmp_path / "run" / "history.csv") if r.frame == 2 and r.step == 0)
    content = video.load_clip(parse(cfg).structure).frames[2].astype(np.float64)
    previous = np.clip(np.load(tmp_path / "run" / "video" / "frame_000001.npz")["0_1"].astype(np.float64), 0, 1)
    with np.load(tmp_path / "run" / "flow" / "000002_000001.npz") as data:
        f, c = data["flow"].astype(np.float64), data["weights"].astype(np.float64)
    mean = np.array([103.939, 116.779, 123.68])  # BGR
    h, w = f.shape[:2]
    gy, gx = np.mgrid[0:h, 0:w]
    x, y = gx + f[..., 0], gy + f[..., 1]
    warped = np.stack([map_coordinates(previous[..., k], [y, x], order=1, mode="nearest") for k in range(3)], -1)
    warped[(x < 0) | (x > w - 1) | (y < 0) | (y > h - 1)] = mean[::-1] / 256.0

    def caffe(rgb):  # artistic-videos' preprocess: RGB → BGR, ×256, minus the mean pixel; (3, H, W)
        return (rgb[..., ::-1] * 256.0 - mean).transpose(2, 0, 1)

    root = np.sqrt(c)[None]
    want = 1e3 * np.mean((root * caffe(content) - root * caffe(warped)) ** 2)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_the_cli_stylises_an_mp4_and_writes_one(synthetic_weights_file, tmp_path, nstjax_cache):
    frames.write_video(tmp_path / "clip.mp4", pan(4), 8)
    run_dir = tmp_path / "run"
    args = overrides(synthetic_weights_file, tmp_path / "clip.mp4", "video.temporal_weight=1e9",
                     f"hydra.run.dir={run_dir}")
    out = run_cli(args, nstjax_cache)
    assert out.returncode == 0, out.stderr[-2000:]
    assert frames.count_frames(run_dir / "video.mp4") == 4
    assert json.loads((run_dir / "metrics.json").read_text())["fps"] == 8
    bad = run_cli(overrides(synthetic_weights_file, tmp_path / "clip.mp4", "video.frames=[0,40,1]",
                            f"hydra.run.dir={tmp_path / 'bad'}"), nstjax_cache)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "outside the video" in bad.stderr and not (tmp_path / "bad").exists()
