"""Style transfer for a batch of points: parse ─► build ─► drive ─► the files of each point.

    from nstjax import config, transfer
    cfgs = [config.compose(["+experiment=preview", f"loss.beta={b}"]) for b in (1e3, 1e4)]
    results = transfer.optimize(cfgs)        # one MemberResult per config: image, history, ...

:func:`optimize` returns the results without writing files; :func:`run_group`
writes into each member's directory what a run leaves there (result.png,
metrics.json, history.csv, loss_curve.png, snapshots). A single run is a group
of one: the same code path. Both take composed configs, parsed at their door
(:func:`nstjax.spec.parse`), or points already parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from nstjax import images, outputs, pyramid, track
from nstjax.build import Group, Inputs, Member, build_group, group_key, level_inputs, validate
from nstjax.driver import Driver, MemberResult
from nstjax.errors import UserError
from nstjax.spec import Point, parse
from nstjax.status import RunStatus


def points_of(configs: Sequence) -> list[Point]:
    """Configs parsed at the door (points already parsed pass as they are)."""
    return [c if isinstance(c, Point) else parse(c) for c in configs]


def level_groups(points: Sequence[Point], inputs: Sequence[Inputs] | None = None) -> list[Group]:
    """The group of each pyramid level (:mod:`nstjax.pyramid`), smallest first; one level, the
    points' own group, without a pyramid."""
    inputs = list(inputs) if inputs is not None else [validate(p) for p in points]
    levels = pyramid.levels(points[0].structure)
    if len(levels) == 1:
        return [build_group(points, inputs)]
    groups: list[Group] = []
    for level in levels:  # the weights read once, for the first level
        groups.append(build_group(points, [level_inputs(p, level, inp) for p, inp in zip(points, inputs)],
                                  groups[0].weights if groups else None, level))
    return groups


def _driver(levels: Sequence[Group], group_dir: Path | None, member_dirs: Sequence[Path | None], log,
            observer=None) -> Driver:
    run = levels[-1].structure.run
    return Driver(levels[-1], group_dir, member_dirs, save_every=run.save_every if group_dir else 0,
                  checkpoint_every=run.checkpoint_every if group_dir else 0, max_members=run.max_members,
                  memory_check=run.memory_check, progress=run.progress, earlier_levels=levels[:-1], log=log,
                  observer=observer)


def optimize(configs: Sequence, inputs: Sequence[Inputs] | None = None,
             log: Callable[[str], None] = print) -> list[MemberResult]:
    """Optimise every config or point (grouped by structure, each group one batched program) and
    return their results in order; nothing is written. ``inputs`` may give each one's images as
    arrays (:class:`~nstjax.build.Inputs`) instead of its files."""
    points = points_of(configs)
    inputs = list(inputs) if inputs is not None else [validate(p) for p in points]
    if points[0].structure.video.enabled:
        from nstjax import video

        done = video.run_group(points, inputs, [None] * len(points), None, False, [{} for _ in points], None, log,
                               lambda *_: None)
        return [done.get(i) for i in range(len(points))]
    groups: dict[tuple, list[int]] = {}
    for i, (point, inp) in enumerate(zip(points, inputs)):
        groups.setdefault(group_key(point, inp), []).append(i)
    results: list[MemberResult | None] = [None] * len(points)
    for index in groups.values():
        levels = level_groups([points[i] for i in index], [inputs[i] for i in index])
        done = _driver(levels, None, [None] * len(index), log).run(lambda *_: None)
        for j, r in done.items():
            results[index[j]] = r
    return results


def run_group(configs: Sequence, member_dirs: Sequence[Path], group_dir: Path, *,
              resume: bool = False, inputs: Sequence[Inputs] | None = None,
              extra_metrics: Sequence[dict] | None = None, start: Callable[[], None] | None = None,
              log: Callable[[str], None] = print) -> dict[int, MemberResult]:
    """Optimise a group of configs (or points) of one structure, writing each member's files into its
    directory and the group's checkpoints into ``group_dir``. A directory that already
    holds a result is refused unless ``resume``. Nothing is written before everything is checked
    (inputs, weights, memory; on resume the checkpoint): then ``start()`` is called. Returns the
    results of the members run."""
    member_dirs = [Path(d) for d in member_dirs]
    points = points_of(configs)
    extra = list(extra_metrics) if extra_metrics is not None else [{} for _ in points]
    if points[0].structure.video.enabled:
        return _run_video(points, member_dirs, Path(group_dir), resume, inputs, extra, start, log)
    if not resume:
        for d in member_dirs:
            if (d / "result.png").exists():
                raise UserError(f"{d / 'result.png'} exists: every run needs its own directory")
    outputs.preload_plotting()
    levels = level_groups(points, inputs)
    group = levels[-1]
    observer = _observer(group.structure, member_dirs, log, ["level"] if len(levels) > 1 else [])

    def write(index: list[int], results: list[MemberResult]) -> None:
        for i, r in zip(index, results):
            facts = write_outputs(member_dirs[i], group, group.members[i], r, extra[i])
            if r.status is RunStatus.FINISHED and (why := not_improved(improvement(group, i, r))):
                log(f"warning: {member_dirs[i]}: {why}")
            if observer is not None:
                observer.finish(i, track.hparams_of(points[i].member, extra[i].get("swept")), facts, r.image)

    return _driver(levels, group_dir, member_dirs, log, observer).run(write, resume, start)


def _observer(structure, member_dirs: Sequence[Path], log, extra: Sequence[str]):
    """The members' trackers (tracking=[...], :mod:`nstjax.track`), or None."""
    return track.Observer(structure.run.tracking, member_dirs, log, extra) if structure.run.tracking else None


def _run_video(points: Sequence[Point], member_dirs: list[Path], group_dir: Path, resume: bool,
               inputs: Sequence[Inputs] | None, extra: list[dict], start, log) -> dict[int, MemberResult]:
    """A group of video points (:mod:`nstjax.video`): resumed when the group directory holds a video's state."""
    from nstjax import video

    resume = resume or video.has_state(group_dir)
    if not resume:
        for d in member_dirs:
            if (d / "result.png").exists():
                raise UserError(f"{d / 'result.png'} exists: every run needs its own directory")
    inputs = list(inputs) if inputs is not None else [validate(p) for p in points]
    outputs.preload_plotting()
    observer = _observer(points[0].structure, member_dirs, log, ["frame", "pass"])

    def write(m: int, group: Group, r: MemberResult, facts: dict) -> None:
        metrics = write_outputs(member_dirs[m], group, group.members[m], r, facts)
        if observer is not None:  # a video's rows are known once its frames are
            observer.rows(m, r.history, 0)
            observer.finish(m, track.hparams_of(points[m].member, facts.get("swept")), metrics, r.image)

    return video.run_group(points, inputs, member_dirs, group_dir, resume, extra, start, log, write)


UNCHANGED = 0.5 / 255
"""A result whose pixels moved by less than this on average (half a grey level) is unchanged."""


def improvement(group: Group, i: int, r: MemberResult) -> dict:
    """Whether member ``i``'s run did anything: ``loss_ratio`` = its final total over its first
    (at its last pyramid level), ``pixel_change`` = mean |result − initial image| in [0, 1], and
    ``improved`` = the loss fell and the image changed (a grey image never passes silently)."""
    rows = [h for h in r.history if h.level == r.history[-1].level]
    ratio = rows[-1].total / rows[0].total if rows[0].total > 0 else float("nan")
    start = group.output_image(i, np.asarray(group.problems.pixels[i]))
    if start.shape != r.image.shape:  # interrupted at a smaller pyramid level
        start = images.resize_to(start, *r.image.shape[:2])
    change = float(np.mean(np.abs(np.asarray(r.image, np.float64) - start)))
    return {"improved": bool(ratio < 1.0 and change >= UNCHANGED), "loss_ratio": ratio, "pixel_change": change}


def not_improved(facts: dict) -> str | None:
    """The warning for a run that did not improve, else None."""
    if facts["improved"]:
        return None
    if facts["pixel_change"] < UNCHANGED:
        return (f"the image is nearly unchanged (mean pixel change {facts['pixel_change']:.2g}): the result is "
                "not stylised; raise optim.steps, optim.lr or loss.beta")
    return (f"the loss did not fall (final / initial = {facts['loss_ratio']:.3g}): the result is not "
            "stylised; lower optim.lr, or use optim.linesearch=zoom or optim=adam")


def metrics(group: Group, member: Member, r: MemberResult) -> dict:
    """metrics.json of one member."""
    s, last = group.structure, r.history[-1]
    out = {
        **{name: getattr(last, name) for name in ("total", "content", "style", "tv", "temporal")},
        "status": r.status.value,
        "reason": r.reason,
        "steps": r.steps,
        "loss_evaluations": r.evaluations,
        "compile_seconds": r.compile_seconds,
        "run_seconds": r.run_seconds,
        "image_size": [int(s) for s in r.image.shape[:2]],
        "style_size": _one_or_all([[int(s) for s in style.shape[:2]] for style in member.styles]),
        "optimizer": s.optimizer,
        "conv": group.model.conv,
        "remat": group.model.remat,
        "precision": group.model.precision,
        "content_image": member.paths[0],
        "style_image": _one_or_all(member.paths[1]),
        "style_blend_weights": [float(w) for w in member.blend],
        "weights": s.model.weights,
        "weights_sha256": group.weights.sha256,
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.local_device_count(),
        "members": len(group.members),
        "platform": jax.default_backend(),
        "seed": member.spec.seed,
        **improvement(group, next(i for i, m in enumerate(group.members) if m is member), r),
        "yardstick": r.yardstick,
        "versions": outputs.versions(),
    }
    if r.levels:
        out["levels"] = [level.to_json() for level in r.levels]
    if r.status is RunStatus.DIVERGED:
        out["diverged_step"] = r.steps + 1
    return out


def _one_or_all(values: list):
    """One style image's value as it is, several as a list."""
    return values[0] if len(values) == 1 else values


def write_outputs(run_dir: Path, group: Group, member: Member, r: MemberResult, extra: dict) -> dict:
    """result.png, history.csv, metrics.json and loss_curve.png of one member; returns metrics.json's facts."""
    facts = {**metrics(group, member, r), **extra}
    images.save_image(run_dir / "result.png", r.image)
    outputs.write_history(run_dir / "history.csv", r.history)
    outputs.write_json(run_dir / "metrics.json", facts)
    outputs.plot_history(run_dir / "loss_curve.png", r.history, title=group.structure.model.weights)
    return facts
