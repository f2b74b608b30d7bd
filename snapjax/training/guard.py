"""Per-example fault containment of one learner step (``OnlineLearner(guard=True)``).

After the step's forward and backward pass: if some example's carry or the gradient is not
finite (checked on every device of ``batch_axis``), the examples whose carry or method state is
non-finite are reset to the zero carry and a fresh method state, the head is re-run on the
contained records, and the loss and gradient are recomputed without them (their weight is 0).
If the gradient is still non-finite (non-finite parameters, say), the step's gradient is zeroed
and the step is marked ``skip``.  The common case costs one finiteness test per step: the slow
branch runs under ``lax.cond`` only when a fault is seen.

Example (one example's input is NaN: it is reset, the other trains)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> x = jnp.ones((2, 3)).at[0, 0].set(jnp.nan)
    >>> state, _, metrics = learner.step(state, x, jnp.zeros((2,), jnp.int32))
    >>> int(metrics["resets"]), bool(jnp.isfinite(metrics["loss"]))
    (1, True)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from snapjax.methods.base import finite_examples, finite_examples_of_methods
from snapjax.training.model import Stage
from snapjax.training.stage_passes import contain, head_output, settle
from snapjax.training.transforms import tree_all_finite
from snapjax.training.update import across_devices, any_device

PyTree = Any

__all__ = ["contain_faults"]


def contain_faults(
    loss_and_grads: Callable, stages: Sequence[Stage], params: PyTree, methods: Sequence[Any], recs: tuple,
    weight: jax.Array, first: tuple, batch_axis: str | None,
) -> tuple:
    """``(loss, grads, method states, carries, resets, skip, good)`` of the step, faults contained.

    Args:
      loss_and_grads: ``(weight, recs, outputs) -> (loss, grads, states, carries)``, the step's
        loss and backward pass.  stages, params, methods: the learner's.  recs: the forward
        records.  weight: ``(B,)`` loss weights.  first: ``loss_and_grads``'s result on
        ``recs``.  batch_axis: the mesh axis of the batch (``None``: one device).
    Returns:
      the contained results, ``resets`` (examples reset, summed over devices), ``skip`` (the
      gradient stayed non-finite and was zeroed) and ``good`` (``(B,)`` examples kept).
    """
    loss, grads, new_states, carries = first
    recs = settle(recs, new_states)  # a fused step's state from its gradient (the same values)
    batch = weight.shape[0]
    dtype = jnp.result_type(*jax.tree.leaves(params))
    ok = jnp.ones((batch,), bool)
    for c in carries:
        ok = ok & finite_examples(c, batch)
    bad_any = any_device(~jnp.all(ok), batch_axis) | ~tree_all_finite(grads)  # the same on every device

    def slow(_):
        stepped = tuple(r[2].state for r in recs if r[2] is not None)
        good = ok & finite_examples_of_methods(methods, stepped, batch)
        fixed = contain(recs, good, methods, batch, dtype)
        out = head_output(stages, params, fixed)
        lo, gr, ns, cs = loss_and_grads(jnp.where(good, weight, 0), fixed, out)
        skip = ~tree_all_finite(gr)  # still non-finite (e.g. non-finite parameters): drop the step
        gr = jax.tree.map(lambda g: jnp.where(skip, 0, g), gr)
        return lo, gr, ns, cs, across_devices(jnp.sum(~good).astype(jnp.int32), batch_axis), skip, good

    def fast(_):
        return loss, grads, new_states, carries, jnp.zeros((), jnp.int32), jnp.zeros((), bool), ok

    return lax.cond(bad_any, slow, fast, None)
