"""Checkpoints of a run: the loop state in safetensors, the rest in JSON (no pickle).

``RUN_DIR/checkpoint/`` holds ``state-STEP.safetensors`` (pixels, optimiser
state, current loss and gradient, RNG keys, counters: every leaf of the state of
every member of the group, named by its path) and ``checkpoint.json`` (step,
the members' histories, the file name of the state and its sha256). The state
file is written first and ``checkpoint.json`` last, both atomically, so a
checkpoint is always whole: an interrupted or failed write leaves the previous
one in place (a state file whose checkpoint.json could not be written is removed
again). A checkpoint is read only once its state file matches the sha256 that
checkpoint.json records and its step; a truncated or changed one is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from nstjax.atomic import atomic_path
from nstjax.errors import UserError
from nstjax.optimize import HistoryRow, LoopState
from nstjax.outputs import write_json
from nstjax.status import RunStatus
from nstjax.weights.formats import file_hash

CHECKPOINT_DIR = "checkpoint"
META = "checkpoint.json"


@dataclasses.dataclass
class LevelResult:
    """What a member ends a pyramid level with (metrics.json's ``levels``: each level's facts)."""

    level: int
    size: list[int]
    status: RunStatus
    reason: str | None
    steps: int
    loss_evaluations: int
    run_seconds: float
    compile_seconds: float

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, data: dict) -> "LevelResult":
        return cls(**{**data, "status": RunStatus(data["status"])})


@dataclasses.dataclass
class Earlier:
    """What the levels below the one running left, per member of the wave: their history rows,
    their results and the initial image's yardsticks (None before the first level ends)."""

    histories: list[list[HistoryRow]]
    levels: list[list[LevelResult]]
    initial: list[dict] | None = None

    @classmethod
    def none(cls, members: int) -> "Earlier":
        return cls([[] for _ in range(members)], [[] for _ in range(members)])

    def then(self, histories: list[list[HistoryRow]], levels: list[LevelResult], initial: list[dict] | None) -> "Earlier":
        """With one more level: its rows, its results, the initial yardsticks if not known yet."""
        return Earlier([e + h for e, h in zip(self.histories, histories)],
                       [e + [r] for e, r in zip(self.levels, levels)], self.initial or initial)

    def to_json(self) -> dict:
        return {"histories": self.histories, "levels": [[r.to_json() for r in rs] for rs in self.levels],
                "initial": self.initial}

    @classmethod
    def from_json(cls, data: dict) -> "Earlier":
        return cls([[HistoryRow(*r) for r in h] for h in data["histories"]],
                   [[LevelResult.from_json(r) for r in rs] for rs in data["levels"]], data["initial"])


@dataclasses.dataclass
class CheckpointMeta:
    """checkpoint.json: where the group's run stands (its wave, level, the members' histories at this
    level, what the levels below left, the seconds run), and which state file holds its arrays."""

    wave: int
    wave_size: int
    level: int
    histories: list[list[HistoryRow]]
    earlier: Earlier
    run_seconds: float
    step: int = 0
    state_file: str = ""
    state_sha256: str = ""

    def to_json(self) -> dict:
        return {"wave": self.wave, "wave_size": self.wave_size, "level": self.level, "histories": self.histories,
                "earlier": self.earlier.to_json(), "run_seconds": self.run_seconds, "step": self.step,
                "state_file": self.state_file, "state_sha256": self.state_sha256}

    @classmethod
    def from_json(cls, data: dict) -> "CheckpointMeta":
        return cls(data["wave"], data["wave_size"], data.get("level", 0),
                   [[HistoryRow(*r) for r in h] for h in data["histories"]],
                   Earlier.from_json(data["earlier"]) if data.get("earlier") else Earlier.none(data["wave_size"]),
                   data["run_seconds"], data["step"], data["state_file"], data["state_sha256"])


def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save(run_dir: Path, state: LoopState, meta: CheckpointMeta) -> Path:
    """Write a checkpoint of ``state`` (a batch of members) into ``run_dir/checkpoint``; return
    the directory. ``meta`` (histories, run seconds, ...) goes into checkpoint.json with the
    state file's name, step and sha256."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    leaves = [jax.random.key_data(leaf) if _is_key(leaf) else leaf
              for leaf in jax.tree_util.tree_leaves(state)]
    tensors = {name: np.ascontiguousarray(np.asarray(leaf))
               for name, leaf in zip(_leaf_names(state), jax.device_get(leaves))}
    step = int(np.max(np.asarray(tensors[".step"])))
    state_file = f"state-{step:08d}.safetensors"
    rewritten = (ckpt / state_file).exists()  # this step's state again (an interrupt after a periodic one)
    with atomic_path(ckpt / state_file) as tmp:
        save_file(tensors, str(tmp))
        digest = file_hash(tmp)
    try:
        meta = dataclasses.replace(meta, step=step, state_file=state_file, state_sha256=digest)
        write_json(ckpt / META, meta.to_json())
    except BaseException:
        if not rewritten:  # the previous checkpoint.json names another state file: keep that one only
            (ckpt / state_file).unlink(missing_ok=True)
        raise
    for old in ckpt.iterdir():  # earlier states, and the temporary files of killed writes
        if old.name not in (state_file, META):
            old.unlink(missing_ok=True)
    return ckpt


def read_meta(run_dir: Path) -> CheckpointMeta:
    """The JSON part of the checkpoint of ``run_dir``; a missing or unreadable one is a UserError."""
    meta_path = Path(run_dir) / CHECKPOINT_DIR / META
    if not meta_path.is_file():
        raise UserError(f"no checkpoint in {run_dir} (expected {meta_path}); "
                        "resume= takes the directory of an interrupted run")
    try:
        data = json.loads(meta_path.read_text())
        if not all(isinstance(data.get(k), t) for k, t in (("step", int), ("state_file", str),
                                                            ("state_sha256", str))):
            raise ValueError("no step, state_file or state_sha256")
        return CheckpointMeta.from_json(data)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable ({e}): the checkpoint is damaged and cannot be "
                        "resumed; start the run again") from e


def verify(run_dir: Path) -> CheckpointMeta:
    """The JSON part of the checkpoint of ``run_dir``, once its state file is found to be the one
    written (the sha256 checkpoint.json records); a missing, truncated or changed one is a UserError."""
    meta = read_meta(run_dir)
    path = Path(run_dir) / CHECKPOINT_DIR / meta.state_file
    try:
        digest = file_hash(path)
    except OSError as e:
        raise UserError(f"checkpoint state {path} is unreadable ({e.strerror or e}): the checkpoint "
                        "cannot be resumed; start the run again") from e
    if digest != meta.state_sha256:
        raise UserError(f"checkpoint state {path} is damaged: truncated or changed since it was written "
                        f"(its sha256 is {digest}, checkpoint.json records {meta.state_sha256}); "
                        "it cannot be resumed: start the run again")
    return meta


def load(run_dir: Path, template: LoopState, sharding=None) -> LoopState:
    """Read the checkpoint of ``run_dir`` (verified: :func:`verify`) into the structure of
    ``template`` (placed with ``sharding``, if given)."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    meta = verify(run_dir)
    try:
        tensors = load_file(str(ckpt / meta.state_file))
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint in {ckpt} is unreadable ({e}); start the run again") from e
    names = _leaf_names(template)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    if set(names) != set(tensors):
        raise UserError(f"checkpoint in {ckpt} does not match this configuration "
                        "(different optimiser or image size); resume with the run's own settings")
    if int(np.max(tensors[".step"])) != meta.step:
        raise UserError(f"checkpoint in {ckpt} is damaged: checkpoint.json is at step {meta.step}, "
                        f"its state at step {int(np.max(tensors['.step']))}; start the run again")
    leaves = []
    for name, like in zip(names, template_leaves):
        value = tensors[name]
        want = jax.random.key_data(like) if _is_key(like) else like
        if value.size == np.size(want):  # safetensors stores 0-d arrays as shape (1,)
            value = value.reshape(np.shape(want))
        if value.shape != np.shape(want) or value.dtype != want.dtype:
            raise UserError(f"checkpoint tensor {name} in {ckpt} has shape {value.shape} "
                            f"{value.dtype}, this configuration {np.shape(want)} {want.dtype}: "
                            "resume with the run's own settings")
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)) if _is_key(like) else value
        leaves.append(jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)
