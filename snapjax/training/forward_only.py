"""Forward-only use of a trained learner: predictions and the masked loss, parameters unchanged.

:func:`predict` runs the model over a time-major chunk ``xs (T, B, n_in)`` with no method state
and no gradient; :func:`evaluate` scores the outputs with the learner's loss, masking invalid
targets as :meth:`snapjax.OnlineLearner.step` does.  The learner's ``predict`` and ``evaluate``
call these.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> state = learner.init(jax.random.key(0), batch_size=3, input_size=2)
    >>> xs, ys = jnp.ones((5, 3, 2)), jnp.zeros((5, 3), jnp.int32)
    >>> outs, carry = learner.predict(state, xs)
    >>> outs.shape, float(learner.evaluate(state, xs, ys)["loss"]) > 0
    ((5, 3, 2), True)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from snapjax.training.config import check_loss_weights
from snapjax.training.online_state import OnlineState
from snapjax.training.stage_passes import forward_only

Array = jax.Array

__all__ = ["predict", "evaluate"]


def predict(learner: Any, state_or_params: Any, xs: Array, carry: tuple | None = None) -> tuple[Array, tuple]:
    """``(outputs (T, B, out), final carries)`` of ``learner``'s model over ``xs (T, B, n_in)``
    from ``carry`` (default: zeros); ``state_or_params`` is an :class:`OnlineState` or the
    parameter dict."""
    params = state_or_params.params if isinstance(state_or_params, OnlineState) else state_or_params
    xs = jnp.asarray(xs)
    if jnp.ndim(xs) != 3:
        raise ValueError(f"xs must be time-major (T, B, n_in), got {jnp.shape(xs)}")
    dtype = jnp.result_type(*jax.tree.leaves(params))
    stages = learner.stages
    start = tuple(s.module.init_carry(xs.shape[1], dtype) for s in stages if s.recurrent) if carry is None else carry

    def body(cs, x):
        return forward_only(stages, params, cs, x.astype(dtype))

    final, outs = lax.scan(body, tuple(start), xs)
    return outs, final


def evaluate(learner: Any, state_or_params: Any, xs: Array, ys: Any, masks: Array | None = None,
             carry: tuple | None = None) -> dict:
    """Forward-only loss: ``{"loss": mean over scored valid example-steps, "per_step": (T,),
    "excluded": invalid scored targets, "carry": final carries}``."""
    outs, carry = predict(learner, state_or_params, xs, carry)
    T, B = outs.shape[:2]
    loss = learner.loss_fn
    if masks is not None and jnp.shape(masks) != (T, B):
        raise ValueError(f"masks must have shape (T, B) = ({T}, {B}), got {jnp.shape(masks)}")
    check_loss_weights(masks)
    masks = jnp.ones((T, B), outs.dtype) if masks is None else jnp.asarray(masks, outs.dtype)
    per = jax.vmap(loss.fn)(outs, ys)
    valid = jax.vmap(loss.valid)(outs, ys) if loss.valid else jnp.isfinite(per)
    valid = valid & (masks >= 0) & jnp.isfinite(masks)
    w = jnp.where(valid, masks, 0)
    per = jnp.where(w > 0, per, 0) * w
    return {"loss": per.sum() / jnp.maximum(w.sum(), 1), "per_step": per.sum(1) / jnp.maximum(w.sum(1), 1),
            "excluded": jnp.sum((masks != 0) & ~valid), "carry": carry}
