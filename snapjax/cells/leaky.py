"""The leaky (rate) RNN of RFLO (Murray, eLife 8:e43299, 2019) as a :class:`CellSpec`.

Per unit, with time constant ``τ`` (in steps, ``τ >= 1``) and activation ``φ``::

    u_t = h_{t-1} W_h + x_t W_i + b_i
    h_t = (1 − 1/τ) h_{t-1} + (1/τ) φ(u_t)

Projections ``"i"`` (input, with the bias ``b``) and ``"h"`` (recurrent, no bias): flax's
``SimpleCell`` / :class:`snapjax.VanillaCell` layout, and ``τ = 1`` is that cell.  One state
per unit (``state_dim = 1``).  The direct (within-unit) derivative ``∂h_t/∂h_{t-1}`` *with the
recurrent weights' path left out* is the constant leak ``1 − 1/τ``; RFLO
(:mod:`snapjax.methods.rflo`) keeps only that part of ``D_t``.

Example (``τ = 1`` is the vanilla tanh cell on the same parameters)::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> h, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
    >>> params = sj.LeakyRNNCell(4, tau=1.0).init(jax.random.key(0), h, x)
    >>> a, _ = sj.LeakyRNNCell(4, tau=1.0).apply(params, h, x)
    >>> b, _ = sj.VanillaCell(4).apply(params, h, x)
    >>> bool(jnp.allclose(a, b, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp

from snapjax.cells.modules import _SpecCell
from snapjax.cells.spec import CellSpec, Projection

__all__ = ["leaky_spec", "LeakyRNNCell"]


def _leaky_phi(act, tau, pre, unit, s):
    h = s[..., 0]
    return ((1.0 - 1.0 / tau) * h + act(pre["i"] + pre["h"]) / tau)[..., None]


@functools.lru_cache(maxsize=None)
def leaky_spec(units: int, tau: float = 10.0, activation_fn: Callable = jnp.tanh) -> CellSpec:
    """The leaky RNN's spec (module docstring): ``h_t = (1 − 1/τ) h_{t-1} + φ(u_t)/τ``.

    Raises:
      ValueError: ``tau < 1`` (the leak ``1 − 1/τ`` must lie in ``[0, 1)``).

    Example (``∂h_t/∂h_{t-1}`` without the recurrent weights is the leak ``1 − 1/τ``)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells import leaky_spec
        >>> spec = leaky_spec(3, tau=4.0)
        >>> pre = {"i": jnp.ones((1, 3)), "h": jnp.zeros((1, 3))}
        >>> d = jax.jacfwd(lambda s: spec.phi(pre, {}, s))(jnp.ones((1, 3, 1)))
        >>> float(d[0, 1, 0, 0, 1, 0]), float(d[0, 1, 0, 0, 2, 0])
        (0.75, 0.0)
    """
    if not tau >= 1.0:
        raise ValueError(f"leaky: tau must be >= 1 (steps), got {tau!r}")
    return CellSpec(name="leaky", units=units, state_dim=1, readout=0, unit_params=(),
                    projections=(Projection("i", "input", True), Projection("h", "state", False)),
                    phi=functools.partial(_leaky_phi, activation_fn, float(tau)))


class LeakyRNNCell(_SpecCell):
    """The leaky RNN (:func:`leaky_spec`) as a flax.linen recurrent cell; carry and output ``h``.

    Attributes (besides ``_SpecCell``'s ``features``, inits and ``param_dtype``):
      tau: time constant in steps (``>= 1``).  activation_fn: ``φ`` (default ``tanh``).

    Example (a constant input: ``h`` relaxes towards ``tanh(u)`` at rate ``1/τ``)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> cell, x = sj.LeakyRNNCell(2, tau=2.0), jnp.ones((1, 1))
        >>> variables = cell.init(jax.random.key(0), jnp.zeros((1, 2)), x)
        >>> h1, _ = cell.apply(variables, jnp.zeros((1, 2)), x)
        >>> u = x @ variables["params"]["i"]["kernel"]            # h = 0, bias 0
        >>> bool(jnp.allclose(h1, 0.5 * jnp.tanh(u)))
        True
    """

    tau: float = 10.0
    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return leaky_spec(self.features, self.tau, self.activation_fn)

