"""KF-RTRL: Kronecker-factored RTRL (Mujika, Meier & Steger, NeurIPS 2018, arXiv 1805.10842).

Per example and per *factor pair* ``g`` (a group of projections sharing the unit-wise partial
``Δ_g``, see below) the influence of the group's kernels and biases is kept as one Kronecker
product ``J_g ≈ u_g ⊗ A_g``, ``u_g ∈ R^{n_g}``, ``A_g ∈ R^{k × units}``
(``J_g[(u,a), (j,i)] = u_g[j] A_g[(u,a), i]``).  One step of exact RTRL gives two Kronecker
terms, ``J_g' = u_g ⊗ (D_t A_g) + v̂_g ⊗ Δ_g``; KF-RTRL combines them into one with two fresh
independent random signs ``c₁, c₂ = ±1`` (the paper's Sec. 4, Lemma/Theorem on the unbiased
update; same form as UORO's):

    u_g' = c₁ ρ₁ u_g + c₂ ρ₂ v̂_g
    A_g' = (c₁/ρ₁) D_t A_g + (c₂/ρ₂) Δ_g
    ρ₁ = sqrt(‖D_t A_g‖ / (‖u_g‖ + eps)) + eps,   ρ₂ = sqrt(‖Δ_g‖ / (‖v̂_g‖ + eps)) + eps

(Frobenius norms).  ``u' ⊗ A' = u ⊗ DA + v̂ ⊗ Δ + c₁c₂((ρ₁/ρ₂) u ⊗ Δ + (ρ₂/ρ₁) v̂ ⊗ DA)``; the
ρ's do not depend on the signs drawn at this step and ``E[c₁c₂] = 0``, so given the past
``E[J_g'] = D_t E[J_g] + v̂_g ⊗ Δ_g``: unbiased at every step for any positive ρ's, and the
online gradient ``Σ_b u_b ⊗ (c_bᵀ A_b)`` (linear in ``J``) is unbiased.  The ρ's minimise the
variance ``E‖cross term‖²_F = r²‖u‖²‖Δ‖² + r⁻²‖v̂‖²‖DA‖² + const`` over ``r = ρ₁/ρ₂``
(minimum at ``r² = ‖DA‖‖v̂‖ / (‖u‖‖Δ‖)``) and balance the two factors' magnitudes.
``eps`` only guards ``0/0`` (e.g. ``u = A = 0`` at the start or after a reset) and keeps
the estimate unbiased (any ρ > 0 does).

What is estimated, cell by cell (``v̂_p = [v_p; 1]`` when projection ``p`` has a bias, which
is thus folded into its projection's factor, as the paper's ``[h_{t-1}; x_t; 1]``):

* vanilla (``SimpleCell``): ``i`` and ``h`` are fused (``φ`` reads ``a_i + a_h``): one pair,
  ``u ∈ R^{n_in + 1 + units}`` for ``[W_i; b_i; W_h]`` — exactly the paper's algorithm;
* GRU (flax form): 4 pairs, ``(ir, hr)`` with ``u = [x; 1; h]`` for ``[W_ir; b_ir; W_hr]``,
  ``(iz, hz)`` likewise, ``(in,)`` with ``[x; 1]`` for ``[W_in; b_in]`` and ``(hn,)`` with
  ``[h; 1]`` for ``[W_hn; b_hn]`` (``r`` multiplies ``a_hn``, so ``in``/``hn`` have different
  partials);  ``fuse=False``: one pair per kernel (6 pairs, each bias in its own
  projection's factor);
* LSTM (``k = 2·units``, state ``(c, h)``): 4 pairs ``(i·, h·)`` per gate, ``A ∈ R^{2u × u}``;
* unit parameters (EGRU thresholds, LRU ν/θ/γ): tracked exactly (see
  :mod:`snapjax.methods._kronecker`).

Any :class:`snapjax.CellSpec` works; a generic flax module (no spec) raises ``ValueError``.

Cost per step and example, with ``k`` state size, ``U`` units, ``G`` pairs, ``n_g`` factor
lengths, ``Q`` unit parameters: ``(G + Q)·k²·U`` for ``D_t A`` (the paper's ``O(n³)``;
``4·U³`` for a GRU) plus ``O(Σ n_g·U + k²)``.  Memory per example: ``Σ_g n_g + (G + Q)·k·U``
floats (``O(n²)``; ``D_t`` is a ``k × k`` transient), versus ``k·p`` for RTRL.

The random key lives in the state (shared by the batch, batch axis ``None``) and is split
every step; every example and every pair draws its own independent signs.  :meth:`KFRTRL.init`
*requires* a key.  A per-example :meth:`~KFRTRL.reset` zeroes ``u, A`` of those examples and
never rewinds the key.  With ``batch_axis`` (inside ``jax.shard_map``) each device keeps its
rows of the whole batch's draw, so a sharded run draws the single-device signs.

Example (float32, flax GRU with 4 units)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.methods.kfrtrl import build
    >>> cell = nn.GRUCell(4)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> method = build(cell, params)
    >>> method.layout.group_names()
    (('ir', 'hr'), ('iz', 'hz'), ('in',), ('hn',))
    >>> carry, state = method.init_carry(2), method.init(2, key=jax.random.key(1))
    >>> carry, state, _ = method.step(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> [u.shape for u in state.u], state.A.shape, grads["hn"]["kernel"].shape
    ([(2, 8), (2, 8), (2, 4), (2, 5)], (2, 4, 4, 4), (4, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from snapjax.cells.recurrent import as_recurrent
from snapjax.methods._kronecker import (
    KroneckerLayout,
    check_batch_axis,
    check_eps,
    check_state_dtype,
    fro,
    rademacher,
    require_key,
)
from snapjax.methods.base import OnlineMethod, StepResult
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["KFRTRLState", "KFRTRL", "build"]


class KFRTRLState(NamedTuple):
    """KF-RTRL method state (every array leaf has the batch axis 0).

    Attributes:
      u: tuple, per factor pair ``g``, of ``(B, n_g)``: the parameter-side factors.
      A: ``(B, G, k, units)``: the state-side factors.
      E: ``(B, Q, k, units)``: exact influence of the ``Q`` unit parameters (``Q`` may be 0).
      key: typed PRNG key, shared by the batch (batch axis ``None``), split every step.

    Example (vanilla cell, 4 units, 3 inputs: one pair, ``u = [x; 1; h]``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.methods.kfrtrl import build, KFRTRLState
        >>> params = nn.SimpleCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> state = build(nn.SimpleCell(4), params).init(2, key=jax.random.key(1))
        >>> isinstance(state, KFRTRLState), [u.shape for u in state.u], state.A.shape, state.E.shape
        (True, [(2, 8)], (2, 1, 4, 4), (2, 0, 4, 4))
    """

    u: tuple
    A: Array
    E: Array
    key: Array


@dataclasses.dataclass(frozen=True, eq=False)
class KFRTRL(OnlineMethod):
    """KF-RTRL for one :class:`snapjax.CellSpec` cell (build with :func:`build`; see the module
    docstring for the algorithm).

    Attributes:
      cell: the :class:`snapjax.Recurrent`.  layout: the factor layout (groups, masks).
      eps: stabiliser of ρ₁, ρ₂.  batch_axis: mesh axis the batch is split over, or ``None``.

    Example (GRU, 4 units, 3 inputs: ``Σ n_g + G·k·U = 25 + 4·16`` floats per example; the key
    is shared by the batch; ``init`` needs a key)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.methods.kfrtrl import build
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> method = build(nn.GRUCell(4), params)
        >>> method.name, method.period, method.num_stored()
        ('kfrtrl', 1, 89)
        >>> method.batch_axes()
        KFRTRLState(u=0, A=0, E=0, key=None)
        >>> method.init(2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: kfrtrl: init needs key=jax.random.key(seed) ...
    """

    cell: Any
    layout: KroneckerLayout
    eps: float = 1e-7
    batch_axis: str | None = None
    name: str = "kfrtrl"

    # ------------------------------------------------------------------ state
    def _zeros(self, batch: int, dtype: Any, key: Array) -> KFRTRLState:
        lay = self.layout
        u = tuple(jnp.zeros((batch, n), dtype) for n in lay.rows)
        A = jnp.zeros((batch, len(lay.groups), lay.k, lay.units), dtype)
        E = jnp.zeros((batch, lay.n_unit, lay.k, lay.units), dtype)
        return KFRTRLState(u, A, E, key)

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> KFRTRLState:
        """Zero factors for ``batch_size`` examples.  ``key`` (required: ``ValueError`` if
        ``None``) seeds the random signs; a raw ``uint32`` key is wrapped."""
        b = check_state_dtype(self.name, batch_size, dtype)
        return self._zeros(b, dtype, require_key(self.name, key))

    def batch_axes(self) -> KFRTRLState:
        return KFRTRLState(u=0, A=0, E=0, key=None)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """Floats per example: ``Σ_g n_g + (G + Q)·k·units``."""
        lay = self.layout
        return int(sum(lay.rows) + (len(lay.groups) + lay.n_unit) * lay.k * lay.units)

    # ------------------------------------------------------------------ step
    def _draw_signs(self, key: Array, batch: int, dtype: Any) -> tuple[Array, Array]:
        """Independent signs ``(c₁, c₂)``, each ``(B, G)``."""
        c = rademacher(key, (batch, len(self.layout.groups), 2), dtype, self.batch_axis)
        return c[..., 0], c[..., 1]

    def step(self, params: PyTree, carry: PyTree, state: KFRTRLState, x: Array) -> StepResult:
        """One step: the new carry and the updated Kronecker factors (module docstring)."""
        lay, eps = self.layout, self.eps
        s = lay.check_step(carry, x, state.A.shape[0])
        dtype = state.A.dtype
        new_s, D, vs, delta, delta_u = lay.factors(params, s, x, dtype)
        key, sub = jax.random.split(state.key)
        c1, c2 = self._draw_signs(sub, s.shape[0], dtype)  # (B, G)

        DA = lay.propagate(D, state.A)  # (B, G, k, U)
        rho1 = jnp.sqrt(fro(DA, (2, 3)) / (jnp.stack([fro(u, (1,)) for u in state.u], 1) + eps)) + eps
        rho2 = jnp.sqrt(fro(delta, (2, 3)) / (jnp.stack([fro(v, (1,)) for v in vs], 1) + eps)) + eps
        u_new = tuple((c1[:, g] * rho1[:, g])[:, None] * u + (c2[:, g] * rho2[:, g])[:, None] * v
                      for g, (u, v) in enumerate(zip(state.u, vs)))
        A_new = (c1 / rho1)[..., None, None] * DA + (c2 / rho2)[..., None, None] * delta
        E_new = lay.propagate(D, state.E) + delta_u
        new_carry = lay.spec.from_internal(new_s)
        return StepResult(new_carry, KFRTRLState(u_new, A_new, E_new, key), {})

    def gradient(self, params: PyTree, state: KFRTRLState, dloss_dcarry: PyTree) -> tuple[PyTree, KFRTRLState]:
        """Unbiased online gradient ``Σ_b u_b ⊗ (∂L/∂s_b · A_b)`` (kernels masked), parameter-shaped."""
        c = self.layout.cotangent(dloss_dcarry, state.A.shape[0], state.A.dtype)
        us = tuple(u[:, None] for u in state.u)
        return self.layout.gradient(params, c, us, state.A[:, :, None], state.E), state


def build(
    cell: Any,
    params: PyTree,
    *,
    masks: Any = None,
    precision: Any = None,
    eps: float | None = 1e-7,
    fuse: bool = True,
    batch_axis: str | None = None,
    verify: bool = True,
) -> KFRTRL:
    """Build :class:`KFRTRL` for ``cell`` with parameters shaped like ``params``.

    Args:
      cell: a :class:`snapjax.Recurrent` with a ``spec``, or anything :func:`snapjax.as_recurrent`
        accepts (snapjax cells, flax ``GRUCell``/``LSTMCell``/``SimpleCell``/``MGUCell``, a spec).
      params: the cell's parameter dict.
      masks: static 0/1 kernel masks, ``{projection: (n_in, units)}`` or params-shaped
        ``{projection: {"kernel": mask}}``; masked entries get exactly zero gradient.
      precision: matmul precision (``"highest"``, ``jax.lax.Precision``...).
      eps: stabiliser of ρ₁, ρ₂ (> 0).
      fuse: share one factor pair between projections with identical unit-wise partials (the
        paper's ``[h; x; 1]`` factor); ``False``: one pair per kernel.
      batch_axis: mesh axis the batch is split over inside ``jax.shard_map`` (signs then equal
        the single-device run's).
      verify: check a user spec's compressed Jacobians against ``jax.jvp`` (``verify_spec``).
    Raises:
      ValueError: a cell without a :class:`snapjax.CellSpec` (generic module), bad parameters,
        masks, precision, ``eps`` or ``batch_axis``.

    Example (masked kernel entries get exactly zero gradient; ``fuse=False``: one pair per kernel)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from snapjax.methods.kfrtrl import build
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> keep = np.eye(4, dtype=bool)
        >>> method = build(nn.GRUCell(4), params, masks={"hn": keep})
        >>> state = method.init(2, key=jax.random.key(1))
        >>> _, state, _ = method.step(params, 0.5 * jnp.ones((2, 4)), state, jnp.ones((2, 3)))
        >>> g = method.gradient(params, state, jnp.ones((2, 4)))[0]["hn"]["kernel"]
        >>> bool(jnp.all(g[~keep] == 0)), bool(jnp.any(g[keep] != 0))
        (True, True)
        >>> len(build(nn.GRUCell(4), params, fuse=False).layout.groups)
        6
    """
    rec = as_recurrent(cell)
    eps = check_eps("kfrtrl", 1e-7 if eps is None else eps)
    check_batch_axis("kfrtrl", batch_axis)
    layout = KroneckerLayout.build("kfrtrl", rec, params, masks=masks, precision=precision, fuse=fuse, verify=verify)
    return KFRTRL(cell=rec, layout=layout, eps=eps, batch_axis=batch_axis)


register_method("kfrtrl", build, options=("masks", "precision", "eps", "batch_axis", "verify"), aliases=("kf_rtrl",),
                summary="KF-RTRL (Mujika et al. 2018): unbiased Kronecker-factored influence u ⊗ A per gate matrix (CellSpec cells)")
