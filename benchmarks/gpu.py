"""The prepared GPU check: nstjax against eager PyTorch CUDA, in at most 5 minutes on one GPU.

    python -m benchmarks.gpu --out DIR [--budget 270] [--stop-after PART]

It rewrites DIR/gpu.json after every part and every measurement (atomically: the file is always
valid JSON; a part that is running says "running", one cut short says "cut short") and tees its log
to DIR/gpu.log (PyTorch's own output: DIR/gpu-torch.log). The parts, in priority order (PARTS):

1. environment: python, jax, jaxlib, flax, optax, torch and numpy versions, the device kind, the
   device's memory_stats(), jax's and torch's cuDNN versions, nvidia-smi's output if present;
2. agreement, the gate: nstjax's and eager PyTorch's float32 Gatys losses at 512 px on the same
   inputs agree to 1e-4 relative, else the check stops with exit status 2 (the JSON says why);
3. per_evaluation: one loss + gradient at 512 px in float32, tf32 and bfloat16 (model.precision),
   nstjax's direct convolution with its custom VJP (model.conv=direct) and XLA's convolution with
   autodiff's gradient (model.conv=xla), beside PyTorch CUDA in IEEE float32, TF32, and TF32 with
   torch.backends.cudnn.benchmark=True;
4. batched_loop: nstjax's Loop at 512 px for K = 1, 8, 32 members (1 and 32 first) in this one
   process, K configs differing in loss.beta built as one group (members·steps/s over timed chunks
   of L-BFGS without line search, compile seconds, the programs' memory against bytes_limit);
5. large: one loss + gradient at 1024 px (float32 both convolutions, tf32 and bfloat16 with the
   convolution that was faster at 512 px, PyTorch float32 and TF32 + cudnn.benchmark);
6. fit: the largest square image whose evaluation fits, without and with model.remat=on (doubling
   from 2048 px, then once halfway), only if at least 60 s of the budget remain.

nstjax's problems are built by the product (nstjax.config.compose + nstjax.build.build_group) from
its default loss (Gatys et al.'s: VGG19 to relu5_1, average pooling) on the bundled pair resized to
squares, synthetic VGG19 weights (the cost does not depend on their values) and a noise start
image. PyTorch's side is benchmarks.torch_gatys on the same arrays, in one worker process
(benchmarks.gpu_torch), started first so that torch's import and CUDA start overlap jax's. The
JAX parts run in this process: an out-of-memory is an exception there, recorded as such, and the
check goes on. Compiled programs are cached in $NSTJAX_CACHE/xla (the CLI's cache) or else
DIR/xla-cache, XLA's autotuning results with them (nstjax's own caches then in DIR/nstjax-cache).

Time: the budget (--budget, default 270 s from the start) is shared among the parts in order
(SHARES; what a part leaves goes to those after it); a measurement is not started when its part
has less time left than the part's measurements took so far (median), and then the part is "cut
short"; a part with no time left is "skipped (no time)". The environment, the gate and the first
measurement (nstjax float32, compiled by the gate) always run. A watchdog writes the JSON and
stops the check budget + grace seconds after its start (25 s: under 5 minutes in all).

Targets (targets(), each PASS / FAIL / NOT MEASURED in the JSON): one float32 evaluation at 512 px
(the faster of model.conv=direct and xla) in at most 10 ms, and faster than eager PyTorch CUDA in
IEEE float32; the batched loop's largest K (32) with at least 4× the members·steps/s of one member.

Without a GPU it says so in one line and dry-runs the same code on the CPU (DRY_RUN: 32 and 64 px,
VGG11 with the loss on its first two blocks, K = 1, 2, the large part in float32 only; a 48 s
budget, under 60 s in all), still writing DIR/gpu.json ("dry_run": true).

Exit status: 0 when the check ran its course (parts cut short included), 2 when --out cannot be
written (nothing else is done) or the gate did not pass, 3 when the watchdog or a signal stopped it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.machinery
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np

from benchmarks.common import EXAMPLES, ROOT, cpu_info, synthetic_weights_file
from benchmarks.report import fmt, gib, log, table, tee_to, write_json_atomic

T0 = time.monotonic()

PARTS = ("environment", "agreement", "per_evaluation", "batched_loop", "large", "fit")
# Shares of the budget, in the order the parts run; a part gets the time left × its share / the
# shares of the parts not begun yet (the fit search gets what is left).
SHARES = {"environment": 0.04, "agreement": 0.10, "per_evaluation": 0.30, "batched_loop": 0.30, "large": 0.12,
          "fit": 0.14}
AGREEMENT_RTOL = 1e-4
ITERATION_S, BATCH_RATIO = 0.010, 4.0
FIT_MEMORY_FRACTION = "0.90"  # XLA_PYTHON_CLIENT_MEM_FRACTION unless set (jax's default is 0.75)

# Dense peak TFLOP/s by jax device_kind (the first substring that matches; vendors' datasheets).
PEAK_TFLOPS = (("H100 PCIe", {"float32": 51.2, "tf32": 378, "bfloat16": 756}),
               ("H200", {"float32": 67, "tf32": 495, "bfloat16": 989}),
               ("H100", {"float32": 67, "tf32": 495, "bfloat16": 989}),
               ("A100", {"float32": 19.5, "tf32": 156, "bfloat16": 312}))

OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory|Allocator .* ran out", re.I)

# The batched loop's optimiser: L-BFGS without line search (one evaluation a step), as the sweep
# benchmark runs it.
LOOP_OVERRIDES = ("optim.linesearch=none", "optim.memory_size=30", "optim.lr=0.5")
DRY_LOSS = ("loss.content_layers=[relu2_1]", "loss.style_layers=[relu1_1,relu2_1]")


@dataclasses.dataclass(frozen=True)
class Plan:
    size: int  # the gate, per evaluation, the batched loop
    large_size: int
    members: tuple  # K of the batched loop
    loop_steps: int  # steps a chunk
    loop_chunks: int  # chunks timed, after one untimed
    reps: int  # timed evaluations per measurement, after a first one
    fit_start: int
    fit_cap: int
    fit_min_left_s: float  # the fit search runs only with this much of the budget left
    min_start_s: float  # no measurement is started with less than this left in its part
    budget_s: float
    grace_s: float  # the watchdog stops the check this long after the budget
    torch_timeout_s: float  # the least time a PyTorch request is given
    arch: str  # the VGG network (synthetic weights)
    loss_overrides: tuple  # config overrides of the loss (the dry run's is shallower)
    torch_threads: int | None
    conv: str  # model.conv of the batched loop and the fit search: the product's default on a GPU
    large_precisions: tuple  # nstjax's precisions in the large part


GPU = Plan(size=512, large_size=1024, members=(1, 8, 32), loop_steps=5, loop_chunks=3, reps=20, fit_start=2048,
           fit_cap=32768, fit_min_left_s=60.0, min_start_s=4.0, budget_s=270.0, grace_s=25.0, torch_timeout_s=30.0,
           arch="vgg19", loss_overrides=(), torch_threads=None, conv="auto",
           large_precisions=("float32", "tf32", "bfloat16"))
DRY_RUN = Plan(size=32, large_size=64, members=(1, 2), loop_steps=2, loop_chunks=1, reps=2, fit_start=64, fit_cap=128,
               fit_min_left_s=3.0, min_start_s=0.3, budget_s=48.0, grace_s=10.0, torch_timeout_s=30.0,
               arch="vgg11", loss_overrides=DRY_LOSS, torch_threads=1, conv="direct",  # auto: Winograd, a CPU's
               large_precisions=("float32",))


class Stopped(Exception):
    """A signal asked the check to stop."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def failure(e: BaseException) -> dict:
    text = f"{type(e).__name__}: {e}"
    return {"error": text[:2000], "out_of_memory": bool(OOM.search(text))}


# --------------------------------------------------------------------------- the torch worker

class TorchWorker:
    """benchmarks.gpu_torch in a process of its own: requests and answers as JSON lines, each
    request waited for at most its timeout (then the worker is stopped and later requests fail)."""

    def __init__(self, log_path: Path):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_torch"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self.buf, self.ready, self.dead, self.n = b"", None, None, 0

    def _line(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _died(self, why: str) -> dict:
        self.kill()
        tail = ""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            tail = f": {lines[-1][-300:]}" if lines else ""
        except OSError:
            pass
        self.dead = why + tail
        return {"error": f"PyTorch worker: {self.dead}"}

    def wait_ready(self, timeout: float) -> dict:
        if self.ready is None and self.dead is None:
            try:
                self.ready = self._line(time.monotonic() + timeout)
            except TimeoutError:
                return self._died(f"not started within {timeout:.0f} s")
            except EOFError:
                return self._died(f"exited (status {self.proc.wait()}) while starting")
        return self.ready if self.ready is not None else {"error": f"PyTorch worker: {self.dead}"}

    def call(self, task: str, timeout: float, **args) -> dict:
        ready = self.wait_ready(timeout)
        if "error" in ready:
            return {"error": ready["error"]}
        self.n += 1
        try:
            self.proc.stdin.write((json.dumps({"id": self.n, "task": task, **args}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return self._died(f"exited (status {self.proc.poll()})")
        deadline = time.monotonic() + timeout
        try:
            while True:
                answer = self._line(deadline)
                if answer.get("id") == self.n:
                    answer.pop("id")
                    return answer
        except TimeoutError:
            r = self._died(f"stopped: {task} took more than {timeout:.0f} s")
            r["out_of_time"] = True
            return r
        except EOFError:
            return self._died(f"exited (status {self.proc.wait()}) during {task}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"task": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._log.close()


# --------------------------------------------------------------------------- the check and its parts

class Check:
    """The report (DIR/gpu.json), the budget, the problems and compiled programs the parts share."""

    def __init__(self, out: Path, plan: Plan, dry: bool, budget_s: float, stop_after: str | None, torch: TorchWorker,
                 work: Path, command: str):
        self.out, self.path, self.plan, self.dry = out, out / "gpu.json", plan, dry
        self.budget_s, self.stop_after, self.torch, self.work = budget_s, stop_after, torch, work
        self.lock = threading.RLock()
        self.report = {"check": "benchmarks.gpu", "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "dry_run": dry, "finished": False, "exit_status": None,
                       "budget": {"total_s": budget_s, "grace_s": plan.grace_s, "used_s": 0.0},
                       "plan": dataclasses.asdict(plan), "peak_tflops": None,
                       "parts": {name: {"status": "pending"} for name in PARTS}, "targets": []}
        self.current: Part | None = None
        self.skip_reason: str | None = None  # once set, the parts not begun are skipped with it
        self.groups, self.evaluators, self.torch_problems = {}, {}, {}
        self._inputs = None

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self) -> None:
        with self.lock:
            self.report["budget"]["used_s"] = self.elapsed()
            self.report["targets"] = targets(self.report, self.plan)
            for attempt in range(5):  # the watchdog's thread may save while the main thread edits
                try:
                    write_json_atomic(self.path, self.report)
                    return
                except RuntimeError:
                    time.sleep(0.05)

    def result(self, name: str) -> dict:
        return self.report["parts"][name].get("result", {})

    def run(self, name: str, fn, mandatory: bool = False) -> None:
        rec = self.report["parts"][name]
        left = self.left()
        if self.skip_reason:
            rec["status"] = self.skip_reason
        elif not mandatory and (left < self.plan.min_start_s or (name == "fit" and left < self.plan.fit_min_left_s)):
            rec.update(status="skipped (no time)", left_s=left)
            if name == "fit":
                rec["rule"] = f"the fit search runs only with at least {self.plan.fit_min_left_s:.0f} s left"
        if rec["status"] != "pending":
            log(f"\n== {name}: {rec['status']}")
            self.save()
            return
        waiting = PARTS[PARTS.index(name):]
        allowance = max(0.0, left) * SHARES[name] / sum(SHARES[n] for n in waiting)
        part = self.current = Part(self, name, allowance)
        log(f"\n== {PARTS.index(name) + 1}. {name} ({allowance:.0f} s of the {max(0.0, left):.0f} s left)")
        self.save()
        status = "done"
        try:
            fn(self, part)
            status = "cut short" if part.cut else "done"
        except Stopped as e:
            status = f"cut short ({e})"
            raise
        except Exception as e:  # noqa: BLE001 - recorded; the check goes on
            status = "failed: " + failure(e)["error"][:500]
            rec["traceback"] = traceback.format_exc()[-4000:]
            log(f"{name} failed: {failure(e)['error'][:300]}")
        finally:
            with self.lock:
                rec.update(status=status, used_s=time.monotonic() - part.t0)
                self.current = None
                if name != "environment" and name != "agreement":  # per_evaluation reuses the gate's program
                    self.release()
                self.save()
            log(f"-- {name}: {status} ({rec['used_s']:.1f} s)")
        if self.stop_after == name:
            self.skip_reason = f"skipped (--stop-after {name})"

    def release(self) -> None:
        """Drop the programs a part compiled and the problems at other sizes than plan.size (device
        memory for the next part)."""
        self.evaluators.clear()
        for key in [k for k in self.groups if k[0] != self.plan.size]:
            del self.groups[key]
        gc.collect()

    # ------------------------------------------------------------------ nstjax's problems

    def inputs(self) -> tuple[Path, Path, Path]:
        """Synthetic VGG19 weights, and the bundled content and style resized to squares."""
        if self._inputs is None:
            from PIL import Image

            weights = synthetic_weights_file(self.work / f"synthetic-{self.plan.arch}.safetensors", arch=self.plan.arch)
            side = max(self.plan.size, self.plan.large_size)
            paths = []
            for name in ("tubingen", "starry_night"):
                with Image.open(EXAMPLES / f"{name}.jpg") as im:
                    path = self.work / f"{name}-{side}.png"
                    im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(path)
                    paths.append(path)
            self._inputs = (weights, *paths)
        return self._inputs

    def overrides(self, size: int, *extra: str) -> list[str]:
        weights, content, style = self.inputs()
        return [f"model.weights={weights}", f"content={content}", f"style={style}", f"image.size={size}",
                f"model.arch={self.plan.arch}", "init=noise", "progress=false", *self.plan.loss_overrides, *extra]

    def group(self, size: int, precision: str, conv: str = "direct"):
        """The product's group of one problem at ``size`` in ``precision`` (model.conv=``conv``)."""
        key = (size, precision, conv)
        if key not in self.groups:
            from nstjax import build, config
            from nstjax.spec import parse

            cfg = config.compose(self.overrides(size, f"model.precision={precision}", f"model.conv={conv}",
                                                "model.remat=off"))
            self.groups[key] = build.build_group([parse(cfg)])
        return self.groups[key]

    def evaluator(self, size: int, precision: str, conv: str) -> Evaluator:
        """One loss + gradient of the product's objective, compiled. 'xla' is the same group as
        'direct' (the targets do not depend on how a gradient is taken) with model.conv=xla."""
        key = (size, precision, conv)
        if key not in self.evaluators:
            group = self.group(size, precision)
            if conv != group.model.conv:
                group = dataclasses.replace(group, model=group.model.clone(conv=conv))
            self.evaluators[key] = Evaluator.compile(group.loop.objective, group)
        return self.evaluators[key]

    def torch_problem(self, size: int) -> dict:
        """The float32 group at ``size`` handed to the PyTorch worker (its name: the size)."""
        name = str(size)
        if name not in self.torch_problems:
            import jax

            group = self.group(size, "float32")
            member, spec, prep = group.members[0], group.structure.loss, group.weights.preprocessing
            hp = jax.tree.map(lambda a: np.asarray(a[0]), group.problems.hp)
            arrays = {f"params/{n}/{k}": np.asarray(v) for n, p in group.weights.params.items() for k, v in p.items()}
            arrays.update(content=np.asarray(member.content, np.float32), style=np.asarray(member.styles[0], np.float32),
                          x=np.asarray(group.problems.pixels[0], np.float32))
            path = self.work / f"problem-{name}.npz"
            np.savez(path, **arrays)
            r = self.torch.call(
                "problem", max(self.plan.torch_timeout_s, 60.0), name=name, npz=str(path),
                spec={k: getattr(spec, k) for k in ("content_layers", "style_layers", "gram_norm", "style_reduction",
                                                    "content_reduction", "tv_norm")},
                prep={k: getattr(prep, k) for k in ("channel_order", "scale", "mean", "std")},
                pooling=group.structure.model.pooling,
                hp={"alpha": float(hp.alpha), "beta": float(hp.beta), "tv_weight": float(hp.tv_weight),
                    "content_layer_weights": np.asarray(hp.content_layer_weights).tolist(),
                    "style_layer_weights": np.asarray(hp.style_layer_weights).tolist()})
            path.unlink(missing_ok=True)
            if "error" in r:
                return r
            self.torch_problems[name] = r
        return self.torch_problems[name]

    def torch_eval(self, part: Part, size: int, precision: str, benchmark: bool = False) -> dict:
        problem = self.torch_problem(size)
        if "error" in problem:
            return problem
        r = self.torch.call("eval", max(part.left(), self.plan.torch_timeout_s), name=str(size), precision=precision,
                            benchmark=benchmark, reps=self.plan.reps)
        if r.get("out_of_time"):
            part.cut = True
        return r

    def peak(self, precision: str) -> float | None:
        return (self.report.get("peak_tflops") or {}).get("tflops", {}).get(precision)


class Part:
    """One part's time and its measurements (``rec['result']['measurements']``)."""

    def __init__(self, check: Check, name: str, allowance_s: float):
        self.check, self.name, self.allowance_s = check, name, allowance_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + allowance_s
        self.rec = check.report["parts"][name]
        self.rec.update(status="running", started_at_s=check.elapsed(), allowance_s=allowance_s)
        self.result = self.rec.setdefault("result", {})
        self.durations: list[float] = []
        self.cut = False

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def need(self) -> float:
        return max(self.check.plan.min_start_s, float(np.median(self.durations)) if self.durations else 0.0)

    def can_start(self) -> bool:
        if self.left() < self.need():
            self.cut = True
        return not self.cut

    def measure(self, key: str, fn, force: bool = False, into: dict | None = None) -> dict | None:
        """``fn()``'s result under ``into[key]`` (the part's measurements), or 'not run (no time)'
        when the part cannot start it (``force``: run it anyway); an exception is recorded as the
        result ('error', 'out_of_memory'). The JSON is rewritten after it."""
        into = self.result.setdefault("measurements", {}) if into is None else into
        if not force and not self.can_start():
            into[key] = {"status": "not run (no time)"}
            self.check.save()
            return None
        into[key] = {"status": "running"}  # what a check killed here was doing
        self.check.save()
        t = time.monotonic()
        try:
            r = fn()
        except Stopped:
            into[key] = {"status": "cut short"}
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the part goes on
            r = failure(e)
            r["traceback"] = traceback.format_exc()[-3000:]
            gc.collect()
        r.setdefault("status", "failed" if "error" in r else "done")
        r["wall_s"] = time.monotonic() - t
        self.durations.append(r["wall_s"])
        into[key] = r
        log(f"  {key}: {describe(r)}")
        self.check.save()
        return r


def describe(r: dict) -> str:
    if "error" in r:
        return ("out of memory: " if r.get("out_of_memory") else "failed: ") + r["error"][:200]
    bits = []
    if "eval_s" in r:
        bits.append(f"{r['eval_s'] * 1e3:.2f} ms per evaluation")
    if "members_steps_per_s" in r:
        bits.append(f"{r['members_steps_per_s']:.1f} members·steps/s")
    if "fits" in r:
        bits.append("fits" if r["fits"] else "does not fit" + (f" ({r['why']})" if r.get("why") else ""))
    if r.get("compile_s") is not None:
        bits.append(f"compile {r['compile_s']:.1f} s")
    if "loss" in r:
        bits.append(f"loss {r['loss']:.7g}")
    return ", ".join(bits) or r.get("status", "")


@dataclasses.dataclass
class Evaluator:
    """One loss + gradient of an objective on a group's first problem, compiled ahead of time."""

    compiled: object
    args: tuple
    compile_s: float

    @classmethod
    def compile(cls, objective, group, pixels=None, targets=None) -> Evaluator:
        import jax

        one = jax.tree.map(lambda a: a[0], group.problems)
        f = jax.jit(jax.value_and_grad(lambda x, params, t, hp, key: objective(x, params, t, hp, key).total))
        args = (one.pixels if pixels is None else pixels, group.params, one.targets if targets is None else targets,
                one.hp, one.key)
        t = time.perf_counter()
        compiled = f.lower(*args).compile()
        return cls(compiled, args, time.perf_counter() - t)

    def program_bytes(self) -> int:
        from nstjax.driver import program_bytes

        try:
            return program_bytes(self.compiled)
        except Exception:  # noqa: BLE001 - not every backend says
            return 0

    def run(self, reps: int) -> dict:
        """A first call, then ``reps`` timed ones: the best, the median, each."""
        import jax

        t = time.perf_counter()
        loss, grad = self.compiled(*self.args)
        jax.block_until_ready(grad)
        out = {"first_call_s": time.perf_counter() - t, "loss": float(loss), "compile_s": self.compile_s,
               "program_bytes": self.program_bytes()}
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(self.compiled(*self.args))
            times.append(time.perf_counter() - t)
        out.update(times_s=times, eval_s=min(times) if times else out["first_call_s"],
                   eval_median_s=float(np.median(times)) if times else out["first_call_s"])
        out.update(device_memory())
        return out

    def gradient(self) -> np.ndarray:
        return np.asarray(self.compiled(*self.args)[1])


def executed_flops(model, layers, size: int) -> int:
    """FLOPs of one loss + gradient of a size × size image: forward and input gradient (the weights
    are not differentiated) of each 3×3 convolution up to the deepest of ``layers``, 2·H·W·Cin·Cout·9
    each way."""
    arch = model.architecture
    last = arch.layer_names.index(arch.deepest(layers))
    total = 0
    for name, ((_, _, c_in, c_out), _) in arch.conv_shapes().items():
        if arch.layer_names.index(name) <= last:
            h, w, _ = model.layer_shape(name, size, size)
            total += 2 * (2 * h * w * c_in * c_out * 9)
    return total


def device_memory() -> dict:
    """The default device's bytes_limit and peak_bytes_in_use (memory_stats()), where it has them."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    return {k: stats[k] for k in ("bytes_limit", "peak_bytes_in_use", "bytes_in_use") if k in stats}


# --------------------------------------------------------------------------- 1. environment

def jax_cudnn() -> dict | str | None:
    """The CUDA library versions jax's CUDA plugin reports (cuDNN's among them), or why not."""
    try:
        from jax._src.lib import cuda_versions  # read only: there is no public API for these
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}"
    if cuda_versions is None:
        return None
    out = {}
    for name in sorted(dir(cuda_versions)):
        if name.endswith("_version") and callable(getattr(cuda_versions, name)):
            try:
                out[name] = getattr(cuda_versions, name)()
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    return out


def nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        p = subprocess.run([exe], capture_output=True, text=True, timeout=15)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "numpy", "nstjax", "hydra-core", "omegaconf", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "nvidia-cudnn", "nvidia-cuda-runtime")):
            out[name] = dist.version
    return out


def peaks(kind: str, dry: bool) -> dict:
    for key, tflops in PEAK_TFLOPS:
        if key in kind:
            return {"source": f"datasheet ({key})", "tflops": tflops}
    cpu = cpu_info()
    if cpu.get("peak_gflops_fp32"):
        return {"source": f"CPU estimate: {cpu['how']}",
                "tflops": {p: cpu["peak_gflops_fp32"] / 1e3 for p in ("float32", "tf32", "bfloat16")}}
    return {"source": f"unknown device {kind!r}", "tflops": {}}


def environment(check: Check, part: Part) -> None:
    import jax

    r = part.result
    r["versions"] = versions()
    import nstjax

    r["nstjax_from"] = str(Path(nstjax.__file__).parent)
    r["platform"] = platform.platform()
    devices = jax.devices()
    r.update(backend=jax.default_backend(), devices=[str(d) for d in devices], device_kind=devices[0].device_kind,
             device_count=len(devices))
    try:
        stats = devices[0].memory_stats()
    except Exception as e:  # noqa: BLE001
        stats = {"error": str(e)}
    r["memory_stats"] = stats
    r["memory_stats_keys"] = sorted(stats) if stats else []
    r["cudnn_jax"] = jax_cudnn()
    r["env"] = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_", "NSTJAX_", "TF_CPP"))}
    r["compilation_cache"] = {"dir": jax.config.jax_compilation_cache_dir,
                              "xla_caches": getattr(jax.config, "jax_persistent_cache_enable_xla_caches", None)}
    r["cpu"] = cpu_info()
    r["nvidia_smi"] = nvidia_smi()
    check.report["peak_tflops"] = peaks(devices[0].device_kind, check.dry)
    torch = check.torch.wait_ready(max(part.left(), 90.0))
    r["torch"] = torch
    if check.plan.torch_threads and "error" not in torch:
        r["torch"]["threads"] = check.torch.call("configure", 30.0, threads=check.plan.torch_threads).get("threads")
    r["cudnn_torch"] = torch.get("cudnn_version")
    log(f"{r['device_kind']} ({r['backend']}), jax {r['versions']['jax']}, jaxlib {r['versions']['jaxlib']}, "
        f"torch {r['versions']['torch']} ({torch.get('device', torch.get('error'))}), cuDNN torch "
        f"{r['cudnn_torch']}; memory_stats keys: {', '.join(r['memory_stats_keys']) or '-'}")


# --------------------------------------------------------------------------- 2. agreement

def agreement(check: Check, part: Part) -> None:
    """The gate: both sides' float32 loss at plan.size on the same inputs (and the gradients' distance)."""
    size = check.plan.size
    r = part.result
    r.update(size=size, rtol=AGREEMENT_RTOL, agree=None)
    jax_side = part.measure("nstjax float32 direct", lambda: {**check.evaluator(size, "float32", "direct").run(0),
                                                               "conv": "direct"}, force=True)
    path = check.work / "torch-grad.npy"

    def torch_loss():
        problem = check.torch_problem(size)
        if "error" in problem:
            return problem
        return check.torch.call("loss", max(part.left(), 120.0), name=str(size), grad_path=str(path))

    torch_side = part.measure("pytorch float32", torch_loss, force=True)
    if "error" in jax_side or "error" in torch_side:
        r["why"] = "a side failed: " + (jax_side.get("error") or torch_side.get("error"))
        raise RuntimeError(r["why"])
    lj, lt = jax_side["loss"], torch_side["loss"]
    r.update(loss_jax=lj, loss_torch=lt, rel_diff=abs(lj - lt) / max(abs(lt), 1e-30))
    r["agree"] = bool(r["rel_diff"] <= AGREEMENT_RTOL)
    gj, gt = check.evaluator(size, "float32", "direct").gradient(), np.load(path)
    r["grad_rel_l2"] = float(np.linalg.norm(gj - gt) / max(float(np.linalg.norm(gt)), 1e-30))
    path.unlink(missing_ok=True)
    log(f"loss nstjax {lj:.8g}, PyTorch {lt:.8g}: relative difference {r['rel_diff']:.2e} "
        f"({'agree' if r['agree'] else 'DISAGREE'}, tolerance {AGREEMENT_RTOL:g}); gradient relative L2 "
        f"{r['grad_rel_l2']:.2e}")


# --------------------------------------------------------------------------- 3. and 5. per evaluation

def evaluations(check: Check, part: Part, size: int, rows: list, first_forced: bool) -> None:
    """Measure ``rows`` at ``size``: nstjax's compiled evaluation, PyTorch's eager one; then each
    one's FLOP rate and loss against nstjax's float32."""
    group = check.group(size, "float32")
    flops = executed_flops(group.model, group.structure.loss.layers, size)
    part.result.update(size=size, executed_flops=flops)
    for i, (key, side, precision, how) in enumerate(rows):
        if side == "jax":
            fn = functools.partial(lambda p, c: {**check.evaluator(size, p, c).run(check.plan.reps), "conv": c},
                                   precision, how)
        else:
            fn = functools.partial(check.torch_eval, part, size, precision, how)
        r = part.measure(key, fn, force=first_forced and i == 0)
        if r and "eval_s" in r:
            r["achieved_tflops"] = flops / r["eval_s"] / 1e12
            peak = check.peak(precision)
            r["fraction_of_peak"] = r["achieved_tflops"] / peak if peak else None
    ms = part.result["measurements"]
    ref = ms.get("nstjax float32 direct", {}).get("loss")
    for r in ms.values():
        if ref and "loss" in r:
            r["loss_rel_diff_vs_nstjax_float32"] = abs(r["loss"] - ref) / abs(ref)


def per_evaluation(check: Check, part: Part) -> None:
    both = ("direct", "xla")
    rows = [("nstjax float32 direct", "jax", "float32", "direct"), ("pytorch float32", "torch", "float32", False),
            ("nstjax float32 xla", "jax", "float32", "xla"),
            ("nstjax tf32 direct", "jax", "tf32", "direct"), ("nstjax tf32 xla", "jax", "tf32", "xla"),
            ("pytorch tf32", "torch", "tf32", False), ("pytorch tf32 cudnn.benchmark", "torch", "tf32", True),
            *[(f"nstjax bfloat16 {c}", "jax", "bfloat16", c) for c in both]]
    evaluations(check, part, check.plan.size, rows, first_forced=True)


def faster_conv(check: Check, precision: str) -> str:
    """The convolution whose evaluation was faster at plan.size in ``precision`` (direct if unmeasured)."""
    ms = check.result("per_evaluation").get("measurements", {})
    times = {c: ms.get(f"nstjax {precision} {c}", {}).get("eval_s") for c in ("direct", "xla")}
    times = {c: t for c, t in times.items() if t}
    return min(times, key=times.get) if times else "direct"


def large(check: Check, part: Part) -> None:
    rows = [("nstjax float32 direct", "jax", "float32", "direct"), ("pytorch float32", "torch", "float32", False),
            ("nstjax float32 xla", "jax", "float32", "xla"), ("pytorch tf32 cudnn.benchmark", "torch", "tf32", True)]
    for precision in check.plan.large_precisions[1:]:
        conv = faster_conv(check, precision)
        rows.insert(-1 if precision == "tf32" else len(rows), (f"nstjax {precision} {conv}", "jax", precision, conv))
    evaluations(check, part, check.plan.large_size, rows, first_forced=False)


# --------------------------------------------------------------------------- 4. the batched loop

def loop_members(check: Check, k: int) -> dict:
    """K problems differing in loss.beta, built by the product as one group, its Loop compiled and
    run: members·steps/s over ``loop_chunks`` chunks after an untimed one."""
    import jax
    import jax.numpy as jnp

    from nstjax import build, config
    from nstjax.driver import free_memory_bytes, program_bytes
    from nstjax.spec import parse

    plan = check.plan
    betas = [10 ** (2 + 4 * i / max(1, k - 1)) for i in range(k)]
    t = time.perf_counter()
    base = check.overrides(plan.size, *LOOP_OVERRIDES, f"chunk_steps={plan.loop_steps}", f"model.conv={plan.conv}")
    group = build.build_group([parse(config.compose(base + [f"loss.beta={b:.6g}"])) for b in betas])
    out = {"members": k, "build_s": time.perf_counter() - t, "conv": group.model.conv,
           "precision": group.structure.model.precision}
    t = time.perf_counter()
    program = group.loop.compile(group.problems, group.params)
    out["compile_s"] = time.perf_counter() - t
    out["program_bytes"] = max(program_bytes(program.init), program_bytes(program.chunk))
    out["free_bytes_before"] = free_memory_bytes()
    out.update(device_memory())
    if out.get("bytes_limit"):
        out["program_fraction_of_limit"] = out["program_bytes"] / out["bytes_limit"]
    n, limit = jnp.int32(plan.loop_steps), jnp.int32(2**31 - 1)
    state = jax.block_until_ready(program.init(group.problems, group.params))
    state, rows, _ = program.chunk(state, group.problems, group.params, n, limit)
    jax.device_get(rows)  # the driver reads each chunk's records back, so does this
    before = int(np.asarray(state.step).sum())
    t = time.perf_counter()
    for _ in range(plan.loop_chunks):
        state, rows, _ = program.chunk(state, group.problems, group.params, n, limit)
        jax.device_get(rows)
    out["run_s"] = time.perf_counter() - t
    out["members_steps"] = int(np.asarray(state.step).sum()) - before
    out["members_steps_per_s"] = out["members_steps"] / out["run_s"]
    out["running_members"] = int((np.asarray(state.status) == 0).sum())
    out.update({f"after_{k_}": v for k_, v in device_memory().items()})
    return out


def batched_loop(check: Check, part: Part) -> None:
    plan = check.plan
    part.result.update(size=plan.size, steps_per_chunk=plan.loop_steps, timed_chunks=plan.loop_chunks,
                       optimizer=" ".join(LOOP_OVERRIDES))
    rows = part.result.setdefault("measurements", {})
    # K = 1 and the largest K first (the target compares them), then those between
    for k in dict.fromkeys([plan.members[0], plan.members[-1], *plan.members[1:-1]]):
        out_of_memory = [m for m, r in rows.items() if r.get("out_of_memory") and int(m[2:]) < k]
        if out_of_memory:
            rows[f"K={k}"] = {"status": f"not run ({out_of_memory[0]} ran out of memory)"}
            continue
        part.measure(f"K={k}", functools.partial(loop_members, check, k))
        gc.collect()
    one = rows.get("K=1", {}).get("members_steps_per_s")
    for r in rows.values():
        if one and "members_steps_per_s" in r:
            r["throughput_vs_one"] = r["members_steps_per_s"] / one


# --------------------------------------------------------------------------- 6. the largest size

def fit_search(probe, start: int, cap: int, can_try) -> dict:
    """The largest square size whose evaluation fits: ``probe(size)`` (a result with 'fits', and
    'out_of_time' when it was stopped) from ``start``, doubling while it fits, the size is at most
    ``cap`` and ``can_try()``, then, if ``can_try()``, once halfway (a multiple of 64) between the last
    size that fit and the first that did not."""
    tried, largest, failed, size = [], None, None, start
    while True:
        if size > cap:
            stopped = f"cap {cap} px"
            break
        if not can_try():
            stopped = "out of time"
            break
        r = probe(size)
        tried.append(r)
        if r.get("out_of_time"):  # killed at the end of its time: neither a fit nor a failure
            stopped = f"out of time at {size} px"
            break
        if not r["fits"]:
            failed, stopped = size, f"{size} px failed"
            break
        largest, size = size, size * 2
    bisect = None
    if largest and failed:
        mid = (largest + failed) // 2 // 64 * 64
        if largest < mid < failed:
            if can_try():
                r = probe(mid)
                tried.append(r)
                if not r.get("out_of_time"):
                    largest, failed = (mid, failed) if r["fits"] else (largest, mid)
                    bisect = mid
            else:
                stopped += f"; no time to try {mid} px"
    return {"largest": largest, "first_failure": failed, "stopped": stopped, "bisected_at": bisect, "tried": tried}


def fit_probe(check: Check, size: int, remat: bool) -> dict:
    """Does one float32 loss + gradient of the product's objective fit at size × size? Compiled for
    that size (targets of the right shapes, zeros: the cost does not depend on their values); not
    compiled when the image, its gradient and the targets (and without remat conv1_1's output)
    alone exceed the memory there is, not run when XLA's plan does."""
    import jax
    import jax.numpy as jnp

    from nstjax.driver import free_memory_bytes
    from nstjax.losses import compute_targets

    group = check.group(check.plan.size, "float32", check.plan.conv)
    structure = group.structure
    model = group.model.clone(remat=remat)
    group = dataclasses.replace(group, model=model)
    image = jax.ShapeDtypeStruct((size, size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(compute_targets, model, spec=structure.loss), group.params, image, image)
    least = 2 * size * size * 3 * 4 + sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    least += 0 if remat else size * size * 64 * 4
    memory = device_memory().get("bytes_limit") or free_memory_bytes()
    out = {"size": size, "remat": remat, "conv": model.conv, "memory_bytes": memory, "least_bytes": least}
    if memory and least > memory:
        out.update(fits=False, compile_s=None, why=f"its image, gradient, targets{'' if remat else ', conv1_1'} alone "
                                                   f"take {gib(least)} GiB of {gib(memory)}")
        return out
    targets = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    ev = Evaluator.compile(group.loop.objective, group, jnp.full((size, size, 3), 0.5, jnp.float32), targets)
    out.update(compile_s=ev.compile_s, program_bytes=ev.program_bytes())
    if memory and out["program_bytes"] > memory:
        out.update(fits=False, why=f"XLA plans {gib(out['program_bytes'])} GiB of {gib(memory)}")
        return out
    try:
        r = ev.run(0)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is the answer; anything else is not
        out.update(fits=False, **failure(e))
        if not out["out_of_memory"]:
            raise
        out["why"] = "out of memory"
        return out
    finally:
        del ev, targets
        gc.collect()
    out.update(fits=True, eval_s=r["first_call_s"], **{k: r[k] for k in ("peak_bytes_in_use",) if k in r})
    return out


def fit(check: Check, part: Part) -> None:
    check.torch.close()  # its device memory is the fit search's now
    plan = check.plan
    part.result["memory_fraction"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    for remat in (False, True):
        mode = "remat" if remat else "plain"
        end = time.monotonic() + part.left() / (1 if remat else 2)
        tried = part.result.setdefault(f"{mode}_tried", {})

        def probe(size):
            r = part.measure(f"{size} px", functools.partial(fit_probe, check, size, remat), force=True, into=tried)
            r.setdefault("fits", False)
            return r

        def can_try():
            ok = end - time.monotonic() >= part.need()
            part.cut |= not ok
            return ok

        found = fit_search(probe, plan.fit_start, plan.fit_cap, can_try)
        found.pop("tried")
        part.result[mode] = found
        log(f"  largest {mode}: {fmt(found['largest'], 'd')} px (stopped: {found['stopped']})")


# --------------------------------------------------------------------------- targets and summary

def targets(report: dict, plan: Plan) -> list:
    """Each target of the GPU issue with its numbers and 'passed' (None: not measured)."""
    pe = report["parts"]["per_evaluation"].get("result", {}).get("measurements", {})
    f32 = {k: v for k, v in pe.items() if k.startswith("nstjax float32") and v.get("eval_s")}
    best = min(f32, key=lambda k: f32[k]["eval_s"]) if f32 else None
    best_s = f32[best]["eval_s"] if best else None
    torch_s = pe.get("pytorch float32", {}).get("eval_s")
    loop = report["parts"]["batched_loop"].get("result", {}).get("measurements", {})
    k_max = plan.members[-1]
    one, most = (loop.get(f"K={k}", {}).get("members_steps_per_s") for k in (1, k_max))
    ratio = most / one if one and most else None

    def verdict(passed):
        return {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[passed]

    out = [{"target": f"one evaluation (loss + gradient) at {plan.size} px in float32 ≤ {ITERATION_S * 1e3:g} ms",
            "nstjax_s": best_s, "measurement": best, "limit_s": ITERATION_S,
            "passed": None if best_s is None else bool(best_s <= ITERATION_S)},
           {"target": f"faster than eager PyTorch CUDA in IEEE float32 per evaluation at {plan.size} px",
            "nstjax_s": best_s, "measurement": best, "pytorch_s": torch_s,
            "nstjax_over_pytorch": best_s / torch_s if best_s and torch_s else None,
            "passed": None if not (best_s and torch_s) else bool(best_s < torch_s)},
           {"target": f"batched loop of {k_max} members at {plan.size} px ≥ {BATCH_RATIO:g}× the members·steps/s "
                      "of one member",
            "one_member": one, "members": k_max, "members_steps_per_s": most, "ratio": ratio,
            "passed": None if ratio is None else bool(ratio >= BATCH_RATIO)}]
    for t in out:
        t["verdict"] = verdict(t["passed"])
    return out


def summary(check: Check) -> str:
    rep = check.report
    env = rep["parts"]["environment"].get("result", {})
    lines = [f"{'DRY RUN on the CPU (not a measurement)' if rep['dry_run'] else 'GPU check'}: "
             f"{env.get('device_kind')}, jax {env.get('versions', {}).get('jax')}, budget {rep['budget']['total_s']:.0f} s,"
             f" used {check.elapsed():.0f} s"]
    lines += [f"  {name}: {p['status']}" for name, p in rep["parts"].items()]
    for name in ("per_evaluation", "large"):
        res = rep["parts"][name].get("result", {})
        rows = [[key, fmt(r["eval_s"] * 1e3, ".2f") if "eval_s" in r else r.get("status", "?")[:30],
                 fmt(r.get("compile_s"), ".1f"), fmt(r.get("achieved_tflops"), ".3g"), fmt(r.get("fraction_of_peak"), ".0%"),
                 fmt(r.get("loss_rel_diff_vs_nstjax_float32"), ".1e")]
                for key, r in res.get("measurements", {}).items()]
        if rows:
            lines.append(f"\n{name} at {res.get('size')} px: one loss + gradient (best of {check.plan.reps})\n"
                         + table(["", "ms", "compile s", "TFLOP/s", "of peak", "loss vs f32"], rows))
    res = rep["parts"]["batched_loop"].get("result", {})
    rows = [[key, fmt(r.get("members_steps_per_s"), ".1f") if "members_steps_per_s" in r else r.get("status", "?")[:30],
             fmt(r.get("throughput_vs_one"), ".2f"), fmt(r.get("compile_s"), ".1f"), gib(r.get("program_bytes")),
             gib(r.get("bytes_limit"))]
            for key, r in sorted(res.get("measurements", {}).items(), key=lambda kr: int(kr[0][2:]))]
    if rows:
        lines.append(f"\nbatched loop at {res.get('size')} px\n"
                     + table(["", "members·steps/s", "× K=1", "compile s", "program GiB", "limit GiB"], rows))
    res = rep["parts"]["fit"].get("result", {})
    for mode in ("plain", "remat"):
        if mode in res:
            lines.append(f"largest square image, {mode}: {fmt(res[mode]['largest'], 'd')} px "
                         f"(stopped: {res[mode]['stopped']})")
    note = " (dry run: these say nothing about a GPU)" if rep["dry_run"] else ""
    lines.append(f"\ntargets{note}")
    for t in targets(rep, check.plan):
        detail = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()
                           if k not in ("target", "passed", "verdict"))
        lines.append(f"{t['verdict']:12s} {t['target']}: {detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def unwritable(out: Path) -> str | None:
    """Why ``out`` cannot hold the check's files, or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".gpu-check-", suffix=".probe"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def installed_nstjax_first() -> None:
    """``python -m benchmarks.gpu`` in a checkout puts the checkout first on sys.path, where the
    nstjax folder lacks nstjax.configs and nstjax.examples (pip maps them in from configs/ and
    examples/). With nstjax installed as a package (gpu_wheels.sh's wheel), the checkout goes to
    the end of sys.path: nstjax is the installed one; benchmarks, imported already, the checkout's.
    An editable install (its own finder) changes nothing."""
    root = os.path.realpath(ROOT)
    here = [p for p in sys.path if os.path.realpath(p or os.curdir) == root]
    rest = [p for p in sys.path if p not in here]
    if here and importlib.machinery.PathFinder.find_spec("nstjax", rest) is not None:
        sys.path[:] = rest + here


def configure_jax(out: Path) -> Path:
    """The persistent compilation cache (and XLA's autotuning cache beside it), before anything
    compiles: $NSTJAX_CACHE/xla as the CLI's, else DIR/xla-cache (and nstjax's own caches, its
    compiled programs, in DIR/nstjax-cache rather than the user's cache folder)."""
    import jax

    if os.environ.get("NSTJAX_CACHE"):
        cache = Path(os.environ["NSTJAX_CACHE"]) / "xla"
    else:
        cache = out / "xla-cache"
        os.environ["NSTJAX_CACHE"] = str(out / "nstjax-cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    except (AttributeError, KeyError, ValueError):
        pass  # an older jax
    return cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.log (and xla-cache)")
    p.add_argument("--budget", type=float,
                   help=f"seconds in all (default {GPU.budget_s:.0f}; dry run {DRY_RUN.budget_s:.0f}); the watchdog "
                        f"stops the check {GPU.grace_s:.0f} s (dry run {DRY_RUN.grace_s:.0f} s) later")
    p.add_argument("--stop-after", choices=PARTS, help="skip the parts after this one")
    a = p.parse_args(argv)
    why = unwritable(a.out)
    if why:
        print(f"benchmarks.gpu: cannot write to --out {a.out}: {why}", file=sys.stderr)
        return 2
    out = a.out
    installed_nstjax_first()
    tee_to(out / "gpu.log")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device until the fit search
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", FIT_MEMORY_FRACTION)
    work = Path(tempfile.mkdtemp(prefix="nstjax-gpu-check-"))
    torch = TorchWorker(out / "gpu-torch.log")  # torch starts while jax does
    try:
        import jax

        configure_jax(out)
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        dry = not gpus
        plan = DRY_RUN if dry else GPU
        if dry:
            log(f"no GPU: jax sees none (backend {jax.default_backend()}); dry run of the check on the CPU at tiny "
                f"sizes, not a measurement → {out / 'gpu.json'}")
        budget = a.budget if a.budget is not None else plan.budget_s
        command = " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)])
        check = Check(out, plan, dry, budget, a.stop_after, torch, work, command)
        return run_check(check)
    finally:
        torch.close()
        shutil.rmtree(work, ignore_errors=True)


def run_check(check: Check) -> int:
    def expire():
        with check.lock:
            if check.current is not None:
                check.current.rec["status"] = "cut short (stopped by the watchdog: budget + grace spent)"
            for rec in check.report["parts"].values():
                if rec["status"] == "pending":
                    rec["status"] = "skipped (no time)"
            check.report["exit_status"] = 3
            check.save()
        log(f"\nwatchdog: {check.elapsed():.0f} s spent (budget {check.budget_s:.0f} s + grace "
            f"{check.plan.grace_s:.0f} s); stopped, {check.path} written")
        check.torch.kill()
        os._exit(3)

    watchdog = threading.Timer(max(0.0, check.budget_s + check.plan.grace_s - check.elapsed()), expire)
    watchdog.daemon = True
    watchdog.start()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        check.save()
        check.run("environment", environment, mandatory=True)
        check.run("agreement", agreement, mandatory=True)
        if not check.result("agreement").get("agree"):
            res = check.result("agreement")
            why = (f"the losses differ by {res['rel_diff']:.2e} relative (> {AGREEMENT_RTOL:g}): the two sides do "
                   "not compute the same objective" if "rel_diff" in res else res.get("why", "it did not run"))
            log(f"REFUSING TO MEASURE: the gate did not pass: {why}")
            check.skip_reason, status = "skipped (the gate did not pass)", 2
        check.run("per_evaluation", per_evaluation, mandatory=True)
        check.run("batched_loop", batched_loop)
        check.run("large", large)
        check.run("fit", fit)
        check.report["finished"] = True
    except Stopped as e:
        with check.lock:
            for rec in check.report["parts"].values():
                if rec["status"] == "pending":
                    rec["status"] = f"skipped (stopped by {e})"
        log(f"\nstopped by {e}")
        status = 3
    finally:
        watchdog.cancel()
        for s, h in previous.items():
            signal.signal(s, h)
    with check.lock:
        check.report["exit_status"] = status
        check.report["budget"]["used_s"] = check.elapsed()
        check.save()
    log("\n" + summary(check))
    log(f"\nwrote {check.path} ({check.elapsed():.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
