"""L-BFGS without line search, step for step as torch.optim.LBFGS takes it.

torch.optim.LBFGS (``line_search_fn=None``; the rule of torch7's optim.lbfgs,
which jcjohnson/neural-style uses) at each iteration, with g the gradient at the
current x:

* if max|g| ≤ ``tolerance_grad``: no step, nothing changes (torch returns
  before the iteration);
* first iteration: d = −g, no pairs, H_diag = 1, t = min(1, 1/‖g‖₁)·lr;
* later: y = g − g_prev, s = t_prev·d_prev (the previous update as computed),
  ys = yᵀs; if ys > 1e-10 the pair (s, y, ρ = 1/ys) is kept (the oldest dropped
  beyond ``memory_size``) and H_diag = ys / yᵀy, otherwise it is skipped and
  H_diag stays; d by the two-loop recursion over the kept pairs, newest to
  oldest then oldest to newest, from H_diag·q; t = lr;
* if gᵀd > −``tolerance_change`` no step is taken (torch breaks before the
  update; the iteration's state is kept);
* else x += t·d.

Unlike optax.lbfgs, whose first step is −lr·g: on style-transfer losses of
1e8–1e12 that step throws the image far out of [0, 1]. The returned update is
t·d; the loop adds it (and may clip: s stays the update as computed, as in the
PyTorch tutorial, which clamps the image inside its closure).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TorchLBFGSState(NamedTuple):
    """The state of :func:`torch_lbfgs`: arrays only (jittable, vmappable, checkpointable)."""

    count: jax.Array  # int32: iterations taken (torch's state n_iter)
    s: jax.Array  # (memory_size, *shape): the kept updates, a circular buffer
    y: jax.Array  # (memory_size, *shape): the kept gradient differences
    rho: jax.Array  # (memory_size,): 1 / yᵀs of each kept pair
    head: jax.Array  # int32: the slot the next kept pair is written to
    kept: jax.Array  # int32: the pairs kept, at most memory_size; the newest is in slot head − 1
    h_diag: jax.Array  # (): yᵀs / yᵀy of the newest kept pair, 1 before any
    prev_grad: jax.Array  # the gradient of the last iteration
    prev_update: jax.Array  # t·d of the last iteration, as computed (taken or not)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.vdot(a, b, precision=jax.lax.Precision.HIGHEST)


def _direction(g, s, y, rho, head, kept, h_diag):
    """d = −H g by the two-loop recursion over the ``kept`` newest pairs of the circular memory."""
    m = rho.shape[0]

    def slot(k):  # the k-th newest pair
        return (head - 1 - k) % m

    def newest_first(k, carry):
        q, al = carry
        j = slot(k)
        a = _dot(s[j], q) * rho[j]
        return q - a * y[j], al.at[k].set(a)

    q, al = jax.lax.fori_loop(0, kept, newest_first, (-g, jnp.zeros_like(rho)))

    def oldest_first(i, r):
        k = kept - 1 - i
        j = slot(k)
        b = _dot(y[j], r) * rho[j]
        return r + (al[k] - b) * s[j]

    return jax.lax.fori_loop(0, kept, oldest_first, q * h_diag)


def torch_lbfgs(learning_rate, memory_size: int = 100, tolerance_grad: float = 1e-7,
                tolerance_change: float = 1e-9) -> optax.GradientTransformationExtraArgs:
    """torch.optim.LBFGS(lr, history_size=memory_size, tolerance_grad, tolerance_change,
    line_search_fn=None) for one array parameter, one iteration an update (the module
    docstring has the rule). The defaults are torch's; neural-style's optim.lbfgs runs with
    tolX = tolFun = −1 (``tolerance_grad=-1.0, tolerance_change=-1.0`` here).

    ``learning_rate``: a scalar (an array under vmap: each member its own). The arithmetic is
    in the parameter's dtype. ``update(grad, state, params=None, **extra)`` ignores ``params``
    and any extra arguments (value, grad, value_fn: the line searches'; the gradient is the
    first argument).
    """
    if memory_size < 1:
        raise ValueError(f"memory_size must be ≥ 1, not {memory_size}")

    def init(params) -> TorchLBFGSState:
        dtype = params.dtype
        memory = jnp.zeros((memory_size, *params.shape), dtype)
        zero = jnp.zeros([], jnp.int32)
        return TorchLBFGSState(count=zero, s=memory, y=memory, rho=jnp.zeros([memory_size], dtype),
                               head=zero, kept=zero, h_diag=jnp.ones([], dtype),
                               prev_grad=jnp.zeros_like(params), prev_update=jnp.zeros_like(params))

    def update(updates, state: TorchLBFGSState, params=None, **extra):
        del params, extra  # (the loop passes value=, grad=, value_fn= for line searches: unused)
        g = updates  # the gradient
        dtype = g.dtype
        lr = jnp.asarray(learning_rate, dtype)
        optimal = jnp.max(jnp.abs(g)) <= tolerance_grad  # torch returns before iterating
        first = state.count == 0

        # The pair of the last iteration: kept if yᵀs > 1e-10 (never at the first iteration).
        y = g - state.prev_grad
        s = state.prev_update
        ys = _dot(y, s)
        keep = ~optimal & ~first & (ys > 1e-10)
        head = state.head
        s_mem = state.s.at[head].set(jnp.where(keep, s, state.s[head]))
        y_mem = state.y.at[head].set(jnp.where(keep, y, state.y[head]))
        rho = state.rho.at[head].set(jnp.where(keep, 1.0 / ys, state.rho[head]))
        h_diag = jnp.where(keep, ys / _dot(y, y), state.h_diag)
        kept = jnp.where(keep, jnp.minimum(state.kept + 1, memory_size), state.kept)
        head = jnp.where(keep, (head + 1) % memory_size, head)

        # At the first iteration no pair is kept and H_diag is 1: d = −g.
        d = _direction(g, s_mem, y_mem, rho, head, kept, h_diag)
        inverse_l1 = 1.0 / jnp.sum(jnp.abs(g))
        t = jnp.where(first, jnp.where(inverse_l1 < 1.0, inverse_l1, 1.0) * lr, lr)  # min(1.0, ·) as Python's
        step = t * d
        breaks = _dot(g, d) > -tolerance_change  # torch breaks before the update: no step
        taken = jnp.where(optimal | breaks, jnp.zeros_like(step), step)
        new = TorchLBFGSState(
            count=jnp.where(optimal, state.count, state.count + 1), s=s_mem, y=y_mem, rho=rho, head=head,
            kept=kept, h_diag=h_diag, prev_grad=jnp.where(optimal, state.prev_grad, g),
            prev_update=jnp.where(optimal, state.prev_update, step))
        return taken, new

    return optax.GradientTransformationExtraArgs(init, update)
