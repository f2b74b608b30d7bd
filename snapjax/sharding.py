"""Batch-parallel online learning: the examples split over a mesh axis, by *declared* batch axes.

Every example's carry and method state (RTRL's influence ``J_b``, SnAp-n's tables, UORO's
``s̃_b, θ̃_b``, TBPTT's window) belongs to that example alone, so a batch ``B`` split over ``D``
devices needs no communication for the forward pass, the method updates or the per-example
gradient contractions.  Where each leaf's batch axis is comes from the methods' declarations
(:meth:`snapjax.OnlineMethod.batch_axes`; carries: axis 0), never from shapes.

:meth:`snapjax.OnlineLearner.run` with ``OnlineLearner(batch_axis="batch")`` runs the
``lax.scan`` of steps inside ``jax.shard_map`` over that mesh axis (:func:`run_sharded`).
Inside, each device runs the ordinary single-device code on its ``B/D`` local examples (plain
arrays: ``check_vma=False``, so no engine code sees sharded types and ``jax.vjp`` w.r.t. the
replicated parameters gives the *local* sum), and the learner reduces over devices at exactly
these points of a step (``lax.psum``):

* the masked-mean denominator ``Σ_b w_b`` (so the cotangent ``w_b ∂ℓ_b/∂o_b / Σ_b w_b`` of
  each local example is the single-device one),
* the loss ``L_t = Σ_d (Σ_{b∈d} w_b ℓ_b) / Σ_b w_b`` and the gradient ``Σ_d g_d``,
* the guard's "some example is non-finite" flag, the reset / excluded counts, and the
  "some example scored" flag of ``skip_unscored_updates``.

The optimizer then sees the same gradient on every device, so parameters, optimizer state and
counters stay replicated and equal to the single-device run up to the order of the batch sums.
Per-example leaves stay sharded (``PartitionSpec(..., axis)`` at their declared axis);
``metrics['aux']`` gains a device axis: ``(T, D, ...)``.  Meshes of either axis type (Auto,
or Explicit, ``jax.make_mesh``'s default) work, since the shard_map body sees local arrays.

Example (one device here; with ``D`` devices use ``jax.make_mesh((D,), ("batch",))``)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> mesh = jax.make_mesh((1,), ("batch",))
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, batch_axis="batch")
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> with jax.set_mesh(mesh):
    ...     state = sj.shard_batch(learner, state, mesh)
    ...     state, outs, metrics = learner.run_jit(state, jnp.ones((5, 2, 3)), jnp.zeros((5, 2), jnp.int32))
    >>> outs.shape, metrics["loss"].shape
    ((5, 2, 2), (5,))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["shard_batch", "batch_specs", "run_sharded"]

PyTree = Any


def _axis_name(learner: Any, axis_name: str | None) -> str:
    name = getattr(learner, "batch_axis", None) if axis_name is None else axis_name
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"a mesh axis name is needed (axis_name=..., or OnlineLearner(batch_axis=...)), got {name!r}"
        )
    return name


def _axis_size(mesh: Any, axis_name: str) -> int:
    shape = dict(mesh.shape)
    if axis_name not in shape:
        raise ValueError(f"the mesh has no axis {axis_name!r}; its axes are {tuple(shape)}")
    return int(shape[axis_name])


def batch_specs(learner: Any, state: Any, axis_name: str | None = None) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``state`` (an :class:`snapjax.OnlineState`): each
    per-example leaf split over ``axis_name`` at its declared batch axis (carries: 0; method
    states: ``method.batch_axes()``), every other leaf replicated (``P()``).

    Raises:
      ValueError: no axis name, or a declared batch axis whose length is not the batch size.
    """
    axis_name = _axis_name(learner, axis_name)
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]

    def specs(axis, tree, where):
        if axis is None:
            return jax.tree.map(lambda _: P(), tree)

        def leaf(a):
            if jnp.ndim(a) <= axis or jnp.shape(a)[axis] != batch:
                raise ValueError(f"{where}: a leaf of shape {jnp.shape(a)} declares batch axis {axis}, "
                                 f"which must have the batch size {batch}")
            return P(*([None] * axis + [axis_name]))

        return jax.tree.map(leaf, tree)

    methods = learner.methods(state.params)
    carry = tuple(specs(0, c, f"carry[{i}]") for i, c in enumerate(state.carry))
    ms = tuple(
        jax.tree.map(lambda ax, sub, m=m: specs(ax, sub, f"{m.name} state"), m.batch_axes(), s,
                     is_leaf=lambda x: x is None)
        for m, s in zip(methods, state.method_state)
    )
    rest = specs(None, state._replace(carry=(), method_state=()), "")
    return rest._replace(carry=carry, method_state=ms)


def shard_batch(learner: Any, state: Any, mesh: Mesh, axis_name: str | None = None) -> Any:
    """``state`` placed on ``mesh`` with its batch axes sharded over ``axis_name`` (default:
    ``learner.batch_axis``) and everything else (parameters, optimizer state, counters, shared
    PRNG keys) replicated; see :func:`batch_specs`.

    Raises:
      ValueError: no axis name, an axis the mesh does not have, or a batch size not divisible
        by the axis size.
    """
    axis_name = _axis_name(learner, axis_name)
    size = _axis_size(mesh, axis_name)
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    if batch % size:
        raise ValueError(f"batch size {batch} is not divisible by mesh axis {axis_name!r} of size {size}")
    specs = batch_specs(learner, state, axis_name)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(state, shardings)


def run_sharded(learner: Any, state: Any, xs: Any, ys: Any, masks: Any, opt_args: dict, mesh: Any = None):
    """``learner``'s scan of steps inside ``jax.shard_map`` over ``learner.batch_axis`` of
    ``mesh`` (``None``: the mesh set with ``jax.set_mesh``); use through
    :meth:`snapjax.OnlineLearner.run` / :meth:`~snapjax.OnlineLearner.run_sharded`.

    ``xs (T, B, n_in)``, ``ys``, ``masks (T, B)`` are split along ``B``; ``opt_args`` are
    replicated.  Returns ``(state, outputs (T, B, out), metrics)`` with ``metrics['aux']``
    leaves ``(T, D, ...)`` (one row per device).

    Raises:
      ValueError: no mesh, a mesh without the axis, or a batch not divisible by its size.
    """
    axis = _axis_name(learner, None)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(f"batch_axis={axis!r} needs a mesh: pass mesh=, or run under `with jax.set_mesh(mesh):`")
    size = _axis_size(mesh, axis)
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    if batch % size:
        raise ValueError(f"batch size {batch} is not divisible by mesh axis {axis!r} of size {size}")
    data = P(None, axis)
    in_specs = (batch_specs(learner, state, axis), data, jax.tree.map(lambda _: data, ys),
                P() if masks is None else data, jax.tree.map(lambda _: P(), opt_args))
    out_specs = (in_specs[0], data,
                 {"loss": P(), "updated": P(), "skipped": P(), "resets": P(), "excluded": P(), "aux": data})

    def local(st, xs, ys, masks, opt_args):
        return learner._scan(st, xs, ys, masks, opt_args, device_aux=True)

    args = (state, xs, ys, masks, opt_args)
    if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == AxisType.Explicit:
        # Explicit axes: shard_map takes arguments typed as its in_specs (a no-op when they are)
        target = in_specs if isinstance(mesh, AbstractMesh) else jax.tree.map(
            lambda s: NamedSharding(mesh, s), in_specs, is_leaf=lambda x: isinstance(x, P))
        args = jax.sharding.reshard(args, target)
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return fn(*args)
