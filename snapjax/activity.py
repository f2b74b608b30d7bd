"""Activity-sparse exact RTRL: propagation cost that falls with the fraction of active units.

Setting.  Exact RTRL keeps, per parameter ``θ`` (in column ``i``, ``L`` rows per column) and
per example, the influence ``J[θ, (u, a)] = ds_{u,a}/dθ`` and updates ``J_t = D_t J_{t-1} + I_t``
with (``r`` = read-out component, the one the recurrent projections read; see
:mod:`snapjax.jacobians`)

    D[(u,a),(v,c)] = δ_uv ∂φ_a/∂s_c[u]  +  δ_{c,r} Σ_{p∈state} ∂φ_a/∂pre_p[u] · W_p[v,u].

Only the read-out column ``c = r`` of ``D`` is off-diagonal.  In an activity-sparse cell
(EGRU, read-out ``h``) a unit that is *silent* (no event and outside the pseudo-derivative
window) has ``h_u = 0`` and an identically zero read-out row of ``D_t`` and ``I_t``, hence
``J_t[·, u, r] = 0`` exactly.  So

* only the ``C`` *active* read-out columns ``J_{t-1}[·, v, r]`` enter the off-diagonal product
  (``O(M·C·U)`` per example instead of ``O(M·(U m)²)`` for the full product, ``M = L·U``
  stored parameters), and
* only the read-out rows ``J_t[·, u, r]`` of units active at ``t`` need computing.

Storage (:class:`ActivityInfluence`), every leaf flat and unit-major (``M = L·U`` stored
parameter entries of the leaf):

* ``other``  ``(B, U·(m-1), M)``: components ``a ≠ r`` (EGRU: ``c``), dense;
* ``readout`` ``(B, U, M)``: component ``r``; a unit's row is one contiguous block, and rows of
  inactive units are kept exactly ``0`` (invariant), so the stored values are dense RTRL's;
* ``active (B, U)`` bool: the units whose read-out row may be nonzero;
* ``scratch``: a work buffer (below); it carries no information between steps.

Step (static shapes under jit).  The active set of ``J_t``'s read-out rows is
known *before* propagating: row ``u`` is zero when ``∂φ_r/∂pre[u]``, ``∂φ_r/∂unit[u]`` and
``∂φ_r/∂s[u]`` all vanish — exact for any cell and parameter trajectory (online updates
included; ``J_0 = 0`` ⇒ all silent).  Slots order the units active first (stable ``argsort``);
with ``n`` = the most active units over the batch, the step works on ``ceil(n/C)`` blocks of
``C`` slots (``block``), in ``lax.fori_loop``s with a dynamic trip count, every buffer updated
in place:

1. copy the old active read-out rows into ``scratch`` (``G``, block gathers);
2. new read-out rows of the units active at ``t``:
   ``Σ_blocks G_k ΔD[new, r, k] + Σ_{c≠r} ∂φ_r/∂s_c ⊙ other_{t-1}[new, c] + I[new, r]``,
   scattered into ``readout``; 3. zero the rows of units active at ``t-1`` only;
4. ``other_t = ΔD[:, other, :K]ᵀ G[:K] + Σ_{c≠r} ∂φ_a/∂s_c ⊙ other_{t-1} + I[other]``: one
   matmul with ``K = C·ceil(n/C)`` (``lax.switch`` over the static ladder of ``K``; its output
   is a temporary) plus one elementwise pass over ``other``, in place,

with ``ΔD[u,a,s] = Σ_p ∂φ_a/∂pre_p[u] W_p[idx_s, u] + δ_{u,idx_s} ∂φ_a/∂s_r[u]``.  Slots past
the active count hold exactly-zero rows (masked with ``where``), so every block adds exactly
dense RTRL's nonzero terms and the result equals dense exact RTRL up to floating-point
summation order (≈1e-16 relative in float64) for *any* number of active units: when all units
fire the step runs all ``ceil(U/C)`` blocks, i.e. the structured product.  (The order of the
loops, and the flat leaves, are what let XLA update the buffers in place: a ``lax.switch``, a
reshape of a loop carry or a read and a scatter of one buffer in the same loop made it copy
whole buffers every step — measured in the compiled HLO, not guessed.  ``lax.switch`` is used
only for the matmul, whose output is not carried.)

Cost per example and step with ``n ≤ K = C·k`` active units: one matmul of ``2·M·K·U·(m-1)``
FLOPs and one elementwise pass over ``other``, plus ``O(M·K²)`` for the read-out rows, vs
``2·M·(U m)²`` for the library's dense RTRL (:func:`step_cost`).  Memory: ``other`` +
``readout`` are exactly dense RTRL's floats; ``scratch`` adds ``U_pad·(1+q)·M`` per example
(``q`` = other components the read-out reads within its unit; EGRU: 1), so the method state is
2× dense RTRL's for EGRU.  The saving is compute and memory traffic, not storage.

Parameter sparsity (``masks``) composes: kernels are stored compressed
(:func:`snapjax.patterns.kernel_layout`), shrinking ``M``; the savings multiply.  SnAp-n whose
pattern uses the dense layout is supported (the pattern is applied to both parts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells import as_cell_spec, masked_kernel
from snapjax.influence import InfluenceTracker, influence_tracker
from snapjax.jacobians import step_jacobians
from snapjax.patterns import derivative_patterns

Array = jax.Array
PyTree = Any

__all__ = ["ActivityInfluence", "ActivitySparseTracker", "activity_sparse_tracker", "step_cost"]



class ActivityInfluence(NamedTuple):
    """Method state of :class:`ActivitySparseTracker` (see the module docstring).

    Attributes:
      other: per parameter leaf, ``(B, U(u)·(m-1), M)``: the influence on the state components
        other than the read-out, unit-major (row ``u·(m-1) + a``, components in order with the
        read-out removed; ``M = L·U(i)`` stored parameter entries, flat: a reshape of a loop
        carry or a size-1 axis would make XLA copy the buffer every step).
      readout: per parameter leaf, ``(B, U(u), M)``: the influence on the read-out component,
        unit-major; rows of inactive units are exactly zero.
      scratch: per parameter leaf, ``(B, U_pad·(1+q), M)``: work buffer into which each step
        copies the rows it reads before updating the buffers in place (the previous active
        read-out rows, and for the ``q`` other components the read-out reads within its unit,
        their columns of the newly active units); its contents carry no information between
        steps.
      active: ``(B, U)`` bool, the units whose read-out row may be nonzero.
    """

    other: PyTree
    readout: PyTree
    scratch: PyTree
    active: Array


@dataclasses.dataclass(frozen=True, eq=False)
class ActivitySparseTracker(InfluenceTracker):
    """Exact RTRL (dense-layout) tracker whose ``step`` skips silent units exactly.

    Same protocol as :class:`InfluenceTracker` (``init``, ``step``, ``gradient``, ``spec``,
    ``masks``, ``to_dense``, ``num_stored``); the method state is an :class:`ActivityInfluence`.
    Build with :func:`activity_sparse_tracker`.

    Extra attributes:
      block: granularity of the active set: the read-out rows are processed ``block`` at a time
        and the main product uses ``K = block·ceil(n/block)`` columns (``n`` = most active units
        in the batch).
      state_pairs: static ``(a, c)`` pairs where ``∂φ_a/∂s_c`` can be nonzero (within-unit term).
    """

    block: int = 32
    state_pairs: tuple = ()

    # ---------------------------------------------------------------- storage
    @property
    def _other_comps(self) -> list[int]:
        return [a for a in range(self.spec.state_dim) if a != self.spec.readout]

    @property
    def _readout_from_other(self) -> list[int]:
        """Components ``c ≠ r`` that the read-out reads within its unit (``∂φ_r/∂s_c ≠ 0``)."""
        r = self.spec.readout
        return sorted({c for a, c in self.state_pairs if a == r and c != r})

    @property
    def _padded_units(self) -> int:
        return -(-self.spec.units // self.block) * self.block

    def _split_shapes(self, batch_size: int) -> tuple[dict, dict, dict]:
        md = self.spec.state_dim - 1
        full = self.leaf_shapes(batch_size)
        is_shape = lambda t: isinstance(t, tuple)  # noqa: E731
        rows = lambda s: math.prod(s[1:-2])  # noqa: E731  M = L·U(i) stored parameter entries
        other = jax.tree.map(lambda s: (s[0], s[-2] * md, rows(s)), full, is_leaf=is_shape)
        readout = jax.tree.map(lambda s: (s[0], s[-2], rows(s)), full, is_leaf=is_shape)
        n_scratch = self._padded_units * (1 + len(self._readout_from_other))
        scratch = jax.tree.map(lambda s: (s[0], n_scratch, rows(s)), full, is_leaf=is_shape)
        return other, readout, scratch

    def _param_shapes(self) -> dict:
        """Compressed parameter shape ``(*lead, U(i))`` per leaf."""
        return jax.tree.map(lambda s: s[1:-2], self.leaf_shapes(1), is_leaf=lambda t: isinstance(t, tuple))

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ActivityInfluence:
        """Zero influence (all units inactive) for ``batch_size`` examples; ``key`` is unused."""
        del key
        self._check_init_args(batch_size, dtype)
        is_shape = lambda t: isinstance(t, tuple)  # noqa: E731
        other, readout, scratch = self._split_shapes(int(batch_size))
        zeros = lambda s: jnp.zeros(s, dtype)  # noqa: E731
        return ActivityInfluence(
            jax.tree.map(zeros, other, is_leaf=is_shape),
            jax.tree.map(zeros, readout, is_leaf=is_shape),
            jax.tree.map(zeros, scratch, is_leaf=is_shape),
            jnp.zeros((int(batch_size), self.spec.units), bool),
        )

    def _check_influence(self, influence: Any, batch: int) -> None:
        if not isinstance(influence, ActivityInfluence):
            raise ValueError("influence must come from ActivitySparseTracker.init (an ActivityInfluence)")
        want = self._split_shapes(batch)
        got = tuple(jax.tree.map(jnp.shape, t) for t in (influence.other, influence.readout, influence.scratch))
        if got != want or jnp.shape(influence.active) != (batch, self.spec.units):
            raise ValueError(
                f"influence does not match this tracker for batch {batch}: expected (other, readout, "
                f"scratch) shapes {want} and active ({batch}, {self.spec.units}); got {got} and "
                f"{jnp.shape(influence.active)}"
            )

    def to_dense(self, influence: ActivityInfluence) -> PyTree:
        """Dense ``(B, *param_shape, units, m)`` per leaf, as :meth:`InfluenceTracker.to_dense`."""
        r, comps = self.spec.readout, self._other_comps

        U = self.spec.units

        def assemble(Jo, Jr, pshape):
            batch = Jo.shape[0]
            Jr = jnp.moveaxis(Jr, 1, -1).reshape((batch,) + pshape + (U,))  # (B, *lead, U(i), U(u))
            Jo = jnp.moveaxis(Jo.reshape((batch, U, len(comps)) + pshape), (1, 2), (-2, -1))
            parts = [None] * self.spec.state_dim
            for k, a in enumerate(comps):
                parts[a] = Jo[..., k]
            parts[r] = Jr
            return jnp.stack(parts, axis=-1)

        full = jax.tree.map(assemble, influence.other, influence.readout, self._param_shapes(),
                            is_leaf=lambda t: isinstance(t, tuple))
        return super().to_dense(full)

    def gradient(self, influence: ActivityInfluence, dloss_dstate: Array) -> PyTree:
        """Online gradient ``Σ_b (∂L/∂s_t)[b] J_t[b]`` in the parameters' shapes."""
        spec, m = self.spec, self.spec.state_dim
        if jnp.ndim(dloss_dstate) != 3 or jnp.shape(dloss_dstate)[1:] != (spec.units, m):
            raise ValueError(f"dloss_dstate must have shape (B, {spec.units}, {m}), got {jnp.shape(dloss_dstate)}")
        batch, prec = jnp.shape(dloss_dstate)[0], self.precision
        dl_other = dloss_dstate[..., self._other_comps]  # (B, U, m-1)
        dl_r = dloss_dstate[..., spec.readout]  # (B, U)

        def contract(Jo, Jr, pshape):
            g = jnp.einsum("bu,bum->m", dl_r.astype(Jr.dtype), Jr, precision=prec)
            if m > 1:
                dl_o = dl_other.reshape(batch, spec.units * (m - 1)).astype(Jo.dtype)
                g = g + jnp.einsum("bn,bnm->m", dl_o, Jo, precision=prec)
            return g.reshape(pshape)

        grads = jax.tree.map(contract, influence.other, influence.readout, self._param_shapes(),
                             is_leaf=lambda t: isinstance(t, tuple))
        return self._decompress(grads)

    # ------------------------------------------------------------------- step
    def step(self, params: PyTree, state: Array, influence: ActivityInfluence, x: Array):
        """One exact RTRL step: ``(s_t, J_t)``; see the module docstring."""
        s, J, _ = self.step_with_stats(params, state, influence, x)
        return s, J

    def step_with_stats(self, params: PyTree, state: Array, influence: ActivityInfluence, x: Array):
        """Like :meth:`step`, also returning per-step statistics (a dict of scalars):
        ``alpha`` (mean fraction of units whose read-out influence was nonzero: the columns
        that enter the product), ``alpha_next`` (the same for ``J_t``), ``max_active`` (max
        over the batch of both), ``blocks`` (blocks of ``block`` columns computed) and
        ``capacity`` (columns of the main product per example, ``max(blocks, 1) · block``)."""
        spec = self.spec
        m, U, r, Cb = spec.state_dim, spec.units, spec.readout, self.block
        batch = self._check_step_args(state, influence, x)  # shapes and dtypes; influence via _check_influence

        Jo_tree, Jr_tree, G_tree, act = influence
        jac = step_jacobians(spec, params, state, x, self.masks, self.precision)
        imm = self._immediate(jac)  # leaves (B, L|1, U(i), m)
        # Read-out rows of J_t that can be nonzero: rows of D_t and I_t not identically zero.
        new_act = (
            jnp.any(jac.dphi_pre[:, :, r, :] != 0, axis=-1)
            | jnp.any(jac.dphi_unit[:, :, r, :] != 0, axis=-1)
            | jnp.any(jac.dphi_state[:, :, r, :] != 0, axis=-1)
        )
        n_old, n_new = act.sum(-1), new_act.sum(-1)  # (B,)
        nb_old = (n_old.max() + Cb - 1) // Cb
        nb_new = (n_new.max() + Cb - 1) // Cb
        Upad = self._padded_units
        pad = jnp.full((batch, Upad - U), U, jnp.int32)  # out-of-range slots: dropped by scatters
        # Slots: active units first (stable), then silent units, then padding.
        idx_old = jnp.concatenate([jnp.argsort(~act, axis=-1, stable=True).astype(jnp.int32), pad], 1)
        idx_new = jnp.concatenate([jnp.argsort(~new_act, axis=-1, stable=True).astype(jnp.int32), pad], 1)

        prec, patterns, comps = self.precision, self.patterns, self._other_comps
        md = m - 1
        pos = {a: k for k, a in enumerate(comps)}
        state_idx = [j for j, p in enumerate(spec.projections) if p.source == "state"]
        kernels = jnp.stack([masked_kernel(params, spec.projections[j].name, self.masks) for j in state_idx])
        ds = jac.dphi_state  # (B, U, m, m)
        pairs_other = [(a, c) for a, c in self.state_pairs if a != r and c != r]
        pairs_rr = [(a, c) for a, c in self.state_pairs if c == r]
        groups = self._group_of_leaves(Jo_tree)
        bidx = jnp.arange(batch)[:, None]

        # ΔD[b, u, a, s] = Σ_p ∂φ_a/∂pre_p[b,u] W_p[v, u] + δ_{u,v} ∂φ_a/∂s_r[b,u],  v = idx_old[b, s]
        v_old = jnp.minimum(idx_old, U - 1)
        dd = jnp.einsum("buap,pbsu->buas", jac.dphi_pre[..., state_idx], kernels[:, v_old], precision=prec)
        if pairs_rr:
            onehot = (idx_old[:, None, :] == jnp.arange(U)[None, :, None]).astype(dd.dtype)  # (B, U, Upad)
            for a, _ in pairs_rr:
                dd = dd.at[:, :, a, :].add(onehot * ds[:, :, a, r][:, :, None])
        # other components, columns ordered (u, a): (B, Upad(slot), U·md)
        dd_other = dd[:, :, comps, :].transpose(0, 3, 1, 2).reshape(batch, Upad, U * md)
        # read-out rows of the new active units: (B, Upad(new slot), Upad(old slot))
        dd_rows = jnp.take_along_axis(dd[:, :, r, :], jnp.minimum(idx_new, U - 1)[:, :, None], axis=1)
        keep_new = jnp.take_along_axis(jnp.pad(new_act, ((0, 0), (0, Upad - U))), idx_new.clip(0, Upad - 1), 1)
        keep_new = keep_new & (idx_new < U)

        def valid_old(k):  # (B, Cb): slot k·Cb + c holds an active unit of t-1
            return (k * Cb + jnp.arange(Cb))[None, :] < n_old[:, None]

        # Every buffer is updated in place by a while loop; the order below (read the old rows,
        # write the new rows, zero the stale rows, update the other components) is one XLA can
        # run without copying a buffer (a reshape of a loop carry, or a scatter after a read in
        # the same loop, would make it copy the whole buffer every step).
        # 1. copy the active read-out rows of J_{t-1} into the work buffer, in slot order.
        def copy_block(k, G_t):
            sl = lax.dynamic_slice(idx_old, (0, k * Cb), (batch, Cb))

            def per_leaf(Jr, G):
                rows = Jr.at[bidx, sl].get(mode="fill", fill_value=0)
                return lax.dynamic_update_slice(G, rows, (0, k * Cb, 0))

            return jax.tree.map(per_leaf, Jr_tree, G_t)

        G_tree = lax.fori_loop(0, nb_old, copy_block, G_tree)

        # 1b. copy the old other-component columns that the new read-out rows read within their
        #     unit (∂φ_r/∂s_c ≠ 0, c ≠ r) into the work buffer, behind the read-out rows.
        from_other = self._readout_from_other
        if from_other:

            def copy_cols(j, G_t):
                u_j = jnp.minimum(lax.dynamic_slice(idx_new, (0, j * Cb), (batch, Cb)), U - 1)

                def per_leaf(Jo, G):
                    for q, c in enumerate(from_other):
                        rows = Jo.at[bidx, u_j * md + pos[c]].get(mode="clip")  # (B, Cb, M): block gather
                        G = lax.dynamic_update_slice(G, rows, (0, (q + 1) * Upad + j * Cb, 0))
                    return G

                return jax.tree.map(per_leaf, Jo_tree, G_t)

            G_tree = lax.fori_loop(0, nb_new, copy_cols, G_tree)

        def g_block(G, k):  # (B, Cb, M): old read-out rows of slots k·Cb…, exactly 0 where invalid
            blk = lax.dynamic_slice_in_dim(G, k * Cb, Cb, axis=1)
            return jnp.where(valid_old(k)[:, :, None], blk, 0)

        # 2. read-out rows of the units active at t, a block of Cb new slots at a time.
        def rows_block(j, Jr_t):
            sl = lax.dynamic_slice(idx_new, (0, j * Cb), (batch, Cb))
            keep = lax.dynamic_slice(keep_new, (0, j * Cb), (batch, Cb))
            ddr_j = lax.dynamic_slice_in_dim(dd_rows, j * Cb, Cb, axis=1)  # (B, Cb(new), Upad(old))
            u_j = jnp.minimum(sl, U - 1)

            def per_leaf(Jr, G, ic, group):
                dt = Jr.dtype
                M = Jr.shape[2]
                L = M // U

                def acc_k(k, acc):
                    d_k = lax.dynamic_slice_in_dim(ddr_j, k * Cb, Cb, axis=2).astype(dt)  # (B, Cb, Cb)
                    return acc + jnp.einsum("bcm,bdc->bdm", g_block(G, k), d_k, precision=prec)

                rows = lax.fori_loop(0, nb_old, acc_k, jnp.zeros((batch, Cb, M), dt))
                rows = rows.reshape(batch, Cb, L, U)
                ic = ic.astype(dt)
                hit = (sl[:, :, None] == jnp.arange(U)[None, None, :]).astype(dt)  # (B, Cb, U(i))
                rows = rows + hit[:, :, None, :] * ic[..., r][:, None, :, :]
                for q, c in enumerate(from_other):  # within-unit term from the old other components
                    ds_g = jnp.take_along_axis(ds[:, :, r, c], u_j, axis=1).astype(dt)  # (B, Cb)
                    Jo_c = lax.dynamic_slice_in_dim(G, (q + 1) * Upad + j * Cb, Cb, axis=1)  # (B, Cb, M)
                    rows = rows + ds_g[:, :, None, None] * Jo_c.reshape(batch, Cb, L, U)
                if patterns is not None:
                    pr = jnp.asarray(patterns[group][:, :, r].T, dt)[u_j]  # (B, Cb, U(i))
                    rows = rows * pr[:, :, None, :]
                rows = jnp.where(keep[:, :, None, None], rows, 0).reshape(batch, Cb, M)
                return Jr.at[bidx, sl].set(rows, mode="drop", unique_indices=True)

            return jax.tree.map(per_leaf, Jr_t, G_tree, imm, groups)

        Jr_tree = lax.fori_loop(0, nb_new, rows_block, Jr_tree)

        # 3. zero the rows of units active at t-1 but not at t (dropped: units active at t).
        stale = jnp.where(jnp.take_along_axis(jnp.pad(new_act, ((0, 0), (0, 1))), idx_old, 1), U, idx_old)

        def zero_block(k, Jr_t):
            sl = lax.dynamic_slice(stale, (0, k * Cb), (batch, Cb))
            return jax.tree.map(lambda Jr: Jr.at[bidx, sl].set(0, mode="drop", unique_indices=True), Jr_t)

        Jr_tree = lax.fori_loop(0, nb_old, zero_block, Jr_tree)

        # 4. other components: J_o ← (Σ_{slots < C} G ΔD) + (within-unit term) + I.  The product
        #    takes the old rows in one matmul with K = C = the smallest multiple of `block`
        #    covering the active rows (``lax.switch`` over the static ladder of K); its output is a
        #    temporary, so the elementwise update of the carried buffer stays in place — one pass
        #    over `other` per step whatever the activity.
        if md > 0:
            ds_oo = jnp.zeros((batch, U, md, md), ds.dtype)
            for a2, c in pairs_other:
                ds_oo = ds_oo.at[:, :, pos[a2], pos[c]].set(ds[:, :, a2, c])
            ladder = tuple(range(Cb, Upad + 1, Cb))

            def product(C):
                def run(G_t):
                    valid = (jnp.arange(C)[None, :] < n_old[:, None])[:, :, None]  # (B, C, 1)
                    d = dd_other[:, :C]  # (B, C, U·md)
                    return jax.tree.map(
                        lambda G: jnp.einsum(
                            "bcm,bcn->bnm", jnp.where(valid, G[:, :C], 0), d.astype(G.dtype), precision=prec
                        ),
                        G_t,
                    )

                return run

            which = jnp.clip(nb_old - 1, 0, len(ladder) - 1)
            prods = lax.switch(which, [product(C) for C in ladder], G_tree)

            def per_leaf(Jo, P, ic, group):  # Jo, P: (B, U·md, M), unit-major
                dt = Jo.dtype
                M = Jo.shape[2]
                L = M // U
                if md == 1:
                    within = ds_oo.reshape(batch, U, 1).astype(dt) * Jo
                else:
                    within = jnp.einsum(
                        "buac,bucm->buam", ds_oo.astype(dt), Jo.reshape(batch, U, md, M), precision=prec
                    ).reshape(batch, U * md, M)
                eye = jnp.eye(U, dtype=dt)  # I on the diagonal u = i
                ic_o = jnp.moveaxis(ic.astype(dt)[..., comps], -1, 1)  # (B, md, L|1, U(i))
                imm_o = eye[None, :, None, None, :] * ic_o[:, None]  # (B, U(u), md, L|1, U(i))
                imm_o = jnp.broadcast_to(imm_o, (batch, U, md, L, U)).reshape(batch, U * md, M)
                new = P + within + imm_o
                if patterns is not None:
                    pat = np.asarray(patterns[group][..., comps], bool).transpose(1, 2, 0)  # (U(u), md, U(i))
                    pat = jnp.broadcast_to(jnp.asarray(pat, dt)[:, :, None, :], (U, md, L, U))
                    new = new * pat.reshape(1, U * md, M)
                return new

            Jo_tree = jax.tree.map(per_leaf, Jo_tree, prods, imm, groups)

        stats = {
            "alpha": n_old.mean() / U,
            "alpha_next": n_new.mean() / U,
            "max_active": jnp.maximum(n_old.max(), n_new.max()),
            "blocks": nb_old,
            "capacity": jnp.maximum(nb_old, 1) * Cb,  # the product always runs (K >= block)
        }
        return jac.new_state, ActivityInfluence(Jo_tree, Jr_tree, G_tree, new_act), stats

    # ------------------------------------------------------------- accounting
    def parameter_density(self) -> float:
        """Unmasked parameters / dense parameter count."""
        spec = self.spec
        dense = kept = 0
        for p in spec.projections:
            n_in = self.kernels[p.name].n_in
            dense += n_in * spec.units
            mk = self.masks.get(p.name)
            kept += n_in * spec.units if mk is None else int(np.asarray(mk).sum())
            if p.use_bias:
                dense += spec.units
                kept += spec.units
        dense += len(spec.unit_params) * spec.units
        kept += len(spec.unit_params) * spec.units
        return kept / dense


def step_cost(tracker: InfluenceTracker, batch_size: int, capacity: Any, itemsize: int = 4) -> dict:
    """FLOPs and memory of one propagation step (per batch), as plain numbers.

    Args:
      tracker: an :class:`ActivitySparseTracker` (or a dense-layout :class:`InfluenceTracker`).
      batch_size: B.  capacity: units computed per example this step (``stats['capacity']``;
        may be an array of per-step values — the result then holds arrays).
      itemsize: bytes per influence float.
    Returns:
      ``flops`` (done by the activity-sparse step at that capacity: matmuls plus elementwise
      terms), ``flops_dense`` (the library's dense RTRL step: the full ``(U m)×(U m)``
      product), ``flops_dense_structured`` (the activity-sparse step at capacity ``U``, i.e.
      exploiting only that ``D`` is off-diagonal in the read-out column),
      ``influence_bytes`` (stored, = dense RTRL's), ``scratch_bytes`` (the activity-sparse
      tracker's work buffer, 0 otherwise), ``readout_bytes_touched`` (read-out rows read +
      written at that capacity) and ``density``.
    """
    spec = tracker.spec
    U, m = spec.units, spec.state_dim
    shapes = jax.tree.leaves(tracker.leaf_shapes(1), is_leaf=lambda t: isinstance(t, tuple))
    M = sum(math.prod(s[1:-3]) for s in shapes) * U  # stored parameter entries (rows × columns)
    B = batch_size
    n_state = sum(p.source == "state" for p in spec.projections)

    def sparse(C):
        matmul = 2.0 * B * M * C * U * (m - 1) + 2.0 * B * M * C * C
        elementwise = 2.0 * B * M * U * m * (m - 1) + 2.0 * B * M * C
        ddelta = 2.0 * B * U * m * n_state * C
        return matmul + elementwise + ddelta

    C = np.asarray(capacity, np.float64)
    dense = 2.0 * B * M * (U * m) * (U * m) + B * M * U * m
    density = tracker.parameter_density() if hasattr(tracker, "parameter_density") else 1.0
    scratch = 0
    if isinstance(tracker, ActivitySparseTracker):
        scratch = sum(math.prod(s) for s in jax.tree.leaves(tracker._split_shapes(B)[2], is_leaf=lambda t: isinstance(t, tuple)))
    return {
        "flops": sparse(C),
        "flops_dense": dense,
        "flops_dense_structured": sparse(float(U)),
        "influence_bytes": tracker.num_stored() * B * itemsize,
        "scratch_bytes": scratch * itemsize,
        "readout_bytes_touched": 3.0 * B * M * C * itemsize,
        "density": density,
    }


def _block_size(units: int, block: int | float) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, float, np.integer, np.floating)):
        raise ValueError(f"block must be an int (units) or a fraction of the units in (0, 1], got {block!r}")
    if isinstance(block, (int, np.integer)):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        return int(min(block, units))
    if not 0 < float(block) <= 1:
        raise ValueError(f"a fractional block must lie in (0, 1], got {block}")
    return max(1, int(math.ceil(float(block) * units)))


def activity_sparse_tracker(
    cell: Any,
    params: PyTree,
    method: str = "rtrl",
    n: int | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    block: int | float = 0.125,
    precision: Any = None,
) -> ActivitySparseTracker:
    """Exact RTRL (or dense-layout SnAp-n) that skips silent units; see module docstring.

    Args:
      cell, params, method, n, masks, precision: as :func:`snapjax.influence_tracker`;
        the method must use the dense layout (``"rtrl"``, or SnAp-n whose reach is all units).
      block: active units are processed in blocks of this many (an int) or of
        ``ceil(block·units)`` (a float in (0, 1]); the per-step cost grows with
        ``ceil(active/block)``, and the number of compiled product sizes with
        ``ceil(units/block)``.  Any number of active units is handled exactly.

    Raises:
      ValueError: as :func:`snapjax.influence_tracker`, for a bad ``block``, or if the method's
        layout is not dense.
    """
    base = influence_tracker(cell, params, method, n, masks=masks, precision=precision)
    if base.layout != "dense":
        raise ValueError(
            f"activity-sparse propagation needs the dense influence layout (exact RTRL); method "
            f"{method!r} uses the {base.layout!r} layout — use snapjax.influence_tracker for it"
        )
    spec = as_cell_spec(cell)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(InfluenceTracker)}
    _, _, state_pat = derivative_patterns(spec, probes=32)
    pairs = tuple((int(a), int(c)) for a, c in zip(*np.nonzero(state_pat)))
    return ActivitySparseTracker(**fields, block=_block_size(spec.units, block), state_pairs=pairs)
