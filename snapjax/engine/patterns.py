"""Static SnAp-n sparsity patterns and compressed parameter layouts (NumPy, built once).

Structural zeros.  A pre-activation ``a_{p,u} = v_p (W_p ⊙ M_p)[:, u] + b_p[u]`` is
identically zero when column ``u`` of the mask ``M_p`` is fully masked and ``p`` has no bias
(for input and recurrent projections alike).  Every product with it then vanishes too (GRU:
``r ⊙ a_hn``; EGRU: ``r ⊙ a_hz``), so the reset-gate derivative ``∂φ_u/∂a_{hr,u}`` is 0 at
every point.  The unit-wise derivatives are therefore probed per unit with those
pre-activations held at exactly 0 (:func:`unit_derivative_patterns`), and every pattern below
is built from where ``D`` and ``I`` can actually be nonzero, not from where a kernel entry is
unmasked.

Recurrent graph: an edge ``v → u`` exists when ``D[u, v]`` can be nonzero, i.e. when some
recurrent kernel ``W_p[v, u]`` is unmasked (flax layout: row ``v`` reads ``h_v``, column ``u``
writes unit ``u``) *and* ``∂φ_u/∂a_{p,u}`` is not structurally zero.  A parameter in column
``i`` (it writes only unit ``i`` in one step) can influence, within ``n`` steps, the units
reachable from ``i`` in at most ``n - 1`` edges.  These are stored as a padded neighbour table
``nbr[i, slot]`` with ``i`` itself in slot 0 and ``valid[i, slot]`` marking real entries;
``K = max_i |reach_n(i)|``.

Component level: the exact SnAp-n pattern can be finer than whole units (LSTM's ``(c, h)``:
the output-gate parameters do not reach ``c_i`` in one step; a dead reset-gate column reaches
nothing).  :func:`component_patterns` computes the exact boolean ``M_n`` per parameter group
by iterating ``M_{j+1} = M_j ∪ pattern(D) M_j`` from ``M_1 = pattern(I)``, using the
structural zero pattern of the unit-wise derivatives.

Example::

    >>> import numpy as np, snapjax as sj
    >>> from snapjax.engine.patterns import recurrent_adjacency, zero_preactivations
    >>> spec = sj.gru_spec(3)
    >>> masks = {"hn": np.ones((3, 3), bool)}
    >>> bool(zero_preactivations(spec, masks).any())   # hn has a bias: never identically 0
    False
    >>> bool(recurrent_adjacency(spec, masks).all())
    True
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from snapjax.cells.spec import CellSpec

__all__ = [
    "NeighbourTable",
    "KernelLayout",
    "neighbour_table",
    "kernel_layout",
    "recurrent_adjacency",
    "zero_preactivations",
    "derivative_patterns",
    "unit_derivative_patterns",
    "component_patterns",
    "check_masks",
    "DENSE_FRACTION",
    "stores_dense",
]

#: A SnAp-n pattern whose widest column reaches more than this fraction of the state is stored
#: densely (RTRL's kernel, masked to the pattern); below it, gathered per column.
DENSE_FRACTION = 0.5


class NeighbourTable(NamedTuple):
    """``nbr (units, K)`` int32 (slot 0 = the unit itself) and ``valid (units, K)`` bool."""

    nbr: np.ndarray
    valid: np.ndarray

    @property
    def width(self) -> int:
        return int(self.nbr.shape[1])

    @property
    def count(self) -> int:  # type: ignore[override]  # shadows tuple.count on purpose
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


def zero_preactivations(spec: CellSpec, masks: Mapping[str, Any] | None) -> np.ndarray:
    """Boolean ``(units, P)``: ``z[u, j]`` when ``a_{p_j, u}`` is identically zero.

    That is the case when projection ``p_j`` has no bias and column ``u`` of its mask is fully
    masked (``v_p (W_p ⊙ M_p)[:, u] = 0`` for every input); ``P`` follows ``spec.projections``.
    """
    z = np.zeros((spec.units, len(spec.projections)), bool)
    for j, p in enumerate(spec.projections):
        m = None if masks is None else masks.get(p.name)
        if p.use_bias or m is None:
            continue
        z[:, j] = ~(np.asarray(m) != 0).any(axis=0)
    return z


def recurrent_adjacency(spec: CellSpec, masks: Mapping[str, Any] | None) -> np.ndarray:
    """Boolean ``(units, units)``: ``adj[v, u]`` when unit ``v`` feeds unit ``u`` in one step.

    ``adj[v, u] = ∨_{p recurrent} M_p[v, u] ∧ (∂φ_u/∂a_{p,u} not structurally 0)``, i.e. exactly
    where ``D[u, v]`` can be nonzero (see the module docstring).
    """
    pre_pat = unit_derivative_patterns(spec, masks)[0]  # (units, m, P)
    adj = np.zeros((spec.units, spec.units), bool)
    for j, p in enumerate(spec.projections):
        if p.source != "state":
            continue
        m = None if masks is None else masks.get(p.name)
        unmasked = np.ones_like(adj) if m is None else (np.asarray(m) != 0)
        adj |= unmasked & pre_pat[:, :, j].any(axis=1)[None, :]
    return adj


def stores_dense(width: int, size: int) -> bool:
    """Whether a SnAp-n pattern reaching at most ``width`` of ``size`` state entries per
    parameter is stored densely, as RTRL's ``(size, p)`` influence masked to the pattern,
    rather than gathered (``width`` slots per parameter): ``width > DENSE_FRACTION · size``.

    The gathered update costs ``O(width²)`` per parameter in gathers and small batched
    products, the dense one ``O(size²)`` in one batched matmul, several times faster per FLOP;
    on a 2-core CPU (GRU, k = 64 and 128) the two cross near ``width ≈ 0.46 · size``
    (``benchmarks/snap_vs_rtrl.py``).  Decided once, when the method is built; both give the
    same values.

    Example::

        >>> from snapjax.engine.patterns import stores_dense
        >>> stores_dense(5, 10), stores_dense(6, 10), stores_dense(1, 64)
        (False, True, False)
    """
    return int(width) > DENSE_FRACTION * int(size)


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
def _phi_jacobian(spec: CellSpec):
    """Jitted, vmapped ``jax.jacfwd`` of φ on a single unit: ``(a (N, P), u (N, Q), s (N, m))
    -> (∂φ/∂a (N, m, P), ∂φ/∂θᵘ (N, m, Q), ∂φ/∂s (N, m, m))`` (compiled once per spec)."""
    names = [p.name for p in spec.projections]

    def phi1(a, u, s):  # a (P,), u (Q,), s (m,) -> (m,)
        pre = {n: a[j][None] for j, n in enumerate(names)}
        unit = {q: u[j][None] for j, q in enumerate(spec.unit_params)}
        return spec.phi(pre, unit, s[None])[0]

    return jax.jit(jax.vmap(jax.jacfwd(phi1, argnums=(0, 1, 2))))


@functools.lru_cache(maxsize=256)
def derivative_patterns(spec: CellSpec, probes: int = 64, seed: int = 0, zero: tuple[str, ...] = ()):
    """Structural nonzero pattern of φ's derivatives, OR-ed over random probe points.

    φ acts unit by unit, so it is probed on single units at ``probes`` random points (one
    jitted, vmapped ``jax.jacfwd``; concrete even when called inside a trace).  The
    pre-activations of the projections named in ``zero`` are held at exactly 0 at every probe
    point (they are identically zero for the unit, see :func:`zero_preactivations`), so a
    product with them gives a structurally zero derivative.

    Returns ``(pre (m, P), unit (m, Q), state (m, m))`` boolean arrays.
    """
    names = [p.name for p in spec.projections]
    unknown = sorted(set(zero) - set(names))
    if unknown:
        raise ValueError(f"zero names unknown projections {unknown}; projections are {names}")
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(probes, len(names))) * 2.0
    a[:, [j for j, n in enumerate(names) if n in zero]] = 0.0
    u = rng.normal(size=(probes, len(spec.unit_params)))
    s = rng.normal(size=(probes, spec.state_dim)) * 2.0
    with jax.ensure_compile_time_eval():
        d_pre, d_unit, d_state = (np.asarray(d) for d in _phi_jacobian(spec)(a, u, s))
    return (d_pre != 0).any(axis=0), (d_unit != 0).any(axis=0), (d_state != 0).any(axis=0)


def unit_derivative_patterns(spec: CellSpec, masks: Mapping[str, Any] | None):
    """Per-unit structural patterns of φ's derivatives, given the masks.

    Unit ``u`` is probed with the pre-activations that are identically zero for it
    (:func:`zero_preactivations`) held at 0; units with the same set share one probe.

    Returns ``(pre (units, m, P), unit (units, m, Q), state (units, m, m))`` boolean arrays:
    ``pre[u, a, j]`` when ``∂φ_{u,a}/∂a_{p_j,u}`` can be nonzero, etc.
    """
    names = [p.name for p in spec.projections]
    zero = zero_preactivations(spec, masks)
    rows, inverse = np.unique(zero, axis=0, return_inverse=True)
    pats = [derivative_patterns(spec, zero=tuple(n for n, z in zip(names, row) if z)) for row in rows]
    inverse = np.asarray(inverse).reshape(-1)
    return tuple(np.stack([pats[r][k] for r in inverse]) for k in range(3))


def component_patterns(
    spec: CellSpec, masks: Mapping[str, Any] | None, table: NeighbourTable, n: int, dense: bool
) -> dict[str, np.ndarray] | None:
    """Exact SnAp-n pattern per parameter group on the stored slots.

    Returns ``{group: bool array}`` with shape ``(units, K, m)`` (table layout) or
    ``(units, units, m)`` (``dense=True``, natural unit order), where the group is a
    projection name or a unit-parameter name; ``None`` if every stored entry is in the pattern
    (no masking needed).
    """
    pre_pat, unit_pat, state_pat = unit_derivative_patterns(spec, masks)  # (U, m, ·)
    m, units = spec.state_dim, spec.units
    # pattern(D)[(u,a),(v,c)] as a (units*m, units*m) boolean matrix: h_v reaches component a
    # of unit u through projection p when W_p[v,u] is unmasked and ∂φ_{u,a}/∂a_{p,u} is not
    # structurally zero (per unit: it is when a multiplying pre-activation is identically 0).
    dpat = np.zeros((units, m, units, m), bool)
    for j, p in enumerate(spec.projections):
        if p.source != "state":
            continue
        mask = None if masks is None else masks.get(p.name)
        adj_p = np.ones((units, units), bool) if mask is None else (np.asarray(mask) != 0)
        dpat[:, :, :, spec.readout] |= adj_p.T[:, None, :] & pre_pat[:, :, j, None]
    for u in range(units):
        dpat[u, :, u, :] |= state_pat[u]
    dflat = dpat.reshape(units * m, units * m).astype(np.float32)
    # pattern(I) per group and column i: (units, m); a kernel entry W_p[r, i] has the pattern
    # of ∂φ_i/∂a_{p,i} (times v_p[r], which is not structurally zero).
    groups = {p.name: pre_pat[:, :, j] for j, p in enumerate(spec.projections)}
    groups.update({q: unit_pat[:, :, j] for j, q in enumerate(spec.unit_params)})
    out = {}
    all_full = True
    for g, ipat in groups.items():
        # M[i, (u, a)] for a parameter in column i.
        M: np.ndarray = np.zeros((units, units, m), bool)
        M[np.arange(units), np.arange(units), :] = ipat
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


def check_masks(spec: CellSpec, params: Any, masks: Mapping[str, Any] | None) -> dict:
    """Per projection name, the mask as a bool array of its kernel's shape, or ``None``;
    ``ValueError`` for an unknown name, a traced value, a wrong shape or values other than 0/1."""
    out: dict[str, np.ndarray | None] = {p.name: None for p in spec.projections}
    if masks is None:
        return out
    if not isinstance(masks, Mapping):
        raise ValueError("masks must be a dict: projection name -> (n_in, units) 0/1 array")
    for name, m in masks.items():
        if name not in out:
            raise ValueError(f"mask for unknown projection {name!r}; projections are {sorted(out)}")
        if m is None:
            continue
        if isinstance(m, jax.core.Tracer):
            raise ValueError("masks must be static (NumPy) arrays, not traced values")
        m = np.asarray(m)
        if isinstance(m, Mapping) or m.dtype == object:
            raise ValueError(f"mask {name!r} must be an array of shape of the kernel")
        kshape = tuple(np.shape(params[name]["kernel"]))
        if m.shape != kshape:
            raise ValueError(f"mask {name!r} has shape {m.shape}, kernel has shape {kshape}")
        if not (m.dtype == bool or np.isin(m, (0, 1)).all()):
            raise ValueError(f"mask {name!r} must hold only 0/1 (or bool) values")
        out[name] = m.astype(bool)
    return out
