"""The PyTorch side of benchmarks.gpu: one worker process that keeps torch, its CUDA context and
cuDNN's autotuning between requests.

    python -m benchmarks.gpu_torch      # started by benchmarks.gpu (TorchWorker); talks on stdin/stdout

Requests and answers are JSON, one a line: a request ``{"id", "task", ...}``, its answer
``{"id", ...}`` (or ``{"id", "error", "traceback", "out_of_memory"}``). On start the worker
imports torch, initialises the device and sends ``{"id": "ready", ...}`` with its environment.
Tasks (``TASKS``):

- ``configure``: ``threads`` (CPU threads, for a dry run);
- ``problem``: load a problem that benchmarks.gpu wrote (``npz``: params, content, style, x;
  ``spec``, ``prep``, ``pooling``, ``hp``) under ``name``: the same Gatys objective as nstjax's
  (benchmarks.torch_gatys), its targets computed on the device;
- ``loss``: the float32 (IEEE) loss of a problem at its x, and with ``grad_path`` its gradient
  (H, W, 3) saved there (.npy);
- ``eval``: one loss + gradient timed, eager: ``precision`` 'float32' (IEEE) or 'tf32',
  ``benchmark`` (torch.backends.cudnn.benchmark), ``reps`` timed calls after a first one.

Anything printed by torch goes to stderr: stdout carries only the answers.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np


def main() -> int:
    answers = sys.stdout
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    import torch

    from benchmarks import torch_gatys as tg

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.zeros(1, device=device).sum().item()  # the CUDA context now, not in the first measurement
    problems = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def env(_req):
        out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "device": device,
               "torch_cuda": torch.version.cuda, "threads": torch.get_num_threads(),
               "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "start_s": time.perf_counter() - t0}
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            out.update(device_name=torch.cuda.get_device_name(0), total_memory_bytes=props.total_memory,
                       capability=list(torch.cuda.get_device_capability(0)))
        return out

    def configure(req):
        if req.get("threads"):
            torch.set_num_threads(int(req["threads"]))
        return {"threads": torch.get_num_threads()}

    def problem(req):
        data = np.load(req["npz"])
        params = {}
        for key in data.files:
            if key.startswith("params/"):
                _, name, part = key.split("/")
                params.setdefault(name, {})[part] = data[key]
        spec, prep, hp = SimpleNamespace(**req["spec"]), SimpleNamespace(**req["prep"]), req["hp"]
        tg.set_precision("float32")
        t = time.perf_counter()
        obj = tg.GatysObjective(tg.params_to_torch(params, device), spec, prep, req["pooling"], data["content"],
                                data["style"], hp["alpha"], hp["beta"], hp["content_layer_weights"],
                                hp["style_layer_weights"], hp.get("tv_weight", 0.0))
        x = tg.to_nchw(data["x"], device)
        sync()
        problems[req["name"]] = (obj, x)
        return {"name": req["name"], "shape": list(data["x"].shape), "targets_s": time.perf_counter() - t}

    def evaluate(obj, x0):
        """One loss + gradient, eager, waited for on the device (no copy to the host)."""
        x = x0.detach().requires_grad_(True)
        total = obj(x)[0]
        total.backward()
        sync()
        return total, x.grad

    def loss(req):
        obj, x0 = problems[req["name"]]
        tg.set_precision("float32")
        torch.backends.cudnn.benchmark = False
        total, grad = evaluate(obj, x0)
        out = {"loss": float(total.detach()), "precision": "float32"}
        if req.get("grad_path"):
            np.save(req["grad_path"], grad[0].permute(1, 2, 0).cpu().numpy())
            out["grad_path"] = req["grad_path"]
        return out

    def eval_(req):
        obj, x0 = problems[req["name"]]
        tg.set_precision(req.get("precision", "float32"))
        torch.backends.cudnn.benchmark = bool(req.get("benchmark", False))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        total, _ = evaluate(obj, x0)
        out = {"first_call_s": time.perf_counter() - t, "loss": float(total.detach()),
               "precision": req.get("precision", "float32"), "cudnn_benchmark": torch.backends.cudnn.benchmark,
               "device": device}
        times = []
        for _ in range(int(req.get("reps", 10))):
            t = time.perf_counter()
            evaluate(obj, x0)
            times.append(time.perf_counter() - t)
        out.update(times_s=times, eval_s=min(times) if times else out["first_call_s"],
                   eval_median_s=float(np.median(times)) if times else out["first_call_s"])
        if device == "cuda":
            out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()  # the device's memory back for nstjax's measurements
        return out

    tasks = {"env": env, "configure": configure, "problem": problem, "loss": loss, "eval": eval_}

    def answer(data):
        answers.write(json.dumps(data, default=float) + "\n")
        answers.flush()

    answer({"id": "ready", **env({})})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("task") == "quit":
            break
        try:
            res = tasks[req["task"]](req)
        except Exception as e:  # noqa: BLE001 - reported to benchmarks.gpu
            oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e)
            res = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:],
                   "out_of_memory": oom}
            if oom and device == "cuda":
                torch.cuda.empty_cache()
        answer({"id": req.get("id"), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
