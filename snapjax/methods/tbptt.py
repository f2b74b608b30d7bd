"""Truncated BPTT as an online method: exact BPTT within windows of ``W`` steps.

The stream is cut into windows of ``W`` steps aligned with the first step the state has seen.
During a window the cell runs forward and the method buffers what the window's backward pass
needs: the carry at the window start ``s_{t0}``, the inputs ``x_{t0+1..t0+W}`` and the loss
cotangents ``c_τ = ∂L_τ/∂s_τ``.  At the window's last step :meth:`TBPTT.gradient` replays the
window from ``s_{t0}`` and returns ``Σ_τ c_τ ds_τ/dθ`` with the dependence on ``s_{t0}``
truncated (one ``jax.vjp`` of a ``lax.scan``), i.e. the BPTT gradient of the window's loss;
it returns zeros at every other step (``period == W``).  With ``W`` equal to the sequence
length this is BPTT exactly.

Per-example resets are replayed exactly: :meth:`TBPTT.reset` marks, per example, that the carry
entering the next step is zero, and if it comes between a step and its ``gradient`` (a fault
detected after the step) the buffered input of that step is zeroed too, so the replay neither
revives nor propagates a non-finite example.

Memory ``O(W·(k + n_in))`` per example, time about BPTT's.  Works for any cell (only
``cell.apply`` is used).

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(3)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    >>> tb = sj.online_method("tbptt", cell, params, window=2)
    >>> carry, st = tb.init_carry(1), tb.init(1)
    >>> carry, st, _ = tb.step(params, carry, st, jnp.ones((1, 2)))
    >>> g, st = tb.gradient(params, st, jnp.ones((1, 3)))        # mid-window: zeros
    >>> float(sum(jnp.abs(l).sum() for l in jax.tree.leaves(g)))
    0.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.recurrent import Recurrent
from snapjax.engine.sparsity import apply_masks
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["TBPTTState", "TBPTT"]


class TBPTTState(NamedTuple):
    """Buffers of one window (``W`` steps, ``B`` examples).

    Attributes:
      start: flax carry at the window start (batch axis 0).
      xs: inputs ``(W, B, n_in)``.  cot: loss cotangents, carry-shaped with a leading ``W``.
      zero_in: ``(W, B)`` bool, the carry entering step ``τ`` is zero (a reset).
      pending: ``(B,)`` bool, a reset requested for the next step.
      stepped: bool scalar, a step was taken and its ``gradient`` is due.
      pos: int32 scalar, position of the next step in the window.

    Example (window 3, batch 2, GRU with 3 units and 2 inputs)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
        >>> tb = sj.online_method("tbptt", nn.GRUCell(3), params, window=3)
        >>> st = tb.init(2)
        >>> st.xs.shape, st.zero_in.shape, st.start.shape, int(st.pos)
        ((3, 2, 2), (3, 2), (2, 3), 0)
        >>> carry, st, _ = tb.step(params, tb.init_carry(2), st, jnp.ones((2, 2)))
        >>> _, st = tb.gradient(params, st, jnp.ones((2, 3)))
        >>> int(st.pos), bool(st.stepped)
        (1, False)
    """

    start: PyTree
    xs: Array
    cot: PyTree
    zero_in: Array
    pending: Array
    stepped: Array
    pos: Array


@dataclasses.dataclass(frozen=True, eq=False)
class TBPTT(OnlineMethod):
    """Truncated BPTT with window ``window`` (build with ``snapjax.online_method("tbptt", ...)``).

    Attributes:
      cell: the cell.  window: ``W``.  n_in: input size.  masks: static kernel masks (masked
      weights get zero gradient).  name: ``f"tbptt{W}"``.
    """

    cell: Recurrent
    window: int
    n_in: int
    masks: Any = None
    name: str = "tbptt"

    @classmethod
    def build(cls, cell: Recurrent, params: PyTree, *, window: int, masks=None, precision=None,
              input_size: int | None = None) -> "TBPTT":
        del precision
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"tbptt window must be a positive int, got {window!r}")
        n_in = cell.input_size(params) if input_size is None else input_size
        if n_in is None:
            raise ValueError(f"{cell.name}: truncated BPTT of a generic cell needs input_size=n_in")
        return cls(cell, int(window), int(n_in), masks, f"tbptt{int(window)}")

    @property
    def period(self) -> int:
        return self.window

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> TBPTTState:
        del key
        b, W = check_batch_size(batch_size), self.window
        carry = self.cell.init_carry(b, dtype)
        return TBPTTState(
            start=carry,
            xs=jnp.zeros((W, b, self.n_in), dtype),
            cot=jax.tree.map(lambda a: jnp.zeros((W,) + a.shape, a.dtype), carry),
            zero_in=jnp.zeros((W, b), bool),
            pending=jnp.zeros((b,), bool),
            stepped=jnp.zeros((), bool),
            pos=jnp.zeros((), jnp.int32),
        )

    def batch_axes(self) -> TBPTTState:
        return TBPTTState(start=0, xs=1, cot=1, zero_in=1, pending=0, stepped=None, pos=None)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        k = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(self.cell.init_carry(1)))
        return self.window * (2 * k + self.n_in) + k

    def step(self, params: PyTree, carry: PyTree, state: TBPTTState, x: Array) -> StepResult:
        x = jnp.asarray(x)
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.n_in:
            raise ValueError(f"x must have shape (B, {self.n_in}), got {jnp.shape(x)}")
        pos = state.pos
        first = pos == 0
        start = jax.tree.map(lambda c, s: jnp.where(first, c.astype(s.dtype), s), carry, state.start)
        xs = lax.dynamic_update_index_in_dim(state.xs, x.astype(state.xs.dtype), pos, 0)
        zero_in = lax.dynamic_update_index_in_dim(state.zero_in, state.pending & ~first, pos, 0)
        new_carry = self.cell.apply(apply_masks(params, self.masks), carry, x)
        return StepResult(
            new_carry,
            state._replace(start=start, xs=xs, zero_in=zero_in, pending=jnp.zeros_like(state.pending),
                           stepped=jnp.ones((), bool)),
            {},
        )

    def _window_grad(self, params: PyTree, state: TBPTTState) -> PyTree:
        cell, masks = self.cell, self.masks

        def replay(p):
            pm = apply_masks(p, masks)

            def body(s, inp):
                x, z = inp
                s = jax.tree.map(lambda a: jnp.where(z.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a), s)
                s = cell.apply(pm, s, x)
                return s, s

            return lax.scan(body, state.start, (state.xs, state.zero_in))[1]

        _, pull = jax.vjp(replay, params)
        return pull(state.cot)[0]

    def gradient(self, params: PyTree, state: TBPTTState, dloss_dcarry: PyTree) -> tuple[PyTree, TBPTTState]:
        pos = state.pos
        cot = jax.tree.map(
            lambda buf, c: lax.dynamic_update_index_in_dim(buf, jnp.asarray(c).astype(buf.dtype), pos, 0),
            state.cot, dloss_dcarry,
        )
        state = state._replace(cot=cot)
        end = pos == self.window - 1
        grads = lax.cond(end, lambda s: self._window_grad(params, s),
                         lambda s: jax.tree.map(jnp.zeros_like, params), state)
        new_pos = jnp.where(end, 0, pos + 1).astype(jnp.int32)
        return grads, state._replace(pos=new_pos, stepped=jnp.zeros((), bool))

    def flush(self, params: PyTree, state: TBPTTState) -> tuple[PyTree, TBPTTState]:
        """Close a partial window: the BPTT gradient of the ``pos`` steps buffered since the
        window started (their ``gradient`` calls returned zeros), truncated at its start like a
        full window; the next step starts a new window.  Zeros when ``pos == 0``."""
        n = state.pos
        keep = jnp.arange(self.window) < n  # positions of this window; the rest are stale

        def partial(s):
            def held(a):
                return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))

            return self._window_grad(params, s._replace(xs=held(s.xs), cot=jax.tree.map(held, s.cot)))

        grads = lax.cond(n > 0, partial, lambda s: jax.tree.map(jnp.zeros_like, params), state)
        return grads, state._replace(pos=jnp.zeros((), jnp.int32))

    def reset(self, state: TBPTTState, where: Array, *, key: Array | None = None) -> TBPTTState:
        """The examples in ``where`` restart from the zero carry at the next step; if called
        between a step and its ``gradient``, that step's buffered input is zeroed too (the
        replay then reproduces the reset forward pass)."""
        del key
        where = jnp.asarray(where, bool)
        row = lax.dynamic_index_in_dim(state.xs, state.pos, 0, keepdims=False)
        row = jnp.where((where & state.stepped)[:, None], 0, row)
        xs = lax.dynamic_update_index_in_dim(state.xs, row, state.pos, 0)
        # a reset between windows restarts the next window from zero: its start is taken from
        # the (already zeroed) incoming carry, so only a mid-window reset needs the flag.
        return state._replace(xs=xs, pending=state.pending | where)


def _build(cell: Recurrent, params: PyTree, *, window: int, masks: Any = None, precision: Any = None,
           input_size: int | None = None) -> TBPTT:
    return TBPTT.build(cell, params, window=window, masks=masks, precision=precision, input_size=input_size)


register_method("tbptt", _build, options=("window", "masks", "precision", "input_size"),
                summary="truncated BPTT over windows of `window` steps, updating at each window's end (any cell)")
