"""Activity-sparse exact RTRL: propagation cost that falls with the fraction of active units.

Setting.  Exact RTRL keeps, per parameter ``θ`` (column ``i``) and per example, the dense
influence ``J[(v, c)] = ds_{v,c}/dθ`` and updates ``J_t = D_t J_{t-1} + I_t`` with

    D[(u,a),(v,c)] = δ_uv dphi_state[u,a,c] + δ_{c,r} Σ_{p∈state} dphi_pre[u,a,p] W_p[v,u]

(``r`` = read-out component, see :mod:`snapjax.jacobians`).  The expensive part is the
off-diagonal sum ``Σ_v D_off[u,a,v] J_{t-1}[v, r]`` (``O(L·U·U·m·U)`` per example).  In an
activity-sparse cell (EGRU) a unit ``v`` that was *silent* at ``t-1`` (no event and outside the
pseudo-derivative window) has ``h_v = 0`` and ``dh_v/dθ = 0`` exactly, i.e. ``J_{t-1}[v, r] = 0``
for every parameter: its column contributes exactly nothing.

Design (static shapes under jit).  Per step and example the *active set* is
``A_b = {v : J_{t-1}[b, ·, ·, v, r] may be nonzero}``.  It is carried in the method state
(:class:`ActivityInfluence`) and computed at the previous step from its Jacobians: if the
read-out row ``(u, r)`` of both ``D_t`` and ``I_t`` is identically zero (all of
``dphi_pre[u, r, ·]``, ``dphi_unit[u, r, ·]``, ``dphi_state[u, r, ·]`` are 0) then
``J_t[·, u, r] = 0`` exactly, so this is exact for any cell and any parameter trajectory,
including online updates (``J_0 = 0`` ⇒ all silent).  A ladder of static
capacities ``C_1 < C_2 < … < U`` is fixed at construction; each step picks (``lax.switch``) the
smallest ``C_j ≥ max_b |A_b|``.  The branch gathers, per example, the ``C_j`` columns of the
active units first (stable ``argsort`` of the activity mask; padding slots hold silent units
whose columns are exactly zero) and computes
``einsum('blic,buac->bliua', J[..., idx, r], D_off[..., idx])`` — cost ``∝ C_j`` instead of
``U`` — plus the elementwise within-unit term and ``I``.  When more units are active than the
largest sparse capacity, the last branch is the library's dense exact RTRL propagation.

Exactness guarantee.  Every branch adds exactly the same nonzero terms as dense RTRL; the
only terms dropped are products with influence entries that are exactly ``0.0``, so the
result equals dense RTRL up to floating-point summation order (≈1e-16 relative in float64),
whatever the activity, and the fallback is itself the dense path.  Cost falls with the measured
activity in steps of the capacity ladder (default U/16, U/8, 3U/16, U/4, 3U/8, U/2, 3U/4).
Memory: the influence is stored densely (same layout as :class:`InfluenceTracker`, so
``init``/``gradient``/``to_dense`` are shared); only compute is saved, not storage.

Parameter sparsity (``masks``) composes: kernels are stored compressed
(:func:`snapjax.patterns.kernel_layout`), shrinking ``L``; the savings multiply.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

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

__all__ = ["ActivityInfluence", "ActivitySparseTracker", "activity_sparse_tracker", "step_cost", "influence_activity"]

DEFAULT_CAPACITY = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75)


def _unwrap(influence):
    return influence.influence if isinstance(influence, ActivityInfluence) else influence


def influence_activity(spec, influence: PyTree) -> Array:
    """``(B, units)`` bool: unit ``v`` has a nonzero read-out influence ``J[b, ·, ·, v, r]``.

    Works on the dense layout ``(B, *lead, units(i), units(v), m)``.
    """
    r, U = spec.readout, spec.units
    act = None
    for J in jax.tree.leaves(influence):
        Jr = J[..., r].reshape(J.shape[0], -1, U)
        a = jnp.any(Jr != 0, axis=1)
        act = a if act is None else act | a
    return act


class ActivityInfluence(NamedTuple):
    """Method state of :class:`ActivitySparseTracker`: the dense-layout influence (same pytree
    as :class:`InfluenceTracker`'s) and ``active (B, units)`` bool, the units whose read-out
    influence row ``J[b, ·, ·, v, r]`` may be nonzero (exactly zero where ``False``)."""

    influence: PyTree
    active: Array


@dataclasses.dataclass(frozen=True, eq=False)
class ActivitySparseTracker(InfluenceTracker):
    """:class:`InfluenceTracker` (dense layout) whose ``step`` skips silent units exactly.

    Same protocol as :class:`InfluenceTracker` (``init``, ``step``, ``gradient``, ``spec``,
    ``masks``, ``to_dense``); the method state is an :class:`ActivityInfluence`.
    Build with :func:`activity_sparse_tracker`.

    Extra attributes:
      capacities: ascending static capacities (< units) of the sparse branches; a dense
        fallback branch is always appended.
      state_pairs: static ``(a, c)`` pairs where ``∂φ_a/∂s_c`` can be nonzero (within-unit term).
    """

    capacities: tuple = ()
    state_pairs: tuple = ()

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ActivityInfluence:
        J = super().init(batch_size, dtype, key=key)
        return ActivityInfluence(J, jnp.zeros((int(batch_size), self.spec.units), bool))

    def gradient(self, influence: ActivityInfluence, dloss_dstate: Array) -> PyTree:
        return super().gradient(_unwrap(influence), dloss_dstate)

    def to_dense(self, influence: ActivityInfluence) -> PyTree:
        return super().to_dense(_unwrap(influence))

    # ------------------------------------------------------------------- step
    def step(self, params: PyTree, state: Array, influence: ActivityInfluence, x: Array):
        """One exact RTRL step (``s_t``, method state ``t``); see the module docstring."""
        s, J, _ = self.step_with_stats(params, state, influence, x)
        return s, J

    def step_with_stats(self, params: PyTree, state: Array, influence: ActivityInfluence, x: Array):
        """Like :meth:`step`, also returning per-step statistics (a dict of scalars):
        ``alpha`` (mean fraction of active units, i.e. with nonzero read-out influence),
        ``max_active`` (max over the batch), ``capacity`` (units computed per example, ``U``
        on the dense fallback) and ``branch`` (index into ``capacities + (U,)``)."""
        if not isinstance(influence, ActivityInfluence):
            raise ValueError("influence must come from ActivitySparseTracker.init (an ActivityInfluence)")
        Jtree, act = influence
        batch = self._check_step_args(state, Jtree, x)
        spec, m, U, r = self.spec, self.spec.state_dim, self.spec.units, self.spec.readout
        jac = step_jacobians(spec, params, state, x, self.masks, self.precision)
        imm = self._immediate(jac)
        n_act = act.sum(-1)
        max_act = n_act.max()
        caps = tuple(self.capacities) + (U,)
        branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), max_act.astype(jnp.int32), side="left")
        branch = jnp.minimum(branch, len(caps) - 1)
        state_idx = [j for j, p in enumerate(spec.projections) if p.source == "state"]
        prec = self.precision
        patterns = self.patterns
        groups = self._group_of_leaves(Jtree)
        pairs = self.state_pairs

        def sparse_branch(C):
            def run(_):
                idx = jnp.argsort(~act, axis=-1, stable=True)[:, :C]  # (B, C): active units first
                kernels = jnp.stack(
                    [masked_kernel(params, spec.projections[j].name, self.masks) for j in state_idx]
                )  # (Ps, U(v), U(u))
                wg = kernels[:, idx]  # (Ps, B, C, U)
                doff = jnp.einsum("buap,pbcu->buac", jac.dphi_pre[..., state_idx], wg, precision=prec)
                ds = jac.dphi_state
                eye = jnp.eye(U, dtype=ds.dtype)

                def per_leaf(Jl, ic, group):
                    shape, dt = Jl.shape, Jl.dtype
                    L = math.prod(shape[1:-3])
                    Jf = Jl.reshape(batch, L, U, U, m)
                    Jr = jnp.take_along_axis(Jf[..., r], idx[:, None, None, :], axis=3)  # (B, L, U, C)
                    off = jnp.einsum("blic,buac->bliua", Jr, doff.astype(dt), precision=prec)
                    ic = ic.astype(dt)
                    comps = []
                    for a in range(m):
                        acc = off[..., a] + ic[:, :, :, None, a] * eye.astype(dt)
                        for (a2, c) in pairs:
                            if a2 == a:
                                acc = acc + ds[:, None, None, :, a, c].astype(dt) * Jf[..., c]
                        comps.append(acc)
                    Jn = jnp.stack(comps, axis=-1)
                    if patterns is not None:
                        Jn = Jn * jnp.asarray(patterns[group], Jn.dtype)
                    return Jn.reshape(shape)

                return jax.tree.map(per_leaf, Jtree, imm, groups)

            return run

        def dense_branch(_):
            prop = self._propagator(params, jac)  # dense layout: D J + I

            def per_leaf(Jl, ic, group):
                shape = Jl.shape
                L = math.prod(shape[1:-3])
                Jn = prop(Jl.reshape(batch, L, U, U, m), ic.astype(Jl.dtype))
                if patterns is not None:
                    Jn = Jn * jnp.asarray(patterns[group], Jn.dtype)
                return Jn.reshape(shape)

            return jax.tree.map(per_leaf, Jtree, imm, groups)

        branches = [sparse_branch(C) for C in self.capacities] + [dense_branch]
        new = lax.switch(branch, branches, None) if len(branches) > 1 else dense_branch(None)
        # Units whose read-out row of D_t and I_t is identically zero have J_t[·, u, r] == 0.
        new_act = (
            jnp.any(jac.dphi_pre[:, :, r, :] != 0, axis=-1)
            | jnp.any(jac.dphi_unit[:, :, r, :] != 0, axis=-1)
            | jnp.any(jac.dphi_state[:, :, r, :] != 0, axis=-1)
        )
        stats = {
            "alpha": n_act.mean() / U,
            "alpha_next": new_act.mean(),
            "max_active": max_act,
            "capacity": jnp.asarray(caps, jnp.int32)[branch],
            "branch": branch,
        }
        return jac.new_state, ActivityInfluence(new, new_act), stats

    # ------------------------------------------------------------- accounting
    def leaf_rows(self) -> int:
        """Σ over influence leaves of the rows ``L`` (stored parameter entries per unit column)."""
        shapes = jax.tree.leaves(self.leaf_shapes(1), is_leaf=lambda t: isinstance(t, tuple))
        return int(sum(math.prod(s[1:-3]) for s in shapes))

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
      ``flops`` (done), ``flops_dense`` (library dense RTRL: full ``(U m)×(U m)`` product),
      ``flops_dense_structured`` (dense RTRL exploiting that ``D`` is off-diagonal only in the
      read-out column), ``influence_bytes`` and ``density``.
    """
    spec = tracker.spec
    U, m = spec.units, spec.state_dim
    L = sum(math.prod(s[1:-3]) for s in jax.tree.leaves(tracker.leaf_shapes(1), is_leaf=lambda t: isinstance(t, tuple)))
    Bq = batch_size
    C = np.asarray(capacity, np.float64)
    n_state = sum(p.source == "state" for p in spec.projections)
    elementwise = 2.0 * Bq * L * U * U * m * m + Bq * L * U * m  # within-unit term + I
    off = 2.0 * Bq * L * U * C * U * m + 2.0 * Bq * U * m * n_state * C
    dense = 2.0 * Bq * L * U * (U * m) * (U * m) + Bq * L * U * U * m
    dense_struct = 2.0 * Bq * L * U * U * U * m + elementwise
    flops = np.where(C >= U, dense, off + elementwise)
    density = tracker.parameter_density() if hasattr(tracker, "parameter_density") else 1.0
    return {
        "flops": flops,
        "flops_dense": dense,
        "flops_dense_structured": dense_struct,
        "influence_bytes": tracker.num_stored() * Bq * itemsize,
        "density": density,
    }


def _capacities(units: int, capacity: float | Sequence[float]) -> tuple:
    fr = (capacity,) if isinstance(capacity, (int, float, np.floating)) else tuple(capacity)
    caps = []
    for f in fr:
        if not 0 < float(f) <= 1:
            raise ValueError(f"capacity fractions must lie in (0, 1], got {f}")
        c = int(math.ceil(float(f) * units))
        if c < units:
            caps.append(c)
    return tuple(sorted(set(caps)))


def activity_sparse_tracker(
    cell: Any,
    params: PyTree,
    method: str = "rtrl",
    n: int | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    capacity: float | Sequence[float] = DEFAULT_CAPACITY,
    precision: Any = None,
) -> ActivitySparseTracker:
    """Exact RTRL (or dense-layout SnAp-n) that skips silent units; see module docstring.

    Args:
      cell, params, method, n, masks, precision: as :func:`snapjax.influence_tracker`;
        the method must use the dense layout (``"rtrl"``, or SnAp-n whose reach is all units).
      capacity: a fraction or a ladder of fractions of ``units``; each gives a static sparse
        branch of ``ceil(f·units)`` columns.  More active units than the largest capacity ⇒
        dense fallback (always exact).

    Raises:
      ValueError: as :func:`snapjax.influence_tracker`, or if the method's layout is not dense.
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
    return ActivitySparseTracker(**fields, capacities=_capacities(spec.units, capacity), state_pairs=pairs)
