"""RFLO, random-feedback local online learning (Murray, eLife 8:e43299, 2019): SnAp-1 with ``D`` replaced by its leak.

For the leaky RNN (:func:`snapjax.leaky_spec`: ``u_t = h_{t-1} W_h + x_t W_i + b``,
``h_t = (1 − 1/τ) h_{t-1} + (1/τ) φ(u_t)``) the dynamics Jacobian is
``D_t = (1 − 1/τ) 1 + (1/τ) diag(φ'(u_t)) W_hᵀ``; SnAp-1 keeps its diagonal
``(1 − 1/τ) + (1/τ) φ'(u_{i,t}) W_h[i, i]``, RFLO only the leak ``1 − 1/τ``.  One trace per
synapse and example, for the weight from ``j`` to unit ``i``::

    p_ij ← (1 − 1/τ) p_ij + (1/τ) φ'(u_{i,t}) r_{j,t}        r = h_{t-1} (W_h), x_t (W_i), 1 (b)
    ∂L_t/∂W_ij ≈ Σ_b c_{t,b,i} p_ij,                           c_t = ∂L_t/∂h_t

With the learner's head ``y = h W_out + b_out`` the cotangent is ``c_t = ε_t W_outᵀ``
(symmetric feedback) or ``ε_t B`` with a fixed random ``B``
(``OnlineLearner(feedback="random")``, Murray's rule).  For any cell with one state per unit
(a :class:`snapjax.CellSpec` with ``state_dim == 1``) "the leak" is the direct derivative
``∂φ_i/∂s_i`` (``∂h_t/∂h_{t-1}`` with the recurrent input held fixed; the leaky RNN's is the
constant ``1 − 1/τ``): that is e-prop with κ = 0 (:mod:`snapjax.methods.eprop`), whose code RFLO
shares.

* exact when ``W_h = 0`` (``D_t`` is then the leak): equal to exact RTRL (tested);
* shapes: :class:`~snapjax.methods.eprop.EPropState` with ``filtered = {}``; kernels
  ``(B, n_in_p, units, 1)``, the bias ``(B, units, 1)``;
* cost per step: the forward plus ``O(p)`` (elementwise); memory per example ``p`` floats;
* bias: **biased** (every path through ``W_h`` dropped, and random feedback when chosen).

References: J. M. Murray, "Local online learning in recurrent networks with random feedback",
eLife 8:e43299 (2019).

Example (float64; the trace after two steps is the recursion written out)::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> with jax.enable_x64(True):
    ...     cell, x = sj.LeakyRNNCell(3, tau=4.0, param_dtype=jnp.float64), jnp.ones((1, 2), jnp.float64)
    ...     params = cell.init(jax.random.key(0), jnp.zeros((1, 3)), x)["params"]
    ...     method = sj.online_method("rflo", cell, params)
    ...     h, st, p = jnp.zeros((1, 3)), method.init(1, jnp.float64), jnp.zeros((2, 3))
    ...     for t in range(2):
    ...         u = h @ params["h"]["kernel"] + x @ params["i"]["kernel"] + params["i"]["bias"]
    ...         p = 0.75 * p + 0.25 * (1 - jnp.tanh(u) ** 2) * x.T          # W_i's traces
    ...         h, st, _ = method.step(params, h, st, x)
    ...     bool(jnp.allclose(st.eligibility["i"]["kernel"][0, ..., 0], p, rtol=1e-12))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from snapjax.cells.recurrent import Recurrent
from snapjax.methods.eprop import EProp, build_eprop
from snapjax.methods.registry import register_method

PyTree = Any

__all__ = ["RFLO"]


@dataclasses.dataclass(frozen=True, eq=False)
class RFLO(EProp):
    """RFLO for a one-state-per-unit compressed cell (build with ``snapjax.online_method("rflo", ...)``):
    :class:`~snapjax.methods.eprop.EProp` with κ = 0 under its own name.

    Example::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell = sj.LeakyRNNCell(4, tau=5.0)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 2)))["params"]
        >>> method = sj.online_method("rflo", cell, params)
        >>> type(method).__name__, method.name, method.num_stored()       # 2·4 + 4·4 + 4 synapses
        ('RFLO', 'rflo', 28)
    """

    name: str = "rflo"


def _build(cell: Recurrent, params: PyTree, *, masks: Any = None, precision: Any = None, verify: bool = True) -> RFLO:
    """:class:`RFLO` for ``cell``.

    Raises:
      ValueError: the cell has no compressed form or ``state_dim != 1`` (use ``"eprop"`` for
        LIF/ALIF, LSTM); bad parameters, masks or precision.
    """
    spec = cell.spec
    if spec is not None and spec.state_dim != 1:
        raise ValueError(f"rflo needs a cell with one state per unit (state_dim == 1, e.g. snapjax.LeakyRNNCell); "
                         f"got {cell.name!r} with state_dim={spec.state_dim} (use 'eprop' for it)")
    method = build_eprop(cell, params, kappa=0.0, masks=masks, precision=precision, verify=verify, name="rflo",
                         cls=RFLO)
    assert isinstance(method, RFLO)
    return method


register_method("rflo", _build, options=("masks", "precision", "verify"),
                summary="RFLO (Murray 2019): one leak-decayed trace per synapse, SnAp-1 with D replaced by its leak "
                        "(one-state cells)")
