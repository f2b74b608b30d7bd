"""Linear Recurrent Unit (LRU, Orvieto et al. 2023, arXiv 2303.06349) as a :class:`CellSpec`.

Per unit ``i`` (``units = N`` complex units) the recurrence is diagonal and complex:

    λ_i = exp(−exp(ν_i) + i·exp(θ_i))           (|λ_i| = exp(−exp(ν_i)) < 1 for finite ν_i)
    h_t = λ ⊙ h_{t−1} + γ ⊙ (B x_t),            B = B_re + i·B_im  (input projections)

stored as two real components per unit, ``s[..., 0] = Re h``, ``s[..., 1] = Im h``
(``state_dim = 2``):

    re' = Re λ · re − Im λ · im + γ ⊙ (x B_re)
    im' = Re λ · im + Im λ · re + γ ⊙ (x B_im)

Normalisation ``γ``: by default a learnable per-unit parameter ``γ = exp(γ_log)`` initialised to
``sqrt(1 − |λ|²)``, as in the paper's code (``learn_gamma=True``); with ``learn_gamma=False``
it is computed from ``λ`` at every step, ``γ = sqrt(1 − |λ|²)`` (no ``gamma_log`` parameter,
the gradient reaches ``ν`` through ``γ`` as well).

Parameters (flax layout): ``B_re``/``B_im`` ``{'kernel': (n_in, N)}`` (no bias), unit parameters
``nu_log``, ``theta_log`` (and ``gamma_log``), each ``(N,)``.  There is no state projection:
the dynamics Jacobian ``D`` is block diagonal (one 2×2 block per unit), so SnAp-1 *is* exact
RTRL, at the cost of a per-example copy of the parameters (×2 components).

The layer emits both components, ``CellSpec.layer_output(s) = concat(re, im)`` of shape
``(B, 2N)`` (``CellSpec.emit``), so a following ``nn.Dense`` computes the paper's
``Re(C h) = C_re h_re − C_im h_im`` (the ``D x`` skip and the MLP/GLU belong to the model).
``CellSpec.output`` (the read-out component) is ``re``; the flax carry is the tuple
``(re, im)``.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from snapjax.cells.lru import LRUCell
    >>> cell = LRUCell(8, r_min=0.9, r_max=0.999)
    >>> carry = cell.initialize_carry(jax.random.key(0), (2, 3))
    >>> params = cell.init(jax.random.key(1), carry, jnp.zeros((2, 3)))["params"]
    >>> sorted(params)
    ['B_im', 'B_re', 'gamma_log', 'nu_log', 'theta_log']
    >>> (re, im), y = cell.apply({"params": params}, carry, jnp.ones((2, 3)))
    >>> y.shape                                   # concat(re, im)
    (2, 16)
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.cells.builtin import _cached_spec
from snapjax.cells.modules import _SpecCell
from snapjax.cells.spec import CellSpec, Projection

Array = jax.Array

__all__ = ["lru_spec", "lru_lambda", "LRUCell"]


def lru_lambda(params) -> tuple[Array, Array]:
    """``(Re λ, Im λ)``, each ``(N,)``, from ``params['nu_log']`` and ``params['theta_log']``:
    ``λ = exp(−exp(ν_log) + i·exp(θ_log))``.

    Example (``|λ| = exp(−exp(ν_log))``, ``arg λ = exp(θ_log)``)::

        >>> import jax.numpy as jnp
        >>> from snapjax.cells.lru import lru_lambda
        >>> params = {"nu_log": jnp.log(jnp.array([0.1, 1.0])), "theta_log": jnp.log(jnp.array([0.5, 3.0]))}
        >>> re, im = lru_lambda(params)
        >>> [round(float(r), 4) for r in jnp.hypot(re, im)], [round(float(a), 4) for a in jnp.arctan2(im, re)]
        ([0.9048, 0.3679], [0.5, 3.0])
    """
    mag = jnp.exp(-jnp.exp(params["nu_log"]))
    phase = jnp.exp(params["theta_log"])
    return mag * jnp.cos(phase), mag * jnp.sin(phase)


def _lru_phi(learn_gamma, pre, unit, s):
    lam_re, lam_im = lru_lambda(unit)
    if learn_gamma:
        gamma = jnp.exp(unit["gamma_log"])
    else:
        gamma = jnp.sqrt(1.0 - jnp.exp(-2.0 * jnp.exp(unit["nu_log"])))
    re, im = s[..., 0], s[..., 1]
    new_re = lam_re * re - lam_im * im + gamma * pre["B_re"]
    new_im = lam_re * im + lam_im * re + gamma * pre["B_im"]
    return jnp.stack([new_re, new_im], axis=-1)


def _emit_re_im(s: Array) -> Array:
    """``(B, N, 2) -> (B, 2N)``: ``concat(re, im)``."""
    return jnp.concatenate([s[..., 0], s[..., 1]], axis=-1)


@_cached_spec
def lru_spec(units: int, learn_gamma: bool = True) -> CellSpec:
    """LRU cell spec (module docstring): projections ``B_re``, ``B_im`` (input, no bias), unit
    parameters ``nu_log``, ``theta_log`` (+ ``gamma_log`` if ``learn_gamma``), state
    ``(re, im)``, emits ``concat(re, im)``.

    Example::

        >>> import jax.numpy as jnp
        >>> from snapjax.cells.lru import lru_spec
        >>> lru_spec(3).unit_params, lru_spec(3, learn_gamma=False).unit_params
        (('nu_log', 'theta_log', 'gamma_log'), ('nu_log', 'theta_log'))
        >>> s = jnp.ones((2, 3, 2))                   # (B, N, (re, im))
        >>> lru_spec(3).output(s).shape, lru_spec(3).layer_output(s).shape
        ((2, 3), (2, 6))
    """
    if not isinstance(units, int) or units < 1:
        raise ValueError(f"LRU needs a positive int number of units, got {units!r}")
    return CellSpec(
        name="lru",
        units=units,
        state_dim=2,
        readout=0,
        projections=(Projection("B_re", "input", False), Projection("B_im", "input", False)),
        unit_params=("nu_log", "theta_log") + (("gamma_log",) if learn_gamma else ()),
        phi=functools.partial(_lru_phi, bool(learn_gamma)),
        carry_kind="tuple",
        emit=_emit_re_im,
    )


def _ring_uniform(key, shape, dtype):
    """``U(eps, 1 − 16·eps)`` (``eps = finfo(dtype).eps``): keeps ``ν`` finite and ``|λ| < 1``
    representable in ``dtype`` even for ``r_max = 1``."""
    eps = jnp.finfo(dtype).eps
    return jax.random.uniform(key, shape, dtype, eps, 1.0 - 16 * eps)


class LRUCell(_SpecCell):
    """LRU as a flax.linen recurrent cell: carry ``(re, im)``, output ``concat(re, im)`` ``(B, 2N)``.

    Ring initialisation (paper, Lemma 3.2): ``|λ|`` uniform on the ring ``[r_min, r_max]`` in the
    complex plane, ``ν_log = log(−½ log(u₁ (r_max² − r_min²) + r_min²))``,
    ``θ_log = log(max_phase · u₂)``, ``γ_log = log sqrt(1 − |λ|²)``; ``B_re``, ``B_im`` from
    ``N(0, 1/(2 n_in))`` (``kernel_init``).

    Attributes (besides ``features``, ``kernel_init``, ``param_dtype``):
      r_min, r_max: ring radii, ``0 <= r_min < r_max <= 1``.
      max_phase: largest initial phase ``exp(θ)``.
      learn_gamma: ``γ`` learnable (``gamma_log``) or computed from ``λ``.

    Example (the initial eigenvalues lie on the ring, ``γ = sqrt(1 − |λ|²)``)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells.lru import LRUCell, lru_lambda
        >>> cell = LRUCell(8, r_min=0.5, r_max=0.9)
        >>> carry = cell.initialize_carry(jax.random.key(0), (2, 3))
        >>> params = cell.init(jax.random.key(1), carry, jnp.zeros((2, 3)))["params"]
        >>> mag = jnp.hypot(*lru_lambda(params))
        >>> bool(jnp.all((mag >= 0.5 - 1e-6) & (mag <= 0.9 + 1e-6)))
        True
        >>> bool(jnp.allclose(jnp.exp(params["gamma_log"]), jnp.sqrt(1 - mag**2), atol=1e-5))
        True
    """

    kernel_init: Callable = nn.initializers.variance_scaling(0.5, "fan_in", "normal")
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 6.28
    learn_gamma: bool = True

    @property
    def spec(self) -> CellSpec:
        if not (0.0 <= self.r_min < self.r_max <= 1.0) or not self.max_phase > 0:
            raise ValueError(
                f"LRUCell needs 0 <= r_min < r_max <= 1 and max_phase > 0, got r_min={self.r_min}, "
                f"r_max={self.r_max}, max_phase={self.max_phase}"
            )
        return lru_spec(self.features, self.learn_gamma)

    def _unit_param_init(self, name: str) -> Callable:
        r_min, r_max, max_phase = float(self.r_min), float(self.r_max), float(self.max_phase)

        def nu_init(key, shape, dtype=jnp.float32):
            u = _ring_uniform(key, shape, dtype)
            return jnp.log(-0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2))

        def theta_init(key, shape, dtype=jnp.float32):
            return jnp.log(max_phase * _ring_uniform(key, shape, dtype))

        def gamma_init(key, shape, dtype=jnp.float32):
            del key, shape  # a function of the ν just created (unit parameters are made in order)
            nu = self.get_variable("params", "nu_log")
            return (0.5 * jnp.log1p(-jnp.exp(-2.0 * jnp.exp(nu)))).astype(dtype)

        inits = {"nu_log": nu_init, "theta_log": theta_init, "gamma_log": gamma_init}
        if name not in inits:  # pragma: no cover
            raise NotImplementedError(name)
        return inits[name]

