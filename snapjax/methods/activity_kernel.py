"""The state and the propagation kernel of :mod:`snapjax.methods.activity` (activity-sparse exact RTRL).

:func:`propagate` computes one step ``(s_t, J_t, stats)`` from ``(s_{t-1}, J_{t-1}, x_t)`` on
the internal state layout ``(B, U, m)``: the cell's step and its immediate Jacobians
(:func:`snapjax.engine.jacobians.step_jacobians`), then ``J_t = D_t J_{t-1} + I_t`` restricted to the
read-out columns of the units active at ``t-1`` and the read-out rows of the units active at
``t`` (silent units have exactly-zero read-out influence), stored as
:class:`ActivityInfluence` (defined here, re-exported by :mod:`snapjax.methods.activity`).  The result equals dense exact RTRL up to
floating-point summation order.

The maths (``D_t``, ``ΔD``, the active set, the four stages, the cost) and the in-place buffer
design (why the loops are ordered as they are, flat leaves, ``lax.switch`` only for the matmul)
are in :mod:`snapjax.methods.activity`'s module docstring.  Do not reorder the loops or reshape the
carried buffers here: the order was tuned, on the compiled HLO, so that XLA updates every buffer
in place instead of copying it each step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.spec import masked_kernel
from snapjax.engine.jacobians import step_jacobians

Array = jax.Array
PyTree = Any

__all__ = ["ActivityInfluence"]


class ActivityInfluence(NamedTuple):
    """Method state of :class:`ActivitySparseRTRL` (see the module docstring); every leaf has
    its batch axis first.

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

    Example (EGRU with 8 units, 3 inputs; ``W_hu`` has ``M = 8·8`` entries)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell = sj.EGRUCell(8)
        >>> params = cell.init(jax.random.key(0), cell.initialize_carry(None, (2, 3)), jnp.zeros((2, 3)))["params"]
        >>> state = sj.online_method("activity", cell, params, block=4).init(2)
        >>> isinstance(state, sj.ActivityInfluence), state.active.shape, bool(state.active.any())
        (True, (2, 8), False)
        >>> state.readout["hu"]["kernel"].shape, state.other["hu"]["kernel"].shape
        ((2, 8, 64), (2, 8, 64))
    """

    other: PyTree
    readout: PyTree
    scratch: PyTree
    active: Array


def propagate(
    method: Any, params: PyTree, state: Array, influence: ActivityInfluence, x: Array
) -> tuple[Array, ActivityInfluence, dict]:
    """One activity-sparse exact RTRL step on the internal layout (arguments checked by
    :meth:`snapjax.methods.activity.ActivitySparseRTRL.step`, the only caller).

    Args:
      method: the :class:`~snapjax.methods.activity.ActivitySparseRTRL` (its ``tracker``, ``block``,
        ``state_pairs`` and storage helpers are read; all static).
      params: cell parameters.
      state: ``s_{t-1}``, internal layout ``(B, U, m)``.
      influence: ``J_{t-1}``, an :class:`~snapjax.methods.activity.ActivityInfluence`.
      x: ``(B, n_in)``.

    Returns:
      ``(s_t (B, U, m), J_t, stats)``: ``J_t`` an ``ActivityInfluence`` of the same shapes whose
      buffers are ``influence``'s updated in place, ``stats`` the ``aux`` dict of
      :class:`~snapjax.methods.activity.ActivitySparseRTRL` (``alpha``, ``alpha_next``, ``max_active``,
      ``blocks``, ``capacity``).
    """
    tr = method.tracker
    spec = tr.spec
    m, U, r, Cb = spec.state_dim, spec.units, spec.readout, method.block
    batch = jnp.shape(state)[0]

    Jo_tree, Jr_tree, G_tree, act = influence
    jac = step_jacobians(spec, params, state, x, tr.masks, tr.precision)
    imm = tr._immediate(jac)  # leaves (B, L|1, U(i), m)
    # Read-out rows of J_t that can be nonzero: rows of D_t and I_t not identically zero.
    new_act = (
        jnp.any(jac.dphi_pre[:, :, r, :] != 0, axis=-1)
        | jnp.any(jac.dphi_unit[:, :, r, :] != 0, axis=-1)
        | jnp.any(jac.dphi_state[:, :, r, :] != 0, axis=-1)
    )
    n_old, n_new = act.sum(-1), new_act.sum(-1)  # (B,)
    nb_old = (n_old.max() + Cb - 1) // Cb
    nb_new = (n_new.max() + Cb - 1) // Cb
    Upad = method._padded_units
    pad = jnp.full((batch, Upad - U), U, jnp.int32)  # out-of-range slots: dropped by scatters
    # Slots: active units first (stable), then silent units, then padding.
    idx_old = jnp.concatenate([jnp.argsort(~act, axis=-1, stable=True).astype(jnp.int32), pad], 1)
    idx_new = jnp.concatenate([jnp.argsort(~new_act, axis=-1, stable=True).astype(jnp.int32), pad], 1)

    prec, patterns, comps = tr.precision, tr.patterns, method._other_comps
    md = m - 1
    pos = {a: k for k, a in enumerate(comps)}
    state_idx = [j for j, p in enumerate(spec.projections) if p.source == "state"]
    kernels = jnp.stack([masked_kernel(params, spec.projections[j].name, tr.masks) for j in state_idx])
    ds = jac.dphi_state  # (B, U, m, m)
    pairs_other = [(a, c) for a, c in method.state_pairs if a != r and c != r]
    pairs_rr = [(a, c) for a, c in method.state_pairs if c == r]
    groups = tr._group_of_leaves(Jo_tree)
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
    from_other = method._readout_from_other
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
    return jac.new_state, influence._replace(other=Jo_tree, readout=Jr_tree, scratch=G_tree, active=new_act), stats
