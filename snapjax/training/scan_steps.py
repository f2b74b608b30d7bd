"""The learner's chunk driver and carry reset, moved out of :mod:`snapjax.training.learner`.

:func:`scan_steps` is ``lax.scan`` of :meth:`snapjax.OnlineLearner.step` over a time-major chunk
(what :meth:`~snapjax.OnlineLearner.run` runs, and each device's share under
:mod:`snapjax.parallel.sharding`); :func:`reset_carry` zeroes the carries and re-initialises the
method states of selected examples (:meth:`snapjax.OnlineLearner.reset_carry`).

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> from snapjax.training.scan_steps import scan_steps
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> state, outs, metrics = scan_steps(learner, state, jnp.ones((3, 2, 3)), jnp.zeros((3, 2), jnp.int32), None, {})
    >>> outs.shape, int(state.step)
    ((3, 2, 2), 3)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from snapjax.methods.base import select_examples
from snapjax.training.online_state import OnlineState

Array = jax.Array

__all__ = ["reset_carry", "scan_steps"]


def scan_steps(learner: Any, state: OnlineState, xs: Array, ys: Any, masks: Array | None, opt_args: dict,
               device_aux: bool = False, hold: Callable | None = None) -> tuple[OnlineState, Array, dict]:
    """``(state, outputs (T, B, out), metrics)`` of ``learner.step`` scanned over ``xs (T, B, n_in)``.

    ``hold`` maps the state after each step (e.g. keeps the influence split over a parameter
    axis); ``device_aux`` gives ``metrics['aux']`` a device axis (concatenated by ``shard_map``)."""
    def body(st, inp):
        x, y, m = inp
        st, out, metrics = learner.step(st, x, y, m, **opt_args)
        if hold is not None:
            st = hold(st)
        if device_aux:
            metrics = {**metrics, "aux": jax.tree.map(lambda a: jnp.asarray(a)[None], metrics["aux"])}
        return st, (out, metrics)

    state, (outs, metrics) = lax.scan(body, state, (xs, ys, masks))
    return state, outs, metrics


def reset_carry(learner: Any, state: OnlineState, batch_mask: Array | None = None) -> OnlineState:
    """Zero the carries and re-initialise the method states of the examples in ``batch_mask``
    (``(B,)`` bool; ``None`` = all).

    Raises:
      ValueError: ``batch_mask`` of another shape than ``(B,)``.
    """
    methods = learner.methods(state.params)
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    where = jnp.ones((batch,), bool) if batch_mask is None else jnp.asarray(batch_mask, bool)
    if jnp.shape(where) != (batch,):
        raise ValueError(f"batch_mask must have shape ({batch},), got {jnp.shape(where)}")
    dtype = jnp.result_type(*jax.tree.leaves(state.params))
    carry = tuple(select_examples(where, m.init_carry(batch, dtype), c, 0) for m, c in zip(methods, state.carry))
    ms = tuple(m.reset(s, where) for m, s in zip(methods, state.method_state))
    return state._replace(carry=carry, method_state=ms)
