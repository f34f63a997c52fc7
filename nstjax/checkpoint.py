"""Checkpoints of a run: the loop state in safetensors, the rest in JSON (no pickle).

``RUN_DIR/checkpoint/`` holds ``state-STEP.safetensors`` (pixels, optimiser
state, current loss and gradient, counters, RNG key: every leaf of the state,
named by its path) and ``checkpoint.json`` (step, history, the file name of the
state). The state file is written first and ``checkpoint.json`` last, both
atomically, so a checkpoint is always whole: an interrupted write leaves the
previous one in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from nstjax.atomic import atomic_path
from nstjax.errors import UserError
from nstjax.optimize import LoopState
from nstjax.outputs import write_json

CHECKPOINT_DIR = "checkpoint"
META = "checkpoint.json"


def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def save(run_dir: Path, state: LoopState, rng_key: jax.Array, history: list, extra: dict) -> Path:
    """Write a checkpoint of ``state`` into ``run_dir/checkpoint``; return the directory."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    leaves = jax.device_get(jax.tree_util.tree_leaves(state))
    tensors = {name: np.ascontiguousarray(np.asarray(leaf))
               for name, leaf in zip(_leaf_names(state), leaves)}
    tensors["rng_key"] = np.asarray(jax.random.key_data(rng_key))
    step = int(state.step)
    state_file = f"state-{step:08d}.safetensors"
    with atomic_path(ckpt / state_file) as tmp:
        save_file(tensors, str(tmp))
    write_json(ckpt / META, {"step": step, "state_file": state_file, "history": history, **extra})
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != state_file:
            old.unlink(missing_ok=True)
    return ckpt


def load(run_dir: Path, template: LoopState) -> tuple[LoopState, jax.Array, dict]:
    """Read the checkpoint of ``run_dir`` into the structure of ``template``.

    Returns the state, the RNG key and the JSON metadata (with the history).
    """
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise UserError(f"no checkpoint in {run_dir} (expected {meta_path}); "
                        "resume= takes the directory of an interrupted run")
    meta = json.loads(meta_path.read_text())
    try:
        tensors = load_file(str(ckpt / meta["state_file"]))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint in {ckpt} is unreadable ({e}); start the run again") from e
    names = _leaf_names(template)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    if set(names) != set(tensors) - {"rng_key"}:
        raise UserError(f"checkpoint in {ckpt} does not match this configuration "
                        "(different optimiser or image size); resume with the run's own settings")
    leaves = []
    for name, like in zip(names, template_leaves):
        value = tensors[name]
        if value.size == np.size(like):  # safetensors stores 0-d arrays as shape (1,)
            value = value.reshape(np.shape(like))
        if value.shape != np.shape(like) or value.dtype != np.asarray(like).dtype:
            raise UserError(f"checkpoint tensor {name} in {ckpt} has shape {value.shape} "
                            f"{value.dtype}, expected {np.shape(like)} {np.asarray(like).dtype}")
        leaves.append(jax.numpy.asarray(value))
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    key = jax.random.wrap_key_data(tensors["rng_key"])
    return state, key, meta
