"""Activity-sparse exact RTRL: propagation cost that falls with the fraction of active units.

Setting.  Exact RTRL keeps, per parameter ``θ`` (in column ``i``, ``L`` rows per column) and
per example, the influence ``J[θ, (u, a)] = ds_{u,a}/dθ`` and updates ``J_t = D_t J_{t-1} + I_t``
with (``r`` = read-out component, the one the recurrent projections read; see
:mod:`snapjax.engine.jacobians`)

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
``2·M·(U m)²`` for the library's dense RTRL (:func:`snapjax.methods.activity_cost.step_cost`).
Memory: ``other`` + ``readout`` are exactly dense RTRL's floats; ``scratch`` adds
``U_pad·(1+q)·M`` per example (``q`` = other components the read-out reads within its unit;
EGRU: 1), so the method state is 2× dense RTRL's for EGRU.  The saving is compute and memory
traffic, not storage.

Parameter sparsity (``masks``) composes: kernels are stored compressed
(:func:`snapjax.engine.patterns.kernel_layout`), shrinking ``M``; the savings multiply.  SnAp-n whose
pattern uses the dense layout is supported (the pattern is applied to both parts).

Interface.  :class:`ActivitySparseRTRL` is an :class:`snapjax.OnlineMethod` (build it with
``snapjax.online_method("activity", cell, params, block=...)``): ``step`` takes and returns
the flax carry and reports the statistics above in ``aux``; the dense-layout configuration
(spec, masks, compressed kernels, SnAp pattern, precision) is an
:class:`snapjax.engine.influence.InfluenceTracker` held as the field ``tracker``, to which storage
shapes, immediate Jacobians, decompression and ``to_dense`` are delegated.  Example::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> cell = sj.EGRUCell(8)
    >>> params = cell.init(jax.random.key(0), cell.initialize_carry(None, (2, 3)), jnp.zeros((2, 3)))["params"]
    >>> method = sj.online_method("activity", cell, params, block=4)
    >>> carry, state = method.init_carry(2), method.init(2)
    >>> carry, state, aux = method.step(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = method.gradient(params, state, jax.tree.map(jnp.ones_like, carry))
    >>> sorted(aux), float(aux["alpha"])
    (['alpha', 'alpha_next', 'blocks', 'capacity', 'max_active'], 0.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.engine.influence import InfluenceTracker, influence_tracker
from snapjax.engine.patterns import derivative_patterns
from snapjax.engine.verify import verify_spec
from snapjax.methods.activity_kernel import ActivityInfluence, propagate
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["ActivityInfluence", "ActivitySparseRTRL", "activity_method"]


_is_shape = lambda t: isinstance(t, tuple)  # noqa: E731


@dataclasses.dataclass(frozen=True, eq=False)
class ActivitySparseRTRL(OnlineMethod):
    """Exact RTRL (or dense-layout SnAp-n) whose step skips silent units exactly.

    Build with ``snapjax.online_method("activity", ...)`` (or :func:`activity_method`).  The
    state is an :class:`ActivityInfluence`; ``step``'s ``aux`` holds the per-step statistics
    ``alpha`` (mean over the batch of the fraction of units whose read-out influence
    ``J_{t-1}[·, u, r]`` may be nonzero: the columns that enter the product), ``alpha_next``
    (the same for ``J_t``), ``max_active`` (most such units in one example, over both),
    ``blocks`` (blocks of ``block`` columns computed) and ``capacity`` (columns of the main
    product per example, ``max(blocks, 1)·block``), all scalars.

    Attributes:
      cell: the cell (its ``spec`` is ``tracker.spec``).
      tracker: the dense-layout :class:`snapjax.engine.influence.InfluenceTracker` (exact RTRL, or
        SnAp-n with a full neighbour table): spec, masks, compressed kernels, pattern, precision.
      block: granularity of the active set: the read-out rows are processed ``block`` at a time
        and the main product uses ``K = block·ceil(n/block)`` columns (``n`` = most active units
        in the batch).
      state_pairs: static ``(a, c)`` pairs where ``∂φ_a/∂s_c`` can be nonzero (within-unit term).
      name: ``"activity"`` (RTRL) or ``"activity-snapN"``.

    Example (the module docstring runs a step; storage is dense RTRL's plus an equal-sized
    work buffer for EGRU)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell = sj.EGRUCell(8)
        >>> params = cell.init(jax.random.key(0), cell.initialize_carry(None, (2, 3)), jnp.zeros((2, 3)))["params"]
        >>> method = sj.online_method("activity", cell, params, block=4)
        >>> isinstance(method, sj.ActivitySparseRTRL), method.name, method.block
        (True, 'activity', 4)
        >>> sj.online_method("activity", cell, params, block=0.25).block    # ceil(0.25 · 8) units
        2
        >>> method.num_stored() == 2 * sj.online_method("rtrl", cell, params).num_stored()
        True
    """

    cell: Recurrent
    tracker: InfluenceTracker
    block: int
    state_pairs: tuple
    name: str = "activity"

    # ---------------------------------------------------------------- storage
    @property
    def _other_comps(self) -> list[int]:
        spec = self.tracker.spec
        return [a for a in range(spec.state_dim) if a != spec.readout]

    @property
    def _readout_from_other(self) -> list[int]:
        """Components ``c ≠ r`` that the read-out reads within its unit (``∂φ_r/∂s_c ≠ 0``)."""
        r = self.tracker.spec.readout
        return sorted({c for a, c in self.state_pairs if a == r and c != r})

    @property
    def _padded_units(self) -> int:
        return -(-self.tracker.spec.units // self.block) * self.block

    def _split_shapes(self, batch_size: int) -> tuple[dict, dict, dict]:
        md = self.tracker.spec.state_dim - 1
        full = self.tracker.leaf_shapes(batch_size)
        rows = lambda s: math.prod(s[1:-2])  # noqa: E731  M = L·U(i) stored parameter entries
        other = jax.tree.map(lambda s: (s[0], s[-2] * md, rows(s)), full, is_leaf=_is_shape)
        readout = jax.tree.map(lambda s: (s[0], s[-2], rows(s)), full, is_leaf=_is_shape)
        n_scratch = self._padded_units * (1 + len(self._readout_from_other))
        scratch = jax.tree.map(lambda s: (s[0], n_scratch, rows(s)), full, is_leaf=_is_shape)
        return other, readout, scratch

    def _param_shapes(self) -> dict:
        """Compressed parameter shape ``(*lead, U(i))`` per leaf."""
        return jax.tree.map(lambda s: s[1:-2], self.tracker.leaf_shapes(1), is_leaf=_is_shape)

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ActivityInfluence:
        """Zero influence (all units inactive) for ``batch_size`` examples; ``key`` is unused."""
        del key  # deterministic
        batch = check_batch_size(batch_size)
        self.tracker._check_init_args(batch, dtype)
        other, readout, scratch = self._split_shapes(batch)
        zeros = lambda s: jnp.zeros(s, dtype)  # noqa: E731
        return ActivityInfluence(
            jax.tree.map(zeros, other, is_leaf=_is_shape),
            jax.tree.map(zeros, readout, is_leaf=_is_shape),
            jax.tree.map(zeros, scratch, is_leaf=_is_shape),
            jnp.zeros((batch, self.tracker.spec.units), bool),
        )

    def batch_axes(self) -> ActivityInfluence:
        return ActivityInfluence(other=0, readout=0, scratch=0, active=0)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """Floats of method state per example: the influence (= dense RTRL's, ``tracker.num_stored()``)
        plus the work buffer ``scratch``."""
        scratch = jax.tree.leaves(self._split_shapes(1)[2], is_leaf=_is_shape)
        return self.tracker.num_stored() + int(sum(math.prod(s) for s in scratch))

    # ------------------------------------------------------------- validation
    def _check_state(self, state: Any, batch: int) -> None:
        if not isinstance(state, ActivityInfluence):
            raise ValueError(f"state must come from {self.name!r} method's init (an ActivityInfluence), "
                             f"got {type(state).__name__}")
        want = self._split_shapes(batch)
        got = tuple(jax.tree.map(jnp.shape, t) for t in (state.other, state.readout, state.scratch))
        units = self.tracker.spec.units
        if got != want or jnp.shape(state.active) != (batch, units):
            raise ValueError(
                f"influence does not match this method for batch {batch}: expected (other, readout, "
                f"scratch) shapes {want} and active ({batch}, {units}); got {got} and {jnp.shape(state.active)}"
            )

    def _check_carry(self, carry: PyTree, batch: int, what: str) -> None:
        want = [a.shape for a in jax.tree.leaves(jax.eval_shape(functools.partial(self.cell.init_carry, batch)))]
        leaves = jax.tree.leaves(carry)
        got = [jnp.shape(a) for a in leaves]
        if got != want:
            raise ValueError(f"{what} must be the flax carry of {self.cell.name} for batch {batch}: expected "
                             f"array shapes {want}, got {got}")
        for a in leaves:
            if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
                raise ValueError(f"{what} must be floating point, got {jnp.result_type(a)}")

    # ------------------------------------------------------------------- step
    def step(self, params: PyTree, carry: PyTree, state: ActivityInfluence, x: Array) -> StepResult:
        """One exact RTRL step ``(carry_t, J_t, aux)``; see the class and module docstrings (the
        kernel is :func:`snapjax.methods.activity_kernel.propagate`).

        Args:
          params: cell parameters.  carry: flax carry ``s_{t-1}``.  state: ``J_{t-1}``.
          x: ``(B, n_in)``.
        """
        n_in = self.tracker.n_in
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != n_in:
            raise ValueError(f"x must have shape (B, {n_in}), got {jnp.shape(x)}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"x must be floating point, got {jnp.result_type(x)}")
        batch = jnp.shape(x)[0]
        self._check_carry(carry, batch, "carry")
        self._check_state(state, batch)
        spec = self.tracker.spec
        s, new_state, stats = propagate(self, params, spec.to_internal(carry), state, x)
        return StepResult(spec.from_internal(s), new_state, stats)

    def gradient(
        self, params: PyTree, state: ActivityInfluence, dloss_dcarry: PyTree
    ) -> tuple[PyTree, ActivityInfluence]:
        """Online gradient ``Σ_b (∂L/∂s_t)[b] J_t[b]`` in the parameters' shapes, and ``state``
        unchanged; ``dloss_dcarry`` in the flax carry layout."""
        del params
        batch = jnp.shape(state.active)[0] if isinstance(state, ActivityInfluence) else 0
        self._check_state(state, batch)
        self._check_carry(dloss_dcarry, batch, "dloss_dcarry")
        tr = self.tracker
        spec, m, prec = tr.spec, tr.spec.state_dim, tr.precision
        dloss_dstate = spec.to_internal(dloss_dcarry)  # (B, U, m)
        dl_other = dloss_dstate[..., self._other_comps]  # (B, U, m-1)
        dl_r = dloss_dstate[..., spec.readout]  # (B, U)

        def contract(Jo, Jr, pshape):
            g = jnp.einsum("bu,bum->m", dl_r.astype(Jr.dtype), Jr, precision=prec)
            if m > 1:
                dl_o = dl_other.reshape(batch, spec.units * (m - 1)).astype(Jo.dtype)
                g = g + jnp.einsum("bn,bnm->m", dl_o, Jo, precision=prec)
            return g.reshape(pshape)

        grads = jax.tree.map(contract, state.other, state.readout, self._param_shapes(), is_leaf=_is_shape)
        return tr.decompress(grads), state

    def to_dense(self, state: ActivityInfluence) -> PyTree:
        """The influence as dense ``(B, *param_shape, units, m)`` per leaf (tests, plots)."""
        spec = self.tracker.spec
        r, comps, U = spec.readout, self._other_comps, spec.units

        def assemble(Jo, Jr, pshape):
            batch = Jo.shape[0]
            Jr = jnp.moveaxis(Jr, 1, -1).reshape((batch,) + pshape + (U,))  # (B, *lead, U(i), U(u))
            Jo = jnp.moveaxis(Jo.reshape((batch, U, len(comps)) + pshape), (1, 2), (-2, -1))
            parts = [None] * spec.state_dim
            for k, a in enumerate(comps):
                parts[a] = Jo[..., k]
            parts[r] = Jr
            return jnp.stack(parts, axis=-1)

        full = jax.tree.map(assemble, state.other, state.readout, self._param_shapes(), is_leaf=_is_shape)
        return self.tracker.to_dense(full)

    # ------------------------------------------------------------- accounting
    def parameter_density(self) -> float:
        """Unmasked parameters / dense parameter count."""
        tr = self.tracker
        spec = tr.spec
        dense = kept = 0
        for p in spec.projections:
            n_in = tr.kernels[p.name].n_in
            dense += n_in * spec.units
            mk = tr.masks.get(p.name)
            kept += n_in * spec.units if mk is None else int(np.asarray(mk).sum())
            if p.use_bias:
                dense += spec.units
                kept += spec.units
        dense += len(spec.unit_params) * spec.units
        kept += len(spec.unit_params) * spec.units
        return kept / dense


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


DEFAULT_BLOCK = 0.125


def activity_method(
    cell: Any,
    params: PyTree,
    *,
    masks: Mapping[str, Any] | None = None,
    block: int | float | None = None,
    precision: Any = None,
    n: int | None = None,
) -> ActivitySparseRTRL:
    """Exact RTRL (``n=None``) or dense-layout SnAp-n that skips silent units; see the module
    docstring.  ``snapjax.online_method("activity", ...)`` calls this.

    Args:
      cell: a :class:`snapjax.Recurrent` with a compressed form (or anything
        :func:`snapjax.cells.recurrent.as_recurrent` turns into one).
      params: the cell's parameters (only shapes and dtypes are read).
      masks, precision: as :func:`snapjax.online_method`.
      block: active units are processed in blocks of this many (an int) or of
        ``ceil(block·units)`` (a float in (0, 1]); ``None``: ``DEFAULT_BLOCK`` (1/8 of the
        units).  The per-step cost grows with ``ceil(active/block)``, and the number of
        compiled product sizes with ``ceil(units/block)``.  Any number of active units is
        handled exactly.
      n: SnAp order; the method must then use the dense layout (a neighbour table that is
        full, or more than half full — SnAp-1 never is).

    Raises:
      ValueError: a cell without a compressed form, as :func:`snapjax.online_method` for
        ``masks``/``params``, a bad ``block``, or a SnAp-n whose layout is not dense.
    """
    rec = as_recurrent(cell)
    if rec.spec is None:
        raise ValueError(f"{rec.name}: activity-sparse RTRL needs a cell with a compressed form (CellSpec)")
    spec = rec.spec
    kind = "rtrl" if n is None else "snap"
    base = influence_tracker(spec, params, kind, n, masks=masks, precision=precision)
    if base.layout != "dense":
        raise ValueError(
            f"activity-sparse propagation needs the dense influence layout (exact RTRL); SnAp-{n} "
            f"uses the {base.layout!r} layout here — use snapjax.online_method('snap{n}', ...) for it"
        )
    _, _, state_pat = derivative_patterns(spec, probes=32)
    pairs = tuple((int(a), int(c)) for a, c in zip(*np.nonzero(state_pat)))
    size = _block_size(spec.units, DEFAULT_BLOCK if block is None else block)
    return ActivitySparseRTRL(rec, base, size, pairs, "activity" if n is None else f"activity-snap{n}")


def _build(cell: Any, params: PyTree, *, masks: Any = None, block: int | float | None = None,
           precision: Any = None, verify: bool = True) -> ActivitySparseRTRL:
    if cell.spec is None:
        raise ValueError(f"{cell.name}: 'activity' needs a cell with a compressed form (CellSpec)")
    if verify:
        verify_spec(cell.spec, params, masks)
    return activity_method(cell, params, masks=masks, block=block, precision=precision)


register_method("activity", _build, options=("masks", "block", "precision", "verify"), aliases=("activity_rtrl",),
                summary="exact RTRL that skips silent units (activity-sparse cells such as EGRU)")
