"""Static SnAp-n sparsity patterns and compressed parameter layouts (NumPy, built once).

Recurrent graph: an edge ``v → u`` exists when some recurrent kernel ``W_p[v, u]`` is not
masked out (flax layout: row ``v`` reads ``h_v``, column ``u`` writes unit ``u``), i.e. when
``D[u, v]`` can be nonzero.  A parameter in column ``i`` (it writes only unit ``i`` in one
step) can influence, within ``n`` steps, the units reachable from ``i`` in at most ``n - 1``
edges.  These are stored as a padded neighbour table ``nbr[i, slot]`` with ``i`` itself in
slot 0 and ``valid[i, slot]`` marking real entries; ``K = max_i |reach_n(i)|``.

Component level: for cells with several state components per unit (LSTM's ``(c, h)``) the
exact SnAp-n pattern can be finer than whole units (e.g. the output-gate parameters do not
reach ``c_i`` in one step).  :func:`component_patterns` computes the exact boolean
``M_n`` by iterating ``M_{j+1} = M_j ∪ pattern(D) M_j`` from ``M_1 = pattern(I)``, using the
structural zero pattern of the unit-wise derivatives (probed at random points).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells import CellSpec

__all__ = ["NeighbourTable", "KernelLayout", "neighbour_table", "kernel_layout", "recurrent_adjacency"]


class NeighbourTable(NamedTuple):
    """``nbr (units, K)`` int32 (slot 0 = the unit itself) and ``valid (units, K)`` bool."""

    nbr: np.ndarray
    valid: np.ndarray

    @property
    def width(self) -> int:
        return int(self.nbr.shape[1])

    @property
    def count(self) -> int:
        """Number of real (unpadded) entries, Σ_i |reach_n(i)|."""
        return int(self.valid.sum())


class KernelLayout(NamedTuple):
    """Compressed storage of a masked kernel ``(n_in, units)``.

    ``rows[r, i]`` is the r-th unmasked input row of column ``i`` (``valid[r, i]`` False on
    padding).  A kernel without a mask has ``rows = None`` and ``R = n_in`` (identity).
    """

    rows: np.ndarray | None
    valid: np.ndarray | None
    n_in: int

    @property
    def num_rows(self) -> int:
        return self.n_in if self.rows is None else int(self.rows.shape[0])


def kernel_layout(mask: np.ndarray | None, n_in: int) -> KernelLayout:
    """Per-column list of the unmasked rows of ``mask`` (padded to the longest column)."""
    if mask is None:
        return KernelLayout(None, None, n_in)
    mask = np.asarray(mask) != 0
    counts = mask.sum(axis=0)
    width = max(int(counts.max()), 1)
    rows = np.zeros((width, mask.shape[1]), np.int32)
    valid = np.zeros((width, mask.shape[1]), bool)
    for i in range(mask.shape[1]):
        idx = np.flatnonzero(mask[:, i])
        rows[: len(idx), i] = idx
        valid[: len(idx), i] = True
    return KernelLayout(rows, valid, n_in)


def recurrent_adjacency(spec: CellSpec, masks: Mapping[str, Any] | None) -> np.ndarray:
    """Boolean ``(units, units)``: ``adj[v, u]`` when unit ``v`` feeds unit ``u`` in one step."""
    adj = np.zeros((spec.units, spec.units), bool)
    for p in spec.projections:
        if p.source != "state":
            continue
        m = None if masks is None else masks.get(p.name)
        adj |= np.ones_like(adj) if m is None else (np.asarray(m) != 0)
    return adj


def neighbour_table(spec: CellSpec, masks: Mapping[str, Any] | None, n: int) -> NeighbourTable:
    """Units reachable from each unit in at most ``n - 1`` steps (padded table, self first)."""
    if n < 1:
        raise ValueError(f"SnAp-n needs n >= 1, got n={n}")
    adj = recurrent_adjacency(spec, masks)
    reach = np.eye(spec.units, dtype=bool)  # reach[i, u]: u reachable from i
    for _ in range(n - 1):
        new = reach | ((reach.astype(np.float32) @ adj.astype(np.float32)) > 0)
        if (new == reach).all():
            break
        reach = new
    counts = reach.sum(axis=1)
    width = int(counts.max())
    nbr = np.zeros((spec.units, width), np.int32)
    valid = np.zeros((spec.units, width), bool)
    for i in range(spec.units):
        others = np.flatnonzero(reach[i] & (np.arange(spec.units) != i))
        idx = np.concatenate([[i], others]).astype(np.int32)
        nbr[i, : len(idx)] = idx
        nbr[i, len(idx) :] = i
        valid[i, : len(idx)] = True
    return NeighbourTable(nbr, valid)


@functools.lru_cache(maxsize=64)
def derivative_patterns(spec: CellSpec, probes: int = 64, seed: int = 0):
    """Structural nonzero pattern of φ's derivatives, OR-ed over random probe points.

    φ acts unit by unit, so it is probed on single units at ``probes`` random points (one
    jitted, vmapped ``jax.jacfwd``; concrete even when called inside a trace).

    Returns ``(pre (m, P), unit (m, Q), state (m, m))`` boolean arrays.
    """
    names = [p.name for p in spec.projections]

    def phi1(a, u, s):  # a (P,), u (Q,), s (m,) -> (m,)
        pre = {n: a[j][None] for j, n in enumerate(names)}
        unit = {q: u[j][None] for j, q in enumerate(spec.unit_params)}
        return spec.phi(pre, unit, s[None])[0]

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(probes, len(names))) * 2.0
    u = rng.normal(size=(probes, len(spec.unit_params)))
    s = rng.normal(size=(probes, spec.state_dim)) * 2.0
    with jax.ensure_compile_time_eval():
        jac = jax.jit(jax.vmap(jax.jacfwd(phi1, argnums=(0, 1, 2))))
        d_pre, d_unit, d_state = (np.asarray(d) for d in jac(a, u, s))
    return (d_pre != 0).any(axis=0), (d_unit != 0).any(axis=0), (d_state != 0).any(axis=0)


def component_patterns(
    spec: CellSpec, masks: Mapping[str, Any] | None, table: NeighbourTable, n: int, dense: bool
) -> dict[str, np.ndarray] | None:
    """Exact SnAp-n pattern per parameter group on the stored slots.

    Returns ``{group: bool array}`` with shape ``(units, K, m)`` (table layout) or
    ``(units, units, m)`` (``dense=True``, natural unit order), where the group is a
    projection name or a unit-parameter name; ``None`` if every stored entry is in the pattern
    (no masking needed).
    """
    pre_pat, unit_pat, state_pat = derivative_patterns(spec)
    m, units = spec.state_dim, spec.units
    # pattern(D)[(u,a),(v,c)] as a (units*m, units*m) boolean matrix: h_v reaches
    # component a of unit u through projection p when W_p[v,u] is unmasked and φ_a reads a_p.
    dpat = np.zeros((units, m, units, m), bool)
    for j, p in enumerate(spec.projections):
        if p.source != "state":
            continue
        mask = None if masks is None else masks.get(p.name)
        adj_p = np.ones((units, units), bool) if mask is None else (np.asarray(mask) != 0)
        dpat[:, :, :, spec.readout] |= adj_p.T[:, None, :] & pre_pat[None, :, j, None]
    for u in range(units):
        dpat[u, :, u, :] |= state_pat
    dflat = dpat.reshape(units * m, units * m).astype(np.float32)
    groups = {p.name: pre_pat[:, j] for j, p in enumerate(spec.projections)}
    groups.update({q: unit_pat[:, j] for j, q in enumerate(spec.unit_params)})
    out = {}
    all_full = True
    for g, ipat in groups.items():
        # M[i, (u, a)] for a parameter in column i.
        M = np.zeros((units, units, m), bool)
        M[np.arange(units), np.arange(units), :] = ipat[None, :]
        M = M.reshape(units, units * m)
        for _ in range(n - 1):
            new = M | ((M.astype(np.float32) @ dflat.T) > 0)
            if (new == M).all():
                break
            M = new
        M = M.reshape(units, units, m)
        if not dense:
            M = np.take_along_axis(M, table.nbr[:, :, None], axis=1) & table.valid[:, :, None]
        all_full &= bool(M.all()) if dense else bool((M == table.valid[:, :, None]).all())
        out[g] = M
    return None if all_full else out
