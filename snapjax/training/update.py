"""The optimizer side of a step: accumulate the period's gradient, update at its end.

Every ``K = learner.period(params)`` steps the accumulated gradient goes through
``learner.transform(params)`` (the optimizer, chained with the parameter masks) with
``value=`` the period's mean loss and the user's extra arguments; in between the parameters
stay fixed.  With ``skip_unscored_updates`` a period with no scored example makes no update; a
step whose gradient stayed non-finite after containment (``skip``) is not applied and is
counted in ``skipped``.  :meth:`snapjax.OnlineLearner.step` calls :func:`period_update` last.

The cumulative counts ``skipped``, ``resets`` and ``excluded`` (``metrics`` and the state) are
int32 and *saturate* at ``2³¹ − 1`` (:data:`COUNT_MAX`) instead of wrapping to negative
values: ``resets``/``excluded`` count example-steps, so a batch of 1,024 could reach it after
2·10⁶ steps of faults.  A count equal to ``COUNT_MAX`` means "at least that many"; for exact
totals over longer runs, read and reset them between chunks (``state._replace(resets=0)``).

Example (an update every 2 steps)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, optimizer=optax.sgd(0.1), update_every=2)
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> state, _, metrics = learner.run(state, jnp.ones((4, 2, 3)), jnp.zeros((4, 2), jnp.int32))
    >>> [bool(u) for u in metrics["updated"]]
    [False, True, False, True]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from snapjax.training.online_state import OnlineState

PyTree = Any

__all__ = ["period_update", "across_devices", "any_device", "saturating_add", "COUNT_MAX"]

#: The largest value of the learner's int32 counters (they saturate there).
COUNT_MAX = int(jnp.iinfo(jnp.int32).max)


def saturating_add(total: jax.Array, n: jax.Array) -> jax.Array:
    """``total + n`` for int32 counts (``n >= 0``), held at :data:`COUNT_MAX` instead of wrapping.

    Example::

        >>> import jax.numpy as jnp
        >>> int(saturating_add(jnp.int32(COUNT_MAX - 1), jnp.int32(5))) == COUNT_MAX
        True
    """
    total, n = jnp.asarray(total, jnp.int32), jnp.asarray(n, jnp.int32)
    return jnp.where(total > COUNT_MAX - n, jnp.int32(COUNT_MAX), total + n)


def across_devices(tree: PyTree, batch_axis: str | None) -> PyTree:
    """``tree`` summed over the devices of ``batch_axis`` (unchanged when it is ``None``)."""
    return tree if batch_axis is None else lax.psum(tree, batch_axis)


def any_device(flag: jax.Array, batch_axis: str | None) -> jax.Array:
    """``flag`` (a bool scalar) true on some device of ``batch_axis``."""
    return flag if batch_axis is None else lax.psum(flag.astype(jnp.int32), batch_axis) > 0


def period_update(learner: Any, state: OnlineState, methods: tuple, loss: jax.Array, grads: PyTree,
                  new_states: tuple, carries: tuple, scored: jax.Array, resets: jax.Array, excluded: jax.Array,
                  recs: tuple, opt_args: dict, outputs: jax.Array, skip: jax.Array | None
                  ) -> tuple[OnlineState, jax.Array, dict]:
    """The new :class:`OnlineState`, the step's outputs and its metrics (see the module docstring).

    Args:
      learner: the :class:`snapjax.OnlineLearner`.  state: the state before the step.
      methods: the stages' online methods.  loss, grads: this step's loss and gradient (summed
        over devices).  new_states, carries: the stages' method states and carries after it.
      scored: ``(B,)`` examples with a target.  resets, excluded: this step's counts.
      recs: the forward records (for the methods' ``aux``).  opt_args: extra optimizer args.
      outputs: ``(B, out)``.  skip: the guard's "drop this step" flag, or ``None``.
    """
    params = state.params
    K = learner.period(params)
    grads = {**jax.tree.map(jnp.zeros_like, {k: v for k, v in params.items() if k not in grads}), **grads}
    grads = {k: grads[k] for k in params}
    count = state.step + 1
    any_scored = state.scored | any_device(jnp.any(scored), learner.batch_axis)
    loss_acc = state.loss_acc + loss
    tx = learner.transform(params)
    acc = grads if state.grad_acc is None else jax.tree.map(jnp.add, state.grad_acc, grads)
    extra = {"value": loss_acc / K, **opt_args}

    def apply(_):
        updates, opt_state = tx.update(acc, state.opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    def keep(_):
        return params, state.opt_state

    if K == 1 and not learner.skip_unscored_updates and skip is None:
        new_params, opt_state = apply(None)
        do_update = jnp.asarray(True)
    else:
        period_end = (count % K) == 0
        do_update = period_end & (any_scored if learner.skip_unscored_updates else True)
        if skip is not None and K == 1:
            do_update = do_update & ~skip
        new_params, opt_state = lax.cond(do_update, apply, keep, None)
        end = period_end
        acc = jax.tree.map(lambda g: jnp.where(end, 0, g), acc)
        loss_acc = jnp.where(end, 0, loss_acc)
        any_scored = jnp.where(end, False, any_scored)
    if state.grad_acc is None:
        acc = None
    if K == 1:
        loss_acc, any_scored = jnp.zeros_like(loss_acc), jnp.zeros((), bool)
    if learner.reset_influence:
        batch = jax.tree.leaves(carries[0])[0].shape[0]
        new_states = tuple(
            m.reset(s, jnp.broadcast_to(do_update, (batch,))) for m, s in zip(methods, new_states)
        )
    skipped = saturating_add(state.skipped, jnp.zeros((), jnp.int32) if skip is None else skip.astype(jnp.int32))
    total_resets = saturating_add(state.resets, resets)
    total_excluded = saturating_add(state.excluded, excluded)
    new_state = OnlineState(
        params=new_params, opt_state=opt_state, carry=carries, method_state=new_states,
        grad_acc=acc, loss_acc=loss_acc, scored=any_scored, step=count, key=state.key,
        skipped=skipped, resets=total_resets, excluded=total_excluded,
    )
    aux = {s.names[-1]: r[2].aux for s, r in zip(learner.stages, recs) if r[2] is not None}
    metrics = {"loss": loss, "updated": do_update, "skipped": skipped, "resets": total_resets,
               "excluded": total_excluded, "aux": aux}
    return new_state, outputs, metrics
