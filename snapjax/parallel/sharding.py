"""Many devices: examples split over one mesh axis, the influence split over another.

**Batch axis** (``OnlineLearner(batch_axis="batch")``).  Every example's carry and method state
(RTRL's influence ``J_b``, SnAp-n's tables, UORO's ``s̃_b, θ̃_b``, TBPTT's window) belongs to
that example alone, so a batch ``B`` split over ``D`` devices needs no communication for the
forward pass, the method updates or the per-example gradient contractions.  Where each leaf's
batch axis is comes from the methods' declarations (:meth:`snapjax.OnlineMethod.batch_axes`;
carries: axis 0), never from shapes.  :meth:`snapjax.OnlineLearner.run` runs the ``lax.scan``
of steps inside ``jax.shard_map`` over that axis: each device runs the single-device code on
its ``B/D`` local examples, and the learner reduces over devices (``lax.psum``) at exactly
these points of a step: the masked-mean denominator ``Σ_b w_b``; the loss and the gradient
``Σ_d g_d``; the guard's "some example is non-finite" flag and the reset / excluded counts;
the "some example scored" flag of ``skip_unscored_updates``.  The optimizer sees the same
gradient on every device, so parameters and optimizer state stay replicated and equal to the
single-device run up to the order of the batch sums; ``metrics['aux']`` gains a device axis
``(T, D, ...)``.

**Parameter axis** (``OnlineLearner(param_axis="model")``, model-parallel influence).  Exact
RTRL stores ``k × p`` floats per example.  The recursion ``J_t = D_t J_{t-1} + I_t`` contracts
over state units only and the gradient ``c_t J_t`` keeps the parameter index, so every leaf
can be split along a parameter axis (declared by :meth:`snapjax.OnlineMethod.param_axes`:
the unit axis of RTRL/SnAp-n's compressed influence, the columns of UORO's ``θ̃``) with no
communication in the update; only the parameter-shaped gradient (``p`` floats, not ``k p``) is
gathered.  Each device holds ``1/D`` of the influence.  This axis is left to XLA's SPMD
partitioner: the state is constrained to its split layout after every step
(``with_sharding_constraint``).  Both axes together form a 2-D mesh (batch × parameters).

Meshes of either axis type work: Explicit axes (``jax.make_mesh``'s default) are run as Auto
inside (``jax.sharding.auto_axes``), so no engine code sees sharded types.  Many processes
(``jax.distributed``) work the same way: :func:`put_sharded` builds global arrays from the
value every process holds (``jax.make_array_from_callback``); checkpoint with
:mod:`snapjax.parallel.sharded_checkpoint` (orbax).

Example (one device here; with ``8`` devices use ``jax.make_mesh((2, 4), ("batch", "model"))``)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> mesh = jax.make_mesh((1, 1), ("batch", "model"))
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl",
    ...                            batch_axis="batch", param_axis="model")
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> with jax.set_mesh(mesh):
    ...     state = sj.shard_state(learner, state, mesh)
    ...     state, outs, metrics = learner.run_jit(state, jnp.ones((5, 2, 3)), jnp.zeros((5, 2), jnp.int32))
    >>> outs.shape, metrics["loss"].shape
    ((5, 2, 2), (5,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from snapjax.methods.base import is_key

__all__ = ["method_specs", "state_specs", "put_sharded", "shard_state", "run_sharded", "sequence_layout"]

PyTree = Any


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _axis_sizes(mesh: Any, *names: str | None) -> dict:
    """``{name: size}`` of the mesh axes ``names`` (``None`` skipped); ``ValueError`` if absent."""
    shape = dict(mesh.shape)
    for name in names:
        if name is not None and name not in shape:
            raise ValueError(f"the mesh has no axis {name!r}; its axes are {tuple(shape)}")
    return shape


def _leaf_axes(prefix: PyTree, tree: PyTree) -> list:
    """The axis (or ``None``) of every leaf of ``tree`` (in ``jax.tree.leaves`` order), from a
    prefix tree of axes such as :meth:`snapjax.OnlineMethod.batch_axes`."""
    out: list = []
    jax.tree.map(lambda ax, sub: out.extend([ax] * len(jax.tree.leaves(sub))), prefix, tree,
                 is_leaf=lambda x: x is None)
    return out


def method_specs(
    method: Any,
    state: PyTree,
    *,
    batch_axis: str | None = None,
    param_axis: str | None = None,
    mesh: Any = None,
    batch_size: int | None = None,
) -> PyTree:
    """A ``PartitionSpec`` per leaf of an :class:`snapjax.OnlineMethod`'s ``state``: split over
    the mesh axis ``batch_axis`` at the leaf's declared batch axis
    (:meth:`~snapjax.OnlineMethod.batch_axes`) and over ``param_axis`` at its declared parameter
    axis (:meth:`~snapjax.OnlineMethod.param_axes`); undeclared axes are replicated.

    Args:
      method: the method.  state: its state (arrays or ``jax.ShapeDtypeStruct``).
      batch_axis: a mesh axis name for the examples, or ``None`` (not split that way).
      param_axis: a mesh axis name for the parameter axis, or ``None`` (not split that way).
      mesh: if given, every split axis must be divisible by the mesh axis size.
      batch_size: if given, every declared batch axis must have this length.
    Raises:
      ValueError: a declared axis the leaf does not have, a batch axis of the wrong length, or
        (with ``mesh``) a split axis not divisible by the mesh axis size.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> method = sj.online_method("rtrl", cell, params)
        >>> specs = sj.method_specs(method, method.init(2), batch_axis="batch", param_axis="model")
        >>> P = jax.sharding.PartitionSpec
        >>> specs.influence["hn"]["kernel"] == P("batch", None, "model")  # J (B, rows, units, K, m)
        True
    """
    sizes = {} if mesh is None else _axis_sizes(mesh, batch_axis, param_axis)
    leaves, treedef = jax.tree.flatten(state)
    b_axes = _leaf_axes(method.batch_axes(), state) if batch_axis is not None else [None] * len(leaves)
    p_axes = _leaf_axes(method.param_axes(), state) if param_axis is not None else [None] * len(leaves)
    name = getattr(method, "name", type(method).__name__)

    def spec(leaf, b, p):
        shape = tuple(jnp.shape(leaf))
        entries: list = [None] * len(shape)
        for ax, mesh_axis, kind in ((b, batch_axis, "batch"), (p, param_axis, "parameter")):
            if ax is None:
                continue
            if not -len(shape) <= ax < len(shape):
                raise ValueError(f"{name} state: a leaf of shape {shape} declares {kind} axis {ax}, which it does not have")
            ax %= len(shape)
            if entries[ax] is not None:
                raise ValueError(f"{name} state: a leaf of shape {shape} declares axis {ax} as both batch and parameter axis")
            if kind == "batch" and batch_size is not None and shape[ax] != batch_size:
                raise ValueError(f"{name} state: a leaf of shape {shape} declares batch axis {ax}, "
                                 f"which must have the batch size {batch_size}")
            if mesh_axis in sizes and shape[ax] % sizes[mesh_axis]:
                raise ValueError(f"{name} state: a leaf of shape {shape} is split along its {kind} axis {ax} over "
                                 f"mesh axis {mesh_axis!r} of size {sizes[mesh_axis]}, which does not divide {shape[ax]}")
            entries[ax] = mesh_axis
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    return jax.tree.unflatten(treedef, [spec(*a) for a in zip(leaves, b_axes, p_axes)])


def _batch_size(state: Any) -> int:
    return int(jnp.shape(jax.tree.leaves(state.carry[0])[0])[0])


def state_specs(learner: Any, state: Any, mesh: Any = None, *, batch: bool = True, params: bool = True) -> PyTree:
    """A ``PartitionSpec`` per leaf of an :class:`snapjax.OnlineState`: carries split over
    ``learner.batch_axis`` at axis 0, method states as :func:`method_specs` with the learner's
    ``batch_axis`` and ``param_axis``, everything else (parameters, optimizer state, counters,
    shared PRNG keys) replicated.  ``batch=False`` / ``params=False`` leave that axis out.

    Raises:
      ValueError: as :func:`method_specs`; with ``mesh``: an axis the mesh does not have, or a
        batch or parameter axis not divisible by the mesh axis size.

    Example (a 1 × 1 mesh: the specs are those of any batch × parameter mesh)::

        >>> import flax.linen as nn, jax, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl",
        ...                            batch_axis="batch", param_axis="model")
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> specs = sj.state_specs(learner, state, jax.make_mesh((1, 1), ("batch", "model")))
        >>> P = jax.sharding.PartitionSpec
        >>> specs.carry == (P("batch"),), specs.step == P(), specs.params["layers_1"]["kernel"] == P()
        (True, True, True)
        >>> specs.method_state[0].influence["hn"]["bias"] == P("batch", "model")  # J (B, units, K, m)
        True
    """
    b = learner.batch_axis if batch else None
    p = learner.param_axis if params else None
    B = _batch_size(state)
    if mesh is not None:
        _check_batch(B, _axis_sizes(mesh, b, p), b)
    carry = tuple(jax.tree.map(lambda _: P(b), c) for c in state.carry)
    ms = tuple(
        method_specs(m, s, batch_axis=b, param_axis=p, mesh=mesh, batch_size=B)
        for m, s in zip(learner.methods(state.params), state.method_state)
    )
    rest = jax.tree.map(lambda _: P(), state._replace(carry=(), method_state=()))
    return rest._replace(carry=carry, method_state=ms)


def put_sharded(tree: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """``tree`` placed on ``mesh`` with ``specs`` (a ``PartitionSpec`` or a prefix tree of them),
    also when the mesh spans several processes (``jax.distributed``): each process then passes
    the same full value (e.g. from a deterministic ``learner.init``) and keeps its own shards
    (``jax.make_array_from_callback``).  Typed PRNG keys are placed through their key data.

    Example::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> mesh = jax.make_mesh((1,), ("batch",))
        >>> xs = sj.put_sharded(jnp.ones((5, 4, 3)), mesh, jax.sharding.PartitionSpec(None, "batch"))
        >>> xs.sharding.spec == jax.sharding.PartitionSpec(None, "batch")
        True
    """
    def place(x, spec):
        if is_key(x):
            data = place(jax.random.key_data(x), spec)  # (*shape, key words): the same spec
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        sharding = NamedSharding(mesh, spec)
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(lambda spec, sub: jax.tree.map(lambda x: place(x, spec), sub), specs, tree, is_leaf=_is_spec)


def shard_state(learner: Any, state: Any, mesh: Mesh) -> Any:
    """``state`` placed on ``mesh`` by :func:`state_specs`: per-example leaves split over
    ``learner.batch_axis``, influence leaves over ``learner.param_axis``, the rest replicated.
    Works across processes (:func:`put_sharded`).  The result may share buffers with ``state``
    (``jax.device_put`` reuses a buffer already where it belongs), and ``learner.run_jit``
    donates its input: after running the placed state, do not reuse ``state``.

    Raises:
      ValueError: the learner has neither axis, or as :func:`state_specs` (with ``mesh``).

    Example::

        >>> import flax.linen as nn, jax, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, batch_axis="batch")
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> placed = sj.shard_state(learner, state, jax.make_mesh((1,), ("batch",)))
        >>> P = jax.sharding.PartitionSpec
        >>> placed.carry[0].sharding.spec == P("batch"), placed.params["layers_1"]["kernel"].sharding.spec == P()
        (True, True)
    """
    if learner.batch_axis is None and learner.param_axis is None:
        raise ValueError("shard_state needs a mesh axis: OnlineLearner(..., batch_axis='batch') and/or param_axis='model'")
    return put_sharded(state, mesh, state_specs(learner, state, mesh))


def _context_mesh(mesh: Any, learner: Any) -> Any:
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            axes = [a for a in (learner.batch_axis, learner.param_axis) if a is not None]
            raise ValueError(f"mesh axes {axes} need a mesh: pass mesh=, or run under `with jax.set_mesh(mesh):`")
    return mesh


def _is_explicit(mesh: Any) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def _check_batch(batch: int, sizes: dict, axis: str | None) -> None:
    """``ValueError`` unless ``batch`` divides by the size of mesh axis ``axis`` (if any)."""
    if axis is not None and batch % sizes[axis]:
        raise ValueError(f"batch size {batch} is not divisible by mesh axis {axis!r} of size {sizes[axis]}")


def _spmd_call(fn: Callable, mesh: Any, in_specs: PyTree, out_specs: PyTree, *args: Any) -> Any:
    """``fn(*args)``; on a mesh with Explicit axes, the arguments are first typed as ``in_specs``
    (a no-op when they are) and ``fn`` runs with those axes as Auto (``jax.sharding.auto_axes``,
    results typed as ``out_specs``), so no engine code sees sharded types."""
    if not _is_explicit(mesh):
        return fn(*args)

    def named(specs):
        if isinstance(mesh, AbstractMesh):
            return specs
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)

    args = jax.sharding.reshard(args, named(in_specs))
    explicit = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
    call = jax.sharding.auto_axes(fn, axes=explicit, out_sharding=named(out_specs))
    if jax.sharding.get_abstract_mesh().empty:  # a concrete mesh passed without a context mesh
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return call(*args)
    return call(*args)


def run_sharded(learner: Any, state: Any, xs: Any, ys: Any, masks: Any, opt_args: dict, mesh: Any = None):
    """``learner``'s scan of steps on ``mesh`` (``None``: the mesh set with ``jax.set_mesh``):
    inside ``jax.shard_map`` over ``learner.batch_axis`` (``xs (T, B, n_in)``, ``ys``, ``masks
    (T, B)`` split along ``B``), with the method states kept split over ``learner.param_axis``;
    ``opt_args`` replicated.  Use through :meth:`snapjax.OnlineLearner.run`.

    Returns ``(state, outputs (T, B, out), metrics)``; with a batch axis, ``metrics['aux']``
    leaves are ``(T, D, ...)`` (one row per device).

    Raises:
      ValueError: no mesh, a mesh without the axes, or a batch or parameter axis not divisible
        by the mesh axis size.
    """
    b, p = learner.batch_axis, learner.param_axis
    mesh = _context_mesh(mesh, learner)
    full = state_specs(learner, state, mesh)
    data = P(None, b) if b is not None else P()
    metric_specs = {"loss": P(), "updated": P(), "skipped": P(), "resets": P(), "excluded": P(), "aux": data}
    in_specs = (full, data, jax.tree.map(lambda _: data, ys), P() if masks is None else data,
                jax.tree.map(lambda _: P(), opt_args))
    out_specs = (full, data, metric_specs)
    # inside the step only the parameter axis is left to the partitioner (the batch axis is
    # manual in shard_map): after every step each leaf is put back in its declared layout, so
    # the influence stays split and parameters / optimizer state stay replicated (the gradient,
    # parameter-shaped, is what gets gathered), and the output layout equals the input's
    keep = None if p is None else state_specs(learner, state, batch=False)

    def hold(st):
        if keep is None:
            return st
        context = not jax.sharding.get_abstract_mesh().empty  # e.g. inside shard_map / auto_axes
        target = keep if context else jax.tree.map(lambda s: NamedSharding(mesh, s), keep, is_leaf=_is_spec)
        return jax.lax.with_sharding_constraint(st, target)

    def local(st, xs, ys, masks, opt_args):
        st, outs, metrics = learner._scan(hold(st), xs, ys, masks, opt_args, device_aux=b is not None, hold=hold)
        return hold(st), outs, metrics  # the loop's result too (XLA may lay a loop carry out its own way)

    explicit = _is_explicit(mesh)
    fn = local
    if b is not None:
        batch_only = state_specs(learner, state, params=False)

        def fn(*args):  # inside auto_axes the mesh is the Auto view of ``mesh``: take the context's
            return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh() if explicit else mesh,
                                 in_specs=(batch_only,) + in_specs[1:], out_specs=(batch_only,) + out_specs[1:],
                                 axis_names={b}, check_vma=False)(*args)

    return _spmd_call(fn, mesh, in_specs, out_specs, state, xs, ys, masks, opt_args)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where :func:`snapjax.online_gradient`'s carries and method state live on the context mesh
    (built by :func:`sequence_layout`)."""

    mesh: Any
    carry: PyTree
    state: PyTree
    batch_axis: str | None

    def hold(self, carry: PyTree, state: PyTree) -> tuple:
        """``(carry, state)`` constrained to their layout (after every step)."""
        return jax.lax.with_sharding_constraint((carry, state), (self.carry, self.state))

    def call(self, fn: Callable, params: PyTree, carry: PyTree, state: PyTree, xs: Any, ys: Any,
             result: Callable[[list], Any]) -> Any:
        """``fn(params, carry, state, xs, ys)`` with Explicit mesh axes run as Auto.  ``fn``
        returns ``result([loss, grads, outputs, carry, state])`` (e.g. a
        :class:`snapjax.SequenceGradient`), laid out as: loss and gradients replicated, outputs
        ``(T, B, ...)`` and carries split over the batch axis, the method state as declared."""
        data = P(None, self.batch_axis)
        out = result([P(), jax.tree.map(lambda _: P(), params), data, self.carry, self.state])
        in_specs = (jax.tree.map(lambda _: P(), params), self.carry, self.state, data,
                    jax.tree.map(lambda _: data, ys))
        return _spmd_call(fn, self.mesh, in_specs, out, params, carry, state, xs, ys)


def sequence_layout(method: Any, params: PyTree, carry: PyTree, state: PyTree,
                    batch_axis: str | None, param_axis: str | None) -> SequenceLayout:
    """The layout of :func:`snapjax.online_gradient` with ``batch_axis`` / ``param_axis`` on the
    context mesh (``jax.set_mesh``).

    Raises:
      ValueError: no context mesh, an axis it does not have, or a split axis not divisible by
        the mesh axis size (see :func:`method_specs`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError("online_gradient(batch_axis=..., param_axis=...) runs on the context mesh: "
                         "call it under `with jax.set_mesh(mesh):`")
    batch = int(jnp.shape(jax.tree.leaves(carry)[0])[0])
    _check_batch(batch, _axis_sizes(mesh, batch_axis, param_axis), batch_axis)
    specs = method_specs(method, state, batch_axis=batch_axis, param_axis=param_axis, mesh=mesh, batch_size=batch)
    return SequenceLayout(mesh, jax.tree.map(lambda _: P(batch_axis), carry), specs, batch_axis)
