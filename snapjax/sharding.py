"""Batch sharding of an online state with the batch axes each method *declares*.

``shard_batch(learner, state, mesh, "data")`` places every per-example leaf (carries, method
states: the axis given by ``method.batch_axes()``) sharded over the mesh axis, and replicates
everything else (parameters, optimizer state, counters, shared PRNG keys).  Shard the data the
same way (``xs (T, B, n_in)``: ``PartitionSpec(None, "data")``) and ``jax.jit(learner.run)``:
the per-example influence stays on its device; only the batch-summed gradients are reduced.

Example::

    >>> import flax.linen as nn, jax, numpy as np, snapjax as sj
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> state = sj.shard_batch(learner, state, mesh, "data")
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["shard_batch"]


def shard_batch(learner: Any, state: Any, mesh: Mesh, axis_name: str) -> Any:
    """``state`` placed on ``mesh`` with its batch axes sharded over ``axis_name``.

    Raises:
      ValueError: the batch size is not divisible by the mesh axis size.
    """
    size = mesh.shape[axis_name]
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    if batch % size:
        raise ValueError(f"batch size {batch} is not divisible by mesh axis {axis_name!r} of size {size}")
    rep = NamedSharding(mesh, P())

    def put(axis, tree):
        def leaf(a):
            if axis is None:
                return jax.device_put(a, rep)
            return jax.device_put(a, NamedSharding(mesh, P(*([None] * axis + [axis_name]))))

        return jax.tree.map(leaf, tree)

    methods = learner.methods(state.params)
    carry = tuple(put(0, c) for c in state.carry)
    ms = tuple(
        jax.tree.map(put, m.batch_axes(), s, is_leaf=lambda x: x is None) for m, s in zip(methods, state.method_state)
    )
    rest = put(None, state._replace(carry=(), method_state=()))
    return rest._replace(carry=carry, method_state=ms)
