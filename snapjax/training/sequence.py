"""``lax.scan`` drivers: the summed online gradient over a sequence, and its BPTT reference.

Both take a per-step loss ``loss_fn(y_t, target_t) -> scalar`` on the cell output ``y_t``
(``(B, features)``) and hold the parameters fixed over the sequence, so the summed online
gradient ``Σ_t (∂L_t/∂s_t) J_t`` of exact RTRL equals ``jax.grad`` of ``Σ_t L_t`` through the
scan (BPTT).  Sequences are time-major: ``xs (T, B, n_in)``; carries are flax carries.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> xs, ys = jnp.ones((5, 2, 3)), jnp.zeros((5, 2, 4))
    >>> loss = lambda y, t: jnp.sum((y - t) ** 2)
    >>> on = sj.online_gradient(sj.online_method("rtrl", cell, params), params, None, xs, ys, loss)
    >>> ref = sj.bptt_gradient(cell, params, None, xs, ys, loss)
    >>> bool(jnp.allclose(on.grads["hn"]["kernel"], ref.grads["hn"]["kernel"], atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.recurrent import as_recurrent
from snapjax.engine.sparsity import apply_masks
from snapjax.methods.base import OnlineMethod
from snapjax.parallel.sharding import sequence_layout

Array = jax.Array
PyTree = Any
LossFn = Callable[[Array, Any], Array]

__all__ = ["SequenceGradient", "online_gradient", "bptt_gradient"]


class SequenceGradient(NamedTuple):
    """Result of a driver: ``loss`` (scalar Σ_t L_t), ``grads`` (parameter-shaped), ``outputs``
    (``(T, B, features)``), ``final_carry`` (flax layout) and ``final_method_state`` (to continue
    a stream chunk by chunk; ``None`` for BPTT).

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> xs, ys = jnp.ones((5, 2, 3)), jnp.zeros((5, 2, 4))
        >>> res = sj.bptt_gradient(cell, params, None, xs, ys, lambda y, t: jnp.sum((y - t) ** 2))
        >>> isinstance(res, sj.SequenceGradient), res.loss.shape, res.outputs.shape, res.final_carry.shape
        (True, (), (5, 2, 4), (2, 4))
        >>> res.final_method_state is None
        True
    """

    loss: Array
    grads: PyTree
    outputs: Array
    final_carry: PyTree
    final_method_state: Any = None


def _batch(xs: Array) -> int:
    if jnp.ndim(xs) != 3:
        raise ValueError(f"xs must be time-major (T, B, n_in), got shape {jnp.shape(xs)}")
    return int(jnp.shape(xs)[1])


def online_gradient(
    method: OnlineMethod,
    params: PyTree,
    carry: PyTree | None,
    xs: Array,
    ys: Any,
    loss_fn: LossFn,
    method_state: PyTree | None = None,
    *,
    key: Array | None = None,
    batch_axis: str | None = None,
    param_axis: str | None = None,
) -> SequenceGradient:
    """Run ``xs`` through the cell with ``lax.scan`` and sum the online gradient of ``method``.

    Args:
      method: from :func:`snapjax.online_method`.  params: the cell's parameters (fixed).
      carry: initial flax carry (``None``: zeros).  xs: ``(T, B, n_in)``; ys: pytree with leading
        axis ``T``.  loss_fn: ``loss_fn(y_t, target_t) -> scalar``.
      method_state: initial method state (``None``: ``method.init``; ``key`` seeds UORO).
      batch_axis: mesh axis of the context mesh (``jax.set_mesh``) over which the examples are
        split (:mod:`snapjax.parallel.sharding`; place the inputs with :func:`snapjax.put_sharded` and
        :func:`snapjax.method_specs`).
      param_axis: mesh axis over which the method state's parameter axis is split.  With either
        axis the state is kept in that layout after every step; Explicit axes are run as Auto.
    Windowed methods (truncated BPTT, chunked RTRL) contribute at the end of each window; when
    ``T`` is not a multiple of the period, the trailing partial window is closed with
    :meth:`snapjax.OnlineMethod.flush` (so every step's loss reaches the gradient).

    Example (a stream in two chunks, carry and method state passed on, gives the gradient of
    one call over the whole stream)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> xs, ys = jax.random.normal(jax.random.key(1), (6, 2, 3)), jnp.zeros((6, 2, 4))
        >>> loss = lambda y, t: jnp.sum((y - t) ** 2)
        >>> method = sj.online_method("snap1", cell, params)
        >>> whole = sj.online_gradient(method, params, None, xs, ys, loss)
        >>> a = sj.online_gradient(method, params, None, xs[:3], ys[:3], loss)
        >>> b = sj.online_gradient(method, params, a.final_carry, xs[3:], ys[3:], loss, a.final_method_state)
        >>> summed = jax.tree.map(jnp.add, a.grads, b.grads)
        >>> all(bool(jnp.allclose(u, v, atol=1e-5)) for u, v in zip(jax.tree.leaves(summed), jax.tree.leaves(whole.grads)))
        True
    """
    batch = _batch(xs)
    dtype = jnp.result_type(xs)
    carry = method.init_carry(batch, dtype) if carry is None else carry
    state = method.init(batch, dtype, key=key) if method_state is None else method_state
    out_fn = method.cell.output
    layout = None
    if batch_axis is not None or param_axis is not None:
        layout = sequence_layout(method, params, carry, state, batch_axis, param_axis)

    def hold(carry, st):
        return (carry, st) if layout is None else layout.hold(carry, st)

    def run(params, carry, state, xs, ys):
        def body(c, inp):
            carry, st, g, total = c
            x, y = inp
            (carry, st, _), fused = method.step_fused(params, carry, st, x)
            carry, st = hold(carry, st)
            loss, dcarry = jax.value_and_grad(lambda cc: loss_fn(out_fn(cc), y))(carry)
            g, st = method.gradient_fused(params, st, fused, dcarry, accumulate=g)
            return (carry, st, g, total + loss), out_fn(carry)

        g0 = jax.tree.map(jnp.zeros_like, params)
        (carry, state, grads, loss), outs = lax.scan(body, (*hold(carry, state), g0, jnp.zeros((), dtype)), (xs, ys))
        if np.shape(xs)[0] % method.period:  # a trailing partial window: its gradient too
            gf, state = method.flush(params, state)
            grads = jax.tree.map(jnp.add, grads, gf)
        return SequenceGradient(loss, grads, outs, *hold(carry, state))

    if layout is None:
        return run(params, carry, state, xs, ys)
    return layout.call(run, params, carry, state, xs, ys, SequenceGradient._make)


def bptt_gradient(
    cell: Any,
    params: PyTree,
    carry: PyTree | None,
    xs: Array,
    ys: Any,
    loss_fn: LossFn,
    masks: Any = None,
) -> SequenceGradient:
    """Reference: ``jax.value_and_grad`` of ``Σ_t loss_fn(y_t, target_t)`` through ``lax.scan``.

    ``masks`` (static 0/1 per projection, like the methods') multiply the kernels in the forward
    pass, so masked weights get the gradient of the masked model (exactly zero).

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> xs, ys = jnp.ones((5, 2, 3)), jnp.zeros((5, 2, 4))
        >>> loss = lambda y, t: jnp.sum((y - t) ** 2)
        >>> keep = np.eye(4, dtype=bool)                  # W_hn: the diagonal only
        >>> res = sj.bptt_gradient(cell, params, None, xs, ys, loss, masks={"hn": keep})
        >>> g = res.grads["hn"]["kernel"]
        >>> bool(jnp.all(g[~keep] == 0)), bool(jnp.all(g[keep] != 0))
        (True, True)
    """
    rec = as_recurrent(cell)
    batch = _batch(xs)
    carry = rec.init_carry(batch, jnp.result_type(xs)) if carry is None else carry

    def total_loss(p):
        def body(c, inp):
            x, y = inp
            c = rec.apply(apply_masks(p, masks), c, x)
            return c, (loss_fn(rec.output(c), y), rec.output(c))

        c, (losses, outs) = lax.scan(body, carry, (xs, ys))
        return losses.sum(), (outs, c)

    (loss, (outs, c)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
    return SequenceGradient(loss, grads, outs, c)
