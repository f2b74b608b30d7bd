"""Chunked forward-backward hybrid: exact RTRL and SnAp-1 touching the influence once per chunk.

(Williams & Peng 1990; Schmidhuber 1992.)  When the parameters are frozen over a chunk of ``K``
steps ``t0+1 … t0+K`` (the optimizer steps every ``K`` steps), the influence ``J`` is only needed
at chunk boundaries.  During the chunk :meth:`ChunkedInfluence.step` runs the cell forward and
buffers per step only state-sized factors (input ``x_τ``, read-out ``h_{τ-1}``, the unit-wise
derivatives of :func:`snapjax.engine.jacobians.step_jacobians`), and :meth:`~ChunkedInfluence.gradient`
buffers the cotangent ``c_τ = ∂L_τ/∂s_τ``.  At the chunk's last step a backward sweep computes,
with ``D_τ``, ``I_τ`` the step Jacobians,

* ``δ_τ = c_τ + D_{τ+1}ᵀ δ_{τ+1}`` (the BPTT adjoint) and ``Φ_τ = D_K ⋯ D_{τ+1}`` (``Φ_K = I``);
* the chunk gradient ``Σ_τ δ_τᵀ I_τ + (D_{t0+1}ᵀ δ_{t0+1})ᵀ J_{t0}``, i.e.
  ``Σ_{τ,b} v_τ[b, j] (δ_τ ⊙ ∂φ/∂a_p)[b, i]`` for a kernel entry ``(j, i)`` (one BPTT-style
  matmul, never a ``k × p`` matrix) plus the engine's contraction of ``J_{t0}``;
* the new influence ``J_{t0+K} = Φ_{t0} J_{t0} + Σ_τ Φ_τ I_τ``; ``I_τ`` of a kernel entry is
  the outer product ``(∂φ_i/∂a_{p,i}) v_τ[j]`` so the sum is one contraction over ``τ`` per
  example: ``Σ_τ v_τ[b, j] G_τ[b, i, :]`` with ``G_τ[b, i, :] = Φ_τ[b, :, i] ∂φ_i/∂a_{p,i}``.

Exact RTRL (``n=None``) uses the full per-example ``D`` (``k × k``): per step ``O(k³ + k·p)``
plus ``O(k²·p)/K`` for ``Φ_{t0} J_{t0}``, instead of ``O(k²·p)``.  SnAp-1 (``n=1``) uses the
diagonal blocks of ``D`` (``m × m`` per unit, ``m = 2`` for LSTM/EGRU): ``Φ`` is block-diagonal,
``δ`` an elementwise recursion, and the cost is about BPTT's plus the influence traffic over
``K``.  SnAp-1's per-step masking ``J_t = (D_t J_{t-1} + I_t) ⊙ M_1`` is reproduced exactly with
``D̃ = M_1 D`` per pattern group (LSTM output-gate parameters never reach ``c``).

The influence is stored in the per-step engine's compressed layout
(:func:`snapjax.engine.influence.influence_tracker`: ``"dense"`` for RTRL, ``"diag"`` for SnAp-1; masked
kernels stored compressed), so after every chunk ``J`` equals the per-step method's ``J`` and
either method can continue the other's stream.  Memory: the influence plus ``K`` state-sized
buffers (flat in stream length); the close also holds the ``K`` matrices ``Φ_τ`` and
``Φ_τ I_τ`` column blocks (RTRL: ``K·k²·(1 + P_src/m)`` per example).  Masked kernels are
contracted densely and gathered to the stored rows.  Buffers are batch-major (``(B, K, ...)``)
and the close runs on ``(B, L, U·W·m)`` views, so XLA:CPU needs no transposes of them.  The
state and the backward sweeps are in :mod:`snapjax.methods.chunked_sweeps`.

Streams: a ragged last chunk is closed with :meth:`ChunkedInfluence.flush` (gradient of the
steps seen so far, ``J`` advanced to the current step; call it after a step's ``gradient``).
Per-example resets are exact: :meth:`ChunkedInfluence.reset` marks that the chain is cut before
the example's next step (the buffered factors are those of the steps actually taken, so no
forward replay is needed); steps before the reset keep their gradient through ``J_{t0}``.  A
reset between a step and its ``gradient`` (the learner's guard, after a fault) also zeroes that
step's buffered factors of the example, so a non-finite value never reaches the close's sums
over the batch: faults stay per example, exactly as per step; a step with a non-finite factor
returns a NaN gradient at once (as the per-step ``J`` would), so the guard sees it at that step.

Example (float32 GRU, exact RTRL in chunks of 4)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(3)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
    >>> method = sj.online_method("rtrl", cell, params, chunk=4)
    >>> carry, state = method.init_carry(2), method.init(2)
    >>> for t in range(4):
    ...     carry, state, _ = method.step(params, carry, state, jnp.ones((2, 2)))
    ...     grads, state = method.gradient(params, state, carry)   # complete at t = 3
    >>> method.period, int(state.pos), bool(jnp.any(grads["hn"]["kernel"] != 0))
    (4, 0, True)
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.engine.influence import InfluenceTracker, influence_tracker
from snapjax.engine.jacobians import step_jacobians
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.chunked_sweeps import (
    ChunkedState,
    _advance,
    _backward_dense,
    _backward_diag,
    _bcast,
    _flat,
    _run_if,
    _sum_axis1,
    _zero_examples,
    params_fingerprint,
)

Array = jax.Array
PyTree = Any

__all__ = ["ChunkedState", "ChunkedInfluence", "chunked_method"]



@dataclasses.dataclass(frozen=True, eq=False)
class ChunkedInfluence(OnlineMethod):
    """Exact RTRL or SnAp-1 run chunk-wise (build with ``snapjax.online_method(..., chunk=K)``
    or :func:`chunked_method`); see the module docstring.

    How to drive it (in a loop of your own): per step, :meth:`step` then :meth:`gradient`, with
    the *same* parameters for all ``K`` steps of a chunk; the gradient is zero until the chunk's
    last step (``state.pos`` back to 0), which returns the whole chunk's gradient: apply the
    optimizer then (or after :meth:`flush`), never inside a chunk (the buffered factors belong
    to the chunk's parameters).  An optimizer that steps inside a chunk (e.g. Adam's momentum
    moves the parameters under a zero gradient) is detected: the state keeps a fingerprint of
    the parameters seen at the chunk's first step (:func:`~snapjax.methods.chunked_sweeps.params_fingerprint`),
    and from the step where others are seen to the chunk's end every gradient is NaN (so
    ``optax.apply_if_finite`` or the learner's guard skip it).  :class:`snapjax.OnlineLearner`
    drives it correctly (``update_every`` a multiple of ``K``).

    Attributes:
      cell: the cell.  tracker: the per-step engine (layout, masks, patterns, precision).
      chunk: ``K``.  param_dtype: dtype of the parameters (buffers are at least this wide).
      pattern_sets: static ``((pattern (U, m) or None, group names), ...)``: groups sharing
        SnAp-1's component pattern share one backward sweep.  name: e.g. ``"rtrl-chunk32"``.
    """

    cell: Recurrent
    tracker: InfluenceTracker
    chunk: int
    param_dtype: Any
    pattern_sets: tuple
    name: str

    # ------------------------------------------------------------------ state
    @property
    def period(self) -> int:
        return self.chunk

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ChunkedState:
        """``J_0 = 0`` stored in ``dtype`` (``jnp.bfloat16`` halves it; the arithmetic stays in
        the buffers' dtype) and empty buffers in ``promote_types(dtype, param dtype)``."""
        del key
        b = check_batch_size(batch_size)
        J = jax.tree.map(_flat, self.tracker.init(b, dtype, pairs=False))  # float leaves (..., m)
        bdt = jnp.promote_types(dtype, self.param_dtype)
        spec, K = self.tracker.spec, self.chunk
        U, m, P, Q = spec.units, spec.state_dim, len(spec.projections), len(spec.unit_params)
        z = lambda *s: jnp.zeros(s, bdt)  # noqa: E731
        flags = jnp.zeros((b,), bool)
        return ChunkedState(J, z(b, K, self.tracker.n_in), z(b, K, U), z(b, K, P, U * m), z(b, K, Q, U * m),
                            z(b, K, U * m * m), z(b, K, U * m), jnp.zeros((b, K), bool), flags, flags,
                            jnp.zeros((), bool), jnp.zeros((), jnp.int32),
                            jnp.zeros((), jnp.uint32), jnp.zeros((), bool))

    def batch_axes(self) -> ChunkedState:
        return ChunkedState(influence=0, xs=0, hs=0, dpre=0, dunit=0, dstate=0, cot=0, cut=0,
                            pending=0, drop=0, stepped=None, pos=None, seen=None, moved=None)

    def param_axes(self) -> ChunkedState:
        # J leaves (B, L, U·W·m): the merged axis leads with the parameter's unit U
        return ChunkedState(influence=-1, xs=None, hs=None, dpre=None, dunit=None, dstate=None, cot=None,
                            cut=None, pending=None, drop=None, stepped=None, pos=None, seen=None, moved=None)

    def num_stored(self) -> int:
        spec = self.tracker.spec
        U, m, P, Q = spec.units, spec.state_dim, len(spec.projections), len(spec.unit_params)
        return self.tracker.num_stored() + self.chunk * (self.tracker.n_in + U + U * m * (P + Q + m + 1))

    def influence(self, state: ChunkedState) -> PyTree:
        """``J`` at the last chunk boundary in the per-step engine's shapes (a free reshape):
        equal to the per-step method's ``state.influence`` at the same step (whose two-component
        diagonal influence may be stored as complex pairs: ``tracker.interleaved`` of it)."""
        shapes = self.tracker.leaf_shapes(int(jnp.shape(state.pending)[0]))
        return jax.tree.map(lambda a, s: a.reshape(s), state.influence, shapes)

    def with_influence(self, state: ChunkedState, influence: PyTree) -> ChunkedState:
        """``state`` at a chunk boundary (``pos == 0``) with ``J`` taken from the per-step
        method's ``influence`` (engine shapes), e.g. to switch a stream to chunked updates."""
        self.tracker._check_influence(influence, int(jnp.shape(state.pending)[0]))
        return state._replace(influence=jax.tree.map(_flat, self.tracker.interleaved(influence)))

    def to_dense(self, state: ChunkedState) -> PyTree:
        """``J`` at the last chunk boundary expanded to ``(B, *param_shape, units, m)``."""
        return self.tracker.to_dense(self.influence(state))

    def _check_batch(self, state: ChunkedState, what: str, got: tuple) -> int:
        spec = self.tracker.spec
        batch = int(jnp.shape(state.pending)[0])
        if tuple(got) != (batch, spec.units, spec.state_dim):
            raise ValueError(f"{what} must match the state: batch {batch}, {spec.units} units, {spec.state_dim} "
                             f"component(s) (internal {(batch, spec.units, spec.state_dim)}), got internal {tuple(got)}")
        return batch

    # ------------------------------------------------------------------- step
    def step(self, params: PyTree, carry: PyTree, state: ChunkedState, x: Array) -> StepResult:
        spec, tr = self.tracker.spec, self.tracker
        s = spec.to_internal(carry)
        batch = self._check_batch(state, "carry", jnp.shape(s))
        x = jnp.asarray(x)
        if jnp.shape(x) != (batch, tr.n_in) or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a float array of shape ({batch}, {tr.n_in}), got {x.dtype}{jnp.shape(x)}")
        jac = step_jacobians(spec, params, s, x, tr.masks, tr.precision)
        pos, fp = state.pos, params_fingerprint(params)

        def put(buf, v):
            return lax.dynamic_update_index_in_dim(buf, v.reshape(buf.shape[:1] + buf.shape[2:]).astype(buf.dtype), pos, 1)

        new = state._replace(
            xs=put(state.xs, x), hs=put(state.hs, jac.inputs["state"]),
            dpre=put(state.dpre, jnp.moveaxis(jac.dphi_pre, -1, 1)), dunit=put(state.dunit, jnp.moveaxis(jac.dphi_unit, -1, 1)),
            dstate=put(state.dstate, jac.dphi_state), cut=put(state.cut, state.pending),
            pending=jnp.zeros_like(state.pending), stepped=jnp.ones((), bool),
            seen=jnp.where(pos == 0, fp, state.seen), moved=(pos > 0) & (state.moved | (fp != state.seen)),
        )
        return StepResult(spec.from_internal(jac.new_state), new, {})

    def gradient(self, params: PyTree, state: ChunkedState, dloss_dcarry: PyTree) -> tuple[PyTree, ChunkedState]:
        """Buffer ``c_τ``; at the chunk's last step return the chunk gradient and advance ``J``
        (the heavy part runs only then), zeros otherwise."""
        spec = self.tracker.spec
        c = spec.to_internal(dloss_dcarry)
        batch = self._check_batch(state, "dloss_dcarry", jnp.shape(c))
        c = jnp.where(state.drop[:, None, None], 0, c).reshape(batch, -1).astype(state.cot.dtype)
        pos = state.pos
        state = state._replace(cot=lax.dynamic_update_index_in_dim(state.cot, c, pos, 1), stepped=jnp.zeros((), bool))
        end = pos == self.chunk - 1
        grads, J = _run_if(end, lambda st: self._close(params, st, None), state, (self._zeros(params), state.influence))
        # a non-finite factor of this step (e.g. an infinite input under a finite carry) makes
        # the per-step methods' J, and so their gradient, non-finite now; the chunk's gradient
        # is NaN at the same step, so a guard sees the fault (and resets the example) when they do
        # (parameters other than the chunk's: NaN too, see the class docstring)
        moved = state.moved | (params_fingerprint(params) != state.seen)
        ok = self._slot_finite(state, pos) & ~moved
        grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.nan), grads)
        new_pos = jnp.where(end, 0, pos + 1).astype(jnp.int32)
        return grads, state._replace(influence=J, drop=jnp.zeros_like(state.drop), pos=new_pos, moved=moved)

    def _slot_finite(self, state: ChunkedState, pos: Array) -> Array:
        """Bool scalar: every example's buffered factors of slot ``pos`` are finite."""
        bufs = (state.xs, state.hs, state.dpre, state.dunit, state.dstate, state.cot)
        return functools.reduce(operator.and_, [jnp.all(jnp.isfinite(lax.dynamic_index_in_dim(b, pos, 1, False)))
                                                for b in bufs])

    def flush(self, params: PyTree, state: ChunkedState) -> tuple[PyTree, ChunkedState]:
        """Close a partial chunk: the gradient of the ``pos`` steps buffered since the last
        boundary (their ``gradient`` calls returned zeros) and ``J`` advanced to the current
        step, which becomes a chunk boundary (``pos = 0``).  Zeros and no change when
        ``pos == 0``.  Call it after a step's ``gradient`` (e.g. at the end of a stream whose
        length is not a multiple of ``K``)."""
        n = state.pos
        grads, J = _run_if(n > 0, lambda st: self._close(params, st, n), state, (self._zeros(params), state.influence))
        moved = (n > 0) & (state.moved | (params_fingerprint(params) != state.seen))
        grads = jax.tree.map(lambda g: jnp.where(moved, jnp.nan, g), grads)
        return grads, state._replace(influence=J, pos=jnp.zeros((), jnp.int32), moved=jnp.zeros((), bool))

    def reset(self, state: ChunkedState, where: Array, *, key: Array | None = None) -> ChunkedState:
        """Restart the examples in ``where`` (their carry is zeroed by the caller): the chain is
        cut before their next step, and if called between a step and its ``gradient`` that
        step's cotangent is dropped (as the per-step methods' ``J_t = 0``).  At a chunk boundary
        ``J`` itself is zeroed; mid-chunk it is kept for the earlier steps' gradient."""
        del key
        where = jnp.asarray(where, bool)
        if jnp.shape(where) != jnp.shape(state.pending):
            raise ValueError(f"where must have shape {jnp.shape(state.pending)}, got {jnp.shape(where)}")
        # a reset between a step and its gradient (the guard's, after a fault): that step's
        # buffered factors of the example are zeroed (they may be NaN, and the close contracts
        # over the batch, where 0 · NaN would reach every example): a zero step, D = 0, I = 0,
        # i.e. J = 0 after it, as the per-step methods' reset
        slot = (jnp.arange(self.chunk) == state.pos)[None, :] & (where & state.stepped)[:, None]  # (B, K)
        clear = lambda a: jnp.where(slot.reshape(slot.shape + (1,) * (a.ndim - 2)), jnp.zeros((), a.dtype), a)  # noqa: E731
        return state._replace(influence=_zero_examples(state.influence, where & (state.pos == 0)),
                              xs=clear(state.xs), hs=clear(state.hs), dpre=clear(state.dpre), dunit=clear(state.dunit),
                              dstate=clear(state.dstate), cot=clear(state.cot),
                              pending=state.pending | where, drop=state.drop | (where & state.stepped))

    # -------------------------------------------------------------- the close
    def _zeros(self, params: PyTree) -> PyTree:
        return jax.tree.map(jnp.zeros_like, params)

    def _close(self, params: PyTree, st: ChunkedState, n: Array | None) -> tuple[PyTree, PyTree]:
        """Chunk gradient and ``J_{t0+n}`` (``(B, L, U·W·m)`` views) from the buffers
        (``n=None``: all ``K`` slots)."""
        spec, tr, K = self.tracker.spec, self.tracker, self.chunk
        prec, U, m = tr.precision, spec.units, spec.state_dim
        if n is not None:  # unused slots become identity steps: D = I, I = 0, c = 0
            valid = jnp.arange(K) < n
            keep = lambda a, fill=0: jnp.where(_bcast(valid, a.ndim, 1), a, fill)  # noqa: E731
            eye = jnp.eye(m, dtype=st.dstate.dtype).reshape(-1)
            st = st._replace(xs=keep(st.xs), hs=keep(st.hs), dpre=keep(st.dpre), dunit=keep(st.dunit),
                             dstate=keep(st.dstate, jnp.tile(eye, U)), cot=keep(st.cot), cut=st.cut & valid)
        J, B = st.influence, st.cot.shape[0]
        names = [p.name for p in spec.projections] + list(spec.unit_params)
        source = {p.name: p.source for p in spec.projections}
        d_all = jnp.concatenate([st.dpre, st.dunit], axis=2)  # (B, K, P + Q, U·m)
        grads, new_J = {}, {}
        for pattern, groups in self.pattern_sets:
            idx = [names.index(g) for g in groups]
            d = d_all if idx == list(range(len(names))) else d_all[:, :, np.asarray(idx)]  # (B, K, G, U·m)
            d5 = d.reshape(d.shape[:3] + (U, m))
            if tr.layout == "diag":
                delta, e, phis, phi0, dead = _backward_diag(tr, K, params, st, pattern)  # Φ (B, K, U·m·m)
                if m == 1:  # no unit axes of size 1 (XLA:CPU then loops without vectorising)
                    G = phis[:, :, None] * d
                else:
                    phi5 = phis.reshape(B, K, 1, U, m, m)
                    G = sum(phi5[..., c] * d5[..., c, None] for c in range(m)).reshape(d.shape)
            else:
                delta, e, phis, phi0, dead = _backward_dense(tr, K, params, st)  # Ψ = Φᵀ (B, K, k, k)
                psi = phis.reshape(B, K, 1, U, m, U * m)
                G = sum(psi[:, :, :, :, c] * d5[..., c, None] for c in range(m)).reshape(B, K, -1, U * U * m)
            # G[b, τ, g, (i, ·)] = Σ_c Φ_τ[b, ·, (i, c)] ∂φ_{i,c}/∂a_{g,i}: column i of Φ_τ I_τ
            delta5 = delta.reshape(B, K, 1, U, m)
            w = sum(delta5[..., c] * d5[..., c] for c in range(m))  # (B, K, G, U): δ_τ ⊙ ∂φ/∂a_g
            w_sum, G_sum = w.reshape(B * K, -1).sum(0).reshape(w.shape[2:]), _sum_axis1(G)
            for src, v in (("input", st.xs), ("state", st.hs)):
                sel = [j for j, g in enumerate(groups) if source.get(g) == src]
                if not sel:
                    continue
                sl = slice(sel[0], sel[-1] + 1) if sel == list(range(sel[0], sel[-1] + 1)) else np.asarray(sel)
                g_k = jnp.einsum("btl,btn->ln", v, w[:, :, sl].reshape(B, K, -1), precision=prec)
                g_k = g_k.reshape(-1, len(sel), U)  # (n_in, G_src, U): Σ_τ v_τ ⊗ (δ_τ ⊙ ∂φ/∂a)
                a_k = jnp.einsum("btl,btn->bln", v, G[:, :, sl].reshape(B, K, -1), precision=prec)
                a_k = a_k.reshape(B, -1, len(sel), G.shape[-1])  # (B, n_in, G_src, U·W·m): Σ_τ v_τ ⊗ Φ_τ I_τ
                for q, j in enumerate(sel):
                    name, lay = groups[j], tr.kernels[groups[j]]
                    kern = g_k[:, q] if tr.masks[name] is None else g_k[:, q] * jnp.asarray(tr.masks[name], g_k.dtype)
                    add = a_k[:, :, q]
                    if lay.rows is not None:  # gather the stored rows of a masked kernel
                        cols = np.broadcast_to(np.arange(U), lay.rows.shape)
                        add = add.reshape(B, -1, U, G.shape[-1] // U)[:, lay.rows, cols]
                        add = jnp.where(jnp.asarray(lay.valid)[None, :, :, None], add, 0).reshape(B, -1, G.shape[-1])
                    g_j, new = _advance(tr, J[name]["kernel"], e, phi0, dead, st.drop, add)
                    if lay.rows is not None:  # scatter the stored rows back to the kernel's shape
                        g_j = jnp.zeros((lay.n_in, U), g_j.dtype).at[lay.rows, cols].add(jnp.where(lay.valid, g_j, 0))
                    grads[name], new_J[name] = {"kernel": kern + g_j}, {"kernel": new}
            for j, name in enumerate(groups):  # biases and unit parameters: I_τ = ∂φ_i/∂a_i
                if name in source and not spec.projection(name).use_bias:
                    continue
                leaf = J[name]["bias"] if name in source else J[name]
                g_b, J_b = _advance(tr, leaf, e, phi0, dead, st.drop, G_sum[:, None, j])
                g_b = w_sum[j] + g_b[0]
                if name in source:
                    grads[name]["bias"], new_J[name]["bias"] = g_b, J_b
                else:
                    grads[name], new_J[name] = g_b, J_b
        grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), grads, params)
        return grads, new_J


def _pattern_sets(tracker: InfluenceTracker) -> tuple:
    spec = tracker.spec
    groups = [p.name for p in spec.projections] + list(spec.unit_params)
    if tracker.patterns is None:
        return ((None, tuple(groups)),)
    sets: dict[bytes, tuple] = {}
    for g in groups:
        pat = np.asarray(tracker.patterns[g])[:, 0, :]  # diag layout: (U, 1, m) -> (U, m)
        key = pat.tobytes()
        sets[key] = (pat, sets.get(key, (pat, ()))[1] + (g,))
    return tuple(sets.values())


def chunked_method(
    cell: Any, params: PyTree, *, n: int | None, chunk: int, masks: Any = None, precision: Any = None
) -> ChunkedInfluence:
    """Exact RTRL (``n=None``) or SnAp-1 (``n=1``) in chunks of ``chunk`` steps.

    Args:
      cell: a compressed cell (:class:`snapjax.Recurrent` with a ``spec``, a snapjax or
        supported flax cell, a :class:`snapjax.CellSpec`).  params: its parameters (shapes and
        dtypes only).  chunk: ``K >= 1``; the gradient is complete every ``K`` steps.
      masks: static 0/1 kernel masks.  precision: matmul precision.
    Raises:
      ValueError: ``n`` other than ``None``/1, ``chunk`` not a positive int, a cell without a
        compressed form.
    """
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ValueError(f"chunked methods are exact RTRL (n=None) or SnAp-1 (n=1), got n={n!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (steps per chunk), got {chunk!r}")
    rec = as_recurrent(cell)
    if rec.spec is None:
        raise ValueError(f"{rec.name}: chunked RTRL/SnAp-1 needs a cell with a compressed form (CellSpec)")
    with jax.ensure_compile_time_eval():
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
    tracker = influence_tracker(rec.spec, shapes, "rtrl" if n is None else "snap", n, masks=masks, precision=precision)
    pdt = jnp.result_type(*[s.dtype for s in jax.tree.leaves(shapes)])
    name = f"{'rtrl' if n is None else 'snap1'}-chunk{int(chunk)}"
    return ChunkedInfluence(rec, tracker, int(chunk), pdt, _pattern_sets(tracker), name)
