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

from snapjax.training.config import check_input_size, check_loss_weights
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
    check_input_size(stages, params, xs.shape[-1])
    zero = lambda: tuple(s.module.init_carry(xs.shape[1], dtype) for s in stages if s.recurrent)  # noqa: E731
    start = zero() if carry is None else _checked_carry(carry, jax.eval_shape(zero), xs.shape[1])

    def body(cs, x):
        return forward_only(stages, params, cs, x.astype(dtype))

    final, outs = lax.scan(body, tuple(start), xs)
    return outs, final


def _checked_carry(carry: Any, want: tuple, batch: int) -> tuple:
    """``carry`` as a tuple, ``ValueError`` unless it has the zero carry's structure and shapes
    (one carry per recurrent stage, batch ``xs.shape[1]``)."""
    if not isinstance(carry, (tuple, list)) or len(carry) != len(want):
        raise ValueError(f"carry must be a tuple of {len(want)} carries (one per recurrent stage, as predict "
                         f"returns), got {type(carry).__name__}" + (f" of {len(carry)}" if isinstance(carry, (tuple, list)) else ""))
    for i, (c, w) in enumerate(zip(carry, want)):
        got = jax.tree_util.tree_flatten_with_path(c)[0]
        if str(jax.tree.structure(c)) != str(jax.tree.structure(w)):
            raise ValueError(f"carry[{i}] must have the structure {jax.tree.structure(w)}, got {jax.tree.structure(c)}")
        for (path, a), b in zip(got, jax.tree.leaves(w)):
            name = f"carry[{i}]{jax.tree_util.keystr(path)}"
            if jnp.ndim(a) >= 1 and jnp.ndim(a) == b.ndim and jnp.shape(a)[0] != batch:
                raise ValueError(f"{name} has batch {jnp.shape(a)[0]}, xs (T, B, n_in) has batch {batch}: "
                                 "the carry must be for the same examples")
            if jnp.shape(a) != b.shape:
                raise ValueError(f"{name} has shape {jnp.shape(a)}, expected {b.shape}")
    return tuple(carry)


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
