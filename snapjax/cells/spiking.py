"""Spiking cells: leaky integrate-and-fire (LIF) and adaptive LIF (ALIF) neurons as :class:`CellSpec`.

The neuron models of e-prop (Bellec, Scherr, Subramoney, Hajek, Salaj, Legenstein, Maass, "A
solution to the learning dilemma for recurrent networks of spiking neurons", Nature
Communications 11:3625, 2020, Methods), in discrete time with ``α = exp(−δt/τ_m)`` and
``ρ = exp(−δt/τ_a)``.  **LIF** (per unit ``j``; input ``x_t``, spikes ``z``)::

    v_t = α v_{t-1} + (x_t W_i)_j + (z_{t-1} W_h)_j − z_{j,t-1} v_th     (soft reset)
    z_t = H((v_t − v_th) / v_th)

**ALIF** adds an adaptive threshold ``A_t = v_th + β a_t`` with ``a_t = ρ a_{t-1} + z_{t-1}``
and spikes ``z_t = H((v_t − A_t) / v_th)``; the reset stays ``z_{t-1} v_th``.

``H`` is the Heaviside step of :func:`snapjax.heaviside` on the scaled voltage
``(v − A)/v_th`` with ``ε = 1``, so with the default ``"triangle"`` shape the pseudo-derivative
is the paper's ``∂z_t/∂v_t = (γ/v_th)·max(0, 1 − |v_t − A_t|/v_th)`` (``= γ·max(0, 1 − |v −
v_th|/v_th)`` for ``v_th = 1``); every method (BPTT, RTRL, e-prop) differentiates that same
``jax.custom_jvp``.

As a :class:`CellSpec`: projections ``"i"`` (input, ``(n_in, units)``) and ``"h"`` (recurrent,
``(units, units)``), no biases; the state per unit is ``(v, z)`` for LIF (``state_dim = 2``)
and ``(v, a, z)`` for ALIF (``state_dim = 3``): the read-out component is the spike ``z``
(last), which the recurrent projection reads and the layer emits; the unit-wise ``φ`` does the
rest.  The flax carry is the tuple of components.  With ``detach_reset=True`` (default, as in
the paper's e-prop derivation and code) the reset term uses ``stop_gradient(z_{t-1})``: no
gradient flows through the reset (the forward pass is unchanged).  The paper excludes
self-connections (``W_h[j, j] = 0``): pass ``masks={"h": 1 - eye}`` to a method for that.

Example (one LIF step: a unit spikes exactly where its membrane crossed the threshold)::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> cell, x = sj.LIFCell(4, v_th=0.5), jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(None, x.shape)             # (v, z), each (2, 4)
    >>> params = cell.init(jax.random.key(0), carry, x)["params"]
    >>> (v, z), y = cell.apply({"params": params}, carry, x)
    >>> bool(jnp.array_equal(z, (v > 0.5).astype(v.dtype))), bool(jnp.array_equal(y, z))
    (True, True)
    >>> sj.verify_spec(cell.spec, params)                       # compressed Jacobians == autodiff
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from snapjax.cells.egru import PSEUDO_DERIVATIVES, heaviside
from snapjax.cells.modules import _SpecCell
from snapjax.cells.spec import CellSpec, Projection

Array = jax.Array

__all__ = ["lif_spec", "alif_spec", "LIFCell", "ALIFCell"]

_PROJECTIONS = (Projection("i", "input", False), Projection("h", "state", False))


def _check(name: str, alpha: float, v_th: float, gamma: float, pseudo_derivative: str, rho: float = 0.5) -> None:
    if not (0.0 <= alpha <= 1.0 and 0.0 <= rho <= 1.0):
        raise ValueError(f"{name}: decay factors must lie in [0, 1], got alpha={alpha}, rho={rho}")
    if not v_th > 0 or not gamma >= 0:
        raise ValueError(f"{name}: need v_th > 0 and gamma >= 0, got v_th={v_th}, gamma={gamma}")
    if pseudo_derivative not in PSEUDO_DERIVATIVES:
        raise ValueError(f"{name}: unknown pseudo-derivative {pseudo_derivative!r}; "
                         f"expected one of {PSEUDO_DERIVATIVES}")


def _lif_phi(H, alpha, v_th, detach_reset, pre, unit, s):
    v, z = s[..., 0], s[..., 1]
    reset = jax.lax.stop_gradient(z) if detach_reset else z
    v_new = alpha * v + pre["i"] + pre["h"] - reset * v_th
    return jnp.stack([v_new, H((v_new - v_th) / v_th)], axis=-1)


def _alif_phi(H, alpha, rho, beta, v_th, detach_reset, pre, unit, s):
    v, a, z = s[..., 0], s[..., 1], s[..., 2]
    reset = jax.lax.stop_gradient(z) if detach_reset else z
    v_new = alpha * v + pre["i"] + pre["h"] - reset * v_th
    a_new = rho * a + z
    z_new = H((v_new - v_th - beta * a_new) / v_th)
    return jnp.stack([v_new, a_new, z_new], axis=-1)


@functools.lru_cache(maxsize=None)
def lif_spec(units: int, alpha: float = math.exp(-1 / 20), v_th: float = 1.0, gamma: float = 0.3,
             pseudo_derivative: str = "triangle", detach_reset: bool = True) -> CellSpec:
    """LIF cell spec (module docstring): state ``(v, z)``, read-out ``z``, projections ``i``, ``h``.

    Args:
      units: neurons.  alpha: membrane decay ``exp(−δt/τ_m)`` in ``[0, 1]``.
      v_th: threshold (> 0).  gamma: height of the pseudo-derivative (``γ_pd``, 0.3 in the paper).
      pseudo_derivative: a shape of :data:`snapjax.PSEUDO_DERIVATIVES`, on ``(v − v_th)/v_th``.
      detach_reset: no gradient through the reset term.

    Cached: equal arguments give the same spec.

    Example (at ``v = 1.5 v_th`` a spike, and ``∂z/∂v = (γ/v_th)·(1 − 0.5)``)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells import lif_spec
        >>> spec = lif_spec(1, alpha=0.9, v_th=2.0, gamma=0.3)
        >>> spec.state_dim, spec.readout, [p.name for p in spec.projections]
        (2, 1, ['i', 'h'])
        >>> z_of = lambda i: spec.phi({"i": i, "h": jnp.zeros(1)}, {}, jnp.zeros((1, 2)))[0, 1]
        >>> float(z_of(jnp.array([3.0]))), round(float(jax.grad(z_of)(jnp.array([3.0]))[0]), 6)
        (1.0, 0.075)
    """
    _check("lif", alpha, v_th, gamma, pseudo_derivative)
    H = heaviside(pseudo_derivative, float(gamma), 1.0)
    return CellSpec(name="lif", units=units, state_dim=2, readout=1, projections=_PROJECTIONS, unit_params=(),
                    phi=functools.partial(_lif_phi, H, float(alpha), float(v_th), bool(detach_reset)),
                    carry_kind="tuple")


@functools.lru_cache(maxsize=None)
def alif_spec(units: int, alpha: float = math.exp(-1 / 20), rho: float = math.exp(-1 / 200), beta: float = 0.07,
              v_th: float = 1.0, gamma: float = 0.3, pseudo_derivative: str = "triangle",
              detach_reset: bool = True) -> CellSpec:
    """ALIF cell spec (module docstring): state ``(v, a, z)``, read-out ``z``; threshold
    ``A_t = v_th + β a_t``, ``a_t = ρ a_{t-1} + z_{t-1}``.

    Args (besides :func:`lif_spec`'s):
      rho: adaptation decay ``exp(−δt/τ_a)`` in ``[0, 1]``.  beta: adaptation strength ``β``.

    Example (after earlier spikes, ``a = 1``: the threshold is ``1 + β`` and the same drive no longer fires)::

        >>> import jax.numpy as jnp
        >>> from snapjax.cells import alif_spec
        >>> pre, s = {"i": jnp.array([1.25]), "h": jnp.zeros(1)}, jnp.array([[0.0, 1.0, 0.0]])  # (v, a, z)
        >>> alif_spec(1, alpha=0.0, rho=1.0, beta=0.5).phi(pre, {}, s).tolist()
        [[1.25, 1.0, 0.0]]
        >>> alif_spec(1, alpha=0.0, rho=1.0, beta=0.0).phi(pre, {}, s).tolist()
        [[1.25, 1.0, 1.0]]
    """
    _check("alif", alpha, v_th, gamma, pseudo_derivative, rho)
    H = heaviside(pseudo_derivative, float(gamma), 1.0)
    return CellSpec(name="alif", units=units, state_dim=3, readout=2, projections=_PROJECTIONS, unit_params=(),
                    phi=functools.partial(_alif_phi, H, float(alpha), float(rho), float(beta), float(v_th),
                                          bool(detach_reset)),
                    carry_kind="tuple")


class LIFCell(_SpecCell):
    """LIF neurons as a flax.linen recurrent cell: carry ``(v, z)``, output the spikes ``z``.

    Attributes (besides ``_SpecCell``'s ``features``, inits and ``param_dtype``):
      tau_m: membrane time constant; ``α = exp(−dt/tau_m)``.  dt: time step.
      v_th: threshold.  gamma: pseudo-derivative height.  pseudo_derivative: its shape.
      detach_reset: no gradient through the reset.

    Example (BPTT through ``flax.linen.RNN`` reaches the input weights via the pseudo-derivative)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = sj.LIFCell(4, tau_m=10.0, v_th=0.5)
        >>> round(cell.alpha, 4), cell.spec.name, cell.spec.state_dim
        (0.9048, 'lif', 2)
        >>> rnn, xs = nn.RNN(cell), jnp.ones((2, 6, 3))
        >>> variables = rnn.init(jax.random.key(0), xs)
        >>> g = jax.grad(lambda v: rnn.apply(v, xs).sum())(variables)["params"]["cell"]["i"]["kernel"]
        >>> g.shape, bool(jnp.any(g != 0))
        ((3, 4), True)
    """

    tau_m: float = 20.0
    dt: float = 1.0
    v_th: float = 1.0
    gamma: float = 0.3
    pseudo_derivative: str = "triangle"
    detach_reset: bool = True

    @property
    def alpha(self) -> float:
        return math.exp(-self.dt / self.tau_m)

    @property
    def spec(self) -> CellSpec:
        return lif_spec(self.features, self.alpha, self.v_th, self.gamma, self.pseudo_derivative, self.detach_reset)


class ALIFCell(LIFCell):
    """ALIF neurons as a flax.linen recurrent cell: carry ``(v, a, z)``, output the spikes ``z``.

    Attributes (besides :class:`LIFCell`'s):
      tau_a: adaptation time constant; ``ρ = exp(−dt/tau_a)``.  beta: adaptation strength.

    Example (steady input: adaptation thins the spike train out compared with LIF)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> xs = jnp.ones((1, 50, 2))
        >>> ones = lambda key, shape, dtype=jnp.float32: jnp.full(shape, 0.3, dtype)
        >>> zeros = lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
        >>> def spikes(cell):
        ...     rnn = nn.RNN(cell)
        ...     return int(rnn.apply(rnn.init(jax.random.key(0), xs), xs).sum())
        >>> kw = dict(kernel_init=ones, recurrent_kernel_init=zeros, tau_m=5.0)
        >>> spikes(sj.ALIFCell(1, beta=0.5, tau_a=100.0, **kw)) < spikes(sj.LIFCell(1, **kw))
        True
        >>> sj.ALIFCell(3).initialize_carry(None, (2, 5))[1].shape    # (v, a, z)
        (2, 3)
    """

    tau_a: float = 200.0
    beta: float = 0.07

    @property
    def rho(self) -> float:
        return math.exp(-self.dt / self.tau_a)

    @property
    def spec(self) -> CellSpec:
        return alif_spec(self.features, self.alpha, self.rho, self.beta, self.v_th, self.gamma,
                         self.pseudo_derivative, self.detach_reset)
