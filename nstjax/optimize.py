"""The optimisation loop: optax Adam or L-BFGS over the pixels, in jitted chunks.

Each step computes an update from the gradient at the current image (L-BFGS
with the zoom line search evaluates the objective more times on its own), adds
it, clips the pixels to [0, 1] (projected gradient descent: the image is always
a valid picture) and evaluates the objective at the new image, whose weighted
terms become that step's history row. ``K`` steps run inside one compiled
``lax.scan``; Python only runs between chunks.

A step whose loss, gradient or pixels are not finite is not taken: the state
keeps the last finite image and its ``status`` says why the run stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nstjax.losses import HParams, Targets, Terms

RUNNING, NONFINITE_LOSS, NONFINITE_PIXELS = 0, 1, 2
STATUS_REASONS = {
    NONFINITE_LOSS: "the loss or its gradient became NaN or Inf",
    NONFINITE_PIXELS: "the pixels became NaN or Inf",
}
OPTIMIZERS = ("adam", "lbfgs")
LINESEARCHES = ("zoom", "none")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimiser's structure. The learning rate is an array argument (sweepable).

    adam: optax.adam(lr, b1, b2, eps); with ``epsilon_hat`` ε is added to √v
    instead of √v̂ (Kingma & Ba 2015, end of §2; what Keras and TensorFlow do).
    lbfgs: optax.lbfgs with ``memory_size`` pairs; ``linesearch='zoom'`` uses
    optax's zoom line search (strong Wolfe, at most ``max_linesearch_steps``
    evaluations a step, lr unused); ``'none'`` takes the step ``lr`` · direction,
    one evaluation a step, as torch.optim.LBFGS does by default (the first
    step is scaled by min(1, 1/‖g‖)).
    """

    name: str = "lbfgs"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epsilon_hat: bool = False
    memory_size: int = 100
    linesearch: str = "zoom"
    max_linesearch_steps: int = 20

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.name!r}")
        if self.linesearch not in LINESEARCHES:
            raise ValueError(f"linesearch must be one of {LINESEARCHES}, not {self.linesearch!r}")

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
        return optax.lbfgs(learning_rate=lr, memory_size=self.memory_size, linesearch=None)


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


class LoopState(NamedTuple):
    """Everything a run needs to continue: what a checkpoint saves."""

    pixels: jax.Array  # (H, W, 3) in [0, 1]
    opt_state: optax.OptState
    terms: Terms  # at ``pixels``
    grad: jax.Array  # d total / d pixels at ``pixels``
    step: jax.Array  # int32, steps taken
    evaluations: jax.Array  # int32, objective evaluations so far
    status: jax.Array  # int32, RUNNING or why the run stopped


Objective = Callable[[jax.Array, dict, Targets, HParams], Terms]


class Loop:
    """Compiled init and chunk functions for one objective, optimiser and chunk size.

    ``init(pixels, params, targets, hp, lr)`` evaluates the objective at the
    initial image (step 0). ``chunk(state, params, targets, hp, lr, n,
    max_evaluations)`` takes up to ``n <= chunk_steps`` steps, stopping early
    once ``max_evaluations`` objective evaluations are spent, and returns the
    new state, the rows (step, total, content, style, tv, evaluations) after
    each step, and which rows are steps taken. Compiled once per image shape:
    ``n``, ``hp``, ``lr`` and ``max_evaluations`` are traced.
    """

    def __init__(self, objective: Objective, spec: OptimSpec, chunk_steps: int = 10):
        self.objective = objective
        self.spec = spec
        self.chunk_steps = int(chunk_steps)
        self.init = jax.jit(self._init)
        self.chunk = jax.jit(self._chunk, donate_argnums=(0,))

    def _value_and_grad(self, pixels, params, targets, hp):
        def total(x):
            terms = self.objective(x, params, targets, hp)
            return terms.total, terms

        (_, terms), grad = jax.value_and_grad(total, has_aux=True)(pixels)
        return terms, grad

    def _init(self, pixels, params, targets, hp, lr) -> LoopState:
        terms, grad = self._value_and_grad(pixels, params, targets, hp)
        opt_state = self.spec.transformation(lr).init(pixels)
        status = jnp.where(_finite(terms.total, grad), RUNNING, NONFINITE_LOSS).astype(jnp.int32)
        return LoopState(pixels, opt_state, terms, grad, jnp.int32(0), jnp.int32(1), status)

    def _step(self, state: LoopState, params, targets, hp, lr) -> LoopState:
        tx = self.spec.transformation(lr)

        def value_fn(x):
            return self.objective(x, params, targets, hp).total

        updates, opt_state = tx.update(
            state.grad, state.opt_state, state.pixels,
            value=state.terms.total, grad=state.grad, value_fn=value_fn,
        )
        stepped = state.pixels + updates
        pixels = jnp.clip(stepped, 0.0, 1.0)
        terms, grad = self._value_and_grad(pixels, params, targets, hp)
        linesearch_evals = optax.tree.get(opt_state, "num_linesearch_steps", 0)
        status = jnp.where(
            ~jnp.all(jnp.isfinite(stepped)), NONFINITE_PIXELS,
            jnp.where(_finite(terms.total, grad), RUNNING, NONFINITE_LOSS),
        ).astype(jnp.int32)
        new = LoopState(pixels, opt_state, terms, grad, state.step + 1,
                        state.evaluations + 1 + jnp.int32(linesearch_evals), status)
        # A non-finite step is not taken: keep the last finite image, losses and step, record why.
        # The optimiser state is not kept (the run stops there, and a second copy of an L-BFGS
        # history would double the memory of the step).
        kept = jax.tree.map(lambda a, b: jnp.where(status == RUNNING, a, b),
                            new._replace(opt_state=None), state._replace(opt_state=None))
        return kept._replace(opt_state=opt_state, status=status, evaluations=new.evaluations)

    def compile(self, pixels, params, targets, hp, lr, max_evaluations):
        """Compile init and chunk ahead of time for these shapes; return both."""
        init = self.init.lower(pixels, params, targets, hp, lr).compile()
        state = jax.eval_shape(self._init, pixels, params, targets, hp, lr)
        chunk = self.chunk.lower(state, params, targets, hp, lr, jnp.int32(0),
                                 max_evaluations).compile()
        return init, chunk

    def _chunk(self, state: LoopState, params, targets, hp, lr, n, max_evaluations):
        def body(state, i):
            active = (i < n) & (state.status == RUNNING) & (state.evaluations < max_evaluations)
            state = jax.lax.cond(active, lambda s: self._step(s, params, targets, hp, lr),
                                 lambda s: s, state)
            t = state.terms
            row = jnp.stack([state.step.astype(jnp.float32), t.total, t.content, t.style, t.tv,
                             state.evaluations.astype(jnp.float32)])
            return state, (row, active & (state.status == RUNNING))

        state, (rows, valid) = jax.lax.scan(body, state, jnp.arange(self.chunk_steps))
        return state, rows, valid


def _finite(total, grad) -> jax.Array:
    return jnp.isfinite(total) & jnp.all(jnp.isfinite(grad))


def history_row(state: LoopState) -> list[float]:
    """(step, total, content, style, tv) of a state, as Python floats."""
    t = state.terms
    return [int(state.step), float(t.total), float(t.content), float(t.style), float(t.tv)]
