"""The propagation kernels of each influence storage layout: ``D_t J_{t-1} + I_t`` and ``c_t J_t``.

The layouts are those of :mod:`snapjax.engine.influence` (a leaf ``(B, *lead, U, K, m)``):

* ``"diag"`` (SnAp-1): only the diagonal ``m × m`` block of ``D`` per unit; elementwise;
* ``"table"`` (sparse SnAp-n): the ``K × K`` sub-blocks of ``D`` on a static neighbour table,
  batched small matmuls, ``O(B p K² m)``;
* ``"dense"`` (RTRL): one batched contraction with the per-example ``D`` ``(B, U, m, U, m)``.

:func:`contract_gradient` is ``Σ_b c_t[b] J_t[b]`` in each layout, scattered back to the
parameters' shapes where a kernel stores only its unmasked rows.

Example (the diagonal layout's step is ``diag(D) ⊙ J + I``)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> from snapjax.engine.influence import influence_tracker
    >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    >>> tracker = influence_tracker(nn.GRUCell(3), params, "snap", 1)
    >>> s, J = tracker.step(params, jnp.zeros((2, 3, 1)), tracker.init(2), jnp.ones((2, 2)))
    >>> g = tracker.gradient(J, jnp.ones((2, 3, 1)))
    >>> jax.tree.structure(g) == jax.tree.structure(params)
    True
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.spec import CellSpec, masked_kernel
from snapjax.engine.jacobians import StepJacobians, computed_once, dense_dynamics
from snapjax.engine.patterns import KernelLayout, NeighbourTable

Array = jax.Array
PyTree = Any

__all__ = ["propagator", "diag_factors", "contract_gradient", "contract_leaves", "diag_batch_sum",
           "decompress_kernels", "apply_pattern", "SCATTER_ZEROS", "pairs_dtype", "real_dtype", "to_pairs",
           "from_pairs", "expand_dense"]

#: A SnAp-n pattern on the dense storage with at most this fraction of its entries outside the
#: pattern is applied by setting those entries to zero in place; a sparser one by a multiply.
SCATTER_ZEROS = 0.1

#: Examples per unrolled group of the diagonal layout's batch sum (:func:`diag_batch_sum`).
BATCH_UNROLL = 16


def pairs_dtype(layout: str, m: int, dtype: Any) -> Any:
    """The complex storage dtype of a two-component diagonal influence, or ``None``.

    In the diagonal layout each entry of a two-component cell (LSTM, LRU) is a pair ``(J₀, J₁)``
    whose update ``J_a ← Σ_c d[a, c] J_c + I_a`` reads both old components.  Stored interleaved
    (a float minor axis of size 2) XLA can neither update it in place nor stream it (the second
    term reads the pair reversed); stored as one complex number (``J₀`` real, ``J₁`` imaginary)
    each new pair reads only its own old pair.  ``benchmarks/pair_storage.py`` (16 × 256 × 256
    pairs, 2-core CPU): interleaved 782 µs per step, complex 280 µs, a stream pass 209 µs.
    Complex storage exists for float32 and float64 (complex64, complex128); 16-bit storage stays
    interleaved.

    Example::

        >>> import jax.numpy as jnp
        >>> from snapjax.engine.propagation import pairs_dtype, to_pairs, from_pairs
        >>> pairs_dtype("diag", 2, jnp.float32), pairs_dtype("diag", 1, jnp.float32), pairs_dtype("diag", 2, jnp.bfloat16)
        (dtype('complex64'), None, None)
        >>> from_pairs(to_pairs(jnp.array([[1.0, 2.0]]))).tolist()
        [[1.0, 2.0]]
    """
    dt = jnp.dtype(dtype)
    if layout != "diag" or m != 2 or dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return None
    return jnp.dtype(jnp.complex64 if dt == jnp.dtype(jnp.float32) else jnp.complex128)


def real_dtype(J: Array) -> Any:
    """The real dtype of ``J``'s entries (complex pairs: of each component), read from its dtype."""
    return jnp.finfo(J.dtype).dtype


def to_pairs(J: Array) -> Array:
    """A float leaf ``(..., 2)`` as complex pairs ``(..., 1)`` (:func:`pairs_dtype`)."""
    return jax.lax.complex(J[..., :1], J[..., 1:])


def from_pairs(J: Array) -> Array:
    """Complex pairs ``(..., 1)`` as the float leaf ``(..., 2)``; a float leaf is returned as it is."""
    return jnp.concatenate([jnp.real(J), jnp.imag(J)], -1) if jnp.iscomplexobj(J) else J


def propagator(spec: CellSpec, layout: str, table: NeighbourTable, masks: dict, precision: Any,
               params: PyTree, jac: StepJacobians) -> Callable:
    """``propagate(J (B, L, U, K, m), Ic (B, L|1, U, m)) -> D J + I`` for the storage ``layout``."""
    prec = precision
    state_idx = [j for j, p in enumerate(spec.projections) if p.source == "state"]
    kernels = [masked_kernel(params, spec.projections[j].name, masks) for j in state_idx]
    r = spec.readout

    if layout == "diag":
        rec = sum(jac.dphi_pre[..., j] * jnp.diagonal(w)[None, :, None] for j, w in zip(state_idx, kernels))
        dii = jac.dphi_state.at[..., r].add(rec)  # (B, U, m, m)
        m = spec.state_dim
        a = np.arange(m)
        # the m×m block product as m shifted elementwise products over whole arrays,
        # Σ_s d[a, a+s] J[a+s] (indices mod m; m = 2: J and J reversed on its minor axis); each
        # shift's coefficients (B, U, m) computed once, contiguous, before the update reads them.
        # A broadcast-and-reduce over the size-m minor axis measured ~10x slower on CPU,
        # a stack of per-component sums (interleaved writes) ~3.5x (LSTM / LRU SnAp-1).
        @functools.cache  # made once per step, by the first leaf of each storage that needs them
        def coefs(paired: bool) -> list:
            if paired:  # d[a, c] per (a, c), (B, U) each
                return computed_once([dii[..., i, j] for i in range(2) for j in range(2)])
            return computed_once([dii[..., a, (a + s) % m] for s in range(m)])  # per shift, (B, U, m)

        def propagate(J, ic):
            if jnp.iscomplexobj(J):  # pairs (m = 2): J (B, L, U, 1, 1), component 0 real, 1 imaginary;
                # ic: the two components' immediate terms, (B, L|1, U) each
                rdt = real_dtype(J)
                d00, d01, d10, d11 = (c[:, None, :, None, None].astype(rdt) for c in coefs(True))
                j0, j1 = jnp.real(J), jnp.imag(J)
                i0, i1 = (i[:, :, :, None, None] for i in ic)
                return jax.lax.complex(d00 * j0 + d01 * j1 + i0, d10 * j0 + d11 * j1 + i1)
            c = coefs(False)
            if m == 1:
                Jn = c[0][:, None, :, None, :].astype(J.dtype) * J
            else:
                shifted = [J] + [J[..., ::-1] if m == 2 else jnp.roll(J, -s, axis=-1) for s in range(1, m)]
                Jn = sum(c[s][:, None, :, None, :].astype(J.dtype) * shifted[s] for s in range(m))
            return Jn + ic[:, :, :, None, :]

        propagate.coefficients = coefs  # type: ignore[attr-defined]  # the per-step factors, made once
        return propagate

    if layout == "table":
        nbr, valid = table.nbr, table.valid
        pair_valid = jnp.asarray(valid[:, :, None] & valid[:, None, :])
        wg = jnp.stack([jnp.where(pair_valid, w[nbr[:, :, None], nbr[:, None, :]], 0) for w in kernels])
        dphi_g = jac.dphi_pre[:, nbr][..., state_idx]  # (B, U, K, m, Ps)
        # a[b, i, t, s, a] = Σ_p wg[p, i, t, s] dphi_g[b, i, s, a, p]: the K×K block of D
        # (row slot s, column slot t) per example and unit.  Built as a sum of P broadcast
        # products (elementwise, fused): an einsum here lowers to tiny (K×P)@(P×B) matmuls.
        a_mat = functools.reduce(operator.add, [
            wg[j][None, :, :, :, None] * dphi_g[:, :, None, :, :, j] for j in range(len(state_idx))
        ])  # (B, U, K(t), K(s), m)
        B_, U_, K_ = a_mat.shape[0], a_mat.shape[1], a_mat.shape[2]
        ds_g = jac.dphi_state[:, nbr]  # (B, U, K, m, m)
        fold = spec.state_dim == 1
        if fold:  # m = 1: the within-unit term is diagonal in the slots; fold it into a.
            a_mat = a_mat + jnp.eye(K_, dtype=a_mat.dtype)[None, None, :, :, None] * ds_g[:, :, None, :, 0, :]
        a_flat = a_mat.reshape(B_, U_, K_, K_ * spec.state_dim)
        slot0 = jnp.zeros((K_,), ds_g.dtype).at[0].set(1)

        def propagate_table(J, ic):
            # Batched (over b, i) matmuls (L×K)@(K×K·m) with the batch axes leading.
            Jt = jnp.swapaxes(J[..., r], 1, 2)  # (B, U, L, K)
            Jn = jnp.matmul(Jt, a_flat.astype(J.dtype), precision=prec)  # (B, U, L, K·m)
            Jn = jnp.swapaxes(Jn, 1, 2).reshape(J.shape)  # (B, L, U, K, m)
            if not fold:
                Jn = Jn + (ds_g[:, None] * J[..., None, :]).sum(-1)
            return Jn + ic[:, :, :, None, :] * slot0[:, None].astype(J.dtype)

        return propagate_table

    d = dense_dynamics(spec, params, jac, masks)  # (B, U, m, U, m)
    eye = jnp.eye(spec.units, dtype=d.dtype)

    def propagate_dense(J, ic):
        Jn = jnp.einsum("blivc,buavc->bliua", J, d.astype(J.dtype), precision=prec)
        return Jn + ic[:, :, :, None, :] * eye[None, None, :, :, None]

    return propagate_dense


def diag_factors(spec: CellSpec, layout: str, patterns: dict | None, propagate: Callable, batch: int, J: Array,
                 immediate: tuple, group: str) -> tuple | None:
    """The factors ``(D, V, G, P)`` of one diagonal leaf's update ``J_t = (D J_{t-1} + V ⊗ G) ⊙ P``
    (for :mod:`snapjax.engine.native`), or ``None`` where the update is not of that form (other
    layouts, a kernel with compressed rows, a one-component leaf with a pattern, a 16-bit
    influence).

    One-component leaves: ``D (B, U)``, ``V (B, L)`` (``None``: biases and unit parameters, ``L =
    1``), ``G (B, U)``, ``P = None``.  Complex pairs: ``D (B, U, 4)`` the 2×2 blocks ``(d00, d01,
    d10, d11)``, ``G (B, U, 2)``, ``P (U, 2)`` the static SnAp pattern (``None``: all kept).
    ``propagate``: this step's diagonal :func:`propagator`; ``immediate``: the leaf's ``(v, d)``."""
    v, d = immediate
    paired = jnp.iscomplexobj(J)
    P = None if patterns is None or patterns[group].all() else patterns[group]
    if layout != "diag" or (J.shape[-1] != 1 and not paired) or (P is not None and not paired) \
            or real_dtype(J) != d.dtype or (v is not None and v.shape[-2] != 1):
        return None
    V = None if v is None else v.reshape(batch, -1)
    if not paired:
        D = propagate.coefficients(False)[0][..., 0]  # type: ignore[attr-defined]
        return D.astype(d.dtype), V, d.reshape(batch, spec.units), None
    D = jnp.stack(propagate.coefficients(True), -1).astype(d.dtype)  # type: ignore[attr-defined]
    return D, V, d.reshape(batch, spec.units, 2), None if P is None else P.reshape(spec.units, 2)


def apply_pattern(J: Array, pattern: np.ndarray) -> Array:
    """``J ⊙ M`` for the static bool pattern ``M (U, K, m)`` of one parameter group, ``J (B, L, U,
    K, m)``: entries outside ``M`` become 0.

    A nearly full pattern (at most :data:`SCATTER_ZEROS` of it outside) zeroes its few entries
    with an in-place scatter; a multiply by ``M`` there made XLA:CPU evaluate ``D J + I`` twice,
    once for the stored influence and once for the gradient's operand (SnAp-3 at GRU-64,
    density 0.1, 99.3 % full: 1.2x RTRL's step, 0.95-0.99x with the scatter).  A sparser
    pattern is multiplied (a scatter of many entries costs more).

    Example::

        >>> import jax.numpy as jnp, numpy as np
        >>> from snapjax.engine.propagation import apply_pattern
        >>> M = np.ones((3, 3, 1), bool); M[0, 2, 0] = False
        >>> out = apply_pattern(jnp.ones((1, 1, 3, 3, 1)), M)
        >>> float(out.sum()), float(out[0, 0, 0, 2, 0])
        (8.0, 0.0)
    """
    zeros = ~np.asarray(pattern, bool)
    if not zeros.any():
        return J
    if jnp.iscomplexobj(J):  # pairs (J (B, L, U, K, 1)): each component's mask on its own part

        def masked(part: Array, keep: np.ndarray) -> Array:  # an all-out component is a constant 0
            return part if keep.all() else jnp.zeros_like(part) if not keep.any() else part * jnp.asarray(keep, part.dtype)

        keep = np.asarray(pattern, bool)
        return jax.lax.complex(masked(jnp.real(J), keep[..., :1]), masked(jnp.imag(J), keep[..., 1:]))
    if zeros.mean() <= SCATTER_ZEROS:
        zi, zk, za = np.nonzero(zeros)
        return J.at[:, :, zi, zk, za].set(jnp.zeros((), J.dtype))
    return J * jnp.asarray(pattern, J.dtype)


def contract_gradient(spec: CellSpec, layout: str, table: NeighbourTable, kernels: dict, precision: Any,
                      influence: PyTree, dloss_dstate: Array) -> PyTree:
    """Online gradient ``Σ_b (∂L/∂s_t)[b] J_t[b]`` in the parameters' shapes.

    Args:
      influence: ``J_t``.  dloss_dstate: ``(B, units, m)``.
    """
    return decompress_kernels(spec, kernels, contract_leaves(spec, layout, table, precision, influence, dloss_dstate))


def contract_leaves(spec: CellSpec, layout: str, table: NeighbourTable, precision: Any, influence: PyTree,
                    dloss_dstate: Array) -> PyTree:
    """:func:`contract_gradient` per influence leaf, kernels in compressed coordinates ``(R, units)``."""
    m = spec.state_dim
    if jnp.ndim(dloss_dstate) != 3 or jnp.shape(dloss_dstate)[1:] != (spec.units, m):
        raise ValueError(f"dloss_dstate must have shape (B, {spec.units}, {m}), got {jnp.shape(dloss_dstate)}")
    batch = jnp.shape(dloss_dstate)[0]
    prec = precision
    if layout == "diag":
        dl = computed_once(dloss_dstate)[:, :, None, :]  # read once per stored entry
    else:  # "table" ("dense" contracts dloss_dstate directly, below)
        dl = dloss_dstate[:, table.nbr]  # (B, U, K, m)

    def contract(J):
        shape = J.shape
        L = math.prod(shape[1:-3])
        if jnp.iscomplexobj(J):  # diagonal pairs (B, *lead, U, 1, 1), component 0 real, 1 imaginary
            rdt = jnp.promote_types(real_dtype(J), jnp.result_type(dloss_dstate))
            Jp = J.reshape(batch, L, spec.units, 1, 1).astype(jnp.promote_types(J.dtype, rdt))
            return diag_batch_sum(Jp, dl[:, None].astype(rdt), prec).reshape(shape[1:-2])
        cdt = jnp.promote_types(J.dtype, jnp.result_type(dloss_dstate))  # upcast a 16-bit J
        if layout == "dense":
            # One batched matrix-vector product per example over J's contiguous minor axes
            # (U·m), then a sum over the batch: J is read once, in its stored order.  The
            # single contraction over (b, v, c) lowered to a transposing copy of J per leaf,
            # which XLA fused with the producer of J — recomputing D J + I (and the SnAp-n
            # mask) in transposed order: 2-3x the step's cost at GRU-32.
            Jm = J.reshape(batch, L * spec.units, spec.units * m).astype(cdt)
            t = jnp.einsum("bnk,bk->bn", Jm, dloss_dstate.reshape(batch, -1).astype(cdt), precision=prec)
            return t.sum(0).reshape(shape[1:-2])
        Jf = J.reshape(batch, L, spec.units, shape[-2], m).astype(cdt)
        dlb = jnp.broadcast_to(dl, (batch, spec.units, shape[-2], m)).astype(cdt)
        if layout == "diag":
            return diag_batch_sum(Jf, dlb[:, None], prec).reshape(shape[1:-2])
        if shape[-2] * m == 1:  # SnAp-1 of a one-component cell: drop the unit axes
            g = jnp.einsum("bi,bli->li", dlb[..., 0, 0], Jf[..., 0, 0], precision=prec)
        else:
            g = jnp.einsum("biKa,bliKa->li", dlb, Jf, precision=prec)
        return g.reshape(shape[1:-2])

    return jax.tree.map(contract, influence)


def diag_batch_sum(J: Array, c: Array, precision: Any = None) -> Array:
    """``Σ_b Σ_a J[b, ..., a] c[b, ..., a]`` (``J (B, L, U, 1, m)``, ``c`` broadcastable to it;
    returns ``(L, U, 1)``): the diagonal layout's gradient contraction.

    Written as sums of per-example products over whole arrays, unrolled over groups of
    :data:`BATCH_UNROLL` examples: XLA fuses each group into one elementwise pass that reads
    ``J`` once, in stored order; more than ``2 · BATCH_UNROLL`` examples leave one partial sum
    per group, added by a matrix-vector product with ones.  Per-step SnAp-1 (``step`` and
    ``gradient`` every step in one jitted ``lax.scan``, quiet 2-core CPU, GRU k = 64 and 128 and
    a CTRNN ``CellSpec`` k = 128, B = 4 and 16) took 1.3-2.9x longer with the batch sum as a
    matrix-vector product over a materialised ``J ⊙ c`` (the previous form) and 1.9-4.9x with
    one einsum over ``(b, a)`` (XLA makes a transposing copy of ``J``).  The batch axis is always
    local here (many devices split it with ``shard_map``), so the slices stay on their device.

    Example::

        >>> import jax.numpy as jnp
        >>> from snapjax.engine.propagation import diag_batch_sum
        >>> J, c = jnp.ones((3, 2, 4, 1, 1)), jnp.arange(3.0)[:, None, None, None, None]
        >>> diag_batch_sum(J, c).shape, float(diag_batch_sum(J, c)[0, 0, 0])
        ((2, 4, 1), 3.0)
    """
    batch = J.shape[0]
    paired = jnp.iscomplexobj(J)  # pairs: J (..., 1) complex, c (..., 2)
    m = 2 if paired else J.shape[-1]
    c = jnp.broadcast_to(c, J.shape[:-1] + (m,))

    def term(Jb: Array, cb: Array) -> Array:  # Σ_a over the minor axis as m elementwise products
        if paired:
            return jnp.real(Jb[..., 0]) * cb[..., 0] + jnp.imag(Jb[..., 0]) * cb[..., 1]
        return functools.reduce(operator.add, [Jb[..., a] * cb[..., a] for a in range(m)])

    def unrolled(Js: Array, cs: Array, axis: int) -> Array:  # Σ over ``axis`` as sliced adds
        n = Js.shape[axis]
        take = functools.partial(jax.lax.index_in_dim, axis=axis, keepdims=False)
        return functools.reduce(operator.add, [term(take(Js, i), take(cs, i)) for i in range(n)])

    if batch <= 2 * BATCH_UNROLL:
        return unrolled(J, c, 0)
    groups, rest = divmod(batch, BATCH_UNROLL)
    full = groups * BATCH_UNROLL
    split = (groups, BATCH_UNROLL) + J.shape[1:]
    c_split = (groups, BATCH_UNROLL) + c.shape[1:]  # pairs: c has both components, J one complex
    partial = unrolled(J[:full].reshape(split), c[:full].reshape(c_split), 1)  # (G, L, U, 1)
    total = jnp.einsum("g,gn->n", jnp.ones((groups,), partial.dtype), partial.reshape(groups, -1),
                       precision=precision).reshape(partial.shape[1:])
    return total + unrolled(J[full:], c[full:], 0) if rest else total


def decompress_kernels(spec: CellSpec, kernels: dict, grads: PyTree) -> PyTree:
    """Scatter compressed kernel coordinates ``(R, units)`` back to ``(n_in, units)``."""
    out = dict(grads)
    for p in spec.projections:
        lay: KernelLayout = kernels[p.name]
        if lay.rows is None:
            continue
        g = grads[p.name]["kernel"]
        cols = np.broadcast_to(np.arange(spec.units), lay.rows.shape)
        assert lay.valid is not None  # compressed rows come with their validity
        dense = jnp.zeros((lay.n_in, spec.units), g.dtype).at[lay.rows, cols].add(
            jnp.where(lay.valid, g, 0)
        )
        out[p.name] = {**grads[p.name], "kernel": dense}
    return out


def expand_dense(spec: CellSpec, layout: str, table: NeighbourTable, kernels: dict, influence: PyTree) -> PyTree:
    """The influence in any layout (pairs included) expanded to dense ``(B, *param_shape, units,
    m)`` per leaf, every unstored entry 0 (for tests and plots)."""
    U, m = spec.units, spec.state_dim

    def expand(J):
        J = from_pairs(J)
        shape = J.shape
        batch, lead, K = shape[0], shape[1:-3], shape[-2]
        if layout == "dense":
            return J
        Jf = J.reshape(batch, -1, U, K, m)
        dense = jnp.zeros((batch, Jf.shape[1], U, U, m), J.dtype)
        nbr = table.nbr if layout == "table" else np.arange(U)[:, None]
        valid = table.valid if layout == "table" else np.ones((U, 1), bool)
        rows = np.broadcast_to(np.arange(U)[:, None], nbr.shape)
        dense = dense.at[:, :, rows, nbr].add(jnp.where(valid[:, :, None], Jf, 0))
        return dense.reshape((batch,) + lead + (U, U, m))

    expanded = jax.tree.map(expand, influence)
    out = dict(expanded)
    for p in spec.projections:
        lay: KernelLayout = kernels[p.name]
        if lay.rows is None:
            continue
        J = expanded[p.name]["kernel"]  # (B, R, U, U, m)
        cols = np.broadcast_to(np.arange(U), lay.rows.shape)
        assert lay.valid is not None  # compressed rows come with their validity
        full = jnp.zeros((J.shape[0], lay.n_in, U, U, m), J.dtype).at[:, lay.rows, cols].add(
            jnp.where(lay.valid[:, :, None, None], J, 0)
        )
        out[p.name] = {**expanded[p.name], "kernel": full}
    return out
