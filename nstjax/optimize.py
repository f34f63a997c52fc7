"""The optimisation loop: Adam or L-BFGS (optax's; without line search torch's rule,
:mod:`nstjax.lbfgs`) over the pixels, in jitted chunks.

Each step computes an update from the gradient at the current image (L-BFGS
with the zoom line search evaluates the objective more times on its own), adds
it, clips the pixels to [0, 1] (projected gradient descent: the image is always
a valid picture; with ``OptimSpec.clip=False`` not, as neural-style) and
evaluates the objective at the new image, whose weighted terms become that
step's history row. ``K`` steps run inside one compiled
``lax.scan``; Python only runs between chunks.

The loop takes a batch of problems (:class:`Problem`, every leaf with a leading
member axis): a sweep's members are optimised together, each exactly as it
would be alone, and a single run is a batch of one. A step whose loss, gradient
or pixels are not finite is not taken: that member keeps its last finite image,
its ``status`` says why it stopped, and the others go on.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nstjax.lbfgs import torch_lbfgs
from nstjax import programs
from nstjax.losses import HParams, Targets, Terms

OPTIMIZERS = ("adam", "lbfgs")
LINESEARCHES = ("zoom", "none")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimiser's structure. The learning rate is an array argument (sweepable).

    adam: optax.adam(lr, b1, b2, eps); with ``epsilon_hat`` ε is added to √v
    instead of √v̂ (Kingma & Ba 2015, end of §2; what Keras and TensorFlow do).
    lbfgs with ``memory_size`` pairs: ``linesearch='zoom'`` is optax.lbfgs with
    optax's zoom line search (strong Wolfe, at most ``max_linesearch_steps``
    evaluations a step, lr unused); ``'none'`` is :func:`nstjax.lbfgs.torch_lbfgs`,
    torch.optim.LBFGS's rule (and torch7 optim.lbfgs's, neural-style's) without
    line search, one evaluation a step: the step lr · direction, the first one
    min(1, 1/‖g‖₁) · lr · (−g); a pair is kept only if yᵀs > 1e-10.
    ``clip``: the pixels are clipped to [0, 1] after each step; False leaves them
    unclamped during the optimisation (neural-style; the saved image is clamped).
    """

    name: str = "lbfgs"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epsilon_hat: bool = False
    memory_size: int = 100
    linesearch: str = "zoom"
    max_linesearch_steps: int = 20
    max_increase: float | None = None
    clip: bool = True

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.name!r}")
        if self.linesearch not in LINESEARCHES:
            raise ValueError(f"linesearch must be one of {LINESEARCHES}, not {self.linesearch!r}")

    @property
    def safeguarded(self) -> bool:
        """L-BFGS without line search with the safeguard on (``max_increase``)."""
        return self.name == "lbfgs" and self.linesearch == "none" and self.max_increase is not None

    def transformation(self, lr: jax.Array) -> optax.GradientTransformationExtraArgs:
        if self.name == "adam" and self.epsilon_hat:
            return optax.chain(scale_by_adam_epsilon_hat(self.b1, self.b2, self.eps),
                               optax.scale_by_learning_rate(lr))
        if self.name == "adam":
            return optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.eps)
        if self.linesearch == "zoom":
            return optax.lbfgs(
                memory_size=self.memory_size,
                linesearch=optax.scale_by_zoom_linesearch(
                    self.max_linesearch_steps, initial_guess_strategy="one"
                ),
            )
        return torch_lbfgs(lr, memory_size=self.memory_size)


def scale_by_adam_epsilon_hat(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam with ε beside √v: √(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v + ε) (Keras/TF form)."""

    def init(params):
        zeros = jnp.zeros_like(params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates, state, params=None):
        mu = b1 * state.mu + (1 - b1) * updates
        nu = b2 * state.nu + (1 - b2) * jnp.square(updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        scale = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        return scale * mu / (jnp.sqrt(nu) + eps), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


SAFEGUARD_SHRINK = 0.1
SAFEGUARD_REACH = 0.05
SAFEGUARD_GROW = 10.0


def backtrack(update: jax.Array) -> jax.Array:
    """The factor by which to shorten a step ``update`` that was taken back: 10× shorter, and short
    enough that no pixel moves by more than SAFEGUARD_REACH (a step that overshot by orders of
    magnitude comes back in one retry, not in one retry per factor of 10)."""
    return jnp.minimum(SAFEGUARD_SHRINK, SAFEGUARD_REACH / jnp.max(jnp.abs(update)))


class Status(enum.IntEnum):
    """Why a member is no longer stepping (RUNNING while it is)."""

    RUNNING = 0
    NONFINITE_LOSS = 1
    NONFINITE_PIXELS = 2

    @property
    def reason(self) -> str | None:
        return {Status.NONFINITE_LOSS: "the loss or its gradient became NaN or Inf",
                Status.NONFINITE_PIXELS: "the pixels became NaN or Inf"}.get(self)


class Problem(NamedTuple):
    """One style-transfer problem as arrays: everything in which the members of a sweep may differ.

    A batch of problems has a leading member axis on every leaf. The VGG params are
    shared by all members and passed beside it.
    """

    pixels: jax.Array  # (H, W, 3) the initial image, in [0, 1]
    targets: Targets
    hp: HParams
    lr: jax.Array  # float32 learning rate (L-BFGS: step scale with linesearch=none)
    key: jax.Array  # typed PRNG key of the run
    ema_decay: jax.Array  # float32 d of the average of the iterates (0: the average is the iterate)


class LoopState(NamedTuple):
    """Everything a run needs to continue: what a checkpoint saves."""

    pixels: jax.Array  # (H, W, 3) in [0, 1]
    opt_state: optax.OptState
    terms: Terms  # at ``pixels``
    grad: jax.Array  # d total / d pixels at ``pixels``
    key: jax.Array  # typed PRNG key, split at every step
    step: jax.Array  # int32, steps taken
    evaluations: jax.Array  # int32, objective evaluations so far
    status: jax.Array  # int32 Status: RUNNING or why the run stopped
    scale: jax.Array  # float32: the step length factor of L-BFGS's safeguard (OptimSpec.max_increase), 1 else
    average: jax.Array  # the exponential moving average of the iterates, before bias correction (average())
    decayed: jax.Array  # d to the power of the updates the average has had: its bias correction


def average(state) -> jax.Array:
    """The bias-corrected exponential moving average of each member's iterates (crowsonkb's
    ``--avg-decay``; Kingma & Ba's bias correction): a = v / (1 − dᵗ), v ← d·v + (1 − d)·x after
    x₀ and each step; with d = 0 exactly the iterate. Works on device and host (numpy) states."""
    decayed = state.decayed.reshape(state.decayed.shape + (1,) * (state.average.ndim - state.decayed.ndim))
    return state.average / (1 - decayed)


class StepRecord(NamedTuple):
    """What a chunk records of each step of each member: the steps taken, the weighted terms after
    it, and the objective evaluations spent so far (each with its own dtype)."""

    step: jax.Array  # int32
    terms: Terms
    evaluations: jax.Array  # int32


class HistoryRow(NamedTuple):
    """One row of history.csv: the weighted terms after ``step`` steps of pyramid level ``level``
    (with video, of frame ``frame`` in pass ``pass_``, the column ``pass``)."""

    step: int
    total: float
    content: float
    style: float
    tv: float
    level: int = 0
    temporal: float = 0.0
    frame: int = 0
    pass_: int = 0

    @classmethod
    def of(cls, step, terms: Terms, level: int) -> "HistoryRow":
        """A row from a step count and the (host) terms after it."""
        return cls(int(step), float(terms.total), float(terms.content), float(terms.style), float(terms.tv),
                   level, float(terms.temporal))


Objective = Callable[[jax.Array, dict, Targets, HParams, jax.Array], Terms]
MEMBERS = "members"
"""The name of the member axis of a device mesh."""
MEMBER_BATCHING = ("vmap", "map")


class Program(NamedTuple):
    """The compiled batched functions of one group: ``init(problems, params)`` and
    ``chunk(state, problems, params, n, max_evaluations) -> (state, records, valid)``
    (:class:`StepRecord`), and the shapes of the state."""

    init: object
    chunk: object
    state: LoopState


class Loop:
    """The optimisation of one objective with one optimiser over a batch of problems.

    ``init(problems, params)`` evaluates the objective at each member's initial
    image (step 0). ``chunk(state, problems, params, n, max_evaluations)`` takes
    up to ``n <= chunk_steps`` steps, each member stopping once it has spent
    ``max_evaluations`` objective evaluations or stopped (diverged), and returns
    the new state, each member's :class:`StepRecord` after each step, and
    which records are steps taken. Every leaf of
    ``problems`` and of the state has the member axis first; the VGG params are
    shared. A single run is a batch of one. :meth:`compile` shards the member
    axis over a device mesh. ``n`` and ``max_evaluations`` are traced.

    A chunk is a loop whose trip count is ``n``: it computes the steps it takes
    and no more, and stops early once no member is active. Each step runs
    every member's step (``members``): ``'vmap'`` batches them (a member that
    has stopped is computed and discarded; the zoom line search's branches
    become selects that evaluate both, and each step waits for the slowest
    member's while loop), ``'map'`` runs them one after another inside the
    same program (``lax.map``: each member's working set stays that of a solo
    run, a stopped member costs nothing and each line search runs only as
    long as its own member needs; one compile and one process still serve
    them all). A batch of one member runs unbatched either way. A ``vmap`` of
    whole per-member chunks instead of per-member steps is 6× slower on
    XLA:CPU (its ``cond`` becomes a select over a batched loop).
    """

    def __init__(self, objective: Objective, spec: OptimSpec, chunk_steps: int = 10, members: str = "vmap"):
        if members not in MEMBER_BATCHING:
            raise ValueError(f"members must be one of {MEMBER_BATCHING}, not {members!r}")
        self.objective = objective
        self.spec = spec
        self.chunk_steps = int(chunk_steps)
        self.members = members

    def _value_and_grad(self, pixels, params, problem: Problem, key):
        def total(x):
            terms = self.objective(x, params, problem.targets, problem.hp, key)
            return terms.total, terms

        (_, terms), grad = jax.value_and_grad(total, has_aux=True)(pixels)
        return terms, grad

    def _init_one(self, problem: Problem, params) -> LoopState:
        key, eval_key = jax.random.split(problem.key)
        terms, grad = self._value_and_grad(problem.pixels, params, problem, eval_key)
        opt_state = self.spec.transformation(problem.lr).init(problem.pixels)
        status = jnp.where(_finite(terms.total, grad), Status.RUNNING, Status.NONFINITE_LOSS)
        d = problem.ema_decay.astype(problem.pixels.dtype)
        return LoopState(problem.pixels, opt_state, terms, grad, key, jnp.int32(0), jnp.int32(1),
                         status.astype(jnp.int32), jnp.ones((), problem.pixels.dtype), (1 - d) * problem.pixels, d)

    def _step_one(self, state: LoopState, problem: Problem, params) -> LoopState:
        tx = self.spec.transformation(problem.lr * state.scale)
        key, eval_key = jax.random.split(state.key)

        def value_fn(x):
            return self.objective(x, params, problem.targets, problem.hp, eval_key).total

        updates, opt_state = tx.update(
            state.grad, state.opt_state, state.pixels,
            value=state.terms.total, grad=state.grad, value_fn=value_fn,
        )
        stepped = state.pixels + updates
        pixels = jnp.clip(stepped, 0.0, 1.0) if self.spec.clip else stepped
        terms, grad = self._value_and_grad(pixels, params, problem, eval_key)
        linesearch_evals = optax.tree.get(opt_state, "num_linesearch_steps", 0)
        status = jnp.where(
            ~jnp.all(jnp.isfinite(stepped)), Status.NONFINITE_PIXELS,
            jnp.where(_finite(terms.total, grad), Status.RUNNING, Status.NONFINITE_LOSS),
        ).astype(jnp.int32)
        d = problem.ema_decay.astype(pixels.dtype)
        new = LoopState(pixels, opt_state, terms, grad, key, state.step + 1,
                        state.evaluations + 1 + jnp.int32(linesearch_evals), status, state.scale,
                        d * state.average + (1 - d) * pixels, state.decayed * d)
        if self.spec.safeguarded:  # a finite step that raises the loss too far is taken back, shorter
            back = (status == Status.RUNNING) & (terms.total > self.spec.max_increase * state.terms.total)
            shorter = state.scale * backtrack(updates)
            new = _select(back, state._replace(opt_state=None, key=key, step=new.step, evaluations=new.evaluations,
                                               scale=shorter),
                          new._replace(opt_state=None, scale=jnp.minimum(1.0, state.scale * SAFEGUARD_GROW)))
            new = new._replace(opt_state=opt_state)
        # A non-finite step is not taken: keep the last finite image, losses and step, record why.
        # The optimiser state is not kept (the member stops there, and a second copy of an L-BFGS
        # history would double the memory of the step).
        kept = _select(status == Status.RUNNING, new._replace(opt_state=None), state._replace(opt_state=None))
        return kept._replace(opt_state=opt_state, status=status, evaluations=new.evaluations)

    def _vmapped(self, problems: Problem) -> bool:
        """Whether members are batched by ``vmap``: with 'vmap' and more than one member (a batch
        of one runs unbatched, so that the line search's branches stay branches)."""
        return self.members == "vmap" and problems.lr.shape[0] > 1

    def init(self, problems: Problem, params) -> LoopState:
        if self._vmapped(problems):
            return jax.vmap(self._init_one, in_axes=(0, None))(problems, params)
        return jax.lax.map(lambda p: self._init_one(p, params), problems)

    def _steps(self, active, state: LoopState, problems: Problem, params) -> LoopState:
        """One step of every ``active`` member; the others keep their state."""
        if self._vmapped(problems):  # every member computed, the inactive ones' discarded
            stepped = jax.vmap(self._step_one, in_axes=(0, 0, None))(state, problems, params)
            return _select(active, stepped, state)

        def step_if(args):  # a stopped member costs nothing
            a, s, p = args
            return jax.lax.cond(a, lambda s: self._step_one(s, p, params), lambda s: s, s)

        return jax.lax.map(step_if, (active, state, problems))

    def chunk(self, state: LoopState, problems: Problem, params, n, max_evaluations):
        """Up to ``n`` steps (a loop whose trip count is ``n``, so a chunk of fewer steps costs
        only those), and none once no member is active. Returns the new state, a
        :class:`StepRecord` of each step (leaves (members, chunk_steps)) and which records are
        steps taken."""
        def active(state):
            return (state.status == Status.RUNNING) & (state.evaluations < max_evaluations)

        def more(carry):
            i, state, _, _ = carry
            return (i < jnp.minimum(n, self.chunk_steps)) & jnp.any(active(state))

        def body(carry):
            i, state, records, valid = carry
            now = active(state)
            state = self._steps(now, state, problems, params)
            record = StepRecord(state.step, state.terms, state.evaluations)
            records = jax.tree.map(lambda buffer, value: buffer.at[i].set(value), records, record)
            return i + 1, state, records, valid.at[i].set(now & (state.status == Status.RUNNING))

        def buffer(like):  # made from the state (zeros_like): inside shard_map it varies over the members
            return jnp.broadcast_to(jnp.zeros_like(like)[None], (self.chunk_steps, *like.shape))

        records = jax.tree.map(buffer, StepRecord(state.step, state.terms, state.evaluations))
        valid = buffer(state.status == Status.RUNNING)
        _, state, records, valid = jax.lax.while_loop(more, body, (jnp.int32(0), state, records, valid))
        members_first = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
        return state, jax.tree.map(members_first, records), members_first(valid)

    def compile(self, problems: Problem, params, mesh: Mesh | None = None, structure=None) -> Program:
        """Compile init and chunk for these shapes, the member axis sharded over ``mesh``
        (default: all local devices; the member count must be a multiple of its size), the
        params replicated: with ``'vmap'`` as shardings of the whole program (XLA partitions
        it), with ``'map'`` each device mapping over its own members (``shard_map``). With a
        ``structure`` (what the objective and the optimiser are, :attr:`nstjax.build.Structure.program_key`)
        the compiled programs are kept across processes (:mod:`nstjax.programs`)."""
        mesh = mesh or member_mesh()
        m, r = P(MEMBERS), P()
        members, replicated = NamedSharding(mesh, m), NamedSharding(mesh, r)
        init_kw = dict(in_shardings=(members, replicated), out_shardings=members)
        chunk_kw = dict(in_shardings=(members, members, replicated, replicated, replicated), out_shardings=members,
                        donate_argnums=(0,))
        if self.members == "vmap":
            init, chunk = self.init, self.chunk
        else:
            init = jax.shard_map(self.init, mesh=mesh, in_specs=(m, r), out_specs=m)
            chunk = jax.shard_map(self.chunk, mesh=mesh, in_specs=(m, m, r, r, r), out_specs=m)

        def chunk_args():  # the state's shapes: traced only when the chunk is compiled
            state = jax.eval_shape(jax.jit(init, **init_kw), problems, params)
            return state, problems, params, jnp.int32(0), jnp.int32(0)

        key = None if structure is None else (structure, self.chunk_steps, self.members)
        init_c, chunk_c = programs.compile_many([
            ("init", init, lambda: (problems, params), (problems, params), init_kw, key),
            ("chunk", chunk, chunk_args, (problems, params), chunk_kw, key)], mesh)
        return Program(init_c, chunk_c, init_c.out_info)


def _select(which: jax.Array, a, b):
    """Leaves of ``a`` where ``which`` (a scalar, or one flag per member along the leading
    axis), else of ``b``; PRNG keys through their data; None leaves stay None."""
    def pick(x, y):
        if x is None:
            return None
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = pick(jax.random.key_data(x), jax.random.key_data(y))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jnp.where(which.reshape(which.shape + (1,) * (x.ndim - which.ndim)), x, y)

    return jax.tree.map(pick, a, b, is_leaf=lambda x: x is None)


def member_mesh(devices=None) -> Mesh:
    """A one-axis mesh over ``devices`` (default: all local devices) for the member axis."""
    return Mesh(np.asarray(devices or jax.local_devices()), (MEMBERS,))


def _finite(total, grad) -> jax.Array:
    return jnp.isfinite(total) & jnp.all(jnp.isfinite(grad))
