"""The one interface every online gradient method implements.

An online method follows a recurrent cell ``s_t = f(θ, s_{t-1}, x_t)`` through a stream and
turns the per-step loss cotangent ``c_t = ∂L_t/∂s_t`` into a parameter gradient without
storing the history.  Exact RTRL keeps the influence ``J_t = ds_t/dθ`` (``J_t = D_t J_{t-1} +
I_t``) and returns ``c_t J_t``; SnAp-n keeps ``J`` masked to its n-step pattern; UORO keeps a
rank-one estimate; truncated BPTT and the chunked methods buffer a window and return the
window's gradient at its end.  All of them are driven the same way, per time step::

    carry, state, aux = method.step(params, carry, state, x_t)        # forward + method update
    dL_dcarry = ...                                                    # from the loss at step t
    grads, state = method.gradient(params, state, dL_dcarry)           # parameter-shaped

with ``carry`` and ``dL_dcarry`` in the **flax carry layout** (an array ``(B, units)``, or the
tuple ``(c, h)`` for an LSTM).  ``gradient`` must be called once after every ``step`` (with a
zero cotangent if the step is not scored).  The gradients of ``period`` consecutive steps are
complete only at the end of each period (``period == 1`` for RTRL/SnAp/UORO; the window
length for truncated BPTT): an optimizer that steps every ``K`` steps needs ``K % period == 0``.

Method states are ``NamedTuple`` pytrees; :meth:`OnlineMethod.batch_axes` *declares* which
axis of each leaf is the batch axis (``None``: shared by all examples, e.g. a PRNG key), so
per-example resets and batch sharding never guess from shapes.  ``aux`` is a dict of
per-step statistics (e.g. the fraction of active units for activity-sparse RTRL; ``{}`` for
most methods).

Build any method by name with :func:`snapjax.online_method`; code above this interface never
asks which method it has.

Example (float32, GRU with 4 units, SnAp-1)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> method = sj.online_method("snap1", cell, params)
    >>> carry, state = method.init_carry(2), method.init(2)
    >>> carry, state, aux = method.step(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> jax.tree.structure(grads) == jax.tree.structure(params)
    True
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import Recurrent

Array = jax.Array
PyTree = Any

__all__ = ["OnlineMethod", "StepResult", "is_key", "typed_key", "select_examples", "check_batch_size",
           "finite_examples", "finite_examples_of_methods"]


class StepResult(NamedTuple):
    """What :meth:`OnlineMethod.step` returns: the new flax carry, the new method state and a
    dict of per-step statistics.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> method = sj.online_method("snap1", nn.GRUCell(4), params)
        >>> result = method.step(params, method.init_carry(2), method.init(2), jnp.ones((2, 3)))
        >>> isinstance(result, sj.StepResult), result.carry.shape, result.aux
        (True, (2, 4), {})
        >>> carry, state, aux = result                # a NamedTuple: unpacks in this order
    """

    carry: PyTree
    state: PyTree
    aux: dict


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array."""
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def typed_key(key: Any) -> Array:
    """A typed PRNG key; a legacy raw ``uint32`` key (``jax.random.PRNGKey``) is wrapped.

    Raises:
      ValueError: ``key`` is neither.
    """
    if is_key(key):
        return key
    raw = jnp.asarray(key)
    if raw.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key (jax.random.key) or a raw uint32 key, got dtype {raw.dtype}")
    return jax.random.wrap_key_data(raw)


def check_batch_size(batch_size: Any) -> int:
    """``int(batch_size)``; ``ValueError`` unless a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def select_examples(where: Array, on_true: PyTree, on_false: PyTree, axes: PyTree) -> PyTree:
    """Per example ``b``: ``on_true`` where ``where[b]`` else ``on_false``.

    ``axes`` is a prefix of the trees giving each leaf's batch axis; leaves under ``None`` are
    taken from ``on_false`` (shared leaves such as a running PRNG key are never rewound).
    """

    def sel(axis, t, f):
        if axis is None:
            return f

        def leaf(a, b):
            shape = [1] * jnp.ndim(a)
            shape[axis] = -1
            return jnp.where(jnp.reshape(where, shape), a, b)

        return jax.tree.map(leaf, t, f)

    return jax.tree.map(sel, axes, on_true, on_false, is_leaf=lambda x: x is None)


def finite_examples(tree: PyTree, batch: int, axes: PyTree = 0) -> Array:
    """``(B,)``: every inexact entry of the example is finite (leaves under a ``None`` axis count
    for every example)."""
    ok = jnp.ones((batch,), bool)

    def visit(axis, sub):
        nonlocal ok
        for leaf in jax.tree.leaves(sub):
            if is_key(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                continue
            fin = jnp.isfinite(leaf)
            if axis is None:
                ok = ok & jnp.all(fin)
            else:
                # reduce over the other axes in place (no reshape: a leaf split over devices along
                # a parameter axis is reduced where it lies, then across devices)
                ok = ok & jnp.all(fin, axis=tuple(i for i in range(fin.ndim) if i != axis))

    jax.tree.map(visit, axes, tree, is_leaf=lambda x: x is None)
    return ok


def finite_examples_of_methods(methods, states, batch: int) -> Array:
    """``(B,)``: each example's method states are finite (by the methods' declared batch axes)."""
    ok = jnp.ones((batch,), bool)
    for m, s in zip(methods, states):
        ok = ok & finite_examples(s, batch, m.batch_axes())
    return ok


class OnlineMethod(abc.ABC):
    """Abstract online gradient method for one recurrent cell (see the module docstring).

    Subclasses are static configurations (frozen dataclasses, hashed by identity) built for one
    cell and one parameter layout; every method below is pure and jittable.

    Attributes (required of subclasses):
      cell: the :class:`snapjax.Recurrent` being followed.
      name: short display name (``"rtrl"``, ``"snap1"``, ``"uoro"``, ``"tbptt8"``...).

    Example (exact RTRL, driven step by step for the loss ``Σ_t Σ h_t``, gives the gradient of
    the unrolled loop)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> xs = jax.random.normal(jax.random.key(1), (3, 2, 3))        # (T, B, n_in)
        >>> method = sj.online_method("rtrl", cell, params)
        >>> isinstance(method, sj.OnlineMethod), method.period
        (True, 1)
        >>> @jax.jit
        ... def online(params):                       # Σ_t of the per-step gradients
        ...     carry, state = method.init_carry(2), method.init(2)
        ...     total = jax.tree.map(jnp.zeros_like, params)
        ...     for x in xs:                          # ∂L_t/∂h_t = 1
        ...         carry, state, _ = method.step(params, carry, state, x)
        ...         g, state = method.gradient(params, state, jnp.ones_like(carry))
        ...         total = jax.tree.map(jnp.add, total, g)
        ...     return total
        >>> def unrolled(p):
        ...     h, loss = jnp.zeros((2, 4)), 0.0
        ...     for x in xs:
        ...         h = cell.apply({"params": p}, h, x)[0]
        ...         loss = loss + h.sum()
        ...     return loss
        >>> total, ref = online(params), jax.jit(jax.grad(unrolled))(params)
        >>> all(bool(jnp.allclose(a, b, atol=1e-5)) for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(ref)))
        True
    """

    cell: Recurrent
    name: str

    # ------------------------------------------------------------------ state
    @abc.abstractmethod
    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> PyTree:
        """Method state for ``batch_size`` examples at the start of a stream (e.g. ``J_0 = 0``)."""

    @abc.abstractmethod
    def batch_axes(self) -> PyTree:
        """A prefix of the state pytree: the batch axis of each leaf, or ``None`` if shared."""

    def param_axes(self) -> PyTree:
        """A prefix of the state pytree: for each leaf, an axis indexing *parameters* (negative:
        counted from the end) along which the leaf may be split over devices, or ``None``.

        Splitting a leaf along that axis must need no communication in :meth:`step` (e.g.
        ``D·J`` contracts over state units, never over parameters) and only parameter-shaped
        results in :meth:`gradient`; :mod:`snapjax.parallel.sharding` uses it for the model-parallel
        influence (``OnlineLearner(param_axis=...)``).  Default: ``None`` (nothing split)."""
        return None

    @property
    def period(self) -> int:
        """Steps after which the accumulated gradient is complete (1 unless windowed)."""
        return 1

    def init_carry(self, batch_size: int, dtype: Any = jnp.float32) -> PyTree:
        """The zero flax carry of the cell."""
        return self.cell.init_carry(check_batch_size(batch_size), dtype)

    def num_stored(self) -> int | None:
        """Floats of method state per example (``None`` if not meaningful)."""
        return None

    # ------------------------------------------------------------------- step
    @abc.abstractmethod
    def step(self, params: PyTree, carry: PyTree, state: PyTree, x: Array) -> StepResult:
        """Advance the cell one step and update the method state.

        Args:
          params: the cell's parameters (held by the caller; not changed here).
          carry: flax carry at ``t-1``.  state: method state.  x: input ``(B, n_in)``.
        Returns:
          :class:`StepResult` ``(carry_t, state_t, aux)``.
        """

    @abc.abstractmethod
    def gradient(self, params: PyTree, state: PyTree, dloss_dcarry: PyTree) -> tuple[PyTree, PyTree]:
        """Parameter gradient contribution of this step's loss cotangent.

        Args:
          params: the cell's parameters.  state: from the last :meth:`step`.
          dloss_dcarry: ``∂L_t/∂carry_t`` in the flax carry layout (summed over nothing:
            one row per example).
        Returns:
          ``(grads, state)``: ``grads`` has the structure of ``params`` (summed over the
          batch); windowed methods return zeros until the end of a period.
        """

    def step_fused(self, params: PyTree, carry: PyTree, state: PyTree, x: Array) -> tuple[StepResult, Any]:
        """:meth:`step`, and what :meth:`gradient_fused` needs to redo the state update fused with
        the gradient (``None``: nothing; the default).  A caller that takes the gradient of every
        step in the same traced function (the learner, :func:`snapjax.online_gradient`) calls
        these two instead of :meth:`step` and :meth:`gradient`; the results are the same."""
        return self.step(params, carry, state, x), None

    def gradient_fused(self, params: PyTree, state: PyTree, fused: Any, dloss_dcarry: PyTree,
                       accumulate: PyTree | None = None) -> tuple[PyTree, PyTree]:
        """:meth:`gradient` of the state :meth:`step_fused` returned, given its ``fused``, added
        to ``accumulate`` (parameter-shaped, e.g. the sum of the earlier steps'; ``None``: zeros)."""
        del fused
        grads, state = self.gradient(params, state, dloss_dcarry)
        return (grads if accumulate is None else jax.tree.map(jnp.add, accumulate, grads)), state

    def flush(self, params: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        """Close a partial period at the end of a stream: the gradient of the steps buffered
        since the last period boundary (whose :meth:`gradient` calls returned zeros), and the
        state at a boundary.  Call it after a step's :meth:`gradient`.  Default (nothing is
        ever pending, ``period == 1``): zeros and the state unchanged."""
        return jax.tree.map(jnp.zeros_like, params), state

    # ------------------------------------------------------------------ reset
    def reset(self, state: PyTree, where: Array, *, key: Array | None = None) -> PyTree:
        """Re-initialise the examples with ``where[b]`` True (e.g. a new sequence, or an
        example that became non-finite); the others are untouched, shared leaves are kept.
        Without ``key``, a method whose state holds a PRNG key is re-initialised with that key
        (a shared leaf: kept, never rewound), so methods that need a key get one."""
        batch = jnp.shape(where)[0]
        dtype = _float_dtype(state)
        if key is None:
            key = next((leaf for leaf in jax.tree.leaves(state) if is_key(leaf)), None)
        fresh = self.init(batch, dtype, key=key)
        return select_examples(jnp.asarray(where, bool), fresh, state, self.batch_axes())


def _float_dtype(tree: PyTree) -> Any:
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.result_type(leaf)
    return jnp.float32
