"""Exact RTRL and SnAp-n on the compressed Jacobians of a :class:`snapjax.CellSpec` cell.

The influence ``J_t = (D_t J_{t-1} + I_t) ⊙ M_n`` (``M_n`` all ones for RTRL) is stored per
parameter leaf in one of three layouts chosen by :func:`snapjax.engine.influence.influence_tracker`
(``diag`` for SnAp-1: ``B × p`` floats updated elementwise with ``diag(D)``; ``table`` for sparse
SnAp-n: a padded neighbour table and batched small matmuls; ``dense`` for RTRL: one batched
matmul with the per-example ``D``).  The engine works on a private ``(B, units, m)`` state
layout; this class converts to and from the flax carry, so users only ever see flax layouts.

Cost per example and step (``k`` state size, ``p`` parameters, ``d`` density): SnAp-1 ``O(d(k²
+ p))`` like BPTT, SnAp-n ``O(p K²)`` with ``K`` the neighbour-table width, RTRL ``O(k² p)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from snapjax.cells.recurrent import Recurrent
from snapjax.engine import native
from snapjax.engine.influence import InfluenceTracker
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size

Array = jax.Array
PyTree = Any

__all__ = ["InfluenceState", "CompressedInfluence"]


class InfluenceState(NamedTuple):
    """State of RTRL / SnAp-n: ``influence``, one leaf per parameter leaf, batch axis 0
    (compressed layout, see :mod:`snapjax.engine.influence`; ``method.to_dense`` expands it).

    Example (SnAp-1 of a GRU with 4 units; ``to_dense`` gives ``(B, *param_shape, units, m)``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> method = sj.online_method("snap1", nn.GRUCell(4), params)
        >>> state = method.init(2)
        >>> isinstance(state, sj.InfluenceState), method.batch_axes()
        (True, InfluenceState(influence=0))
        >>> method.to_dense(state)["hn"]["kernel"].shape
        (2, 4, 4, 4, 1)
    """

    influence: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedInfluence(OnlineMethod):
    """RTRL or SnAp-n for a compressed cell (build with ``snapjax.online_method``).

    Attributes:
      cell: the cell.  tracker: the engine (static storage layout, pattern, masks).
      name: ``"rtrl"`` or ``"snapN"``.
    """

    cell: Recurrent
    tracker: InfluenceTracker
    name: str

    @property
    def storage(self) -> str:
        """``"dense"``: the influence is stored as RTRL's (every unit per parameter; SnAp-n
        masks it to its pattern after each step), ``"pattern"``: only the pattern's entries
        (SnAp-1's diagonal, or a gathered neighbour table).  Chosen once, at construction,
        from the pattern's width (:func:`snapjax.engine.patterns.stores_dense`); both storages
        give the same values.

        Example (a GRU-8 at density 0.1: SnAp-2 reaches at most 4 of the 8 units per parameter
        and gathers them; SnAp-3 reaches all 8, so it takes RTRL's dense kernel, masked)::

            >>> import jax, snapjax as sj
            >>> cell = sj.GRUCell(8)
            >>> params = sj.as_recurrent(cell).init_params(jax.random.key(0), 4)
            >>> masks = sj.random_masks(0, params, 0.1, spec=cell)
            >>> [sj.online_method(m, cell, params, masks=masks).storage for m in ("snap1", "snap2", "snap3", "rtrl")]
            ['pattern', 'pattern', 'dense', 'dense']
            >>> sj.online_method("snap3", cell, params, masks=masks)
            CompressedInfluence(name='snap3', cell='gru', storage='dense', layout='dense', stored=640, pattern=370)
        """
        return "dense" if self.tracker.layout == "dense" else "pattern"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, cell={self.cell.name!r}, storage={self.storage!r}, "
                f"layout={self.tracker.layout!r}, stored={self.num_stored()}, pattern={self.pattern_count()})")

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> InfluenceState:
        del key  # deterministic
        return InfluenceState(self.tracker.init(check_batch_size(batch_size), dtype))

    def batch_axes(self) -> InfluenceState:
        return InfluenceState(influence=0)

    def param_axes(self) -> InfluenceState:
        # every leaf is (B, *rows, U, K, m): U indexes the parameter's unit (its kernel column);
        # D·J contracts over the K state slots only
        return InfluenceState(influence=-3)

    def num_stored(self) -> int:
        return self.tracker.num_stored()

    def pattern_count(self) -> int:
        """Entries of the SnAp-n pattern per example (RTRL: all ``k·p``)."""
        return self.tracker.pattern_count()

    def step(self, params: PyTree, carry: PyTree, state: InfluenceState, x: Array) -> StepResult:
        spec = self.tracker.spec
        s, J = self.tracker.step(params, spec.to_internal(carry), state.influence, x)
        return StepResult(spec.from_internal(s), InfluenceState(J), {})

    def gradient(self, params: PyTree, state: InfluenceState, dloss_dcarry: PyTree) -> tuple[PyTree, InfluenceState]:
        del params
        spec = self.tracker.spec
        return self.tracker.gradient(state.influence, spec.to_internal(dloss_dcarry)), state

    def step_fused(self, params: PyTree, carry: PyTree, state: InfluenceState, x: Array
                   ) -> tuple[StepResult, Any]:
        """:meth:`step` and, for a diagonal influence (SnAp-1; the LRU's RTRL) where the native
        kernel is built (:mod:`snapjax.engine.native`), ``(J_{t-1}, the update's factors)``:
        :meth:`gradient_fused` then redoes the update in the pass that forms the gradient, and on
        CPU XLA drops the first update as dead code (one pass over the influence per step)."""
        spec = self.tracker.spec
        if self.tracker.layout != "diag" or not native.available():
            return self.step(params, carry, state, x), None
        s, J, factors = self.tracker.step(params, spec.to_internal(carry), state.influence, x, factors=True)
        fused = None if all(f is None for f in jax.tree.leaves(
            factors, is_leaf=lambda f: f is None or isinstance(f, tuple))) else (state.influence, factors)
        return StepResult(spec.from_internal(s), InfluenceState(J), {}), fused

    def gradient_fused(self, params: PyTree, state: InfluenceState, fused: Any, dloss_dcarry: PyTree,
                       accumulate: PyTree | None = None) -> tuple[PyTree, InfluenceState]:
        if fused is None:
            return super().gradient_fused(params, state, None, dloss_dcarry, accumulate)
        previous, factors = fused
        grads, J = native.update_and_gradient(self.tracker, previous, state.influence, factors,
                                              self.tracker.spec.to_internal(dloss_dcarry), accumulate)
        return grads, InfluenceState(J)

    def influence(self, state: InfluenceState) -> PyTree:
        """The influence as float leaves ``(B, *rows, U, K, m)`` (the engine's shapes, as
        :meth:`snapjax.methods.chunked.ChunkedInfluence.influence` gives them): a two-component
        cell's diagonal influence is stored as complex pairs ``(..., 1)`` and unpacked here."""
        return self.tracker.interleaved(state.influence)

    def to_dense(self, state: InfluenceState) -> PyTree:
        """The influence expanded to ``(B, *param_shape, units, m)`` per leaf (tests, plots)."""
        return self.tracker.to_dense(state.influence)
