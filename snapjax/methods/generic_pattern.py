"""Pattern storage of generic SnAp-n: per parameter, only the state entries its pattern reaches.

Generic SnAp-n (:mod:`snapjax.methods.dense`) follows ``J_t = (D_t J_{t-1} + I_t) ⊙ M_n`` with
``J (B, k, p)`` per example.  Column ``j`` of ``J`` (parameter ``j``) is nonzero only on the
rows ``U_j = {u : M_n[u, j]}``, and since ``J_{t-1}[v, j] = 0`` for ``v ∉ U_j``,

    ``J_t[U_j, j] = D_t[U_j, U_j] J_{t-1}[U_j, j] + I_t[U_j, j]``,

so only ``|U_j|`` floats per parameter are needed (Menick et al., ICLR 2021, §3).  Columns are
grouped by width: a group of ``p_g`` columns of at most ``w_g`` rows stores ``J_g (B, w_g,
p_g)`` with a static row table ``rows (w_g, p_g)`` (padded slots repeat a real row and stay 0);
its update gathers the ``w_g × w_g`` blocks of ``D`` per column and is elementwise in ``p_g``
(``w_g = 1``, e.g. SnAp-1 on a unit-local cell: ``diag(D)[rows] ⊙ J_g + I_g``).  Widths are
bucketed to powers of two (at most 2x padding, ``⌈log₂ k⌉ + 1`` groups).  Columns wider than
:func:`snapjax.engine.patterns.stores_dense` allows are stored at full width ``k`` (one
batched matmul with ``D``, masked), and parameters the masks remove (``U_j = ∅``) are not
stored at all.  The gradient is ``g[j] = Σ_b Σ_s c_b[rows[s, j]] J_g[b, s, j]``.

The values are those of the dense masked recursion (the same products, without the zeros).

Fewer Jacobian products.  When no column is stored densely, ``I`` is needed only on the stored
entries.  Given the structural pattern ``P_I`` of ``I`` (``I[u, j] = 0`` wherever ``P_I[u, j]``
is False), rows that share no column of ``P_I`` get one colour (greedy colouring, Curtis,
Powell & Reid 1974 on rows), and one vector-Jacobian product per colour ``S``,
``V_S = Σ_{u∈S} I[u, :]``, gives ``I[u, j] = V_{colour(u)}[j]`` on ``P_I``: SnAp-1 of a cell
whose parameters each write one unit needs a single product for all of ``I`` instead of
``k`` (:attr:`PatternLayout.colors`; ``D`` still takes ``k`` products with respect to the
state only, ``O(k³)`` per example for a dense recurrence, without the ``O(k·p)`` of ``I``).

Example (SnAp-1 of a GRU with a layer-normalised candidate: the update gate's parameters and
the norm's reach only their own unit, stored once; the others reach every unit)::

    >>> import numpy as np
    >>> from snapjax.methods.generic_pattern import pattern_layout
    >>> pattern = np.zeros((4, 6), bool)
    >>> pattern[:, :2] = True                          # two parameters reach all 4 units
    >>> pattern[[0, 1, 2], [2, 3, 4]] = True           # three reach one unit each
    >>> layout = pattern_layout(pattern)               # the last parameter reaches nothing
    >>> [(len(g.cols), g.width) for g in layout.groups], layout.dense_cols.tolist(), layout.num_stored()
    ([(3, 1)], [0, 1], 11)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.engine.patterns import stores_dense

Array = jax.Array

__all__ = ["PatternGroup", "PatternLayout", "pattern_layout"]


class PatternGroup(NamedTuple):
    """Columns ``cols (p_g,)`` (indices into ``ravel_pytree(params)``) stored on the rows
    ``rows (w_g, p_g)`` of the state; ``valid (w_g, p_g)`` is False on padding."""

    cols: np.ndarray
    rows: np.ndarray
    valid: np.ndarray

    @property
    def width(self) -> int:
        return int(self.rows.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class PatternLayout:
    """Static storage of a ``(k, p)`` pattern: column groups and the densely stored columns.

    Attributes:
      k, p: state and parameter floats per example.
      dense_cols: ``(p_d,)`` columns stored at full width ``k``; ``dense_mask (k, p_d)`` their
        pattern (``None``: all ones).
      groups: the gathered column groups (:class:`PatternGroup`), narrowest first.
      colors: ``(k,)`` colour of each state row for the row-compressed ``I`` (``None``: ``I`` is
        taken whole, ``(B, k, p)``); ``ipatterns``: per group, ``P_I`` on its slots ``(w_g, p_g)``.
    """

    k: int
    p: int
    dense_cols: np.ndarray
    dense_mask: np.ndarray | None
    groups: tuple
    colors: np.ndarray | None = None
    ipatterns: tuple | None = None

    @property
    def num_colors(self) -> int:
        """Vector-Jacobian products for ``I`` per example: the colours, or ``k`` without them."""
        return self.k if self.colors is None else int(self.colors.max()) + 1

    def color_cotangents(self, dtype: Any) -> np.ndarray:
        """``(C, k)``: row ``c`` is the indicator of the state rows of colour ``c``."""
        assert self.colors is not None
        return (self.colors[None, :] == np.arange(self.num_colors)[:, None]).astype(dtype)

    def shapes(self, batch: int) -> tuple:
        """Shapes of the stored arrays: ``(B, k, p_d)`` (if any dense column), then ``(B, w_g, p_g)``."""
        dense = ((batch, self.k, len(self.dense_cols)),) if len(self.dense_cols) else ()
        return dense + tuple((batch, g.width, len(g.cols)) for g in self.groups)

    def num_stored(self) -> int:
        """Stored floats per example, padding included."""
        return int(sum(np.prod(s) for s in self.shapes(1)))

    def init(self, batch: int, dtype: Any) -> tuple:
        return tuple(jnp.zeros(s, dtype) for s in self.shapes(batch))

    def step(self, d_mat: Array, i_mat: Array, influence: tuple, precision: Any = None) -> tuple:
        """``(D J + I) ⊙ M`` on the stored entries, from ``D (B, k, k)`` and ``I (B, k, p)``, or
        with :attr:`colors` the colour sums ``V (B, C, p)`` in place of ``I``."""
        out, parts = [], list(influence)
        if len(self.dense_cols):
            J = parts.pop(0)
            Jn = jnp.einsum("buv,bvp->bup", d_mat.astype(J.dtype), J, precision=precision)
            Jn = Jn + i_mat[:, :, self.dense_cols].astype(J.dtype)
            if self.dense_mask is not None:
                Jn = jnp.where(self.dense_mask, Jn, jnp.zeros((), J.dtype))
            out.append(Jn)
        diag = jnp.diagonal(d_mat, axis1=1, axis2=2)  # (B, k)
        for gi, (g, J) in enumerate(zip(self.groups, parts)):
            if self.colors is None:
                ic = i_mat[:, g.rows, g.cols[None, :]].astype(J.dtype)  # (B, w, p_g)
            else:  # the colour sum of each slot's row, kept where I can be nonzero
                assert self.ipatterns is not None
                ic = i_mat[:, self.colors[g.rows], g.cols[None, :]].astype(J.dtype)
                if not self.ipatterns[gi].all():
                    ic = jnp.where(self.ipatterns[gi], ic, jnp.zeros((), J.dtype))
            if g.width == 1:
                Jn = diag[:, g.rows].astype(J.dtype) * J + ic
            else:  # Σ_r D[rows[s], rows[r]] J[r]: the w×w block of D per column
                dg = d_mat[:, g.rows[:, None, :], g.rows[None, :, :]].astype(J.dtype)  # (B, w, w, p_g)
                Jn = jnp.einsum("bsrp,brp->bsp", dg, J, precision=precision) + ic
            if not g.valid.all():
                Jn = jnp.where(g.valid, Jn, jnp.zeros((), J.dtype))
            out.append(Jn)
        return tuple(out)

    def gradient(self, c: Array, influence: tuple, precision: Any = None) -> Array:
        """``Σ_b c_b J_b`` as a ``(p,)`` vector (zero on unstored columns), ``c (B, k)``."""
        parts, pieces, cols = list(influence), [], []
        if len(self.dense_cols):
            J = parts.pop(0)
            pieces.append(jnp.einsum("bk,bkp->p", c.astype(J.dtype), J, precision=precision))
            cols.append(self.dense_cols)
        for g, J in zip(self.groups, parts):
            pieces.append(jnp.sum(c[:, g.rows].astype(J.dtype) * J, axis=(0, 1)))
            cols.append(g.cols)
        dtype = parts[-1].dtype if parts else influence[0].dtype
        flat = jnp.concatenate(pieces + [jnp.zeros((1,), dtype)])
        where = np.full(self.p, flat.shape[0] - 1)  # unstored columns read the trailing zero
        where[np.concatenate(cols)] = np.arange(flat.shape[0] - 1)
        return flat[where]

    def to_dense(self, influence: tuple) -> Array:
        """The stored entries scattered into ``(B, k, p)`` (tests, plots)."""
        parts = list(influence)
        first = parts[0]
        out = jnp.zeros((first.shape[0], self.k, self.p), first.dtype)
        if len(self.dense_cols):
            out = out.at[:, :, self.dense_cols].set(parts.pop(0))
        for g, J in zip(self.groups, parts):
            out = out.at[:, g.rows, g.cols[None, :]].add(jnp.where(g.valid, J, 0))
        return out


def _greedy_colors(conflict: np.ndarray) -> np.ndarray:
    """Colours of the rows of a symmetric bool conflict matrix, largest degree first."""
    k = conflict.shape[0]
    colors = np.full(k, -1, np.int64)
    for u in np.argsort(-conflict.sum(axis=1), kind="stable"):
        used = set(colors[conflict[u] & (colors >= 0)].tolist())
        colors[u] = next(c for c in range(k) if c not in used)
    return colors


def pattern_layout(pattern: np.ndarray, ipattern: np.ndarray | None = None) -> PatternLayout:
    """The storage of a static bool pattern ``(k, p)`` (see the module docstring).

    ``ipattern``: the structural pattern ``P_I (k, p)`` of ``I`` (``P_I ⊆ pattern``); when given
    and no column is stored densely, ``I`` is taken row-compressed (:attr:`PatternLayout.colors`)
    if that needs fewer than ``k`` products.

    Raises:
      ValueError: ``pattern`` (or ``ipattern``) is not a 2-D bool array of that shape, or
        ``ipattern`` is not inside ``pattern``.
    """
    pattern = np.asarray(pattern)
    if pattern.ndim != 2 or pattern.dtype != bool:
        raise ValueError(f"pattern must be a (k, p) bool array, got {pattern.dtype} of shape {pattern.shape}")
    k, p = pattern.shape
    widths = pattern.sum(axis=0)
    dense = np.array([stores_dense(w, k) for w in widths], bool) if p else np.zeros(0, bool)
    dense_cols = np.flatnonzero(dense)
    sub = pattern[:, dense_cols]
    dense_mask = None if sub.all() else sub
    buckets: dict[int, list[int]] = {}
    for j in np.flatnonzero(~dense & (widths > 0)):
        buckets.setdefault(1 << int(np.ceil(np.log2(widths[j]))), []).append(int(j))
    groups = []
    for _, cols in sorted(buckets.items()):
        cols_a = np.asarray(cols, np.int64)
        w = int(widths[cols_a].max())
        rows = np.zeros((w, len(cols_a)), np.int32)
        valid = np.zeros((w, len(cols_a)), bool)
        for c, j in enumerate(cols_a):
            idx = np.flatnonzero(pattern[:, j])
            rows[:, c] = idx[0]  # padding repeats a real row (its J stays 0)
            rows[: len(idx), c] = idx
            valid[: len(idx), c] = True
        groups.append(PatternGroup(cols_a, rows, valid))
    colors = ipats = None
    if ipattern is not None:
        ipattern = np.asarray(ipattern)
        if ipattern.shape != pattern.shape or ipattern.dtype != bool or (ipattern & ~pattern).any():
            raise ValueError(f"ipattern must be a bool array of shape {pattern.shape} inside pattern")
        if not len(dense_cols) and groups:
            sub = ipattern[:, np.concatenate([g.cols for g in groups])].astype(np.int64)
            cand = _greedy_colors((sub @ sub.T) > 0)
            if cand.max() + 1 < k:
                colors = cand
                ipats = tuple(ipattern[g.rows, g.cols[None, :]] & g.valid for g in groups)
    return PatternLayout(k=k, p=p, dense_cols=dense_cols, dense_mask=dense_mask, groups=tuple(groups),
                         colors=colors, ipatterns=ipats)
