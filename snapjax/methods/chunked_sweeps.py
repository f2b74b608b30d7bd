"""The buffers of the chunked RTRL / SnAp-1 method and the backward sweeps that close a chunk.

:class:`ChunkedState` holds ``J_{t0}`` and the chunk's per-step factors (re-exported by
:mod:`snapjax.methods.chunked`, whose module docstring has the method).  At the chunk's end,
with ``D_τ`` the step Jacobians, :func:`_sweep` runs backward over the ``K`` buffered steps:
``δ_τ = c_τ + D_{τ+1}ᵀ δ_{τ+1}`` and ``Φ_{τ-1} = Φ_τ D_τ`` (``Φ_K = I``), cut at resets, with
the full ``D`` (:func:`_backward_dense`, exact RTRL; it carries ``Ψ_τ = Φ_τᵀ``) or its ``m × m``
diagonal blocks ``D̃ = M_1 ⊙ diag-blocks(D)`` (:func:`_backward_diag`, SnAp-1); :func:`_advance`
then gives one leaf's gradient term ``Σ_b e_b J_{t0,b}`` (``e = D_{t0+1}ᵀ δ_{t0+1}``) and the new
influence ``Φ_{t0} J_{t0} + Σ_τ Φ_τ I_τ``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.spec import masked_kernel
from snapjax.engine.influence import InfluenceTracker
from snapjax.engine.jacobians import StepJacobians, dense_dynamics

Array = jax.Array
PyTree = Any

__all__ = ["ChunkedState", "params_fingerprint"]


class ChunkedState(NamedTuple):
    """State of a chunked method (``K`` chunk length, ``B`` batch, ``U`` units, ``m`` components
    per unit, ``P`` projections, ``Q`` unit parameters).  Buffers are batch-major (axis 0).

    Attributes:
      influence: ``J`` at the last chunk boundary: the engine's compressed layout with each
        leaf's axes merged to ``(B, L, U·W·m)`` (same values in the same memory order;
        :meth:`snapjax.methods.chunked.ChunkedInfluence.influence` gives the engine's shapes).
        Batch axis 0.
      xs: inputs ``(B, K, n_in)``.  hs: read-outs ``h_{τ-1}`` ``(B, K, U)``.
      dpre, dunit: ``∂φ/∂a`` ``(B, K, P, U·m)`` and ``∂φ/∂θᵘ`` ``(B, K, Q, U·m)`` of each step.
      dstate: ``∂φ/∂s`` (within a unit) ``(B, K, U·m·m)``.  cot: ``c_τ`` ``(B, K, U·m)``.
      cut: ``(B, K)`` bool, the chain is cut before step ``τ`` (a reset).
      pending: ``(B,)`` a reset requested before the next step.  drop: ``(B,)`` a reset came
        between a step and its ``gradient`` (that step's cotangent is dropped).
      stepped: bool scalar, a step awaits its ``gradient``.  pos: int32 scalar, slot of the
        next step in the chunk.
      seen: uint32 scalar, :func:`params_fingerprint` of the parameters at the
        chunk's first step.  moved: bool scalar, parameters other than those were seen in this
        chunk (its gradient is NaN).  Neither has a batch axis.
    """

    influence: PyTree
    xs: Array
    hs: Array
    dpre: Array
    dunit: Array
    dstate: Array
    cot: Array
    cut: Array
    pending: Array
    drop: Array
    stepped: Array
    pos: Array
    seen: Array
    moved: Array


def params_fingerprint(params: PyTree) -> Array:
    """uint32 scalar ``Σ_l Σ_i (2l + 1)(4i + 3) w_{l,i}`` (mod 2³²) over the 32-bit words
    ``w_{l,i}`` of leaf ``l``'s bit pattern.  Integer sums are exact in any order, so the same
    parameters give the same fingerprint in any program; every weight is odd (invertible mod
    2³²), so a change of any one value always changes it, and moved values do too (but for a
    collision).  ``O(p)``, far below a step's cost."""
    total = jnp.zeros((), jnp.uint32)
    for index, leaf in enumerate(jax.tree.leaves(params)):
        a = jnp.asarray(leaf)
        if jnp.iscomplexobj(a):
            a = jnp.stack([a.real, a.imag])
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16}.get(jnp.dtype(a.dtype).itemsize, jnp.uint32))
        w = a.astype(jnp.uint32).reshape(-1)
        weight = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(4) + jnp.uint32(3)
        total = total + jnp.sum(w * weight, dtype=jnp.uint32) * jnp.uint32(2 * index + 1)
    return total


def _zero_examples(tree: PyTree, where: Array) -> PyTree:
    return jax.tree.map(lambda a: jnp.where(_bcast(where, a.ndim), jnp.zeros((), a.dtype), a), tree)


def _flat(J: Array) -> Array:
    """An influence leaf ``(B, *lead, U, W, m)`` as ``(B, L, U·W·m)`` (a free reshape)."""
    return J.reshape(J.shape[0], int(np.prod(J.shape[1:-3])), int(np.prod(J.shape[-3:])))


def _run_if(pred: Array, fn, state: ChunkedState, default: tuple) -> tuple:
    """``fn(state)`` if ``pred`` else ``default``, as ``(grads, influence)``.  A
    ``lax.while_loop`` of zero or one trip rather than ``lax.cond``: XLA updates a while loop's
    carry in place, whereas a ``cond`` whose other branch passes the influence through costs a
    copy of it at every step (it dominated the step time)."""

    def body(carry):
        return (jnp.zeros((), bool),) + tuple(fn(state._replace(influence=carry[2])))

    return lax.while_loop(lambda c: c[0], body, (pred,) + tuple(default))[1:]


def _sum_axis1(x: Array) -> Array:
    """``x.sum(1)`` as a batched product with ones (XLA:CPU reduces non-minor axes slowly)."""
    ones = jnp.ones((x.shape[0], 1, x.shape[1]), x.dtype)
    out = jnp.matmul(ones, x.reshape(x.shape[0], x.shape[1], -1), precision=lax.Precision.HIGHEST)
    return out.reshape(x.shape[:1] + x.shape[2:])


def _bcast(flag: Array, ndim: int, axis: int = 0) -> Array:
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(flag, shape)


def _backward_diag(tracker: InfluenceTracker, chunk: int, params: PyTree, st: ChunkedState, pattern):
    """SnAp-1 sweep with the diagonal blocks ``D̃ = M ⊙ diag-blocks(D)`` (``m × m`` per unit)."""
    spec, tr, K = tracker.spec, tracker, chunk
    B, U, m = st.cot.shape[0], spec.units, spec.state_dim
    idx = [j for j, p in enumerate(spec.projections) if p.source == "state"]
    diag = [jnp.diagonal(masked_kernel(params, spec.projections[j].name, tr.masks)) for j in idx]
    # (B, K, U, m); zeros for a cell without recurrent projections (LRU: a diagonal recurrence in φ)
    rec = functools.reduce(operator.add, [st.dpre[:, :, j].reshape(B, K, U, m) * w[:, None] for j, w in zip(idx, diag)],
                           jnp.zeros((B, K, U, m), st.dstate.dtype))
    dii = st.dstate.reshape(B, K, U, m, m).at[..., spec.readout].add(rec.astype(st.dstate.dtype))
    if pattern is not None:
        dii = dii * jnp.asarray(pattern[:, :, None], dii.dtype)
    dii = dii.reshape(B, K, -1)

    def dot_t(d, x):  # (Dᵀ x)[u, c] = Σ_a D[u, a, c] x[u, a]
        return x * d if m == 1 else (d.reshape(B, U, m, m) * x.reshape(B, U, m, 1)).sum(2).reshape(B, -1)

    def mat(phi, d):  # (Φ D)[u, a, e] = Σ_c Φ[u, a, c] D[u, c, e]
        if m == 1:
            return phi * d
        return (phi.reshape(B, U, m, m, 1) * d.reshape(B, U, 1, m, m)).sum(3).reshape(B, -1)

    return _sweep(st, K, dii, dot_t, mat, jnp.tile(jnp.eye(m, dtype=dii.dtype).reshape(-1), (B, U)))


def _backward_dense(tracker: InfluenceTracker, chunk: int, params: PyTree, st: ChunkedState):
    """Exact sweep with the full ``D`` (``(B, k, k)``); returns ``Ψ_τ = Φ_τᵀ``."""
    spec, tr, K = tracker.spec, tracker, chunk
    B, U, m = st.cot.shape[0], spec.units, spec.state_dim
    k = U * m

    def build(t):
        dpre = jnp.moveaxis(lax.dynamic_index_in_dim(st.dpre, t, 1, False).reshape(B, -1, U, m), 1, -1)
        dstate = lax.dynamic_index_in_dim(st.dstate, t, 1, False).reshape(B, U, m, m)
        jac = StepJacobians(None, dpre, None, dstate, None)
        return dense_dynamics(spec, params, jac, tr.masks).reshape(B, k, k).astype(st.cot.dtype)

    def dot_t(D, x):
        return jnp.matmul(x[:, None], D, precision=tr.precision)[:, 0]

    def mat(psi, D):  # Ψ_{τ-1} = D_τᵀ Ψ_τ
        return jnp.matmul(jnp.swapaxes(D, 1, 2), psi, precision=tr.precision)

    eye = jnp.broadcast_to(jnp.eye(k, dtype=st.cot.dtype), (B, k, k))
    return _sweep(st, K, build, dot_t, mat, eye)


def _sweep(st: ChunkedState, chunk: int, dyn, dot_t, mat, phi_init):
    """Backward over the chunk: ``δ_τ = c_τ + D_{τ+1}ᵀ δ_{τ+1}``, ``Φ_{τ-1} = Φ_τ D_τ``, with
    the chain cut (and ``Φ`` zeroed) at resets.  ``dyn``: ``(B, K, ·)`` array of ``D`` or a
    function of ``τ``.  Returns ``δ (B, K, k)``, ``e = D_{t0+1}ᵀ δ_{t0+1}``, ``Φ_τ`` stacked
    ``(B, K, ...)``, ``Φ_{t0}`` and whether a reset cut the chunk, per example."""
    K, B = chunk, st.cot.shape[0]

    def body(i, carry):
        g, phi, dead, deltas, phis = carry
        t = K - 1 - i
        D = dyn(t) if callable(dyn) else lax.dynamic_index_in_dim(dyn, t, 1, False)
        cut = lax.dynamic_index_in_dim(st.cut, t, 1, False)
        delta = lax.dynamic_index_in_dim(st.cot, t, 1, False) + g
        deltas = lax.dynamic_update_index_in_dim(deltas, delta, t, 1)
        phis = lax.dynamic_update_index_in_dim(phis, phi, t, 1)
        g = jnp.where(_bcast(cut, g.ndim), 0, dot_t(D, delta))
        dead = dead | cut
        phi = jnp.where(_bcast(dead, phi.ndim), 0, mat(phi, D))
        return g, phi, dead, deltas, phis

    init = (jnp.zeros_like(st.cot[:, 0]), phi_init, jnp.zeros((B,), bool), jnp.zeros_like(st.cot),
            jnp.zeros((B, K) + phi_init.shape[1:], phi_init.dtype))
    e, phi0, dead, deltas, phis = lax.fori_loop(0, K, body, init)
    return deltas, e, phis, phi0, dead


def _advance(tracker: InfluenceTracker, J: Array, e: Array, phi0: Array, dead: Array, zero: Array, add: Array):
    """One influence leaf ``J (B, L, U·W·m)``: returns the gradient term ``Σ_b e_b J_{t0,b}``
    (``(L, U)``, ``e = D_{t0+1}ᵀ δ_{t0+1}`` ``(B, U·m)``) and ``Φ_{t0} J + add`` (``add =
    Σ_τ Φ_τ I_τ``) in ``J``'s storage dtype.  ``dead``: ``Φ_{t0} = 0`` (a reset in the
    chunk); ``zero``: the new ``J`` is 0 (a reset after the chunk's last step).  The sum
    over ``b`` is a loop (XLA:CPU reduces leading axes slowly) and is ordered before the
    update by an optimisation barrier, so the update can overwrite ``J`` in place."""
    B, L, n = J.shape
    U, m = tracker.spec.units, tracker.spec.state_dim
    cdt, prec = jnp.promote_types(J.dtype, add.dtype), tracker.precision
    e = e.astype(cdt)
    if tracker.layout == "dense":
        Jm = J.reshape(B, L * U, U * m).astype(cdt)
        g = jnp.matmul(Jm, e[:, :, None], precision=prec).reshape(B, L * U)
        g = lax.fori_loop(0, B, lambda b, acc: acc + g[b], jnp.zeros((L * U,), cdt)).reshape(L, U)
        g, Jm = lax.optimization_barrier((g, Jm))
        prop = jnp.matmul(Jm, phi0, precision=prec).reshape(B, L, n)  # J Φ_{t0}ᵀ = J Ψ_{t0}
    else:
        g = lax.fori_loop(0, B, lambda b, acc: acc + e[b] * J[b].astype(cdt), jnp.zeros((L, n), cdt))
        g = g.reshape(L, U, m).sum(-1) if m > 1 else g
        g, J = lax.optimization_barrier((g, J))
        Jf = J.astype(cdt)
        if m == 1:
            prop = phi0[:, None] * Jf
        else:  # prop[b, l, i, a] = Σ_c Φ_{t0}[b, i, a, c] J[b, l, i, c]
            phi5, J4 = phi0.reshape(B, 1, U, m, m), Jf.reshape(B, L, U, m)
            prop = functools.reduce(operator.add, [phi5[..., c] * J4[..., c, None] for c in range(m)]).reshape(B, L, n)
    prop = jnp.where(dead[:, None, None], 0, prop)  # a reset in the chunk: J_{t0} is gone
    new = jnp.where(zero[:, None, None], 0, prop + add)  # a reset after the chunk's last step
    return g, new.astype(J.dtype)
