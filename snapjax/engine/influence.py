"""The influence pytree and its propagation: exact RTRL and SnAp-n.

The influence ``J_t = ds_t/dθ`` obeys ``J_t = D_t J_{t-1} + I_t`` (``J_0 = 0``); SnAp-n
keeps only the entries of the n-step pattern ``M_n``: ``J_t = (D_t J_{t-1} + I_t) ⊙ M_n``.
The online gradient of a loss ``L_t(s_t)`` is ``g_t = (∂L_t/∂s_t) J_t``.

Storage: one influence leaf per parameter leaf (same dict structure as the parameters).
Every parameter entry belongs to one unit ``i`` (its column; biases and unit parameters
too), so a leaf has shape ``(B, *lead, units, K, m)`` with ``lead = (R,)`` for kernels
(``R = n_in``, or the longest column of a mask: masked entries are not stored) and
``lead = ()`` otherwise; ``m`` is the number of state components per unit.  The ``K``
axis is

* ``"diag"`` (SnAp-1): ``K = 1``, only unit ``i`` itself — exactly ``B × p × m`` floats,
  the same size as a per-example copy of the parameters (``m = 1`` for vanilla/GRU);
  propagation uses only the diagonal blocks of ``D`` (an elementwise update).  With ``m = 2``
  (LSTM, LRU) a float32/float64 leaf is stored as complex pairs ``(B, *lead, units, 1, 1)``,
  component 0 real and 1 imaginary, so that each entry's update reads and writes only its own
  pair, in place (:func:`snapjax.engine.propagation.pairs_dtype`; :meth:`InfluenceTracker.
  interleaved` gives the float leaves);
* ``"table"`` (SnAp-n, n ≥ 2, sparse): slot ``s`` holds unit ``nbr[i, s]`` of a static
  padded neighbour table; propagation gathers the ``K × K`` sub-blocks of ``D`` and does
  batched small matmuls — cost ``O(B p K² m)``, scaling with parameter density;
* ``"dense"`` (exact RTRL, or SnAp-n whose table is full): ``K = units`` in natural order;
  propagation is one batched matmul with the per-example ``D`` (``(B, k, k)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.builtin import as_cell_spec
from snapjax.cells.spec import CellSpec
from snapjax.engine.jacobians import StepJacobians, step_jacobians
from snapjax.engine.patterns import (
    KernelLayout,
    NeighbourTable,
    check_masks,
    component_patterns,
    kernel_layout,
    neighbour_table,
    stores_dense,
)
from snapjax.engine.propagation import (
    apply_pattern,
    contract_gradient,
    decompress_kernels,
    diag_factors,
    expand_dense,
    from_pairs,
    pairs_dtype,
    propagator,
    real_dtype,
)

Array = jax.Array
PyTree = Any

__all__ = ["InfluenceTracker", "influence_tracker", "parse_method"]

Layout = Literal["diag", "table", "dense"]


def parse_method(method: str, n: int | None = None) -> tuple[str, int | None]:
    """Normalise a method name: ``"rtrl"``, ``"snap"`` (with ``n``), ``"snap1"``, ``"snap-2"``…"""
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {type(method).__name__}")
    name = method.lower().replace("-", "").replace("_", "")
    if name == "rtrl":
        if n is not None:
            raise ValueError("method 'rtrl' takes no n (it is exact)")
        return "rtrl", None
    if name.startswith("snap"):
        suffix = name[4:]
        if suffix:
            if not suffix.isdigit():
                raise ValueError(f"unknown method {method!r}")
            if n is not None and n != int(suffix):
                raise ValueError(f"method {method!r} conflicts with n={n}")
            n = int(suffix)
        if n is None:
            raise ValueError("method 'snap' needs n (e.g. method='snap', n=1, or 'snap1')")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"SnAp-n needs an integer n >= 1, got n={n!r}")
        return "snap", int(n)
    raise ValueError(f"unknown method {method!r}: expected 'rtrl' or 'snap' / 'snapN'")


@dataclasses.dataclass(frozen=True, eq=False)
class InfluenceTracker:
    """Static configuration of one online-gradient method for one cell and parameter layout.

    Build with :func:`influence_tracker`.  All methods are pure and jittable; the tracker
    itself is static (hash by identity) and is meant to be closed over.

    Attributes:
      spec: the cell.  method: ``"rtrl"`` or ``"snap"``.  n: SnAp order (``None`` for RTRL).
      masks: per projection name, a bool ``(n_in, units)`` array or ``None``.
      kernels: compressed storage layout of each kernel.
      layout: ``"diag"``, ``"table"`` or ``"dense"`` (see module docstring).
      table: neighbour table (``table`` layout; trivial otherwise).
      patterns: exact component-level SnAp pattern per parameter group, or ``None``.
      precision: ``jax.lax.Precision`` for the propagation matmuls (``None`` = backend
        default, which is TF32 on recent NVIDIA GPUs; use ``"highest"`` for full float32).
    """

    spec: CellSpec
    method: str
    n: int | None
    masks: dict
    kernels: dict
    layout: Layout
    table: NeighbourTable
    patterns: dict | None
    n_in: int
    precision: Any = None

    # ------------------------------------------------------------------ storage
    @property
    def width(self) -> int:
        """K, the number of state units stored per parameter."""
        return {"diag": 1, "table": self.table.width, "dense": self.spec.units}[self.layout]

    def leaf_shapes(self, batch_size: int) -> dict:
        """Shapes of the influence leaves (same dict structure as the parameters)."""
        spec, K, m, U = self.spec, self.width, self.spec.state_dim, self.spec.units
        shapes = {}
        for p in spec.projections:
            leaf = {"kernel": (batch_size, self.kernels[p.name].num_rows, U, K, m)}
            if p.use_bias:
                leaf["bias"] = (batch_size, U, K, m)
            shapes[p.name] = leaf
        for q in spec.unit_params:
            shapes[q] = (batch_size, U, K, m)
        return shapes

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None,
             pairs: bool = True) -> PyTree:
        """Zero influence ``J_0`` for ``batch_size`` examples (``key`` is unused: RTRL/SnAp
        are deterministic; it is accepted so that every online method shares one protocol).

        ``dtype`` is the *storage* dtype: ``jnp.bfloat16`` / ``jnp.float16`` halve the influence
        memory and traffic, while :meth:`step` and :meth:`gradient` still compute in the state /
        cotangent dtype (the influence is upcast, updated, and rounded once per step).  A
        two-component cell's diagonal influence in float32/float64 is stored as complex pairs
        ``(..., 1)`` (``pairs=False``: the float leaves ``(..., 2)``; :func:`~snapjax.engine.
        propagation.pairs_dtype`); :meth:`step`, :meth:`gradient` and :meth:`to_dense` take both."""
        del key
        self._check_init_args(batch_size, dtype)
        cdt = pairs_dtype(self.layout, self.spec.state_dim, dtype) if pairs else None
        return jax.tree.map(lambda s: jnp.zeros(s, dtype) if cdt is None else jnp.zeros(s[:-1] + (1,), cdt),
                            self.leaf_shapes(int(batch_size)), is_leaf=lambda x: isinstance(x, tuple))

    def interleaved(self, influence: PyTree) -> PyTree:
        """The influence with complex pairs as float leaves ``(..., m)`` (:meth:`leaf_shapes`)."""
        return jax.tree.map(from_pairs, influence)

    def num_stored(self) -> int:
        """Stored influence entries per example (pattern entries incl. padding, times m)."""
        shapes = jax.tree.leaves(self.leaf_shapes(1), is_leaf=lambda x: isinstance(x, tuple))
        return int(sum(math.prod(s) for s in shapes))

    def pattern_count(self) -> int:
        """Entries of the SnAp-n pattern ``M_n`` per example (RTRL: every stored entry),
        counting only unmasked parameters; ``num_stored() - pattern_count()`` is padding."""
        spec, m = self.spec, self.spec.state_dim
        if self.layout == "dense":
            per_unit = {g: np.full(spec.units, spec.units * m) for g in self._groups()}
        elif self.layout == "diag":
            per_unit = {g: np.full(spec.units, m) for g in self._groups()}
        else:
            per_unit = {g: self.table.valid.sum(axis=1) * m for g in self._groups()}
        if self.patterns is not None:
            per_unit = {g: self.patterns[g].sum(axis=(1, 2)) for g in self._groups()}
        total = 0
        for p in spec.projections:
            lay: KernelLayout = self.kernels[p.name]
            rows_per_unit = np.full(spec.units, lay.n_in) if lay.rows is None else lay.valid.sum(axis=0)
            total += int((rows_per_unit * per_unit[p.name]).sum())
            if p.use_bias:
                total += int(per_unit[p.name].sum())
        for q in spec.unit_params:
            total += int(per_unit[q].sum())
        return total

    def _groups(self) -> list[str]:
        return [p.name for p in self.spec.projections] + list(self.spec.unit_params)

    # --------------------------------------------------------------- validation
    def _check_step_args(self, state: Array, influence: PyTree, x: Array) -> int:
        """Validate one step's arguments (trace time); return the batch size."""
        spec = self.spec
        if jnp.ndim(state) != 3 or jnp.shape(state)[1:] != (spec.units, spec.state_dim):
            raise ValueError(
                f"state must have shape (B, {spec.units}, {spec.state_dim}) (internal layout; "
                f"use spec.to_internal(carry)), got {jnp.shape(state)}"
            )
        batch = jnp.shape(state)[0]
        if jnp.ndim(x) != 2 or jnp.shape(x) != (batch, self.n_in):
            raise ValueError(f"x must have shape ({batch}, {self.n_in}), got {jnp.shape(x)}")
        for a, what in ((state, "state"), (x, "x")):
            if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
                raise ValueError(f"{what} must be floating point, got {jnp.result_type(a)}")
        self._check_influence(influence, batch)
        return batch

    def _check_influence(self, influence: PyTree, batch: int) -> None:
        want = self.leaf_shapes(batch)
        paired = pairs_dtype(self.layout, self.spec.state_dim, jnp.float32) is not None  # (..., 1) stands for (..., 2)
        if not paired and any(jnp.iscomplexobj(J) for J in jax.tree.leaves(influence)):
            raise ValueError(f"complex influence leaves are the pair storage of a two-component cell's diagonal "
                             f"layout; this tracker ({self.layout!r}, m={self.spec.state_dim}) stores floats")
        got = jax.tree.map(lambda J: jnp.shape(J)[:-1] + (2,) if paired and jnp.iscomplexobj(J) else jnp.shape(J),
                           influence)
        if jax.tree.structure(got, is_leaf=lambda t: isinstance(t, tuple)) != jax.tree.structure(
            want, is_leaf=lambda t: isinstance(t, tuple)
        ) or got != want:
            raise ValueError(f"influence does not match this tracker for batch {batch}: expected {want}, got {got}")

    @staticmethod
    def _check_init_args(batch_size: Any, dtype: Any) -> None:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"influence dtype must be floating point, got {dtype}")

    # -------------------------------------------------------------- immediate
    def _immediate(self, jac: StepJacobians) -> dict:
        """Compressed immediate Jacobian per leaf, shape ``(B, L, units, m)``."""
        return jax.tree.map(lambda f: f[1] if f[0] is None else f[0] * f[1], self._immediate_factors(jac),
                            is_leaf=lambda t: isinstance(t, tuple))

    def _immediate_factors(self, jac: StepJacobians) -> dict:
        """Per leaf ``(v, d)``, the immediate Jacobian ``v · d`` unmultiplied: ``d = ∂φ/∂a``
        ``(B, 1, U, m)`` and ``v`` the kernel's input ``(B, L, U|1, 1)`` (``None``: biases and unit
        parameters), so that one component can be formed without the other."""
        spec = self.spec
        out = {}
        for j, p in enumerate(spec.projections):
            v = jac.inputs[p.source]  # (B, n_in)
            lay: KernelLayout = self.kernels[p.name]
            vg = v[:, :, None] if lay.rows is None else jnp.where(lay.valid, v[:, lay.rows], 0)  # (B, L, U|1)
            out[p.name] = {"kernel": (vg[..., None], jac.dphi_pre[:, None, ..., j])}
            if p.use_bias:
                out[p.name]["bias"] = (None, jac.dphi_pre[:, None, ..., j])
        for j, q in enumerate(spec.unit_params):
            out[q] = (None, jac.dphi_unit[:, None, ..., j])
        return out

    def _group_of_leaves(self, tree: PyTree) -> dict:
        """Map each leaf to its parameter group (projection or unit-param name)."""
        return {k: (jax.tree.map(lambda _: k, v) if isinstance(v, Mapping) else k) for k, v in tree.items()}

    # ------------------------------------------------------------------- step
    def step(self, params: PyTree, state: Array, influence: PyTree, x: Array, *,
             factors: bool = False) -> tuple:
        """One online step: ``s_t = f(θ, s_{t-1}, x_t)`` and ``J_t`` from ``J_{t-1}``.

        Args:
          params: parameter dict.  state: ``(B, units, m)``.  influence: from :meth:`init`.
          x: ``(B, n_in)``.  factors: also return each leaf's
            :func:`~snapjax.engine.propagation.diag_factors` (for :mod:`snapjax.engine.native`).
        Returns:
          ``(s_t, J_t)``, or ``(s_t, J_t, factors)``.
        """
        batch = self._check_step_args(state, influence, x)
        spec = self.spec
        jac = step_jacobians(spec, params, state, x, self.masks, self.precision, materialize=self.layout == "diag")
        imm = self._immediate_factors(jac)
        propagate = propagator(spec, self.layout, self.table, self.masks, self.precision, params, jac)
        groups = self._group_of_leaves(influence)

        def update(J, factors, group):
            v, d = factors  # pairs get each component's immediate term on its own (no strided slices)
            ic = (d if v is None else v * d) if not jnp.iscomplexobj(J) else \
                [d[..., a] if v is None else v[..., 0] * d[..., a] for a in range(2)]
            shape = J.shape
            L = math.prod(shape[1:-3])
            # Arithmetic in the wider of the storage and the state dtype: a 16-bit influence is
            # upcast, propagated and rounded once when stored (pairs: the wider real dtype).
            rdt = jnp.promote_types(real_dtype(J), d.dtype)
            Jf = J.reshape(batch, L, spec.units, shape[-2], shape[-1]).astype(jnp.promote_types(J.dtype, rdt))
            Jn = propagate(Jf, jax.tree.map(lambda a: a.astype(rdt), ic))
            if self.patterns is not None:
                Jn = apply_pattern(Jn, self.patterns[group])
            return Jn.reshape(shape).astype(J.dtype)

        new = jax.tree.map(update, influence, imm, groups)
        if not factors:
            return jac.new_state, new
        fac = functools.partial(diag_factors, spec, self.layout, self.patterns, propagate, batch)
        return jac.new_state, new, jax.tree.map(fac, influence, imm, groups)

    # --------------------------------------------------------------- gradient
    def gradient(self, influence: PyTree, dloss_dstate: Array) -> PyTree:
        """Online gradient ``Σ_b (∂L/∂s_t)[b] J_t[b]`` in the parameters' shapes.

        Args:
          influence: ``J_t``.  dloss_dstate: ``(B, units, m)``.
        """
        return contract_gradient(self.spec, self.layout, self.table, self.kernels, self.precision,
                                 influence, dloss_dstate)

    def decompress(self, grads: PyTree) -> PyTree:
        """Kernel gradients in compressed coordinates ``(R, units)`` scattered back to
        ``(n_in, units)`` (the parameters' shapes)."""
        return decompress_kernels(self.spec, self.kernels, grads)

    # ------------------------------------------------------------------ views
    def to_dense(self, influence: PyTree) -> PyTree:
        """Expand to dense ``(B, *param_shape, units, m)`` per leaf (for tests and plots)."""
        return expand_dense(self.spec, self.layout, self.table, self.kernels, influence)


def influence_tracker(
    cell: Any,
    params: PyTree,
    method: str = "snap",
    n: int | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    precision: Any = None,
    layout: Layout | None = None,
) -> InfluenceTracker:
    """Build the static influence configuration for ``cell`` and ``params``.

    Args:
      cell: a snapjax cell module, a supported flax.linen cell or a :class:`CellSpec`.
      params: the cell's parameter dict (``variables['params']``); only shapes/dtypes are used.
      method: ``"rtrl"`` (exact), ``"snap"`` with ``n`` or ``"snapN"``.
      n: SnAp order, ``n >= 1``.  SnAp-n with ``n >= k`` equals RTRL.
      masks: optional static 0/1 masks per projection name, each of the kernel's shape.
      precision: matmul precision of the propagation (``"highest"`` for exact float32 on GPU).
      layout: storage of SnAp-n for ``n >= 2``: ``"table"`` (gathered neighbours, cost
        ``∝ K²`` per parameter) or ``"dense"`` (all units, one batched matmul with ``D``, then
        masked to the pattern — the same values).  Default: ``"dense"`` when the neighbour
        table is more than half full (the gather no longer pays,
        :func:`snapjax.engine.patterns.stores_dense`), else ``"table"``.  SnAp-1
        is always ``"diag"`` and RTRL always ``"dense"``.

    Raises:
      ValueError: unknown method, bad ``n``, masks of the wrong shape, bad parameter layout,
        a layout the method cannot use.
    """
    spec = as_cell_spec(cell)
    method, n = parse_method(method, n)
    spec.check_params(params)
    mask_dict = check_masks(spec, params, masks)
    kernels = {
        p.name: kernel_layout(mask_dict[p.name], int(np.shape(params[p.name]["kernel"])[0])) for p in spec.projections
    }
    if layout not in (None, "diag", "table", "dense"):
        raise ValueError(f"unknown layout {layout!r}: expected 'diag', 'table' or 'dense'")
    unit_diagonal = not any(p.source == "state" for p in spec.projections)
    allowed = ("dense",) if method == "rtrl" else ("diag",) if n == 1 else ("table", "dense")
    if unit_diagonal:
        allowed = allowed + ("diag",) * ("diag" not in allowed)
    if layout is not None and layout not in allowed:
        raise ValueError(f"layout {layout!r} is not available for {method}{n or ''}; use one of {allowed}")
    if unit_diagonal and layout in (None, "diag"):
        # No recurrent projection (e.g. the LRU): D is block-diagonal per unit, so the influence
        # of a unit's parameters stays on that unit's m components for ever.  Exact RTRL is then
        # the "diag" storage with full per-unit blocks at O(p·m²) per step, and SnAp-n for every
        # n keeps the same blocks (SnAp at unit granularity), i.e. equals exact RTRL.
        table = neighbour_table(spec, None, 1)
        layout = "diag"
        patterns = None
    elif method == "rtrl":
        table = neighbour_table(spec, None, spec.units)
        layout = "dense"
        patterns = None
    else:
        table = neighbour_table(spec, mask_dict, n)
        if n == 1:
            layout = "diag"
        elif table.width == spec.units:
            layout = "dense"  # a full table is RTRL's storage whatever was asked
        elif layout is None:
            layout = "dense" if stores_dense(table.width, spec.units) else "table"
        patterns = component_patterns(spec, mask_dict, table, n, dense=layout == "dense")
    return InfluenceTracker(
        spec=spec,
        method=method,
        n=n,
        masks=mask_dict,
        kernels=kernels,
        layout=layout,
        table=table,
        patterns=patterns,
        n_in=spec.input_size(params),
        precision=precision,
    )
