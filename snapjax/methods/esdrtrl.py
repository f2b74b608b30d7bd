"""ES-D-RTRL (``pp_prop`` in braintrace): D-RTRL's diagonal trace, factorised per weight matrix.

For a compressed cell with one state per unit (:class:`snapjax.CellSpec` with ``state_dim ==
1``: vanilla, GRU, MGU, ...) each projection ``p`` computes ``a_{p,t} = v_{p,t} (W_p ⊙ M_p) +
b_p`` (``v_p`` the input ``x_t`` or the recurrent read-out ``h_{t-1}``, ``W_p (n_in_p, units)``)
and ``s_t = φ(a_t, θᵘ, s_{t-1})`` acts unit by unit.  D-RTRL (= SnAp-1) keeps one trace per
weight, ``e_{p,t}[j,i] = D_t[i,i] e_{p,t-1}[j,i] + (∂s_i/∂a_{p,i}) v_{p,j}``: ``n_in_p · units``
floats per example and matrix.  ES-D-RTRL approximates it by an outer product of two
exponentially smoothed vectors (``α`` = ``decay``):

    ε_x ← α ε_x + v_{p,t}                                      (B, n_in_p)   presynaptic
    ε_f ← α diag(D_t) ∘ ε_f + (1 − α) ∂s_t/∂a_{p,t}           (B, units)    postsynaptic
    ∂L_t/∂W_p ≈ Σ_b ε_x[b]ᵀ ⊗ (c_t[b] ∘ ε_f[b])               (n_in_p, units)

with ``c_t = ∂L_t/∂s_t`` and ``diag(D_t)_i = ∂φ_i/∂s_i + Σ_{p: state} (∂φ_i/∂a_{p,i}) (W_p ⊙
M_p)[i,i]`` (the full diagonal of ``∂s_t/∂s_{t-1}``, as SnAp-1).  ``ε_x`` depends only on the
source, so one is kept per source (``"input"``, ``"state"``).  Biases and per-unit parameters
keep D-RTRL's plain diagonal trace ``e ← diag(D_t) ∘ e + ∂s_t/∂b`` (one float per unit).  All
diagonals come from :func:`snapjax.engine.jacobians.step_jacobians` (one JVP of ``spec.phi``
per input along all-ones tangents: ``φ`` acts unit by unit, so each such JVP is the diagonal).

* shapes: state ``eps_x {source: (B, n)}``, ``eps_f {projection: (B, units)}``, ``bias
  {projection: (B, units)}``, ``unit {name: (B, units)}``, all batch axis 0.
* cost per step: the cell's forward ``O(d(k·n_in + k²))`` plus ``O(P·k + n_in)`` for the
  traces; the gradient is one outer product per matrix, ``O(Σ_p n_in_p·k)`` (BPTT's order).
* memory per example: ``n_in + k`` (``ε_x``) ``+ P·k`` (``ε_f``) ``+ k`` per bias and unit
  parameter, i.e. ``O(n + m)`` per ``n × m`` matrix instead of D-RTRL's ``n·m``.
* bias: **biased** (diagonal ``D`` and the rank-one factorisation); with ``decay = 0`` the
  kernels get the immediate (SnAp-0) gradient, exact only when ``D_t = 0``.
* masks (``{projection: (n_in, units)}`` or params-shaped): masked weights act as zeros and
  get exactly zero gradient.  Per-example reset: the base class's (traces to zero).

On the learner's memory task (Dense + 2 GRUs, 300 steps; ``tests/test_rules.py``) it recalls
the previous bit (0.07 nats) but stayed at chance for the bit two steps back (decay 0.5-0.9;
SnAp-1 reached 0.10-0.13 nats there).

Not included: braintrace's optional warm-up normaliser of ``ε_f`` (its ``1 − α^t`` bias
correction) and its rank parameterisation ``α = (r − 1)/(r + 1)``.

References: C. Wang, X. Dong, Z. Ji, M. Xiao, J. Jiang, X. Liu, Y. Huan, S. Wu, "Model-agnostic
linear-memory online learning in spiking neural networks", Nature Communications, 2026,
doi:10.1038/s41467-026-68453-w (bioRxiv 2024.09.24.614728); braintrace (``pp_prop``,
``ES_D_RTRL``); Menick et al., arXiv 2006.07232 (SnAp-1 = D-RTRL).

Example (float32 GRU; with ``decay=0`` the kernels' gradient is the immediate one)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> h0, x, c = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3)), jnp.ones((2, 4))
    >>> params = cell.init(jax.random.key(0), h0, x)["params"]
    >>> def one_step(name, **options):
    ...     method = sj.online_method(name, cell, params, **options)
    ...     _, st, _ = method.step(params, h0, method.init(2), x)
    ...     return method.gradient(params, st, c)[0]
    >>> g, ref = one_step("esdrtrl", decay=0.0), one_step("immediate")
    >>> all(bool(jnp.allclose(g[p]["kernel"], ref[p]["kernel"], atol=1e-6)) for p in params)
    True
    >>> sj.online_method("esdrtrl", nn.LSTMCell(4), params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: esdrtrl needs ... state_dim == 1...; got 'lstm' with state_dim=2
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import Recurrent
from snapjax.engine.jacobians import step_jacobians
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.generic_support import ParamMasks, check_precision, param_masks
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["ESDRTRL", "ESDState"]


class ESDState(NamedTuple):
    """ES-D-RTRL traces, every leaf ``(B, n)`` with batch axis 0.

    Attributes:
      eps_x: ``{source: (B, n_in_source)}`` presynaptic traces (``"input"``, ``"state"``).
      eps_f: ``{projection: (B, units)}`` postsynaptic traces.
      bias: ``{projection: (B, units)}`` diagonal traces of the biases.
      unit: ``{name: (B, units)}`` diagonal traces of the per-unit parameters.

    Example (GRU, 4 units, 3 inputs: 3 + 4 + 6·4 + 4·4 = 47 floats per example)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> method = sj.online_method("esdrtrl", nn.GRUCell(4), params)
        >>> st = method.init(2)
        >>> {k: v.shape for k, v in st.eps_x.items()}, sorted(st.bias), method.num_stored()
        ({'input': (2, 3), 'state': (2, 4)}, ['hn', 'in', 'ir', 'iz'], 47)
    """

    eps_x: dict
    eps_f: dict
    bias: dict
    unit: dict


@dataclasses.dataclass(frozen=True, eq=False)
class ESDRTRL(OnlineMethod):
    """ES-D-RTRL for a compressed cell with ``state_dim == 1`` (build with
    ``snapjax.online_method("esdrtrl", ..., decay=α)``).

    Attributes:
      cell: the :class:`snapjax.Recurrent` (``cell.spec`` set).
      n_in: input size.
      masks: static masks (:class:`~snapjax.methods.generic_support.ParamMasks`).
      decay: ``α`` in ``[0, 1)``.
      precision: matmul precision.
    """

    cell: Recurrent
    n_in: int
    masks: ParamMasks
    decay: float = 0.9
    precision: Any = None
    name: str = "esdrtrl"

    @property
    def _spec(self):
        return self.cell.spec

    def _sizes(self) -> dict:
        return {"input": self.n_in, "state": self._spec.units}

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> ESDState:
        del key
        b, spec = check_batch_size(batch_size), self._spec
        z = lambda n: jnp.zeros((b, n), dtype)
        sources = sorted({p.source for p in spec.projections})
        return ESDState(
            eps_x={src: z(self._sizes()[src]) for src in sources},
            eps_f={p.name: z(spec.units) for p in spec.projections},
            bias={p.name: z(spec.units) for p in spec.projections if p.use_bias},
            unit={q: z(spec.units) for q in spec.unit_params},
        )

    def batch_axes(self) -> ESDState:
        return ESDState(eps_x=0, eps_f=0, bias=0, unit=0)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        st = jax.eval_shape(lambda: self.init(1))
        return int(sum(a.shape[1] for a in jax.tree.leaves(st)))

    def _diagonals(self, params: PyTree, h: Array, x: Array):
        """New ``h``, ``diag(D_t)`` and ``{p: ∂s/∂a_p}``, ``{q: ∂s/∂θᵘ_q}``, each ``(B, units)``."""
        spec = self._spec
        jac = step_jacobians(spec, params, h[..., None], x, None, self.precision)
        d_a = {p.name: jac.dphi_pre[..., 0, j] for j, p in enumerate(spec.projections)}
        d_u = {q: jac.dphi_unit[..., 0, j] for j, q in enumerate(spec.unit_params)}
        diag_d = jac.dphi_state[..., 0, 0]
        for p in spec.projections:
            if p.source == "state":
                diag_d = diag_d + d_a[p.name] * jnp.diagonal(params[p.name]["kernel"])
        return jac.new_state[..., 0], diag_d, d_a, d_u

    def step(self, params: PyTree, carry: PyTree, state: ESDState, x: Array) -> StepResult:
        spec = self._spec
        x = jnp.asarray(x)
        h = spec.to_internal(carry)[..., 0]
        if jnp.ndim(x) != 2 or jnp.shape(x) != (jnp.shape(h)[0], self.n_in):
            raise ValueError(f"{self.name}: x must have shape ({jnp.shape(h)[0]}, {self.n_in}), got {jnp.shape(x)}")
        new_h, diag_d, d_a, d_u = self._diagonals(self.masks.apply(params), h, x)
        a, dt = self.decay, jax.tree.leaves(state)[0].dtype
        cast = lambda v: jnp.asarray(v).astype(dt)
        dd = cast(diag_d)
        v = {"input": x, "state": h}
        new = ESDState(
            eps_x={src: a * e + cast(v[src]) for src, e in state.eps_x.items()},
            eps_f={n: a * dd * e + (1.0 - a) * cast(d_a[n]) for n, e in state.eps_f.items()},
            bias={n: dd * e + cast(d_a[n]) for n, e in state.bias.items()},
            unit={q: dd * e + cast(d_u[q]) for q, e in state.unit.items()},
        )
        return StepResult(spec.from_internal(new_h[..., None]), new, {})

    def gradient(self, params: PyTree, state: ESDState, dloss_dcarry: PyTree) -> tuple[PyTree, ESDState]:
        """Kernels ``Σ_b ε_x ⊗ (c ∘ ε_f)``; biases and unit parameters ``Σ_b c ∘ e``."""
        spec = self._spec
        c = spec.to_internal(dloss_dcarry)[..., 0]
        grads: dict = {}
        for p in spec.projections:
            ef = c.astype(state.eps_f[p.name].dtype) * state.eps_f[p.name]
            leaf = {"kernel": jnp.matmul(state.eps_x[p.source].T, ef, precision=self.precision)}
            if p.use_bias:
                leaf["bias"] = jnp.sum(c * state.bias[p.name], axis=0)
            grads[p.name] = leaf
        for q in spec.unit_params:
            grads[q] = jnp.sum(c * state.unit[q], axis=0)
        grads = jax.tree.map(lambda g, w: g.astype(jnp.result_type(w)), grads, dict(params))
        return self.masks.apply(grads), state


def _build(cell: Recurrent, params: PyTree, *, decay: float | None = None, masks: Any = None,
           precision: Any = None) -> ESDRTRL:
    """:class:`ESDRTRL` for ``cell`` (``decay`` ``α``, default 0.9).

    Raises:
      ValueError: the cell has no compressed form or ``state_dim != 1`` (e.g. an LSTM);
        ``decay`` not in ``[0, 1)``; parameters that do not fit the spec; bad masks or precision.
    """
    spec = cell.spec
    if spec is None or spec.state_dim != 1:
        got = "no CellSpec (a generic cell)" if spec is None else f"state_dim={spec.state_dim}"
        raise ValueError("esdrtrl needs a cell with a compressed form with one state per unit "
                         f"(a CellSpec with state_dim == 1: vanilla, GRU, MGU); got {cell.name!r} with {got}")
    decay = 0.9 if decay is None else decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"esdrtrl decay must be a number in [0, 1), got {decay!r}")
    spec.check_params(params)
    check_precision(precision)
    return ESDRTRL(cell, spec.input_size(params), param_masks(params, masks), float(decay), precision)


register_method("esdrtrl", _build, options=("decay", "masks", "precision"), aliases=("pp_prop", "es_d_rtrl"),
                summary="ES-D-RTRL (braintrace pp_prop): D-RTRL's trace factorised per matrix, O(n + m) per n×m")
