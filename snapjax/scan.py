"""``lax.scan`` drivers: the accumulated online gradient over a sequence, and its BPTT reference.

Both take a per-step loss ``loss_fn(h_t, y_t) -> scalar`` on the cell output
``h_t`` (``(B, units)``) and hold the parameters fixed over the sequence, so the summed
online gradient ``Σ_t (∂L_t/∂s_t) J_t`` of exact RTRL equals ``jax.grad`` of ``Σ_t L_t``
through the scan (BPTT).  Sequences are time-major: ``xs (T, B, n_in)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from snapjax.cells import CellSpec, as_cell_spec, cell_step
from snapjax.influence import InfluenceTracker

Array = jax.Array
PyTree = Any
LossFn = Callable[[Array, Any], Array]

__all__ = ["SequenceGradient", "online_gradient", "bptt_gradient"]


class SequenceGradient(NamedTuple):
    """Result of a driver: ``loss`` (scalar Σ_t L_t), ``grads`` (parameter-shaped),
    ``outputs`` (``(T, B, units)`` cell outputs), ``final_carry`` (flax carry layout) and
    ``final_method_state`` (the online method's state after the last step, e.g. ``J_T``, to
    continue a stream chunk by chunk; ``None`` for BPTT)."""

    loss: Array
    grads: PyTree
    outputs: Array
    final_carry: PyTree
    final_method_state: Any = None


def _check_sequence(spec: CellSpec, xs: Array, batch: int) -> None:
    if jnp.ndim(xs) != 3 or jnp.shape(xs)[1] != batch:
        raise ValueError(f"xs must be time-major with shape (T, {batch}, n_in), got {jnp.shape(xs)}")


def online_gradient(
    tracker: InfluenceTracker,
    params: PyTree,
    carry: PyTree,
    xs: Array,
    ys: Any,
    loss_fn: LossFn,
    influence: PyTree | None = None,
) -> SequenceGradient:
    """Run ``xs`` through the cell with ``lax.scan`` and accumulate the online gradient.

    Args:
      tracker: from :func:`snapjax.influence_tracker` (fixes the method).
      params: cell parameters (held fixed over the sequence).
      carry: initial flax carry (``(B, units)``, or ``(c, h)`` for LSTM).
      xs: ``(T, B, n_in)``; ys: per-step targets, any pytree with leading axis ``T``.
      loss_fn: ``loss_fn(h_t, y_t) -> scalar`` (summed over the batch by the caller's choice).
      influence: initial ``J`` (zeros if ``None``).
    """
    spec = tracker.spec
    s0 = spec.to_internal(carry)
    _check_sequence(spec, xs, s0.shape[0])
    if influence is None:
        influence = tracker.init(s0.shape[0], jnp.result_type(s0))
    grads0 = jax.tree.map(jnp.zeros_like, params)

    def body(c, inp):
        s, J, g, total = c
        x, y = inp
        s, J = tracker.step(params, s, J, x)
        loss, dlds = jax.value_and_grad(lambda st: loss_fn(spec.output(st), y))(s)
        g = jax.tree.map(jnp.add, g, tracker.gradient(J, dlds))
        return (s, J, g, total + loss), spec.output(s)

    (s, J, grads, loss), outs = lax.scan(body, (s0, influence, grads0, jnp.zeros((), s0.dtype)), (xs, ys))
    return SequenceGradient(loss, grads, outs, spec.from_internal(s), J)


def bptt_gradient(
    cell: Any,
    params: PyTree,
    carry: PyTree,
    xs: Array,
    ys: Any,
    loss_fn: LossFn,
    masks: Any = None,
    precision: Any = None,
) -> SequenceGradient:
    """Reference: ``jax.value_and_grad`` of ``Σ_t loss_fn(h_t, y_t)`` through ``lax.scan`` (BPTT)."""
    spec = as_cell_spec(cell)
    s0 = spec.to_internal(carry)
    _check_sequence(spec, xs, s0.shape[0])

    def total_loss(p):
        def body(s, inp):
            x, y = inp
            s = cell_step(spec, p, s, x, masks, precision)
            return s, (loss_fn(spec.output(s), y), spec.output(s))

        s, (losses, outs) = lax.scan(body, s0, (xs, ys))
        return losses.sum(), (outs, s)

    (loss, (outs, s)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
    return SequenceGradient(loss, grads, outs, spec.from_internal(s))
