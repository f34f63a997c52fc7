"""Video: Ruder, Dosovitskiy & Brox 2016, "Artistic style transfer for videos" (GCPR; IJCV 2018).

Each frame i is a style-transfer problem with the frame as content and a temporal term
γ Σ_j (1/D) Σ_k c_jk (x_k − ω_jk)² (:func:`nstjax.losses.temporal_loss`): ω_j the stylised frame
i − j warped into frame i by the content's optical flow, c_j its consistency weights
(:mod:`nstjax.flow`), long-term weights closest first. Two schedules:

- ``sequential`` (the paper's single pass): frame after frame, each from its predecessor's result
  warped (``video.init=prev_warped``), the first frame ``video.first_frame_steps`` steps. The
  points of a sweep are the members of each frame's program: every point's chain runs together.
- ``parallel`` (multi-pass with every frame of a pass a member of one program): pass 1 every frame
  alone; pass p > 1 starts each frame from (x + δ c ω) / (1 + δ c), x its own last result, ω its
  neighbour's (previous frame on odd passes, next on even ones) from the previous pass warped into
  it, and from pass ``video.temporal_from_pass`` on compares with the neighbours' previous-pass
  results. Frames × points members, in waves when they do not fit (:class:`nstjax.driver.Driver`).

A run's directory gets ``frames/NNNNNN.png`` (numbered by source frame), ``video.mp4``,
``frames.csv``, ``history.csv`` (with ``temporal``, ``frame``, ``pass``), ``metrics.json`` (with
``frames``, ``fps``, ``schedule``, ``temporal_error``) and ``result.png`` (the last frame). The group
directory keeps ``flow/`` (flows and weights, reused on resume) and ``video/`` (each finished
frame's pixels, or the last two passes', the records so far, and the checkpoint of the one
running): a run stopped at any frame or pass resumes from there bitwise.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import colors, flow, frames, images, outputs
from nstjax.atomic import write_bytes, write_text
from nstjax.build import Group, Inputs, build_group, check_loss_shapes, check_resized, input_paths, load_resized
from nstjax.driver import Driver, MemberResult
from nstjax.errors import UserError
from nstjax.losses import Temporal
from nstjax.optimize import HistoryRow
from nstjax.spec import Point, Structure
from nstjax.status import SIGNALS, RunStatus

FRAMES_COLUMNS = ("frame", "pass", "steps", "evaluations", "total", "content", "style", "tv", "temporal",
                  "temporal_error", "status")
"""frames.csv: per frame and pass, its steps, evaluations and final terms, and the temporal error of
the pair (frame − 1, frame) of that pass's results (empty for the first frame)."""
STATE = "video"
PROGRESS = "progress.json"


@dataclasses.dataclass(frozen=True)
class Clip:
    """The selected frames at the run's size, their source indices and the frame rate."""

    indices: tuple[int, ...]
    frames: tuple[np.ndarray, ...]
    fps: float


@functools.lru_cache(maxsize=4)
def load_clip(structure: Structure) -> Clip:
    """The frames of video.input selected by video.frames, each resized as a content image."""
    v = structure.video
    raw, fps = frames.read_frames(v.input, v.frames, structure.image.max_pixels)
    resized = tuple(images.resize_longest(img, structure.image.size) for _, img in raw)
    check_resized(resized[0], "content", structure.loss, "raise image.size or use shallower layers")
    for img in resized:
        img.setflags(write=False)
    return Clip(tuple(i for i, _ in raw), resized, v.fps or fps)


def validate(point: Point) -> Inputs:
    """A video point's inputs: its first frame as the content, its style images."""
    s = point.structure
    clip = load_clip(s)
    far = [j for j in s.video.long_term if j >= len(clip.frames)]
    if far:
        raise UserError(f"video.long_term = {list(s.video.long_term)} reaches back {max(far)} frames, but the "
                        f"selection has {len(clip.frames)}: use indices below {len(clip.frames)}")
    styles = [load_resized(s, p, "style") for p in input_paths(point)[1]]
    for style in styles:
        check_loss_shapes(s, clip.frames[0].shape, style.shape)
    return Inputs(np.array(clip.frames[0]), styles)


def has_state(group_dir: Path) -> bool:
    """Whether a group directory holds an interrupted video run's state (to resume)."""
    return (Path(group_dir) / STATE).is_dir()


class Flows:
    """The flows and consistency weights between frames of a clip, computed once and kept in
    ``folder`` (``flow/FROM_TO.npz``: the flow from frame FROM to TO and the weights of FROM's pixels)."""

    def __init__(self, clip: Clip, structure: Structure, folder: Path | None):
        self.clip, self.v, self.folder = clip, structure.video, folder
        self._memory: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(flow i → k, consistency weights of frame i's pixels), frames as positions in the clip."""
        if (i, k) in self._memory:
            return self._memory[(i, k)]
        path = self.folder / f"{self.clip.indices[i]:06d}_{self.clip.indices[k]:06d}.npz" if self.folder else None
        if path is not None and path.is_file():
            with np.load(path) as data:
                pair = data["flow"], data["weights"]
        else:
            a, b = self.clip.frames[i], self.clip.frames[k]
            ab = flow.optical_flow(a, b, self.v.flow, self.v.flow_preset)
            ba = flow.optical_flow(b, a, self.v.flow, self.v.flow_preset)
            pair = ab, flow.consistency(ab, ba)
            if path is not None:
                buf = io.BytesIO()
                np.savez(buf, flow=pair[0], weights=pair[1])
                write_bytes(path, buf.getvalue())
        self._memory[(i, k)] = pair
        return pair


@dataclasses.dataclass
class Chain:
    """One member's (point's) video so far: each frame's optimised pixels and output image, the
    records, its status."""

    pixels: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    history: list[HistoryRow] = dataclasses.field(default_factory=list)
    rows: list[dict] = dataclasses.field(default_factory=list)
    status: RunStatus = RunStatus.FINISHED
    reason: str | None = None
    steps: int = 0
    evaluations: int = 0
    run_seconds: float = 0.0
    compile_seconds: float = 0.0
    yardstick: dict = dataclasses.field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.status is RunStatus.FINISHED


class VideoRun:
    """One group of video points (see the module): ``VideoRun(points, ...).run()``."""

    def __init__(self, points: Sequence[Point], inputs: Sequence[Inputs], member_dirs: Sequence[Path | None],
                 group_dir: Path | None, extra: Sequence[dict], log: Callable[[str], None]):
        self.points, self.member_dirs, self.extra, self.log = list(points), list(member_dirs), list(extra), log
        self.s = points[0].structure
        self.v = self.s.video
        self.clip = load_clip(self.s)
        self.group_dir = Path(group_dir) if group_dir is not None else None
        self.state_dir = self.group_dir / STATE if self.group_dir else None
        self.flows = Flows(self.clip, self.s, self.group_dir / "flow" if self.group_dir else None)
        self.styles = [inp.styles for inp in inputs]
        self.chains = [Chain() for _ in points]
        self.done: list[tuple[int, int]] = []  # (pass, frame) finished, in order
        self.partial: dict[int, dict[int, tuple[int, MemberResult]]] = {}  # interrupted: member → frame → (pass, result)
        self.base: Group | None = None
        self.base = self.frame_group(0, range(len(self.points)))  # frame 0 of every point: the weights, metrics
        self.driver: Driver | None = None
        self._pass_groups: dict[tuple, Group] = {}

    # --- problems --------------------------------------------------------------------
    def frame_group(self, frame: int, members: Sequence[int], steps: int | None = None) -> Group:
        """The group of ``members`` (points) with ``frame`` as their content."""
        structure = self.s if steps is None else dataclasses.replace(self.s, steps=steps)
        inputs = [Inputs(np.asarray(self.clip.frames[frame]), self.styles[m]) for m in members]
        weights = self.base.weights if self.base is not None else None  # read once, for frame 0
        return build_group([self.points[m] for m in members], inputs, weights, structure)

    def fill(self) -> np.ndarray:
        """What a warped frame holds where the flow leaves it: the network's mean pixel."""
        mean = np.broadcast_to(np.asarray(self.base.weights.preprocessing.mean_rgb(), np.float32), (1, 1, 3))
        return colors.optimized(self.s.color, np.array(mean))[0, 0]

    def warped(self, pixels: np.ndarray, i: int, k: int) -> np.ndarray:
        """Frame k's optimised pixels (clipped to [0, 1]) warped into frame i."""
        return flow.warp(np.clip(pixels, 0.0, 1.0), self.flows(i, k)[0], self.fill())

    def temporal(self, m: int, i: int, neighbours: Sequence[int | None], results: dict[int, np.ndarray]) -> Temporal:
        """Member m's temporal targets at frame i: the results of ``neighbours`` (closest first;
        None or missing: weight 0) warped into frame i, with the long-term weights."""
        shape = self.clip.frames[i].shape[:2]
        channels = self.fill().shape[-1]
        warped, weights = [], []
        for k in neighbours:
            if k is None or k not in results:
                warped.append(np.zeros(shape + (channels,), np.float32))
                weights.append(np.zeros(shape, np.float32))
            else:
                warped.append(self.warped(results[k], i, k))
                weights.append(self.flows(i, k)[1])
        weights = flow.long_term_weights(weights)
        return Temporal(jnp.asarray(np.stack(warped)), jnp.asarray(np.stack(weights)[..., None].astype(np.float32)))

    def with_problems(self, group: Group, pixels: Sequence[np.ndarray | None], temporal: Sequence[Temporal]) -> Group:
        """``group`` with each member's initial pixels (None: the group's own) and temporal targets."""
        p = group.problems
        x0 = jnp.stack([p.pixels[n] if x is None else jnp.asarray(x) for n, x in enumerate(pixels)])
        t = jax.tree.map(lambda *leaves: jnp.stack(leaves), *temporal)
        return dataclasses.replace(group, problems=p._replace(pixels=x0, targets=p.targets._replace(temporal=t)))

    # --- driving ---------------------------------------------------------------------
    def drive(self, group: Group, key: str, resume: bool, start) -> dict[int, MemberResult]:
        """Optimise ``group`` (one frame, or one pass), checkpointing into video/KEY; the programs of
        one shape are compiled once for the whole video."""
        folder = self.state_dir / key if self.state_dir else None
        run = self.s.run
        if self.driver is None or len(self.driver.group.members) != len(group.members):
            self.driver = Driver(group, folder, [None] * len(group.members), checkpoint_every=run.checkpoint_every
                                 if folder else 0, max_members=run.max_members, memory_check=run.memory_check,
                                 progress=run.progress, log=self.log)
        self.driver.use(group, folder)
        return self.driver.run(lambda *_: None, resume, start)

    # --- state -------------------------------------------------------------------------
    def save(self, key: str, pixels: dict[tuple[int, int], np.ndarray]) -> None:
        """A finished frame or pass: its pixels (video/KEY.npz, member_frame → array) and the records."""
        if self.state_dir is None:
            return
        buf = io.BytesIO()
        np.savez(buf, **{f"{m}_{f}": x for (m, f), x in pixels.items()})
        write_bytes(self.state_dir / f"{key}.npz", buf.getvalue())
        data = {"done": self.done, "chains": [
            {"history": [list(r) for r in c.history], "rows": c.rows, "status": c.status.value, "reason": c.reason,
             "steps": c.steps, "evaluations": c.evaluations, "run_seconds": c.run_seconds,
             "compile_seconds": c.compile_seconds, "yardstick": c.yardstick} for c in self.chains]}
        outputs.write_json(self.state_dir / PROGRESS, data)
        shutil.rmtree(self.state_dir / key, ignore_errors=True)  # its checkpoint, now superseded
        if self.v.schedule == "parallel" and len(self.done) > 2:  # a pass needs only the last; two are kept
            (self.state_dir / f"{pass_key(self.done[-3][0])}.npz").unlink(missing_ok=True)

    def load(self) -> bool:
        """The records and pixels of an earlier, interrupted run of this group; False if none."""
        path = self.state_dir / PROGRESS if self.state_dir else None
        if path is None or not path.is_file():
            return False
        import json

        data = json.loads(path.read_text())
        self.done = [tuple(d) for d in data["done"]]
        for chain, c in zip(self.chains, data["chains"]):
            chain.history = [HistoryRow(*r) for r in c["history"]]
            chain.rows, chain.status, chain.reason = c["rows"], RunStatus(c["status"]), c["reason"]
            chain.steps, chain.evaluations = c["steps"], c["evaluations"]
            chain.run_seconds, chain.compile_seconds, chain.yardstick = (c["run_seconds"], c["compile_seconds"],
                                                                         c["yardstick"])
        for key in self.state_keys():
            with np.load(self.state_dir / f"{key}.npz") as arrays:
                for name in arrays.files:
                    m, f = (int(v) for v in name.split("_"))
                    self.chains[m].pixels[f] = arrays[name]
        return True

    def state_keys(self) -> list[str]:
        """The state files the pixels so far are in: every frame (sequential), the last pass (parallel)."""
        if self.v.schedule == "sequential":
            return [frame_key(f) for _, f in self.done]
        return [pass_key(self.done[-1][0])] if self.done else []

    # --- records -----------------------------------------------------------------------
    def record(self, m: int, frame: int, pass_: int, r: MemberResult, error: float | None) -> None:
        """Member m's result of one frame (and pass), with the frame's temporal error, into its chain."""
        c = self.chains[m]
        c.history += [row._replace(frame=self.clip.indices[frame], pass_=pass_) for row in r.history]
        last = r.history[-1]
        c.rows.append({"frame": self.clip.indices[frame], "pass": pass_, "steps": r.steps,
                       "evaluations": r.evaluations, "total": last.total, "content": last.content,
                       "style": last.style, "tv": last.tv, "temporal": last.temporal,
                       "temporal_error": "" if error is None else error,
                       "status": r.status.value})
        c.steps += r.steps
        c.evaluations += r.evaluations
        c.compile_seconds = max(c.compile_seconds, r.compile_seconds)  # one program serves every frame
        c.yardstick = r.yardstick
        if r.status is not RunStatus.FINISHED:
            c.status, c.reason = r.status, r.reason

    # --- the schedules ---------------------------------------------------------------------
    def run(self, resume: bool, start: Callable[[], None] | None) -> None:
        resumed = self.load() if resume else False
        started = [False]

        def start_once():
            if not started[0]:
                started[0] = True
                if start is not None:
                    start()

        if resumed:
            self.log(f"resuming {self.group_dir}: {len(self.done)} "
                     f"{'frames' if self.v.schedule == 'sequential' else 'passes'} done")
        if self.v.schedule == "sequential":
            self.sequential(start_once)
        else:
            self.parallel(start_once)

    def sequential(self, start) -> None:
        v = self.v
        first = len(self.done)
        for f in range(first, len(self.clip.frames)):
            members = [m for m, c in enumerate(self.chains) if c.running]
            if not members or SIGNALS.received is not None:
                return
            steps = v.first_frame_steps if f == 0 and v.first_frame_steps is not None else None
            group = self.frame_group(f, members, steps)
            pixels, temporal = [], []
            for m in members:
                results = self.chains[m].pixels
                previous = results.get(f - 1)
                if f > 0 and v.init == "prev_warped":
                    pixels.append(self.warped(previous, f, f - 1))
                elif f > 0 and v.init == "prev":
                    pixels.append(previous)
                else:
                    pixels.append(None)
                temporal.append(self.temporal(m, f, [f - j if f - j >= 0 else None for j in v.long_term], results))
            group = self.with_problems(group, pixels, temporal)
            key = frame_key(f)
            resume = self.state_dir is not None and (self.state_dir / key / "checkpoint" / "checkpoint.json").is_file()
            results = self.drive(group, key, resume, start)
            if self.interrupted(results, [(m, f) for m in members], 1):
                return
            new = {}
            for j, m in enumerate(members):
                self.chains[m].pixels[f] = new[(m, f)] = results[j].pixels
                self.record(m, f, 1, results[j], self.error(m, f))
                self.chains[m].run_seconds += results[j].run_seconds
            self.done.append((1, f))
            self.save(key, new)

    def parallel(self, start) -> None:
        v, count = self.v, len(self.clip.frames)
        for p in range(len(self.done) + 1, v.passes + 1):
            if SIGNALS.received is not None:
                return
            members = [(m, f) for m, c in enumerate(self.chains) if c.running for f in range(count)]
            if not members:
                return
            group = self.pass_group(members)
            step = -1 if p % 2 == 1 else 1  # odd passes look back, even ones ahead
            pixels, temporal = [], []
            for m, f in members:
                results = self.chains[m].pixels
                neighbours = [f + step * j if 0 <= f + step * j < count else None for j in v.long_term]
                if p == 1:
                    pixels.append(None)
                else:
                    x = results[f]
                    n = neighbours[0]
                    if n is None:
                        pixels.append(x)
                    else:
                        omega, c = self.warped(results[n], f, n), self.flows(f, n)[1][..., None]
                        delta = self.points[m].member.blend
                        pixels.append(((x + delta * c * omega) / (1 + delta * c)).astype(np.float32))
                use = p >= v.temporal_from_pass and p > 1
                temporal.append(self.temporal(m, f, neighbours if use else [None] * len(neighbours), results))
            group = self.with_problems(group, pixels, temporal)
            key = pass_key(p)
            resume = self.state_dir is not None and (self.state_dir / key / "checkpoint" / "checkpoint.json").is_file()
            results = self.drive(group, key, resume, start)
            if self.interrupted(results, members, p):
                return
            new = {}
            for j, (m, f) in enumerate(members):
                self.chains[m].pixels[f] = new[(m, f)] = results[j].pixels
            for j, (m, f) in enumerate(members):
                self.record(m, f, p, results[j], self.error(m, f))
            for m in {m for m, _ in members}:  # the frames of a pass ran as one program: its time once
                self.chains[m].run_seconds += max(r.run_seconds for j, r in results.items() if members[j][0] == m)
            self.done.append((p, -1))
            self.save(key, new)

    def interrupted(self, results: dict[int, MemberResult], members: Sequence[tuple[int, int]], pass_: int) -> bool:
        """Whether a signal stopped the frame or pass; if so each member's state so far is kept
        for its outputs (its checkpoint is in video/)."""
        if len(results) == len(members) and not any(r.status is RunStatus.INTERRUPTED for r in results.values()):
            return False
        for j, r in results.items():
            m, f = members[j]
            self.partial.setdefault(m, {})[f] = (pass_, r)
        return True

    def pass_group(self, members: Sequence[tuple[int, int]]) -> Group:
        """One group of every (point, frame) member (built once for a set of members)."""
        key = tuple(members)
        if key not in self._pass_groups:
            self._pass_groups = {key: self._stacked([self.frame_group(f, [m]) for m, f in members])}
        return self._pass_groups[key]

    @staticmethod
    def _stacked(groups: Sequence[Group]) -> Group:
        return dataclasses.replace(
            groups[0], members=[g.members[0] for g in groups],
            problems=jax.tree.map(lambda *a: jnp.concatenate(a), *[g.problems for g in groups]),
            yardstick_targets=jax.tree.map(lambda *a: jnp.concatenate(a), *[g.yardstick_targets for g in groups]))

    # --- outputs -------------------------------------------------------------------------
    def outputs(self, write: Callable[[int, Group, MemberResult, dict], None]) -> dict[int, MemberResult]:
        """Each member's frames, video.mp4, frames.csv and errors; then ``write(m, group, result,
        extra)`` for the files every run has."""
        results = {}
        interrupted = SIGNALS.received is not None and self.unfinished()
        for m, chain in enumerate(self.chains):
            shown = {f: self.output(m, f, x) for f, x in sorted(chain.pixels.items())}
            history, rows = list(chain.history), list(chain.rows)
            for f, (p, r) in sorted(self.partial.get(m, {}).items()):  # the frame or pass a signal stopped
                shown[f] = r.image
                history += [row._replace(frame=self.clip.indices[f], pass_=p) for row in r.history]
            if not shown:
                continue
            d = self.member_dirs[m]
            last_pass = max((r["pass"] for r in rows), default=1)
            errors = [r["temporal_error"] for r in rows if r["pass"] == last_pass and r["temporal_error"] != ""]
            status = RunStatus.INTERRUPTED if interrupted and chain.running else chain.status
            result = MemberResult(shown[max(shown)], history, status,
                                  chain.reason if status is chain.status else "stopped by a signal",
                                  chain.steps, chain.evaluations, chain.yardstick, chain.run_seconds,
                                  chain.compile_seconds)
            mean_error = float(np.mean(errors)) if errors else float("nan")
            extra = {**self.extra[m], "frames": len(shown), "frame_indices": [self.clip.indices[f] for f in shown],
                     "fps": self.clip.fps, "schedule": self.v.schedule, "temporal_error": mean_error,
                     "passes": last_pass}
            if d is not None:
                for f, img in shown.items():
                    images.save_image(d / "frames" / f"{self.clip.indices[f]:06d}.png", img)
                frames.write_video(d / "video.mp4", list(shown.values()), self.clip.fps)
                write_frames_csv(d / "frames.csv", rows)
                write(m, self.base, result, extra)
            results[m] = result
        return results

    def unfinished(self) -> bool:
        total = len(self.clip.frames) if self.v.schedule == "sequential" else self.v.passes
        return len(self.done) < total

    def output(self, m: int, f: int, pixels: np.ndarray) -> np.ndarray:
        """Frame f's RGB output image from member m's optimised pixels (colour control with the frame)."""
        return colors.finish(self.s.color, pixels, self.clip.frames[f])

    def error(self, m: int, f: int) -> float | None:
        """The temporal error of member m's frame f with frame f − 1 (their output images; None for
        the first frame, :func:`nstjax.flow.temporal_error`)."""
        pixels = self.chains[m].pixels
        if f == 0 or f - 1 not in pixels:
            return None
        flow_, weights = self.flows(f, f - 1)
        warped = flow.warp(self.output(m, f - 1, pixels[f - 1]), flow_, self.fill_rgb())
        return flow.temporal_error(self.output(m, f, pixels[f]), warped, weights)

    def fill_rgb(self) -> tuple:
        return self.base.weights.preprocessing.mean_rgb()


def frame_key(f: int) -> str:
    return f"frame_{f:06d}"


def pass_key(p: int) -> str:
    return f"pass_{p:03d}"


def write_frames_csv(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FRAMES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def run_group(points: Sequence[Point], inputs: Sequence[Inputs], member_dirs: Sequence[Path | None],
              group_dir: Path | None, resume: bool, extra: Sequence[dict], start, log,
              write: Callable[[int, Group, MemberResult, dict], None]) -> dict[int, MemberResult]:
    """Optimise a group of video points (see the module); returns each member's result."""
    run = VideoRun(points, inputs, member_dirs, group_dir, extra, log)
    t0 = time.perf_counter()
    run.run(resume, start)
    log(f"video: {len(run.clip.frames)} frames, {len(run.done)} "
        f"{'frames' if run.v.schedule == 'sequential' else 'passes'} in {time.perf_counter() - t0:.1f} s")
    return run.outputs(write)
