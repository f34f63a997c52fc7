"""Checkpoints of a run: the loop state in safetensors, the rest in JSON (no pickle).

``RUN_DIR/checkpoint/`` holds ``state-STEP.safetensors`` (pixels, optimiser
state, current loss and gradient, RNG keys, counters: every leaf of the state of
every member of the group, named by its path) and ``checkpoint.json`` (step,
the members' histories, the file name of the state). The state file is written first and ``checkpoint.json`` last, both
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


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save(run_dir: Path, state: LoopState, meta: dict) -> Path:
    """Write a checkpoint of ``state`` (a batch of members) into ``run_dir/checkpoint``; return
    the directory. ``meta`` (histories, run seconds, ...) goes into checkpoint.json."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    leaves = [jax.random.key_data(leaf) if _is_key(leaf) else leaf
              for leaf in jax.tree_util.tree_leaves(state)]
    tensors = {name: np.ascontiguousarray(np.asarray(leaf))
               for name, leaf in zip(_leaf_names(state), jax.device_get(leaves))}
    step = int(np.max(np.asarray(tensors[".step"])))
    state_file = f"state-{step:08d}.safetensors"
    with atomic_path(ckpt / state_file) as tmp:
        save_file(tensors, str(tmp))
    write_json(ckpt / META, {"step": step, "state_file": state_file, **meta})
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != state_file:
            old.unlink(missing_ok=True)
    return ckpt


def read_meta(run_dir: Path) -> dict:
    """The JSON part of the checkpoint of ``run_dir``; a missing one is a UserError."""
    meta_path = Path(run_dir) / CHECKPOINT_DIR / META
    if not meta_path.is_file():
        raise UserError(f"no checkpoint in {run_dir} (expected {meta_path}); "
                        "resume= takes the directory of an interrupted run")
    return json.loads(meta_path.read_text())


def load(run_dir: Path, template: LoopState, sharding=None) -> LoopState:
    """Read the checkpoint of ``run_dir`` into the structure of ``template`` (placed with
    ``sharding``, if given)."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    meta = read_meta(run_dir)
    try:
        tensors = load_file(str(ckpt / meta["state_file"]))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint in {ckpt} is unreadable ({e}); start the run again") from e
    names = _leaf_names(template)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    if set(names) != set(tensors):
        raise UserError(f"checkpoint in {ckpt} does not match this configuration "
                        "(different optimiser or image size); resume with the run's own settings")
    leaves = []
    for name, like in zip(names, template_leaves):
        value = tensors[name]
        want = jax.random.key_data(like) if _is_key(like) else like
        if value.size == np.size(want):  # safetensors stores 0-d arrays as shape (1,)
            value = value.reshape(np.shape(want))
        if value.shape != np.shape(want) or value.dtype != want.dtype:
            raise UserError(f"checkpoint tensor {name} in {ckpt} has shape {value.shape} "
                            f"{value.dtype}, expected {np.shape(want)} {want.dtype}")
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)) if _is_key(like) else value
        leaves.append(jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)
