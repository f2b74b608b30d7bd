"""optax gradient transformations for online (RTRL / SnAp / UORO / TBPTT) training.

All transformations follow the optax conventions: they are
``optax.GradientTransformationExtraArgs`` with ``init(params) -> state`` and
``update(updates, state, params=None, **extra_args) -> (updates, state)``, their states are
``NamedTuple`` pytrees (checkpointable, shardable), and they chain with any optax optimizer::

    tx = skip_nonfinite(optax.chain(optax.adam(1e-3), masked_updates(mask_tree)))
    tx = accumulate_online(optax.adam(1e-3), every_k=8)

* :func:`skip_nonfinite` wraps an inner transformation; when the incoming gradients (or the
  inner updates) hold a NaN/Inf, it returns all-zero updates **and keeps the inner state
  unchanged**, and counts the skip (``SkipNonFiniteState.total_skipped``).  Unlike
  ``optax.apply_if_finite`` it never gives up after N consecutive errors: an online learner
  sees an unbounded stream, so a bad example must not poison the optimizer for good.
* :func:`masked_updates` zeroes the updates of masked (pruned) weights, so that a sparse
  parameter pattern stays exactly sparse whatever the optimizer (weight decay included).
* :func:`accumulate_online` sums (or averages) ``every_k`` successive online gradients and
  applies the inner transformation once per ``k`` calls (zero updates in between), like
  ``optax.MultiSteps`` but as a plain transformation and with a *sum* by default: the sum of
  the per-step online gradients over a window equals the gradient of the summed loss (the
  BPTT gradient for exact RTRL with frozen parameters).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any

__all__ = [
    "SkipNonFiniteState",
    "AccumulateOnlineState",
    "skip_nonfinite",
    "masked_updates",
    "accumulate_online",
    "tree_all_finite",
    "skipped_count",
]


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every element of every (inexact) leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def _tree_select(pred, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# ---------------------------------------------------------------------------
# skip_nonfinite


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transformation's state (unchanged by skipped updates).
      last_finite: bool scalar, whether the last update was finite (applied).
      consecutive_skipped: int32 scalar, skips since the last applied update.
      total_skipped: int32 scalar, skips since ``init``.

    Example (two bad gradients in a row, then a good one)::

        >>> import jax.numpy as jnp, optax
        >>> from snapjax.training.transforms import SkipNonFiniteState, skip_nonfinite
        >>> tx, params = skip_nonfinite(optax.sgd(0.1)), {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> isinstance(state, SkipNonFiniteState), bool(state.last_finite)
        (True, True)
        >>> for g in (jnp.nan, jnp.inf, 1.0):
        ...     _, state = tx.update({"w": jnp.full(2, g)}, state, params)
        ...     print(bool(state.last_finite), int(state.consecutive_skipped), int(state.total_skipped))
        False 1 1
        False 2 2
        True 0 2
    """

    inner_state: PyTree
    last_finite: jax.Array
    consecutive_skipped: jax.Array
    total_skipped: jax.Array


def skip_nonfinite(inner: optax.GradientTransformation | None = None) -> optax.GradientTransformationExtraArgs:
    """Apply ``inner`` only when the gradients and the resulting updates are all finite.

    A skipped call returns zero updates (so ``optax.apply_updates`` leaves the parameters
    bit-identical) and the unchanged inner state, and increments the skip counters.

    Args:
      inner: the transformation to protect (e.g. ``optax.adam(1e-3)``); ``None`` means the
        identity (then the transform just zeroes non-finite updates and counts them).
    Returns:
      an ``optax.GradientTransformationExtraArgs`` with state :class:`SkipNonFiniteState`.

    Example::

        >>> import jax.numpy as jnp, optax
        >>> from snapjax.training.transforms import skip_nonfinite
        >>> tx, params = skip_nonfinite(optax.sgd(0.1)), {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
        >>> updates["w"].tolist(), int(state.total_skipped)          # skipped: zero updates
        ([0.0, 0.0], 1)
        >>> updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
        >>> [round(float(u), 2) for u in updates["w"]], int(state.total_skipped)
        ([-0.1, -0.2], 1)
    """
    inner = optax.with_extra_args_support(inner if inner is not None else optax.identity())

    def init_fn(params):
        return SkipNonFiniteState(
            inner_state=inner.init(params),
            last_finite=jnp.asarray(True),
            consecutive_skipped=jnp.zeros((), jnp.int32),
            total_skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        grads_ok = tree_all_finite(updates)
        # Feed zeros to the inner transformation when the gradients are bad so that it cannot
        # produce NaN in branches we discard (NaN * 0 hazards under jnp.where).
        safe = jax.tree.map(lambda u: jnp.where(grads_ok, u, jnp.zeros_like(u)), updates)
        new_updates, new_inner = inner.update(safe, state.inner_state, params, **extra_args)
        ok = jnp.logical_and(grads_ok, tree_all_finite(new_updates))
        out_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        out_inner = _tree_select(ok, new_inner, state.inner_state)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return out_updates, SkipNonFiniteState(
            inner_state=out_inner,
            last_finite=ok,
            consecutive_skipped=jnp.where(ok, 0, state.consecutive_skipped + 1).astype(jnp.int32),
            total_skipped=state.total_skipped + bad,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skipped_count(opt_state: PyTree) -> jax.Array | None:
    """Total skips recorded by the outermost :class:`SkipNonFiniteState` found in ``opt_state``
    (searching depth-first through tuples); ``None`` if there is none.

    Example::

        >>> import jax.numpy as jnp, optax
        >>> from snapjax.training.transforms import skip_nonfinite, skipped_count
        >>> params = {"w": jnp.ones(2)}
        >>> tx = optax.chain(optax.clip(1.0), skip_nonfinite(optax.adam(1e-3)))
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": jnp.full(2, jnp.nan)}, state, params)
        >>> int(skipped_count(state))
        1
        >>> skipped_count(optax.adam(1e-3).init(params)) is None
        True
    """
    if isinstance(opt_state, SkipNonFiniteState):
        return opt_state.total_skipped
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            c = skipped_count(s)
            if c is not None:
                return c
        return None
    return None


# ---------------------------------------------------------------------------
# masked_updates


def masked_updates(masks: PyTree) -> optax.GradientTransformationExtraArgs:
    """Zero the updates of masked weights: ``u ← u ⊙ mask``.

    Args:
      masks: a pytree with the structure of the parameters whose leaves are static 0/1 (or
        bool) NumPy arrays of the leaf's shape, or ``None`` for "no mask" (the update passes
        through unchanged).  Being static, masks are closed over as constants.
    Returns:
      a stateless ``optax.GradientTransformationExtraArgs``.

    Example (the masked weight keeps its value even under weight decay)::

        >>> import jax.numpy as jnp, numpy as np, optax
        >>> from snapjax.training.transforms import masked_updates
        >>> params = {"w": jnp.array([1.0, 0.5]), "b": jnp.ones(1)}
        >>> tx = optax.chain(optax.adamw(0.1, weight_decay=0.1), masked_updates({"w": np.array([True, False]), "b": None}))
        >>> updates, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init(params), params)
        >>> optax.apply_updates(params, updates)["w"][1].item(), bool(updates["b"][0] != 0)
        (0.5, True)
    """

    def is_none(x):
        return x is None

    np_masks = jax.tree.map(lambda m: None if m is None else np.asarray(m).astype(bool), masks, is_leaf=is_none)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args

        def apply(m, u):
            if m is None:
                return u
            if np.shape(m) != jnp.shape(u):
                raise ValueError(f"mask of shape {np.shape(m)} does not match an update of shape {jnp.shape(u)}")
            return jnp.where(jnp.asarray(m), u, jnp.zeros_like(u))

        return jax.tree.map(apply, np_masks, updates, is_leaf=is_none), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# accumulate_online


class AccumulateOnlineState(NamedTuple):
    """State of :func:`accumulate_online`.

    Attributes:
      mini_step: int32 scalar in ``[0, every_k)``, calls since the last inner update.
      acc_grads: accumulated gradients (parameter-shaped).
      inner_state: the inner transformation's state.

    Example::

        >>> import jax.numpy as jnp, optax
        >>> from snapjax.training.transforms import AccumulateOnlineState, accumulate_online
        >>> tx, params = accumulate_online(optax.sgd(1.0), every_k=3), {"w": jnp.zeros(2)}
        >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
        >>> isinstance(state, AccumulateOnlineState), int(state.mini_step), state.acc_grads["w"].tolist()
        (True, 1, [1.0, 1.0])
    """

    mini_step: jax.Array
    acc_grads: PyTree
    inner_state: PyTree


def accumulate_online(
    inner: optax.GradientTransformation, every_k: int, *, mean: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Accumulate online gradients over ``every_k`` calls, then apply ``inner`` once.

    Calls ``1..k-1`` of each window return zero updates and leave ``inner``'s state alone;
    call ``k`` passes the sum (or the mean if ``mean=True``) of the window's gradients to
    ``inner`` and resets the accumulator.  Equivalent to ``optax.MultiSteps(inner, every_k,
    use_grad_mean=mean)`` apart from being a plain (chainable) transformation; use
    ``optax.MultiSteps`` directly if you prefer.

    Args:
      inner: transformation applied once per window (e.g. ``optax.adam(1e-3)``).
      every_k: window length ``k >= 1``.
      mean: average instead of sum.

    Example (SGD with rate 1 on the sum of three gradients, once every 3 calls)::

        >>> import jax.numpy as jnp, optax
        >>> from snapjax.training.transforms import accumulate_online
        >>> tx, params = accumulate_online(optax.sgd(1.0), every_k=3), {"w": jnp.zeros(2)}
        >>> state = tx.init(params)
        >>> for g in (1.0, 2.0, 3.0):
        ...     updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
        ...     print(updates["w"].tolist())
        [0.0, 0.0]
        [0.0, 0.0]
        [-6.0, -6.0]
    """
    if not isinstance(every_k, (int, np.integer)) or every_k < 1:
        raise ValueError(f"every_k must be a positive int, got {every_k!r}")
    every_k = int(every_k)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return AccumulateOnlineState(
            mini_step=jnp.zeros((), jnp.int32),
            acc_grads=jax.tree.map(jnp.zeros_like, params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        acc = jax.tree.map(jnp.add, state.acc_grads, updates)
        last = state.mini_step + 1 >= every_k

        def emit(_):
            g = jax.tree.map(lambda a: a / every_k, acc) if mean else acc
            new_updates, new_inner = inner.update(g, state.inner_state, params, **extra_args)
            return new_updates, new_inner, jax.tree.map(jnp.zeros_like, acc)

        def hold(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner_state, acc

        new_updates, new_inner, new_acc = lax.cond(last, emit, hold, None)
        return new_updates, AccumulateOnlineState(
            mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
            acc_grads=new_acc,
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
