"""Driving a group's compiled program: waves, chunks, and the hooks between chunks.

    group ─► waves of members that fit in memory ─► compiled init + chunk (members sharded
    over the local devices) ─► chunks until every member is done ─► results per member

Between chunks (``for hook in hooks: hook(state, rows)``): the progress bar, the
history of each member, snapshots, periodic checkpoints. SIGINT / SIGTERM are
turned into a flag read between chunks: every member's current image, history
and metrics are written, with one checkpoint for the group, and the run stops.

With the zoom line search each step waits for the slowest member's line search
(a vmapped while loop); each member still counts its own evaluations. A member
that diverges stops alone, keeping its last finite image, while the others go on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from jax.sharding import NamedSharding, PartitionSpec as P

from nstjax import checkpoint, images, outputs, programs, pyramid
from nstjax.build import Group
from nstjax.checkpoint import CheckpointMeta, Earlier, LevelResult
from nstjax.errors import UserError
from nstjax.optimize import MEMBERS, HistoryRow, LoopState, Program, Status, average, member_mesh
from nstjax.status import SIGNALS, RunStatus
from nstjax.yardstick import as_metrics, yardstick

@dataclasses.dataclass
class MemberResult:
    """What one member ends with: its image, history and the facts metrics.json records."""

    image: np.ndarray
    history: list[HistoryRow]
    status: RunStatus
    reason: str | None
    steps: int
    evaluations: int
    yardstick: dict
    run_seconds: float
    compile_seconds: float
    levels: list[LevelResult] = dataclasses.field(default_factory=list)  # with a pyramid: each level's facts
    pixels: np.ndarray | None = None  # the optimised pixels the image is made of (colour control's space)

    @property
    def exit_code(self) -> int:
        return self.status.exit_code(SIGNALS.received)


def program_bytes(compiled) -> int:
    """Memory a compiled program needs while it runs: arguments, temporaries and
    outputs not aliased to (donated) arguments, as XLA plans them."""
    ma = compiled.memory_analysis()
    if ma is None:
        return 0
    return (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
            - ma.alias_size_in_bytes)


def free_memory_bytes() -> int | None:
    """Memory free for this run on the default device: available RAM on a CPU; on an accelerator
    the allocator's limit less what is in use, and with the device shared (preallocation off,
    see :func:`nstjax.run.share_the_device`) no more than the GPU has free (nvidia-smi)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return psutil.virtual_memory().available
    shared = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0")
    return accelerator_free(device.memory_stats(), gpu_free_bytes() if shared and device.platform == "gpu" else None)


def accelerator_free(stats: dict | None, device_free: int | None) -> int | None:
    """What this process can still allocate: its allocator's ``bytes_limit − bytes_in_use``, and at
    most what the device has free (other processes' memory included) when that is known."""
    if not stats or "bytes_limit" not in stats:
        return device_free
    own = stats["bytes_limit"] - stats["bytes_in_use"]
    return own if device_free is None else min(own, device_free)


def gpu_free_bytes() -> int | None:
    """The least free memory over the visible GPUs as nvidia-smi reports it (other processes'
    allocations included), or None without nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = ["--id=" + visible] if visible and all(v.strip().isdigit() for v in visible.split(",")) else []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", *ids],
                             capture_output=True, text=True, timeout=20)
        values = [int(v) for v in out.stdout.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return min(values) * 2**20 if out.returncode == 0 and values else None


def check_memory(programs, optimizer_state_bytes: int, remat: bool, free: int | None = None) -> None:
    """Refuse, before it starts, a run that needs more memory than is free."""
    need = max(program_bytes(p) for p in programs)
    free = free_memory_bytes() if free is None else free
    if free is None or need <= free:
        return
    gib = 2.0**30
    remedies = "lower image.size, " + ("" if remat else "set model.remat=on, ")
    raise UserError(
        f"this run needs about {need / gib:.1f} GiB ({optimizer_state_bytes / gib:.1f} GiB of it "
        f"optimiser state) but {free / gib:.1f} GiB is free: {remedies}use a smaller "
        "optim.memory_size (L-BFGS keeps 2·memory_size images) or optim=adam; "
        "memory_check=false runs it anyway"
    )


def _tree_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@jax.jit
def _take(tree, index):
    """Members ``index`` of a batch (padding by repeating members is an index too), in one program."""
    return jax.tree.map(lambda a: a[index], tree)


@dataclasses.dataclass
class Programs:
    """A batch size's compiled programs: the loop's init and chunk, the yardstick, compile time."""

    program: Program
    yardstick: object
    seconds: float


class Driver:
    """Runs one group: ``Driver(group, ...).run()`` returns a :class:`MemberResult` per member.

    ``group_dir`` holds the group's checkpoint; ``member_dirs`` get each member's
    snapshots (None for both: no files). ``max_members`` caps the members per program; the memory check
    (``memory_check``) picks the largest batch that fits, a multiple of the device count.
    ``earlier_levels`` are the groups of a pyramid's levels below ``group`` (the last level).
    ``observer`` gets each member's history rows after each chunk and its snapshots
    (:class:`nstjax.track.Observer`).
    """

    def __init__(self, group: Group, group_dir: Path | None, member_dirs: Sequence[Path | None], *,
                 save_every: int = 0, checkpoint_every: int = 0, max_members: int | None = None,
                 memory_check: bool = True, progress: bool = False, earlier_levels: Sequence[Group] = (),
                 log: Callable[[str], None] = print, observer=None):
        self.levels = [*earlier_levels, group]  # the pyramid's levels (nstjax.pyramid), smallest first
        self.member_dirs = member_dirs
        self.group_dir = Path(group_dir) if group_dir is not None else None
        self.save_every, self.checkpoint_every = save_every, checkpoint_every
        self.max_members, self.memory_check, self.progress = max_members, memory_check, progress
        self.log = log
        self.observer = observer  # rows(n, rows, first) and image(n, name, img) of each member as they come (nstjax.track)
        self._start: Callable[[], None] | None = None
        self.mesh = member_mesh()
        self.devices = self.mesh.size
        self.members = NamedSharding(self.mesh, P(MEMBERS))
        # the weights are one file for every level (nstjax.transfer.level_groups): one copy on the devices
        self.params = jax.device_put(group.params, NamedSharding(self.mesh, P()))
        self._programs: dict[tuple[int, int], Programs] = {}

    @property
    def group(self) -> Group:
        """The last level's group: the run's members, their outputs."""
        return self.levels[-1]

    def use(self, group: Group, group_dir: Path | None) -> None:
        """Run ``group`` next, checkpointing into ``group_dir``: a group of the same structure (but its
        step counts) and shapes as this driver's, whose compiled programs serve it (a video's frames,
        :mod:`nstjax.video`)."""
        self.levels[-1] = group
        self.group_dir = Path(group_dir) if group_dir is not None else None

    # --- programs and waves ------------------------------------------------------------
    def _wave_problems(self, level: int, index: Sequence[int], size: int):
        padded = jnp.asarray(list(index) + [index[-1]] * (size - len(index)))
        group = self.levels[level]
        return (jax.device_put(_take(group.problems, padded), self.members),
                jax.device_put(_take(group.yardstick_targets, padded), self.members))

    def programs(self, level: int, size: int) -> Programs:
        """Level ``level``'s programs for batches of ``size`` members (compiled once)."""
        key = (level, size)
        if key not in self._programs:
            t0 = time.perf_counter()
            problems, yards = self._wave_problems(level, [0], size)
            group, params = self.levels[level], self.params
            program = group.loop.compile(problems, params, self.mesh, group.program_key)
            rgb = jax.ShapeDtypeStruct(problems.pixels.shape[:-1] + (3,), jnp.float32, sharding=self.members)
            measure = programs.compile("yardstick", jax.vmap(functools.partial(yardstick, group.model),
                                                             in_axes=(None, 0, 0)),
                                       (params, rgb, yards), group.model, self.mesh)
            self._programs[key] = Programs(program, measure, time.perf_counter() - t0)
        return self._programs[key]

    def wave_size(self) -> int:
        """The largest batch (a multiple of the device count, at most ``max_members`` rounded up
        to it) whose programs (of the last, largest level) fit in free memory; one device's worth
        must fit."""
        k, last = len(self.group.members), len(self.levels) - 1
        per = self.devices
        size = per * math.ceil(min(k, self.max_members or k) / per)
        while True:
            compiled = self.programs(last, size)
            if not self.memory_check:
                return size
            try:
                check_memory((compiled.program.init, compiled.program.chunk, compiled.yardstick),
                             _tree_bytes(compiled.program.state.opt_state) // self.devices,
                             self.group.model.remat)
                return size
            except UserError:
                if size <= per:
                    raise
                self._programs.pop((last, size))
                size = per * max(1, (size // per) // 2)

    # --- the run -----------------------------------------------------------------------
    def run(self, write: Callable[[list[int], list[MemberResult]], None],
            resume: bool = False, start: Callable[[], None] | None = None) -> dict[int, MemberResult]:
        """Optimise every member, wave by wave; ``write(index, results)`` is called after each
        wave (and on a signal) with the members' results. With ``resume``, continue from the
        group's checkpoint: the waves before it are done. ``start()`` is called once the first
        wave is ready to step (compiled, its memory checked, its checkpoint loaded), before
        anything else is written. Returns the results of this call."""
        self._start = start
        meta = checkpoint.read_meta(self.group_dir) if resume else None
        size = meta.wave_size if meta else self.wave_size()
        k = len(self.group.members)
        waves = [list(range(i, min(i + size, k))) for i in range(0, k, size)]
        if len(waves) > 1:
            self.log(f"{k} members in {len(waves)} waves of at most {size} (the largest batch that fits"
                     + (f", at most max_members={self.max_members}" if self.max_members else "") + ")")
        results = {}
        first = meta.wave if meta else 0
        for w in range(first, len(waves)):
            wave_results = self._run_wave(waves[w], size, w, meta if w == first else None)
            write(waves[w], wave_results)
            results.update(zip(waves[w], wave_results))
            if SIGNALS.received is not None:
                break
        return results

    def _run_wave(self, index: list[int], size: int, wave: int, meta: CheckpointMeta | None) -> list[MemberResult]:
        """The wave's members through every pyramid level (one level without a pyramid): each
        level from the previous level's pixels upsampled, members that diverged kept stopped.
        A checkpoint names its level and carries what the earlier levels left."""
        first = meta.level if meta else 0
        earlier = meta.earlier if meta else Earlier.none(size)
        previous = None  # the last level's final state, on the host
        for k in range(first, len(self.levels)):
            run = self._run_level(index, size, wave, meta if k == first else None, previous, k, earlier)
            earlier = earlier.then(run.histories, run.results, run.initial)
            interrupted = SIGNALS.received is not None and any(
                r.status is RunStatus.INTERRUPTED for r in run.results[:len(index)])
            last = k == len(self.levels) - 1
            if len(self.levels) > 1 and not interrupted:
                for i, n in enumerate(index):
                    if self.member_dirs[n] is not None:
                        images.save_image(Path(self.member_dirs[n]) / "levels" / f"level_{k}.png",
                                          self.levels[k].output_image(n, average(run.host)[i]))
            if last or interrupted:
                break
            previous = run.host
        return [self._result(index[i], run, i, earlier) for i in range(len(index))]

    def _result(self, n: int, run: "LevelRun", i: int, earlier: Earlier) -> MemberResult:
        """Member ``n`` (row ``i`` of the wave) over its levels."""
        levels, level = earlier.levels[i], earlier.levels[i][-1]
        pixels = np.asarray(average(run.host)[i])
        return MemberResult(
            self.levels[run.level].output_image(n, pixels), list(earlier.histories[i]),
            level.status, level.reason, sum(x.steps for x in levels), sum(x.loss_evaluations for x in levels),
            {"initial": earlier.initial[i], "final": as_metrics(_member(run.final, i))},
            sum(x.run_seconds for x in levels), sum(x.compile_seconds for x in levels),
            levels if len(self.levels) > 1 else [], pixels)

    def _run_level(self, index: list[int], size: int, wave: int, meta: CheckpointMeta | None,
                   previous: LoopState | None, level: int, earlier: Earlier) -> "LevelRun":
        """One level of the wave: its final state on the host, the members' history rows, the initial
        (at the first level) and final yardsticks, and each member's :class:`LevelResult`."""
        group, params = self.levels[level], self.params
        s = group.structure
        compiled = self.programs(level, size)
        problems, yards = self._wave_problems(level, index, size)
        if previous is not None:  # start from the level below, upsampled; stopped members stay stopped
            pixels = pyramid.upsample(average(previous), tuple(problems.pixels.shape[1:3]))
            problems = problems._replace(pixels=jax.device_put(pixels, self.members))
        t_run = time.perf_counter()
        state = compiled.program.init(problems, params)
        if previous is not None:
            stopped = jnp.asarray(previous.status) != Status.RUNNING
            state = state._replace(status=jax.device_put(jnp.where(stopped, previous.status, state.status),
                                                         self.members))
        histories = [[_row(state, i, level)] for i in range(size)]
        seconds_before = 0.0
        if meta is not None:
            state = checkpoint.load(self.group_dir, state, self.members)
            histories = [list(h) for h in meta.histories]
            seconds_before = meta.run_seconds
            self.log(f"resuming {self.group_dir} at step {int(np.max(np.asarray(state.step)))}"
                     + (f" of level {level}" if len(self.levels) > 1 else ""))
        start, self._start = self._start, None
        if start is not None:
            start()

        def observe(new: list) -> None:  # the rows, each at its index in the member's run (levels continue it)
            if self.observer is not None:
                for i, n in enumerate(index):
                    if new[i]:
                        first = len(earlier.histories[i]) + len(histories[i]) - len(new[i])
                        self.observer.rows(n, new[i], first)

        if meta is None:
            observe(histories)

        def save_checkpoint(state):
            checkpoint.save(self.group_dir, state, CheckpointMeta(
                wave, size, level, histories, earlier, seconds_before + time.perf_counter() - t_run))

        hooks = [lambda st, step, new: observe(new), functools.partial(self._snapshots, group, index, level)]
        if self.checkpoint_every:
            hooks.append(lambda st, step, new: (
                save_checkpoint(st) if step % self.checkpoint_every == 0 and any(new) else None))
        state = self._drive(group, params, compiled.program, state, problems, histories, hooks, level)
        run_seconds = seconds_before + time.perf_counter() - t_run
        signum = SIGNALS.received
        host = jax.device_get(state._replace(opt_state=None, grad=None))  # the optimiser's memory stays
        initial = None
        if earlier.initial is None:
            values = jax.device_get(compiled.yardstick(params, self._outputs(group, index, size, problems.pixels),
                                                       yards))
            initial = [as_metrics(_member(values, i)) for i in range(size)]
        final = jax.device_get(compiled.yardstick(params, self._outputs(group, index, size, average(host)), yards))
        results, interrupted = [], False
        for i in range(size):
            status, reason = RunStatus.FINISHED, None
            code = Status(int(host.status[i]))
            done = int(host.step[i]) >= s.steps or int(host.evaluations[i]) >= s.evaluation_limit
            if code != Status.RUNNING:
                status, reason = RunStatus.DIVERGED, code.reason
            elif signum is not None and not done:
                status, reason, interrupted = RunStatus.INTERRUPTED, f"stopped by {signal.Signals(signum).name}", True
            results.append(LevelResult(level, [int(v) for v in problems.pixels.shape[1:3]], status, reason,
                                       int(host.step[i]), int(host.evaluations[i]), run_seconds, compiled.seconds))
        if interrupted and self.group_dir is not None:
            save_checkpoint(state)
        return LevelRun(level, host, histories, initial, final, results)

    def _outputs(self, group: Group, index: list[int], size: int, pixels) -> jax.Array:
        """The wave's RGB images (its members' outputs from their pixels, padded as the wave)."""
        padded = list(index) + [index[-1]] * (size - len(index))
        rgb = [group.output_image(n, np.asarray(pixels[j])) for j, n in enumerate(padded)]
        return jax.device_put(np.stack(rgb), self.members)

    @staticmethod
    def _active(group: Group, state: LoopState) -> np.ndarray:
        s = group.structure
        status, step, evals = jax.device_get((state.status, state.step, state.evaluations))
        return (status == Status.RUNNING) & (step < s.steps) & (evals < s.evaluation_limit)

    def _drive(self, group: Group, params, program: Program, state: LoopState, problems, histories: list, hooks,
               level: int) -> LoopState:
        s = group.structure
        events = [e for e in (self.save_every, self.checkpoint_every) if e > 0]
        max_evals = jnp.int32(s.evaluation_limit)
        active = self._active(group, state)
        step = int(np.max(np.asarray(state.step)[active])) if active.any() else s.steps
        with _progress(s.steps, step, self.progress) as bar:
            while active.any() and SIGNALS.received is None:
                n = min(s.run.chunk_steps, s.steps - step, *[e - step % e for e in events])
                state, records, valid = program.chunk(state, problems, params, jnp.int32(n), max_evals)
                records, valid = jax.device_get(records), np.asarray(valid)
                new = [[_history_row(records, i, j, level) for j in np.flatnonzero(valid[i])]
                       for i in range(len(histories))]
                for h, rows_i in zip(histories, new):
                    h += rows_i
                active = self._active(group, state)
                last = int(np.max(records.step[valid])) if valid.any() else step
                bar.update(last - step)
                step = last
                _postfix(bar, histories, active)
                for hook in hooks:
                    hook(state, step, new)
        return state

    def _snapshots(self, group: Group, index: list[int], level: int, state: LoopState, step: int, new: list) -> None:
        if not (self.save_every and step % self.save_every == 0):
            return
        name = outputs.snapshot_name(step, level if len(self.levels) > 1 else None)
        pixels = np.asarray(average(state))
        for i, n in enumerate(index):
            if new[i]:
                img = group.output_image(n, pixels[i])
                images.save_image(Path(self.member_dirs[n]) / "snapshots" / name, img)
                if self.observer is not None:
                    self.observer.image(n, name[:-4], img)


@dataclasses.dataclass
class LevelRun:
    """One level of a wave, run: its level, final state on the host, the members' history rows, the
    initial yardsticks (the first level's) and the final ones, each member's result."""

    level: int
    host: LoopState
    histories: list[list[HistoryRow]]
    initial: list[dict] | None
    final: dict
    results: list[LevelResult]


def _history_row(records, i: int, j: int, level: int) -> HistoryRow:
    """Member ``i``'s record ``j`` of a chunk as a history row."""
    return HistoryRow.of(records.step[i, j], jax.tree.map(lambda a: a[i, j], records.terms), level)


def _row(state: LoopState, i: int, level: int) -> HistoryRow:
    return HistoryRow.of(state.step[i], jax.tree.map(lambda a: a[i], state.terms), level)


def _member(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _postfix(bar, histories: list, active: np.ndarray) -> None:
    last = histories[0][-1]
    if len(histories) == 1:
        bar.set_postfix(total=f"{last.total:.4g}", content=f"{last.content:.3g}",
                        style=f"{last.style:.3g}", tv=f"{last.tv:.3g}", refresh=False)
    else:
        bar.set_postfix(running=int(active.sum()), best=f"{min(h[-1].total for h in histories):.4g}",
                        refresh=False)
