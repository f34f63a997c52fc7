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

import contextlib
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

from nstjax import checkpoint, images, programs, pyramid
from nstjax.build import Group
from nstjax.errors import UserError
from nstjax.optimize import MEMBERS, HistoryRow, LoopState, Program, Status, average, member_mesh
from nstjax.yardstick import as_metrics, yardstick

EXIT_DIVERGED = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """SIGINT / SIGTERM as a flag that the chunk loop reads; installed once per process."""

    def __init__(self):
        self.received: int | None = None
        self._depth = 0

    def _handle(self, signum, frame):
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL} if self._depth == 0 else {}
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            for s, h in previous.items():
                signal.signal(s, h)


SIGNALS = StopSignals()


@dataclasses.dataclass
class MemberResult:
    """What one member ends with: its image, history and the facts metrics.json records."""

    image: np.ndarray
    history: list[HistoryRow]
    status: str  # finished | diverged | interrupted
    reason: str | None
    steps: int
    evaluations: int
    yardstick: dict
    run_seconds: float
    compile_seconds: float
    levels: list[dict] = dataclasses.field(default_factory=list)  # with a pyramid: each level's facts

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "diverged": EXIT_DIVERGED}.get(
            self.status, EXIT_SIGNAL.get(SIGNALS.received, 130))


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
    """

    def __init__(self, group: Group, group_dir: Path | None, member_dirs: Sequence[Path | None], *,
                 save_every: int = 0, checkpoint_every: int = 0, max_members: int | None = None,
                 memory_check: bool = True, progress: bool = False, earlier_levels: Sequence[Group] = (),
                 log: Callable[[str], None] = print):
        self.levels = [*earlier_levels, group]  # the pyramid's levels (nstjax.pyramid), smallest first
        self.level = len(self.levels) - 1  # the level being run, and its group
        self.group, self.member_dirs = group, member_dirs
        self.group_dir = Path(group_dir) if group_dir is not None else None
        self.save_every, self.checkpoint_every = save_every, checkpoint_every
        self.max_members, self.memory_check, self.progress = max_members, memory_check, progress
        self.log = log
        self._start: Callable[[], None] | None = None
        self.mesh = member_mesh()
        self.devices = self.mesh.size
        self.members = NamedSharding(self.mesh, P(MEMBERS))
        self.params = jax.device_put(group.params, NamedSharding(self.mesh, P()))
        self._programs: dict[tuple[int, int], Programs] = {}

    # --- programs and waves ------------------------------------------------------------
    def _wave_problems(self, index: Sequence[int], size: int):
        padded = jnp.asarray(list(index) + [index[-1]] * (size - len(index)))
        return (jax.device_put(_take(self.group.problems, padded), self.members),
                jax.device_put(_take(self.group.yardstick_targets, padded), self.members))

    def programs(self, size: int) -> Programs:
        """The current level's programs for batches of ``size`` members (compiled once)."""
        key = (self.level, size)
        if key not in self._programs:
            t0 = time.perf_counter()
            problems, yards = self._wave_problems([0], size)
            structure = self.group.structure
            program = structure.loop.compile(problems, self.params, self.mesh, structure.program_key)
            rgb = jax.ShapeDtypeStruct(problems.pixels.shape[:-1] + (3,), jnp.float32, sharding=self.members)
            measure = programs.compile("yardstick", jax.vmap(functools.partial(yardstick, structure.model),
                                                             in_axes=(None, 0, 0)),
                                       (self.params, rgb, yards), structure.model)
            self._programs[key] = Programs(program, measure, time.perf_counter() - t0)
        return self._programs[key]

    def wave_size(self) -> int:
        """The largest batch (a multiple of the device count, at most ``max_members`` rounded up
        to it) whose programs fit in free memory; one device's worth must fit."""
        k = len(self.group.members)
        per = self.devices
        size = per * math.ceil(min(k, self.max_members or k) / per)
        while True:
            compiled = self.programs(size)
            if not self.memory_check:
                return size
            try:
                check_memory((compiled.program.init, compiled.program.chunk, compiled.yardstick),
                             _tree_bytes(compiled.program.state.opt_state) // self.devices,
                             self.group.structure.model.remat)
                return size
            except UserError:
                if size <= per:
                    raise
                self._programs.pop((self.level, size))
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
        size = meta["wave_size"] if meta else self.wave_size()
        k = len(self.group.members)
        waves = [list(range(i, min(i + size, k))) for i in range(0, k, size)]
        if len(waves) > 1:
            self.log(f"{k} members in {len(waves)} waves of at most {size} (the largest batch that fits"
                     + (f", at most max_members={self.max_members}" if self.max_members else "") + ")")
        results = {}
        first = meta["wave"] if meta else 0
        for w in range(first, len(waves)):
            wave_results = self._run_wave(waves[w], size, w, meta if w == first else None)
            write(waves[w], wave_results)
            results.update(zip(waves[w], wave_results))
            if SIGNALS.received is not None:
                break
        return results

    def _run_wave(self, index: list[int], size: int, wave: int, meta: dict | None) -> list[MemberResult]:
        """The wave's members through every pyramid level (one level without a pyramid): each
        level from the previous level's pixels upsampled, members that diverged kept stopped.
        A checkpoint names its level and carries what the earlier levels left."""
        first = meta.get("level", 0) if meta else 0
        earlier = meta.get("earlier") if meta else None
        earlier = earlier or {"histories": [[] for _ in range(size)], "levels": [[] for _ in range(size)],
                              "initial": None}
        previous = None  # the last level's final state, on the host
        for k in range(first, len(self.levels)):
            self.level, self.group = k, self.levels[k]
            host, histories, initial, final, info = self._run_level(
                index, size, wave, meta if k == first else None, previous, k, earlier)
            earlier = {"histories": [e + h for e, h in zip(earlier["histories"], histories)],
                       "levels": [e + [i] for e, i in zip(earlier["levels"], info)],
                       "initial": earlier["initial"] or initial}
            interrupted = SIGNALS.received is not None and any(
                i["status"] == "interrupted" for i in info[:len(index)])
            last = k == len(self.levels) - 1
            if len(self.levels) > 1 and not interrupted:
                for i, n in enumerate(index):
                    if self.member_dirs[n] is not None:
                        images.save_image(Path(self.member_dirs[n]) / "levels" / f"level_{k}.png",
                                          self.group.output_image(n, average(host)[i]))
            if last or interrupted:
                break
            previous = host
        self.level, self.group = len(self.levels) - 1, self.levels[-1]
        return [self._result(index[i], host, i, earlier, final) for i in range(len(index))]

    def _result(self, n: int, host: LoopState, i: int, earlier: dict, final) -> MemberResult:
        """Member ``n`` (row ``i`` of the wave) over its levels."""
        levels, level = earlier["levels"][i], earlier["levels"][i][-1]
        return MemberResult(
            self.group.output_image(n, average(host)[i]), [HistoryRow(*r) for r in earlier["histories"][i]],
            level["status"], level["reason"], sum(x["steps"] for x in levels),
            sum(x["loss_evaluations"] for x in levels),
            {"initial": earlier["initial"][i], "final": as_metrics(_member(final, i))},
            sum(x["run_seconds"] for x in levels), sum(x["compile_seconds"] for x in levels),
            levels if len(self.levels) > 1 else [])

    def _run_level(self, index: list[int], size: int, wave: int, meta: dict | None, previous: LoopState | None,
                   level: int, earlier: dict):
        """One level of the wave: (final host state, histories, initial and final yardsticks, and
        per member its status, steps, evaluations and seconds at this level)."""
        s = self.group.structure
        compiled = self.programs(size)
        problems, yards = self._wave_problems(index, size)
        if previous is not None:  # start from the level below, upsampled; stopped members stay stopped
            pixels = pyramid.upsample(average(previous), tuple(problems.pixels.shape[1:3]))
            problems = problems._replace(pixels=jax.device_put(pixels, self.members))
        t_run = time.perf_counter()
        state = compiled.program.init(problems, self.params)
        if previous is not None:
            stopped = jnp.asarray(previous.status) != Status.RUNNING
            state = state._replace(status=jax.device_put(jnp.where(stopped, previous.status, state.status),
                                                         self.members))
        histories = [[_row(state, i, level)] for i in range(size)]
        seconds_before = 0.0
        if meta is not None:
            state = checkpoint.load(self.group_dir, state, self.members)
            histories = [[HistoryRow(*r) for r in h] for h in meta["histories"]]
            seconds_before = meta["run_seconds"]
            self.log(f"resuming {self.group_dir} at step {int(np.max(np.asarray(state.step)))}"
                     + (f" of level {level}" if len(self.levels) > 1 else ""))
        start, self._start = self._start, None
        if start is not None:
            start()

        def save_checkpoint(state):
            checkpoint.save(self.group_dir, state, {
                "wave": wave, "wave_size": size, "histories": histories, "level": level, "earlier": earlier,
                "run_seconds": seconds_before + time.perf_counter() - t_run})

        hooks = [functools.partial(self._snapshots, index, level)]
        if self.checkpoint_every:
            hooks.append(lambda st, step, new: (
                save_checkpoint(st) if step % self.checkpoint_every == 0 and any(new) else None))
        state = self._drive(compiled.program, state, problems, histories, hooks, level)
        run_seconds = seconds_before + time.perf_counter() - t_run
        signum = SIGNALS.received
        host = jax.device_get(state._replace(opt_state=None, grad=None))  # the optimiser's memory stays
        initial = None
        if earlier["initial"] is None:
            values = jax.device_get(compiled.yardstick(self.params, self._outputs(index, size, problems.pixels), yards))
            initial = [as_metrics(_member(values, i)) for i in range(size)]
        final = jax.device_get(compiled.yardstick(self.params, self._outputs(index, size, average(host)), yards))
        info, interrupted = [], False
        for i in range(size):
            status, reason = "finished", None
            code = Status(int(host.status[i]))
            done = int(host.step[i]) >= s.steps or int(host.evaluations[i]) >= s.max_evaluations
            if code != Status.RUNNING:
                status, reason = "diverged", code.reason
            elif signum is not None and not done:
                status, reason, interrupted = "interrupted", f"stopped by {signal.Signals(signum).name}", True
            info.append({"level": level, "size": [int(v) for v in problems.pixels.shape[1:3]], "status": status,
                         "reason": reason, "steps": int(host.step[i]), "loss_evaluations": int(host.evaluations[i]),
                         "run_seconds": run_seconds, "compile_seconds": compiled.seconds})
        if interrupted and self.group_dir is not None:
            save_checkpoint(state)
        return host, histories, initial, final, info

    def _outputs(self, index: list[int], size: int, pixels) -> jax.Array:
        """The wave's RGB images (its members' outputs from their pixels, padded as the wave)."""
        padded = list(index) + [index[-1]] * (size - len(index))
        rgb = [self.group.output_image(n, np.asarray(pixels[j])) for j, n in enumerate(padded)]
        return jax.device_put(np.stack(rgb), self.members)

    def _active(self, state: LoopState) -> np.ndarray:
        s = self.group.structure
        status, step, evals = jax.device_get((state.status, state.step, state.evaluations))
        return (status == Status.RUNNING) & (step < s.steps) & (evals < s.max_evaluations)

    def _drive(self, program: Program, state: LoopState, problems, histories: list, hooks,
               level: int = 0) -> LoopState:
        s = self.group.structure
        events = [e for e in (self.save_every, self.checkpoint_every) if e > 0]
        max_evals = jnp.int32(s.max_evaluations)
        active = self._active(state)
        step = int(np.max(np.asarray(state.step)[active])) if active.any() else s.steps
        with _progress(s.steps, step, self.progress) as bar:
            while active.any() and SIGNALS.received is None:
                n = min(s.chunk_steps, s.steps - step, *[e - step % e for e in events])
                state, rows, valid = program.chunk(state, problems, self.params, jnp.int32(n), max_evals)
                rows, valid = np.asarray(rows), np.asarray(valid)
                new = [[HistoryRow(int(r[0]), *map(float, r[1:5]), level) for r, v in zip(rows[i], valid[i]) if v]
                       for i in range(len(histories))]
                for h, rows_i in zip(histories, new):
                    h += rows_i
                active = self._active(state)
                last = int(np.max(rows[:, :, 0][valid])) if valid.any() else step
                bar.update(last - step)
                step = last
                _postfix(bar, histories, active)
                for hook in hooks:
                    hook(state, step, new)
        return state

    def _snapshots(self, index: list[int], level: int, state: LoopState, step: int, new: list) -> None:
        if not (self.save_every and step % self.save_every == 0):
            return
        name = (f"level_{level}_" if len(self.levels) > 1 else "") + f"step_{step:06d}.png"
        pixels = np.asarray(average(state))
        for i, n in enumerate(index):
            if new[i]:
                images.save_image(Path(self.member_dirs[n]) / "snapshots" / name, self.group.output_image(n, pixels[i]))


def _row(state: LoopState, i: int, level: int) -> HistoryRow:
    t = state.terms
    return HistoryRow(int(state.step[i]), float(t.total[i]), float(t.content[i]), float(t.style[i]),
                      float(t.tv[i]), level)


def _member(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _postfix(bar, histories: list, active: np.ndarray) -> None:
    last = histories[0][-1]
    if len(histories) == 1:
        bar.set_postfix(total=f"{last.total:.4g}", content=f"{last.content:.3g}",
                        style=f"{last.style:.3g}", tv=f"{last.tv:.3g}", refresh=False)
    else:
        bar.set_postfix(running=int(active.sum()), best=f"{min(h[-1].total for h in histories):.4g}",
                        refresh=False)
