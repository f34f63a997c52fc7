"""Batched sweeps: the points of a Hydra multirun grouped by structure, a group per job.

    points (Hydra's overrides, composed) ─► validate each ─► group by structure
    ─► SWEEP_DIR/groups.yaml ─► one job per group (Hydra's launcher) ─► SWEEP_DIR/N/ per point
    ─► sweep.csv, sheet.png, tradeoff.png

Point N's directory is ``SWEEP_DIR/N`` (N as Hydra's basic sweeper numbers it)
and holds what a single run writes; group G's job runs in ``SWEEP_DIR/groups/G``,
where its checkpoint lives. A group job that finds its checkpoint continues from
it (a requeued SLURM job, ``resume=SWEEP_DIR``); finished groups are not rerun.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from nstjax import checkpoint, config, rundir, spec
from nstjax.atomic import atomic_path, write_text
from nstjax.build import Inputs, check_arch, group_key, validate
from nstjax.errors import UserError
from nstjax.status import SIGNALS, RunStatus
from nstjax.transfer import run_group
from nstjax.weights import load_weights

PLAN = "groups.yaml"
MULTIRUN = "multirun.yaml"
"""Hydra's config of the whole sweep, as its basic launcher writes it."""
SUMMARY_COLUMNS = ("total", "content", "style", "tv", "yardstick_content", "yardstick_style", "status",
                   "steps", "loss_evaluations", "group", "run_seconds")
"""sweep.csv's columns after ``n`` and the swept keys."""
VIDEO_COLUMNS = ("temporal", "temporal_error")
"""sweep.csv's further columns in a sweep of videos (nstjax.video)."""


@dataclasses.dataclass
class Point:
    """One point of a sweep: Hydra's number, its overrides, its swept values, its config (what its
    config.yaml holds), and, once planned, its parse and its inputs."""

    n: int
    overrides: list[str]
    values: dict[str, str]
    cfg: DictConfig
    parsed: spec.Point | None = None
    inputs: Inputs | None = None


def plan(points: Sequence[Point]) -> list[list[Point]]:
    """Parse and validate every point and read each weights file the points name (a bad one is
    refused, naming it) and group them (:func:`nstjax.build.group_key`)."""
    groups: dict[tuple, list[Point]] = {}
    read: set = set()
    for p in points:
        try:
            p.parsed = spec.parse(p.cfg)
            p.inputs = validate(p.parsed)
            model = p.parsed.structure.model
            if model not in read:
                check_arch(model, load_weights(model.weights, preprocessing=model.preprocessing).arch)
                read.add(model)
        except UserError as e:
            raise UserError(f"sweep point {p.n} ({' '.join(p.overrides)}): {e}") from e
        groups.setdefault(group_key(p.parsed, p.inputs), []).append(p)
    return list(groups.values())


def member_dir(sweep_dir: Path, n: int) -> Path:
    return Path(sweep_dir) / str(n)


def group_dir(sweep_dir: Path, g: int) -> Path:
    return Path(sweep_dir) / "groups" / str(g)


def write_plan(sweep_dir: Path, swept: Sequence[str], groups: Sequence[Sequence[Point]]) -> None:
    """SWEEP_DIR/groups.yaml: the swept keys and, per group, each member's number, overrides,
    swept values and resolved config (what the group's job runs)."""
    data = {"swept": list(swept), "groups": [
        [{"n": p.n, "overrides": p.overrides, "values": p.values,
          "config": OmegaConf.to_container(p.cfg, resolve=True, enum_to_str=True)} for p in group]
        for group in groups]}
    write_text(Path(sweep_dir) / PLAN, OmegaConf.to_yaml(OmegaConf.create(data)))


def read_plan(sweep_dir: Path) -> DictConfig:
    path = Path(sweep_dir) / PLAN
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {PLAN})")
    return OmegaConf.load(path)


def job_overrides(groups: Sequence[Sequence[Point]]) -> list[list[str]]:
    """Each group's job: its first member's overrides, the group, and the group's directory."""
    return [[*group[0].overrides, f"sweep_group={g}", f"hydra.sweep.subdir=groups/{g}"]
            for g, group in enumerate(groups)]


def is_sweep(path: Path) -> bool:
    return (Path(path) / PLAN).is_file()


def status(run_dir: Path) -> RunStatus:
    """A point's (or a run's) status from its metrics.json: pending before it has one."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return RunStatus.PENDING
    return RunStatus(OmegaConf.load(path).status)


def run_group_job(sweep_dir: Path, g: int, log: Callable[[str], None] = print,
                  start: Callable[[], None] = lambda: None) -> list[str]:
    """Run group ``g`` of the sweep in ``sweep_dir``, continuing from its checkpoint if it has
    one; a group whose members are all done, or a process that has received a stop signal,
    runs nothing. Once the group is ready to step, each new member's config files are written
    and ``start()`` is called. Returns the members' statuses."""
    members = read_plan(sweep_dir).groups[g]
    dirs = [member_dir(sweep_dir, m.n) for m in members]
    if SIGNALS.received is None and not all(status(d).final for d in dirs):
        gdir = group_dir(sweep_dir, g)
        resume = (gdir / checkpoint.CHECKPOINT_DIR / checkpoint.META).is_file()
        cfgs = [config.from_container(m.config) for m in members]

        def started() -> None:
            if not resume:
                for m, cfg, d in zip(members, cfgs, dirs):
                    write_text(d / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
                    write_text(d / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
                    write_text(d / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(list(m.overrides)))
            start()

        run_group(cfgs, dirs, gdir, resume=resume, log=log, start=started,
                  extra_metrics=[{"n": int(m.n), "group": g, "swept": OmegaConf.to_container(m["values"])} for m in members])
    return [str(status(d)) for d in dirs]


def discard_unstarted(sweep_dir: Path, keep: Path) -> None:
    """Remove a sweep of which no point has started (its plan and multirun.yaml), and the
    directories made for it up to ``keep``; a sweep with a point's directory stays."""
    sweep_dir = Path(sweep_dir)
    if any(member_dir(sweep_dir, m.n).exists() for g in read_plan(sweep_dir).groups for m in g):
        return
    for name in (PLAN, MULTIRUN):
        (sweep_dir / name).unlink(missing_ok=True)
    rundir.discard(sweep_dir, keep)


def resume(sweep_dir: Path, log: Callable[[str], None] = print) -> int:
    """Continue the sweep in ``sweep_dir`` in this process, group after group; return its exit code."""
    plan_ = read_plan(sweep_dir)
    for g in range(len(plan_.groups)):
        run_group_job(sweep_dir, g, log)
    return exit_code(summarize(sweep_dir))


def summarize(sweep_dir: Path) -> list[dict]:
    """sweep.csv, sheet.png and tradeoff.png from the points' directories; returns the rows."""
    sweep_dir = Path(sweep_dir)
    plan_ = read_plan(sweep_dir)
    rows, video = [], False
    for g, members in enumerate(plan_.groups):
        for m in members:
            d = member_dir(sweep_dir, m.n)
            row = {"n": int(m.n), **{k: m["values"].get(k, "") for k in plan_.swept}}
            metrics = OmegaConf.to_container(OmegaConf.load(d / "metrics.json")) \
                if (d / "metrics.json").is_file() else {}
            final = metrics.get("yardstick", {}).get("final", {})
            row.update({k: metrics.get(k, "") for k in SUMMARY_COLUMNS},
                       yardstick_content=final.get("content", ""), yardstick_style=final.get("style_mean", ""),
                       status=metrics.get("status", RunStatus.PENDING.value), group=g)
            row.update({k: metrics.get(k, "") for k in VIDEO_COLUMNS})
            video = video or "temporal_error" in metrics
            rows.append(row)
    rows.sort(key=lambda r: r["n"])
    buf = io.StringIO()
    columns = ["n", *plan_.swept, *SUMMARY_COLUMNS, *(VIDEO_COLUMNS if video else ())]
    writer = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "sweep.csv", buf.getvalue())
    done = [r for r in rows if (member_dir(sweep_dir, r["n"]) / "result.png").is_file()]
    if done:
        contact_sheet(sweep_dir / "sheet.png", sweep_dir, done, list(plan_.swept))
        tradeoff_plot(sweep_dir / "tradeoff.png", [r for r in done if r["yardstick_content"] != ""], list(plan_.swept))
    return rows


def exit_code(rows: Sequence[dict]) -> int:
    """0 when every point finished; 130 / 143 when a signal stopped the sweep; 3 when a point
    diverged."""
    statuses = [RunStatus(r["status"]) for r in rows]
    unfinished = [s for s in statuses if not s.final] or [s for s in statuses if s is RunStatus.DIVERGED]
    return unfinished[0].exit_code(SIGNALS.received) if unfinished else 0


def contact_sheet(path: Path, sweep_dir: Path, rows: Sequence[dict], swept: Sequence[str]) -> None:
    """The results in a grid (:func:`nstjax.sheet.grid_sheet`): a column per value of the first
    swept key, a row per value of the others, each labelled once."""
    from PIL import Image

    from nstjax.sheet import grid_sheet

    tiles = [Image.open(member_dir(sweep_dir, r["n"]) / "result.png") for r in rows]
    with atomic_path(path) as tmp:
        grid_sheet(tiles, rows, list(swept)).image.save(tmp, format="PNG")


def tradeoff_plot(path: Path, rows: Sequence[dict], swept: Sequence[str]) -> None:
    """Content yardstick against style yardstick, a marker per point, the legend its swept values
    (:func:`nstjax.sheet.tradeoff_figure`)."""
    import matplotlib.pyplot as plt

    from nstjax.sheet import tradeoff_figure

    fig = tradeoff_figure(rows, list(swept), [float(r["yardstick_style"]) for r in rows],
                          [float(r["yardstick_content"]) for r in rows])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
