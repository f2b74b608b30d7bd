"""The cost model of activity-sparse RTRL: FLOPs and memory of one step (:func:`step_cost`).

For an :class:`snapjax.methods.activity.ActivitySparseRTRL` step computing ``C`` units per
example (``M`` stored parameter entries, ``U`` units, ``m`` components): ``2·B·M·C·(U(m-1) + C)``
FLOPs of matmuls plus the elementwise terms, against ``2·B·M·(U m)² + B·M·U m`` for the
library's dense RTRL step; see :mod:`snapjax.methods.activity` for the method.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from snapjax.methods.activity import ActivitySparseRTRL, _is_shape

__all__ = ["step_cost"]


def step_cost(method: ActivitySparseRTRL, batch_size: int, capacity: Any, itemsize: int = 4) -> dict:
    """FLOPs and memory of one propagation step (per batch), as plain numbers.

    Args:
      method: an :class:`ActivitySparseRTRL`.
      batch_size: B.  capacity: units computed per example this step (``aux['capacity']``;
        may be an array of per-step values — the result then holds arrays).
      itemsize: bytes per influence float.
    Returns:
      ``flops`` (done by the activity-sparse step at that capacity: matmuls plus elementwise
      terms), ``flops_dense`` (the library's dense RTRL step: the full ``(U m)×(U m)``
      product), ``flops_dense_structured`` (the activity-sparse step at capacity ``U``, i.e.
      exploiting only that ``D`` is off-diagonal in the read-out column),
      ``influence_bytes`` (stored influence, = dense RTRL's), ``scratch_bytes`` (the work
      buffer; ``influence_bytes + scratch_bytes = num_stored()·B·itemsize``),
      ``readout_bytes_touched`` (read-out rows read + written at that capacity) and ``density``.

    Raises:
      ValueError: ``method`` is not an :class:`ActivitySparseRTRL`.

    Example (EGRU with 8 units, 4 of them computed per example)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell = sj.EGRUCell(8)
        >>> params = cell.init(jax.random.key(0), cell.initialize_carry(None, (2, 3)), jnp.zeros((2, 3)))["params"]
        >>> method = sj.online_method("activity", cell, params, block=4)
        >>> cost = sj.step_cost(method, batch_size=2, capacity=4)
        >>> [int(cost[k]) for k in ("flops", "flops_dense_structured", "flops_dense")]
        [81280, 181504, 312576]
        >>> cost["influence_bytes"] == cost["scratch_bytes"] == method.tracker.num_stored() * 2 * 4
        True
        >>> sj.step_cost(method, 2, jnp.array([0, 4, 8]))["flops"].shape   # per-step capacities
        (3,)
    """
    if not isinstance(method, ActivitySparseRTRL):
        raise ValueError(f"step_cost needs an ActivitySparseRTRL (online_method('activity', ...)), "
                         f"got {type(method).__name__}")
    tracker = method.tracker
    spec = tracker.spec
    U, m = spec.units, spec.state_dim
    shapes = jax.tree.leaves(tracker.leaf_shapes(1), is_leaf=_is_shape)
    M = sum(math.prod(s[1:-3]) for s in shapes) * U  # stored parameter entries (rows × columns)
    B = batch_size
    n_state = sum(p.source == "state" for p in spec.projections)

    def sparse(C):
        matmul = 2.0 * B * M * C * U * (m - 1) + 2.0 * B * M * C * C
        elementwise = 2.0 * B * M * U * m * (m - 1) + 2.0 * B * M * C
        ddelta = 2.0 * B * U * m * n_state * C
        return matmul + elementwise + ddelta

    C = np.asarray(capacity, np.float64)
    dense = 2.0 * B * M * (U * m) * (U * m) + B * M * U * m
    scratch = sum(math.prod(s) for s in jax.tree.leaves(method._split_shapes(B)[2], is_leaf=_is_shape))
    return {
        "flops": sparse(C),
        "flops_dense": dense,
        "flops_dense_structured": sparse(float(U)),
        "influence_bytes": tracker.num_stored() * B * itemsize,
        "scratch_bytes": scratch * itemsize,
        "readout_bytes_touched": 3.0 * B * M * C * itemsize,
        "density": method.parameter_density(),
    }
