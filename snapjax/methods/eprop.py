"""e-prop (Bellec et al., Nat. Commun. 11:3625, 2020): eligibility traces driven by each unit's own state.

For a compressed cell (:class:`snapjax.CellSpec`: ``a_p = v_p (W_p ⊙ M_p) + b_p``, ``s_{j,t} =
φ(a_{·,j}, θᵘ_j, s_{j,t-1})`` with ``m`` components per unit ``j``) the diagonal ``m × m`` block
of the dynamics Jacobian is

    D_t[j, j] = Δ_{j,t} + Σ_{p: state} (∂φ_j/∂a_{p,j}) W_p[j, j] e_r ᵀ,     Δ_{j,t} = ∂φ_j/∂s_j

(``e_r`` the read-out component): ``Δ`` is the derivative of unit ``j``'s state with respect to
its own previous state with the recurrent input held fixed, the second term the path through
its self-recurrent weight.  e-prop keeps only ``Δ``: per weight ``W_ji`` (kernel ``W_p[i, j]``
feeds unit ``j``; likewise a bias or unit parameter of ``j``) an eligibility vector
``ε_{ji} ∈ R^m`` per example,

    ε_{ji,t} = Δ_{j,t} ε_{ji,t-1} + ∂s_{j,t}/∂W_ji            (for W_p[i, j]: ∂φ_j/∂a_{p,j} · v_{p,i})
    ē_{ji,t} = κ ē_{ji,t-1} + ε_{ji,t}                         (κ = ``decay``; κ = 0: ē = ε)
    ∂L_t/∂W_ji ≈ Σ_b c_{t,b,j} · ē_{ji,t,b},                    c_t = ∂L_t/∂s_t (the carry's cotangent)

For the spiking cells (:mod:`snapjax.cells.spiking`) the state is ``(v[, a], z)`` and the
read-out ``z``; the ``z`` component of ``ε`` is ``(∂z_t/∂h_t) ε^h``, the paper's eligibility
trace ``e_ji`` (``h = v`` for LIF, ``(v, a)`` for ALIF), and the learner's cotangent sits on the
emitted ``z`` only, ``c_t = L_t = ∂E_t/∂z_t`` (the learning signal), so the gradient is the
paper's ``Σ_t L_{j,t} ē_{ji,t}``.  With ``detach_reset`` (no gradient through the reset) the
recursion is the paper's: LIF ``ε^v ← α ε^v + z_{i,t-1}`` (or ``x_{i,t}``), ``e = ψ_t ε^v``;
ALIF ``ε^a ← ψ_{t-1} ε^v_{t-1} + (ρ − ψ_{t-1} β) ε^a_{t-1}``, ``e = ψ_t (ε^v − β ε^a)``
(``ψ = ∂z/∂v``, the pseudo-derivative).  The filter ``F_κ`` is the paper's (no ``1 − κ``
factor): use κ equal to the read-out's own leak when the head low-pass filters the spikes.

* relation to the others: SnAp-1 (``"snap1"``) keeps all of ``D_t[j, j]``; it equals e-prop
  (κ = 0) when ``W_p[j, j] = 0`` for every recurrent projection (the paper's networks have no
  self-connections: ``masks={"h": 1 - eye}``).  With no recurrent weights at all (``W_p = 0``)
  ``D_t`` is block diagonal and e-prop (κ = 0) is exact RTRL.  For one-state cells with the
  leak as ``Δ`` it is RFLO (:mod:`snapjax.methods.rflo`).
* shapes: state ``eligibility`` (and ``filtered`` when κ > 0) per parameter leaf, kernels
  ``(B, n_in_p, units, m)``, biases and unit parameters ``(B, units, m)``; batch axis 0.
* cost per step: the cell's forward ``O(d(k·n_in + k²))`` plus ``O(p·m²)`` for the traces
  (elementwise); the gradient ``O(p·m)``: BPTT's order.
* memory per example: ``p·m`` floats (``2·p·m`` with κ > 0), SnAp-1's.
* bias: **biased** (every path through a recurrent weight is dropped); the learning signal is
  the same-step cotangent (random feedback: ``OnlineLearner(feedback="random")``).
* masks: masked weights act as zeros and get exactly zero gradient.

References: G. Bellec, F. Scherr, A. Subramoney, E. Hajek, D. Salaj, R. Legenstein, W. Maass, "A
solution to the learning dilemma for recurrent networks of spiking neurons", Nature
Communications 11:3625 (2020), Methods (eligibility traces for LIF and ALIF neurons).

Example (LIF, float64: with no recurrent weights e-prop is exact RTRL)::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> with jax.enable_x64(True):
    ...     cell, x = sj.LIFCell(3, param_dtype=jnp.float64, v_th=0.5), jnp.ones((2, 2), jnp.float64)
    ...     carry = cell.initialize_carry(None, x.shape)
    ...     params = cell.init(jax.random.key(0), carry, x)["params"]
    ...     params["h"]["kernel"] = jnp.zeros((3, 3), jnp.float64)
    ...     def total(name):
    ...         method = sj.online_method(name, cell, params)
    ...         c, st, g = carry, method.init(2, jnp.float64), 0.0
    ...         for t in range(4):
    ...             c, st, _ = method.step(params, c, st, 0.7 * t * x)
    ...             grads, st = method.gradient(params, st, (jnp.ones((2, 3)), jnp.ones((2, 3))))
    ...             g = g + grads["i"]["kernel"]
    ...         return g
    ...     bool(jnp.allclose(total("eprop"), total("rtrl"), rtol=1e-12)), bool(jnp.any(total("eprop") != 0))
    (True, True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import Recurrent
from snapjax.engine.jacobians import step_jacobians
from snapjax.engine.verify import verify_spec
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.generic_support import ParamMasks, check_precision, param_masks
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["EProp", "EPropState", "build_eprop"]


class EPropState(NamedTuple):
    """e-prop traces: ``eligibility`` (``ε``) and ``filtered`` (``ē``; ``{}`` when κ = 0), each a
    dict like the parameters with leaves ``(B, n_in_p, units, m)`` (kernels) or ``(B, units, m)``.

    Example (ALIF, 4 units, 2 inputs: ``(2·4 + 4·4)·3`` floats per example, twice with κ > 0)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell, x = sj.ALIFCell(4), jnp.ones((1, 2))
        >>> params = cell.init(jax.random.key(0), cell.initialize_carry(None, x.shape), x)["params"]
        >>> method = sj.online_method("eprop", cell, params, decay=0.5)
        >>> st = method.init(2)
        >>> st.eligibility["h"]["kernel"].shape, method.batch_axes(), method.num_stored()
        ((2, 4, 4, 3), EPropState(eligibility=0, filtered=0), 144)
    """

    eligibility: dict
    filtered: dict


def _local(delta: Array, e: Array) -> Array:
    """``Δ e`` per unit: ``delta (B, U, m, m)``, ``e (B, *lead, U, m)``."""
    m = e.shape[-1]
    d = delta.reshape(delta.shape[:1] + (1,) * (e.ndim - 3) + delta.shape[1:]).astype(e.dtype)
    if m == 1:
        return d[..., 0] * e
    # unrolled m×m product (a broadcast-and-reduce over the small minor axis is slower on CPU)
    return jnp.stack([sum(d[..., a, c] * e[..., c] for c in range(m)) for a in range(m)], axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class EProp(OnlineMethod):
    """e-prop for a compressed cell (build with ``snapjax.online_method("eprop", ..., decay=κ)``).

    Attributes:
      cell: the :class:`snapjax.Recurrent` (``cell.spec`` set).
      n_in: input size.
      masks: static masks (:class:`~snapjax.methods.generic_support.ParamMasks`).
      kappa: the filter ``κ`` in ``[0, 1)``.
      precision: matmul precision of the step.
      name: ``"eprop"``.
    """

    cell: Recurrent
    n_in: int
    masks: ParamMasks
    kappa: float = 0.0
    precision: Any = None
    name: str = "eprop"

    @property
    def _spec(self):
        return self.cell.spec

    def _shapes(self, b: int) -> dict:
        spec, U, m = self._spec, self._spec.units, self._spec.state_dim
        rows = {"input": self.n_in, "state": U}
        out: dict = {}
        for p in spec.projections:
            out[p.name] = {"kernel": (b, rows[p.source], U, m), **({"bias": (b, U, m)} if p.use_bias else {})}
        out.update({q: (b, U, m) for q in spec.unit_params})
        return out

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> EPropState:
        del key  # deterministic
        shapes = self._shapes(check_batch_size(batch_size))
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s, dtype), shapes, is_leaf=lambda t: isinstance(t, tuple))
        return EPropState(zeros(), zeros() if self.kappa > 0 else {})

    def batch_axes(self) -> EPropState:
        return EPropState(eligibility=0, filtered=0)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        shapes = jax.tree.leaves(self._shapes(1), is_leaf=lambda t: isinstance(t, tuple))
        return int(sum(math.prod(s) for s in shapes)) * (2 if self.kappa > 0 else 1)

    def _immediate(self, jac) -> dict:
        """``∂s_t/∂θ`` per leaf, compressed: kernels ``(B, n_in_p, U, m)``, others ``(B, U, m)``."""
        spec, out = self._spec, {}
        for j, p in enumerate(spec.projections):
            dphi = jac.dphi_pre[..., j]  # (B, U, m)
            v = jac.inputs[p.source]  # (B, n_in_p)
            out[p.name] = {"kernel": v[:, :, None, None] * dphi[:, None], **({"bias": dphi} if p.use_bias else {})}
        out.update({q: jac.dphi_unit[..., j] for j, q in enumerate(spec.unit_params)})
        return out

    def step(self, params: PyTree, carry: PyTree, state: EPropState, x: Array) -> StepResult:
        spec = self._spec
        s, x = spec.to_internal(carry), jnp.asarray(x)
        if jnp.ndim(x) != 2 or jnp.shape(x) != (jnp.shape(s)[0], self.n_in):
            raise ValueError(f"{self.name}: x must have shape ({jnp.shape(s)[0]}, {self.n_in}), got {jnp.shape(x)}")
        jac = step_jacobians(spec, self.masks.apply(params), s, x, None, self.precision)
        imm = self._immediate(jac)

        def update(e, i):
            cdt = jnp.promote_types(e.dtype, i.dtype)
            return (_local(jac.dphi_state, e.astype(cdt)) + i.astype(cdt)).astype(e.dtype)

        eps = jax.tree.map(update, state.eligibility, imm)
        filt = jax.tree.map(lambda f, e: self.kappa * f + e, state.filtered, eps) if self.kappa > 0 else {}
        return StepResult(spec.from_internal(jac.new_state), EPropState(eps, filt), {})

    def gradient(self, params: PyTree, state: EPropState, dloss_dcarry: PyTree) -> tuple[PyTree, EPropState]:
        """``Σ_b Σ_a c[b, j, a] ē[b, ..., j, a]`` per leaf (``ē = ε`` when κ = 0)."""
        spec = self._spec
        c = spec.to_internal(dloss_dcarry)
        traces = state.filtered if self.kappa > 0 else state.eligibility

        def contract(e, w):
            cdt = jnp.promote_types(e.dtype, c.dtype)
            cc, ee = c.astype(cdt), e.astype(cdt)
            g = jnp.einsum("bua,bua->u", cc, ee) if e.ndim == 3 else jnp.einsum("bua,blua->lu", cc, ee)
            return g.astype(jnp.result_type(w))

        grads = jax.tree.map(contract, traces, dict(params))
        return self.masks.apply(grads), state


def build_eprop(cell: Recurrent, params: PyTree, *, kappa: float = 0.0, masks: Any = None, precision: Any = None,
                verify: bool = True, name: str = "eprop", cls: type = EProp) -> EProp:
    """An :class:`EProp` (or subclass ``cls``) for ``cell``, checked: a compressed cell, ``κ`` in
    ``[0, 1)``, parameters that fit the spec, masks, precision; the spec against autodiff
    (``verify``).

    Raises:
      ValueError: the cell has no compressed form (a generic cell), or any of the above.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> from snapjax.methods.eprop import build_eprop
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> build_eprop(sj.as_recurrent(nn.GRUCell(4)), params, kappa=0.5).kappa
        0.5
        >>> build_eprop(sj.as_recurrent(nn.GRUCell(4), generic=True), params)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: eprop needs a cell with a compressed form (a CellSpec...
    """
    spec = cell.spec
    if spec is None:
        raise ValueError(f"{name} needs a cell with a compressed form (a CellSpec: the snapjax and flax.linen "
                         f"cells, LIF/ALIF, or a CellSpec of your own); got the generic cell {cell.name!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float, np.floating)) or not 0.0 <= kappa < 1.0:
        raise ValueError(f"{name}: the filter kappa (option decay) must be a number in [0, 1), got {kappa!r}")
    spec.check_params(params)
    check_precision(precision)
    pm = param_masks(params, masks)
    if verify:
        verify_spec(spec, params)
    return cls(cell, spec.input_size(params), pm, float(kappa), precision, name)


def _build(cell: Recurrent, params: PyTree, *, decay: float | None = None, masks: Any = None, precision: Any = None,
           verify: bool = True) -> EProp:
    return build_eprop(cell, params, kappa=0.0 if decay is None else decay, masks=masks, precision=precision,
                       verify=verify)


register_method("eprop", _build, options=("decay", "masks", "precision", "verify"), aliases=("e_prop",),
                summary="e-prop (Bellec et al. 2020): eligibility traces through each unit's own state "
                        "(decay = the filter κ; compressed cells)")
