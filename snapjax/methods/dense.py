"""Exact RTRL and SnAp-n for *any* recurrent cell, with dense per-example Jacobians (slow path).

For a cell without a compressed form (``cell.spec is None``: any flax.linen module ``(carry,
x) -> (carry, y)``, e.g. a GRU with layer norm) the online methods flatten the carry pytree of
one example to a vector ``s (k,)`` and the parameters to ``θ (p,)``, and per example and step
compute the dense Jacobians of ``f(θ, s, x) = cell.apply(params ⊙ masks, carry, x)``::

    D_t = ∂f/∂s  (B, k, k),     I_t = ∂f/∂θ  (B, k, p),
    J_t = (D_t J_{t-1} + I_t) ⊙ M_n,        J (B, k, p),  J_0 = 0,
    g_t = Σ_b c_b J_t[b],                   c_b = ravel(∂L_t/∂carry_t)[b]  (k,).

``M_n`` is all ones for exact RTRL (``n=None``; then ``Σ_t g_t`` is the BPTT gradient).  For
SnAp-n it is the boolean n-step pattern ``M_1 = pattern(I)``, ``M_{j+1} = M_j ∪ pattern(D)·M_j``,
computed once from the *structural* sparsity of ``D`` and ``I``: the union of their nonzeros
at :data:`PATTERN_POINTS` random points (random carry, input and parameters of the given shapes,
masked weights zero).  An entry that vanishes at all of them is taken as structurally zero (a
NaN counts as nonzero; an entry that is zero with probability 1/2 at a random point, as behind
a ReLU, is missed with probability 2⁻⁸).
SnAp-n with ``n >= k`` is RTRL.

Both Jacobians come from one ``jax.jacrev`` over ``(θ, s)``: the output has ``k`` entries and
the input ``k + p > k``, so reverse mode (``k`` vector-Jacobian products sharing one forward
pass) is always the cheaper; forward mode would need ``k + p`` JVPs.

Cost per example and step: ``O(k² p)`` for ``D J`` plus ``k`` VJPs of the cell; memory ``k·p``
floats per example.  SnAp-n whose input size is known at construction (``input_size=``, or a
cell that reads it from its parameters; the learner passes it) stores only its pattern
instead (``storage == "pattern"``, :mod:`snapjax.methods.generic_pattern`): per parameter the
``w ≤ k`` state entries it reaches, updated with the ``w × w`` block of ``D``
(``O(w² p)``; SnAp-1 of a unit-local parameter: ``w = 1``, elementwise), with parameters
reaching more than half the state stored densely and masked; same values.  Use it for small cells,
for prototyping a new cell and to check a hand-written :class:`snapjax.CellSpec`; cells with a
compressed form (snapjax cells, flax ``GRUCell``/``LSTMCell``/``SimpleCell``) get the fast
compressed methods from :func:`snapjax.online_method` (SnAp-1 about BPTT's cost).

Masks (static 0/1, parameter sparsity) are given either as ``{name: (n_in, units) array}``
applied to ``params[name]['kernel']`` (the compressed engine's format) or as a full
params-shaped tree of arrays / ``None``.  Masked weights act as zeros and get exactly zero
gradient.

Example (float32, a GRU forced onto the generic path, SnAp-2)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
    >>> method = dense_method(sj.as_recurrent(nn.GRUCell(3), generic=True), params, n=2)
    >>> carry, state = method.init_carry(2), method.init(2)
    >>> carry, state, _ = method.step(params, carry, state, jnp.ones((2, 2)))
    >>> state.influence.shape
    (2, 3, 57)
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 3)))
    >>> grads["hn"]["kernel"].shape
    (3, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.generic_pattern import PatternLayout, pattern_layout
from snapjax.methods.generic_support import (
    CarryCheck,
    ParamMasks,
    check_params,
    check_precision,
    matmul_precision,
    param_masks,
)

Array = jax.Array
PyTree = Any

__all__ = ["GenericInfluence", "DenseInfluence", "dense_method", "PATTERN_POINTS"]

#: Random points whose Jacobian nonzeros are united into the SnAp-n pattern.
PATTERN_POINTS = 8


# ------------------------------------------------------------------- tracing helpers
def _outside_traces():
    """Evaluate eagerly even inside a ``jit`` trace (a jitted call in it still compiles once;
    ``jax.ensure_compile_time_eval`` would instead compile every constant op separately)."""
    ctx = getattr(jax.core, "eval_context", None)
    return ctx() if ctx is not None else jax.ensure_compile_time_eval()


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0], tree)


def _lead(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[None], tree)


# ------------------------------------------------------------------------------ the method
class GenericInfluence(NamedTuple):
    """State of generic RTRL / SnAp-n: ``influence`` ``J (B, k, p)`` (``k`` = carry floats per
    example in ``ravel_pytree`` order, ``p`` = parameter floats in ``ravel_pytree(params)`` order);
    with ``storage == "pattern"`` a tuple of the stored groups ``(B, w_g, p_g)``
    (:meth:`snapjax.methods.generic_pattern.PatternLayout.shapes`; ``method.to_dense`` expands it).

    Example (GRU with 3 units and 2 inputs: ``k = 3``, ``p = 57``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
        >>> method = sj.dense_method(sj.as_recurrent(nn.GRUCell(3), generic=True), params)
        >>> state = method.init(2)
        >>> isinstance(state, sj.GenericInfluence), state.influence.shape, method.batch_axes()
        (True, (2, 3, 57), GenericInfluence(influence=0))
    """

    influence: Any  # J (B, k, p), or the tuple of stored groups (storage == "pattern")


@dataclasses.dataclass(frozen=True, eq=False)
class DenseInfluence(OnlineMethod):
    """RTRL or SnAp-n with dense per-example Jacobians (build with :func:`dense_method`).

    Attributes:
      cell: the cell.  name: ``"rtrl"`` or ``"snapN"``.  n: SnAp order (``None``: RTRL).
      masks: :class:`snapjax.methods.generic_support.ParamMasks`.
      carry: :class:`snapjax.methods.generic_support.CarryCheck`.  p: parameter floats.
      param_shapes: ``ShapeDtypeStruct`` tree of the parameters.
      precision: matmul precision of the cell step and of ``D J``.
      layout: the pattern storage (:class:`snapjax.methods.generic_pattern.PatternLayout`) and
        the input size it was built for, or ``None``: the dense ``(B, k, p)`` storage.

    The ``(k, p)`` bool pattern ``M_n`` (:meth:`pattern`; ``None`` for RTRL without masks) is
    built at construction when the input size is known, else on the first trace of
    :meth:`step` (the input size is read from ``x``), and cached.

    Example (pattern sizes of a GRU with ``k = 3``, ``p = 57``: SnAp-1 keeps one entry per
    parameter, SnAp-2 already all ``k·p``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
        >>> rec = sj.as_recurrent(nn.GRUCell(3), generic=True)
        >>> methods = [sj.dense_method(rec, params, n=n, input_size=2) for n in (1, 2, None)]
        >>> [m.name for m in methods], [m.pattern_count(2) for m in methods]
        (['snap1', 'snap2', 'rtrl'], [57, 171, 171])
        >>> methods[0].pattern(2).shape                    # (k, p)
        (3, 57)
        >>> [(m.storage, m.num_stored()) for m in methods]  # SnAp-1 stores its pattern only
        [('pattern', 57), ('dense', 171), ('dense', 171)]
    """

    cell: Recurrent
    name: str
    n: int | None
    masks: ParamMasks
    carry: CarryCheck
    p: int
    param_shapes: PyTree
    precision: Any = None
    layout: tuple[PatternLayout, int] | None = None
    _patterns: dict = dataclasses.field(default_factory=dict, repr=False)
    _ipatterns: dict = dataclasses.field(default_factory=dict, repr=False)  # P_I per input size

    @property
    def storage(self) -> str:
        """``"pattern"`` (only the entries of ``M_n``, :mod:`snapjax.methods.generic_pattern`) or
        ``"dense"`` (``J (B, k, p)``, masked): chosen once, at construction."""
        return "dense" if self.layout is None else "pattern"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, cell={self.cell.name!r}, storage={self.storage!r}, "
                f"k={self.carry.size}, p={self.p}, stored={self.num_stored()})")

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> GenericInfluence:
        del key  # deterministic
        b = check_batch_size(batch_size)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{self.name}: influence dtype must be floating point, got {dtype}")
        if self.layout is not None:
            return GenericInfluence(self.layout[0].init(b, dtype))
        return GenericInfluence(jnp.zeros((b, self.carry.size, self.p), dtype))

    def to_dense(self, state: GenericInfluence) -> Array:
        """The influence as ``(B, k, p)`` whatever the storage (tests, plots)."""
        return state.influence if self.layout is None else self.layout[0].to_dense(state.influence)

    def batch_axes(self) -> GenericInfluence:
        return GenericInfluence(influence=0)

    def param_axes(self) -> GenericInfluence:
        return GenericInfluence(influence=-1)  # J (B, k, p): the p axis

    def num_stored(self) -> int:
        return self.carry.size * self.p if self.layout is None else self.layout[0].num_stored()

    # ---------------------------------------------------------------- Jacobians
    def _example_step(self, unravel, unravel_s, x_b: Array):
        """``f(θ, s) -> (ravel(new carry), new carry)``: one example's masked cell step."""

        def f(th, s):
            with matmul_precision(self.precision):
                new = self.cell.apply(self.masks.apply(unravel(th)), _lead(unravel_s(s)), x_b[None])
            new = _first(new)
            return ravel_pytree(new)[0], new

        return f

    def _jacobians(self, params: PyTree, carry: PyTree, x: Array):
        """Per example ``(D (B,k,k), I (B,k,p), new carry)``."""
        theta, unravel = ravel_pytree(params)

        def one(c_b, x_b):
            s_vec, unravel_s = ravel_pytree(c_b)
            f = self._example_step(unravel, unravel_s, x_b)
            (i_mat, d_mat), new = jax.jacrev(f, argnums=(0, 1), has_aux=True)(theta, s_vec)
            return d_mat, i_mat, new

        return jax.vmap(one)(carry, x)

    def _colored_jacobians(self, params: PyTree, carry: PyTree, x: Array, layout: PatternLayout):
        """Per example ``(D (B,k,k), V (B,C,p), new carry)``: ``D`` from ``k`` products with
        respect to the state only, ``V`` the colour sums of the rows of ``I`` (``C`` products)."""
        theta, unravel = ravel_pytree(params)
        cot = jnp.asarray(layout.color_cotangents(np.dtype(theta.dtype)))

        def one(c_b, x_b):
            s_vec, unravel_s = ravel_pytree(c_b)
            f = self._example_step(unravel, unravel_s, x_b)
            d_mat, new = jax.jacrev(lambda s: f(theta, s), has_aux=True)(s_vec)
            _, pullback = jax.vjp(lambda th: f(th, s_vec)[0], theta)
            return d_mat, jax.vmap(lambda v: pullback(v.astype(s_vec.dtype))[0])(cot), new

        return jax.vmap(one)(carry, x)

    @property
    def built_patterns(self) -> tuple[int, ...]:
        """Input sizes whose pattern ``M_n`` has been built so far."""
        return tuple(sorted(self._patterns))

    def pattern(self, n_in: int) -> np.ndarray | None:
        """The static pattern ``M_n (k, p)`` for inputs of size ``n_in`` (``None``: all ones)."""
        if n_in not in self._patterns:
            self._patterns[n_in] = self._compute_pattern(int(n_in))
        return self._patterns[n_in]

    def _compute_pattern(self, n_in: int) -> np.ndarray | None:
        col = self.masks.flat(self.param_shapes)
        if self.n is None:
            return None if col.all() else np.broadcast_to(col, (self.carry.size, self.p)).copy()
        dtype = np.dtype(jnp.result_type(*jax.tree.leaves(self.param_shapes)))
        rng = np.random.default_rng(20240607)
        normal_like = lambda tree: jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(dtype), tree)
        k, p = self.carry.size, self.p
        pd, pi = np.zeros((k, k), bool), np.zeros((k, p), bool)
        with _outside_traces():  # concrete even when first called while tracing `step`
            jac = jax.jit(self._jacobians)  # compiled once, called at every point
            carry_shape = jax.eval_shape(lambda: self.cell.init_carry(1, dtype))
            for _ in range(PATTERN_POINTS):
                x = rng.standard_normal((1, n_in)).astype(dtype)
                d_mat, i_mat, _ = jac(normal_like(self.param_shapes), normal_like(carry_shape), x)
                pd |= np.asarray(d_mat[0]) != 0
                pi |= np.asarray(i_mat[0]) != 0
        m = pi & col
        self._ipatterns[n_in] = m.copy()
        for _ in range(self.n - 1):  # M_{j+1} = M_j ∪ pattern(D)·M_j, until it stops growing
            grown = m | ((pd.astype(np.int64) @ m.astype(np.int64)) > 0)
            if np.array_equal(grown, m):
                break
            m = grown
        return m

    def pattern_count(self, n_in: int) -> int:
        """Entries of ``M_n`` per example (RTRL: ``k`` per unmasked parameter)."""
        m = self.pattern(n_in)
        return int(self.carry.size * self.masks.flat(self.param_shapes).sum()) if m is None else int(m.sum())

    # --------------------------------------------------------------------- step
    def step(self, params: PyTree, carry: PyTree, state: GenericInfluence, x: Array) -> StepResult:
        batch = self.carry.step_args(carry, x)
        J = state.influence
        if self.layout is not None:
            layout, n_in = self.layout
            got = tuple(jnp.shape(a) for a in J) if isinstance(J, tuple) else jnp.shape(J)
            if got != layout.shapes(batch) or jnp.shape(x)[1] != n_in:
                raise ValueError(f"{self.name}: the pattern storage was built for x of shape ({batch}, {n_in}) "
                                 f"and influence shapes {layout.shapes(batch)}; got x {jnp.shape(x)}, influence {got}")
            if layout.colors is None:
                d_mat, i_mat, new = self._jacobians(params, carry, x)
            else:
                d_mat, i_mat, new = self._colored_jacobians(params, carry, x, layout)
            return StepResult(new, GenericInfluence(layout.step(d_mat, i_mat, J, self.precision)), {})
        if jnp.shape(J) != (batch, self.carry.size, self.p):
            raise ValueError(f"{self.name}: influence must have shape ({batch}, {self.carry.size}, {self.p}), "
                             f"got {jnp.shape(J)}")
        pattern = self.pattern(int(jnp.shape(x)[1]))
        d_mat, i_mat, new = self._jacobians(params, carry, x)
        J = jnp.einsum("buv,bvp->bup", d_mat.astype(J.dtype), J, precision=self.precision) + i_mat.astype(J.dtype)
        if pattern is not None:
            J = jnp.where(pattern, J, jnp.zeros((), J.dtype))
        return StepResult(new, GenericInfluence(J), {})

    def gradient(self, params: PyTree, state: GenericInfluence, dloss_dcarry: PyTree) -> tuple[PyTree, GenericInfluence]:
        batch = self.carry.like(dloss_dcarry, "dloss_dcarry")
        J = state.influence
        first = J[0] if isinstance(J, tuple) else J
        if jnp.shape(first)[:1] != (batch,):
            raise ValueError(f"{self.name}: dloss_dcarry has batch {batch}, the influence {jnp.shape(first)[0]}")
        c = jax.vmap(lambda d: ravel_pytree(d)[0])(dloss_dcarry).astype(first.dtype)
        if self.layout is not None:
            g = self.layout[0].gradient(c, J, self.precision)
        else:
            g = jnp.einsum("bk,bkp->p", c, J, precision=self.precision)
        return ravel_pytree(params)[1](g), state


def dense_method(
    cell: Any,
    params: PyTree,
    *,
    n: int | None = None,
    masks: Any = None,
    precision: Any = None,
    input_size: int | None = None,
    storage: str | None = None,
) -> DenseInfluence:
    """Exact RTRL (``n=None``) or SnAp-n with dense per-example Jacobians, for any cell.

    This is the slow path (``O(k² p)`` per example and step plus ``k`` VJPs of the cell, memory
    ``k·p`` per example): use it for cells without a compressed form, small models and checks.

    Args:
      cell: a :class:`snapjax.Recurrent` or anything :func:`snapjax.as_recurrent` accepts.
      params: the cell's parameters (shapes and dtypes are read).
      n: SnAp order ``n >= 1``, or ``None`` for exact RTRL.
      masks: static 0/1 masks, ``{name: (n_in, units)}`` for ``params[name]['kernel']`` or a
        params-shaped tree (see :func:`snapjax.methods.generic_support.param_masks`).
      precision: matmul precision (``"highest"`` for full float32 on GPUs).
      input_size: size of ``x``; when known (or read from a compressed cell's params) the
        SnAp-n pattern is built here, else at the first traced :meth:`DenseInfluence.step`.
      storage: SnAp-n's storage: ``"pattern"`` (only the entries of ``M_n``; needs the input
        size), ``"dense"`` (``J (B, k, p)``, masked) or ``None``: ``"pattern"`` when the input
        size is known and some parameter reaches at most half the state
        (:func:`snapjax.engine.patterns.stores_dense`), else ``"dense"``.  RTRL is always dense.
    Raises:
      ValueError: bad ``n``, masks, parameters, precision, ``input_size`` or ``storage``.

    Example (exact RTRL on the dense path equals the compressed RTRL of the same GRU)::

        >>> import functools, flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(3)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
        >>> xs = jax.random.normal(jax.random.key(1), (2, 2, 2))        # (T, B, n_in)
        >>> @functools.partial(jax.jit, static_argnums=0)              # methods are static
        ... def summed_gradient(method):                              # loss Σ_t Σ h_t
        ...     carry, state = method.init_carry(2), method.init(2)
        ...     total = jax.tree.map(jnp.zeros_like, params)
        ...     for x in xs:
        ...         carry, state, _ = method.step(params, carry, state, x)
        ...         g, state = method.gradient(params, state, jnp.ones_like(carry))
        ...         total = jax.tree.map(jnp.add, total, g)
        ...     return total
        >>> dense = summed_gradient(sj.dense_method(sj.as_recurrent(cell, generic=True), params))
        >>> fast = summed_gradient(sj.online_method("rtrl", cell, params))
        >>> all(bool(jnp.allclose(a, b, atol=1e-5)) for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(fast)))
        True
    """
    rec = as_recurrent(cell)
    if storage not in (None, "pattern", "dense"):
        raise ValueError(f"{rec.name}: storage must be None, 'pattern' or 'dense', got {storage!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"{rec.name}: SnAp-n needs an integer n >= 1 (or None for RTRL), got n={n!r}")
    leaves = check_params(rec.name, params)
    check_precision(precision)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
    method = DenseInfluence(
        cell=rec,
        name="rtrl" if n is None else f"snap{int(n)}",
        n=None if n is None else int(n),
        masks=param_masks(params, masks),
        carry=CarryCheck.of(rec),
        p=int(sum(np.size(a) for a in leaves)),
        param_shapes=shapes,
        precision=precision,
    )
    if input_size is None and rec.spec is not None:
        input_size = rec.input_size(params)
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
            raise ValueError(f"{rec.name}: input_size must be a positive int, got {input_size!r}")
        pattern = method.pattern(int(input_size))
        if n is not None and storage != "dense" and pattern is not None:
            layout = pattern_layout(pattern, method._ipatterns.get(int(input_size)))
            if layout.groups or storage == "pattern":
                method = dataclasses.replace(method, layout=(layout, int(input_size)))
    elif storage == "pattern" and n is not None:
        raise ValueError(f"{rec.name}: storage='pattern' needs input_size= (the pattern depends on it)")
    return method
