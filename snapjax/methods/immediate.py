"""Immediate-Jacobian online gradient (SnAp-0): keep only ``I_t``, drop the history.

For ``s_t = f(θ, s_{t-1}, x_t)`` with ``D_t = ∂f/∂s_{t-1}`` and ``I_t = ∂f/∂θ``, exact RTRL keeps
``J_t = D_t J_{t-1} + I_t``.  The immediate rule (SnAp-0, the ``n = 0`` end of Menick et al.'s
SnAp-n ladder: SnAp-1 keeps the diagonal of ``D``, SnAp-0 none of it) keeps

    J_t ≈ I_t,        g_t = c_t · I_t,        c_t = ∂L_t/∂s_t,

i.e. the gradient of ``L_t`` with the previous state held constant: one ``jax.vjp`` of one cell
step w.r.t. the parameters at ``(s_{t-1}, x_t)`` with cotangent ``c_t`` (summed over the batch
by the vjp itself).  The method state holds what that vjp needs: the carry entering the step
and its input.

* shapes: state ``prev`` (flax carry, batch axis 0) and ``x (B, n_in)``; gradients are
  parameter-shaped.
* cost per step: one extra cell forward and one backward (the cost of BPTT's per-step
  gradient, ``O(d(k² + p))``); period 1.
* memory per example: ``k + n_in`` floats (``k`` carry floats).
* bias: **biased** (ignores every path through ``s_{t-1}``); exact when ``D_t = 0`` (no
  recurrence) and equal to sliding-window TBPTT with ``W = 1``.
* what it can learn: no gradient reaches ``s_{t-1}``, so it never trains the state to *keep*
  an input; it trains the weights that *read* ``s_{t-1}``, so it recalls what the forward
  dynamics happen to keep.  On the learner's memory task (Dense + 2 GRUs, 300 steps;
  ``tests/test_rules.py``) it recalls the previous bit (0.10 nats, chance ``ln 2 = 0.69``) but
  stays at chance for the bit three steps back.
* any cell: only ``cell.apply`` is used (compressed and generic cells alike); static masks
  (``{projection: (n_in, units)}`` for ``params[name]['kernel']``, or a params-shaped tree with
  ``None`` for unmasked leaves) make masked weights act as zeros and get exactly zero gradient.

References: Menick, Elsen, Evci, Osindero, Simonyan, Graves, "Practical real time recurrent
learning with a sparse approximation", ICLR 2021 (arXiv 2006.07232), SnAp-n; the same rule is
one-step truncated BPTT (Williams & Peng 1990).

Example (float32 GRU; the gradient equals that of ``L_t`` with ``s_{t-1}`` held constant)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> h0, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
    >>> params = cell.init(jax.random.key(0), h0, x)["params"]
    >>> method = sj.online_method("immediate", cell, params)          # or "snap0"
    >>> carry, state, _ = method.step(params, h0, method.init(2), x)
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> ref = jax.grad(lambda p: cell.apply({"params": p}, h0, x)[0].sum())(params)
    >>> all(bool(jnp.allclose(a, b, atol=1e-6)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from snapjax.cells.recurrent import Recurrent
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.generic_support import (
    CarryCheck,
    ParamMasks,
    check_params,
    check_precision,
    input_size_of,
    matmul_precision,
    param_masks,
)
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["Immediate", "ImmediateState"]


class ImmediateState(NamedTuple):
    """State of the immediate rule: the carry entering the last step (``prev``, batch axis 0)
    and that step's input ``x (B, n_in)``.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.LSTMCell(3).init(jax.random.key(0), (jnp.zeros((1, 3)),) * 2, jnp.zeros((1, 2)))["params"]
        >>> method = sj.online_method("immediate", nn.LSTMCell(3), params)
        >>> st = method.init(2)
        >>> [a.shape for a in st.prev], st.x.shape, method.batch_axes(), method.num_stored()
        ([(2, 3), (2, 3)], (2, 2), ImmediateState(prev=0, x=0), 8)
    """

    prev: PyTree
    x: Array


@dataclasses.dataclass(frozen=True, eq=False)
class Immediate(OnlineMethod):
    """SnAp-0 / immediate Jacobian (build with ``snapjax.online_method("immediate", ...)``).

    Attributes:
      cell: the :class:`snapjax.Recurrent`.
      n_in: input size.
      masks: static masks (:class:`~snapjax.methods.generic_support.ParamMasks`).
      precision: matmul precision of the cell step.
    """

    cell: Recurrent
    n_in: int
    masks: ParamMasks
    precision: Any = None
    name: str = "immediate"

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ImmediateState:
        del key
        b = check_batch_size(batch_size)
        return ImmediateState(self.cell.init_carry(b, dtype), jnp.zeros((b, self.n_in), dtype))

    def batch_axes(self) -> ImmediateState:
        return ImmediateState(prev=0, x=0)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """``k + n_in`` floats per example (the carry entering the step and its input)."""
        return CarryCheck.of(self.cell).size + self.n_in

    def _f(self, params: PyTree, carry: PyTree, x: Array) -> PyTree:
        with matmul_precision(self.precision):
            return self.cell.apply(self.masks.apply(params), carry, x)

    def step(self, params: PyTree, carry: PyTree, state: ImmediateState, x: Array) -> StepResult:
        x = jnp.asarray(x)
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.n_in:
            raise ValueError(f"{self.name}: x must have shape (B, {self.n_in}), got {jnp.shape(x)}")
        if jnp.shape(x)[0] != jnp.shape(state.x)[0]:
            raise ValueError(f"{self.name}: x has batch {jnp.shape(x)[0]}, the state {jnp.shape(state.x)[0]}")
        new_carry = self._f(params, carry, x)
        prev = jax.tree.map(lambda c, s: jnp.asarray(c).astype(s.dtype), carry, state.prev)
        return StepResult(new_carry, ImmediateState(prev, x.astype(state.x.dtype)), {})

    def gradient(self, params: PyTree, state: ImmediateState, dloss_dcarry: PyTree) -> tuple[PyTree, ImmediateState]:
        """``Σ_b c_b · ∂f/∂θ(s_{t-1,b}, x_{t,b})``: one vjp of the cell step w.r.t. ``params``."""
        out, pull = jax.vjp(lambda p: self._f(p, state.prev, state.x), params)
        cot = jax.tree.map(lambda c, o: jnp.asarray(c).astype(o.dtype), dloss_dcarry, out)
        return self.masks.apply(pull(cot)[0]), state


def _build(cell: Recurrent, params: PyTree, *, masks: Any = None, precision: Any = None,
           input_size: int | None = None) -> Immediate:
    """:class:`Immediate` for ``cell``; ``input_size`` is read from ``params`` for compressed
    cells.  ``ValueError``: bad parameters, masks, precision, missing or bad ``input_size``."""
    check_params(cell.name, params)
    check_precision(precision)
    n_in = input_size_of(cell, params, input_size, "immediate")
    return Immediate(cell, n_in, param_masks(params, masks), precision)


register_method("immediate", _build, options=("masks", "precision", "input_size"), aliases=("snap0",),
                summary="SnAp-0: the immediate Jacobian only, g_t = c_t·∂s_t/∂θ with s_{t-1} held fixed (any cell)")
