"""Event-based GRU (EGRU, Subramoney et al. 2023, arXiv 2303.05641) as a :class:`CellSpec`.

Per unit the state is ``(c, h)`` (``state_dim = 2``, read-out ``h``, the component the
recurrent projections read):

    u  = σ(x W_iu + b_iu + h W_hu)            r = σ(x W_ir + b_ir + h W_hr)
    z  = tanh(x W_iz + b_iz + r ⊙ (h W_hz))
    o_prev = H(c - ϑ)                          (event of the previous step, from the stored c)
    c' = u ⊙ z + (1 - u) ⊙ (c - o_prev ⊙ ϑ)   (reset by subtraction after an event)
    o' = H(c' - ϑ),   h' = o' ⊙ c'

``H`` is the Heaviside step (``H(0) = 0``) whose derivative is replaced by a pseudo-derivative
``γ·ψ((c - ϑ)/ε)`` with ψ one of

* ``"triangle"``     ψ(x) = max(0, 1 - |x|)            (support |c-ϑ| < ε)
* ``"rectangle"``    ψ(x) = 1[|x| < 1]                 (support |c-ϑ| < ε)
* ``"fast_sigmoid"`` ψ(x) = 1 / (1 + |x|)²             (no compact support: every unit always
  has a nonzero derivative, so activity-sparse RTRL can never skip a unit).

A unit is *silent* at a step when ``o = 0`` and its pseudo-derivative is 0: then ``h = 0`` and
``dh/dθ = 0`` exactly, which is what :mod:`snapjax.methods.activity` exploits.

The threshold ``ϑ`` (``params['threshold']``, shape ``(units,)``) is a unit parameter.  With
``learn_threshold=False`` it is wrapped in ``jax.lax.stop_gradient`` inside ``φ``, so every
method (BPTT, RTRL, SnAp) returns an exactly zero gradient for it (it can also be frozen with
``optax.masked``/``optax.set_to_zero`` instead).

``φ`` is purely unit-wise, so every snapjax method (BPTT via :func:`snapjax.bptt_gradient`,
RTRL/SnAp-n via :func:`snapjax.online_method`) works unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from snapjax.cells.modules import _SpecCell
from snapjax.cells.spec import CellSpec, Projection

Array = jax.Array

__all__ = ["PSEUDO_DERIVATIVES", "heaviside", "egru_spec", "EGRUCell"]

PSEUDO_DERIVATIVES = ("triangle", "rectangle", "fast_sigmoid")


def _psi(shape: str, x: Array) -> Array:
    if shape == "triangle":
        return jnp.maximum(0.0, 1.0 - jnp.abs(x))
    if shape == "rectangle":
        return (jnp.abs(x) < 1.0).astype(x.dtype)
    if shape == "fast_sigmoid":
        return 1.0 / (1.0 + jnp.abs(x)) ** 2
    raise ValueError(f"unknown pseudo-derivative {shape!r}; expected one of {PSEUDO_DERIVATIVES}")


@functools.lru_cache(maxsize=None)
def heaviside(shape: str = "triangle", gamma: float = 0.5, epsilon: float = 0.3) -> Callable[[Array], Array]:
    """Heaviside ``H(x) = 1[x > 0]`` with pseudo-derivative ``γ·ψ(x/ε)`` (a ``jax.custom_jvp``).

    Cached: equal arguments return the same function.

    Example (triangle: ``H'(x) = 0.5·max(0, 1 - |x|/0.3)``)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells.egru import heaviside
        >>> H = heaviside("triangle", gamma=0.5, epsilon=0.3)
        >>> x = jnp.array([-0.6, -0.15, 0.0, 0.15, 0.6])
        >>> H(x).tolist()
        [0.0, 0.0, 0.0, 1.0, 1.0]
        >>> [round(float(d), 3) for d in jax.vmap(jax.grad(H))(x)]
        [0.0, 0.25, 0.5, 0.25, 0.0]
    """
    if shape not in PSEUDO_DERIVATIVES:
        raise ValueError(f"unknown pseudo-derivative {shape!r}; expected one of {PSEUDO_DERIVATIVES}")
    if not (gamma >= 0 and epsilon > 0):
        raise ValueError(f"need gamma >= 0 and epsilon > 0, got gamma={gamma}, epsilon={epsilon}")

    @jax.custom_jvp
    def step(x):
        return (x > 0).astype(x.dtype)

    @step.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return step(x), gamma * _psi(shape, x / epsilon).astype(x.dtype) * t

    return step


def _egru_phi(H, learn_threshold, pre, unit, s):
    c = s[..., 0]
    theta = unit["threshold"]
    if not learn_threshold:
        theta = jax.lax.stop_gradient(theta)
    u = jax.nn.sigmoid(pre["iu"] + pre["hu"])
    r = jax.nn.sigmoid(pre["ir"] + pre["hr"])
    z = jnp.tanh(pre["iz"] + r * pre["hz"])
    o_prev = H(c - theta)
    c_new = u * z + (1.0 - u) * (c - o_prev * theta)
    h_new = H(c_new - theta) * c_new
    return jnp.stack([c_new, h_new], axis=-1)


@functools.lru_cache(maxsize=None)
def egru_spec(
    units: int,
    learn_threshold: bool = True,
    pseudo_derivative: str = "triangle",
    gamma: float = 0.5,
    epsilon: float = 0.3,
) -> CellSpec:
    """EGRU cell spec: projections ``iu, ir, iz`` (input, bias) and ``hu, hr, hz`` (state),
    unit parameter ``threshold``; state ``(c, h)``, read-out ``h`` (see module docstring).

    Example (one step: a unit emits ``h = c`` above its threshold, else exactly 0)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step
        >>> from snapjax.cells.egru import EGRUCell, egru_spec
        >>> spec = egru_spec(4)
        >>> [p.name for p in spec.projections], spec.unit_params, spec.state_dim
        (['iu', 'ir', 'iz', 'hu', 'hr', 'hz'], ('threshold',), 2)
        >>> x = jnp.ones((2, 3))
        >>> params = EGRUCell(4).init(jax.random.key(0), EGRUCell(4).initialize_carry(None, x.shape), x)["params"]
        >>> c, h = spec.from_internal(cell_step(spec, params, spec.zero_state(2), x))
        >>> bool(jnp.all(jnp.where(c > params["threshold"], h == c, h == 0)))
        True
    """
    H = heaviside(pseudo_derivative, float(gamma), float(epsilon))
    return CellSpec(
        name="egru",
        units=units,
        state_dim=2,
        readout=1,
        projections=(
            Projection("iu", "input", True),
            Projection("ir", "input", True),
            Projection("iz", "input", True),
            Projection("hu", "state", False),
            Projection("hr", "state", False),
            Projection("hz", "state", False),
        ),
        unit_params=("threshold",),
        phi=functools.partial(_egru_phi, H, bool(learn_threshold)),
        carry_kind="tuple",
    )


class EGRUCell(_SpecCell):
    """EGRU as a flax.linen recurrent cell; carry ``(c, h)``, output ``h`` (sparse events).

    Attributes (besides ``_SpecCell``'s ``features``, inits and ``param_dtype``):
      threshold_init: a float (constant ``ϑ``) or a ``(low, high)`` pair (uniform init).
      learn_threshold: if ``False`` the threshold gets an exactly zero gradient.
      pseudo_derivative: ``"triangle"`` | ``"rectangle"`` | ``"fast_sigmoid"``.
      gamma, epsilon: height and half-width of the pseudo-derivative.

    Example (the threshold's gradient: nonzero when learned, exactly zero when frozen)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.cells.egru import EGRUCell
        >>> carry, x = (0.25 * jnp.ones((2, 4)), jnp.zeros((2, 4))), jnp.ones((2, 3))
        >>> def threshold_grad(cell):
        ...     params = cell.init(jax.random.key(0), carry, x)["params"]
        ...     loss = lambda p: cell.apply({"params": p}, carry, x)[1].sum()   # Σ h'
        ...     return jax.grad(loss)(params)["threshold"]
        >>> g = threshold_grad(EGRUCell(4, threshold_init=0.2))
        >>> g.shape, bool(jnp.any(g != 0))
        ((4,), True)
        >>> float(jnp.abs(threshold_grad(EGRUCell(4, threshold_init=0.2, learn_threshold=False))).max())
        0.0
    """

    threshold_init: Any = 0.5
    learn_threshold: bool = True
    pseudo_derivative: str = "triangle"
    gamma: float = 0.5
    epsilon: float = 0.3

    @property
    def spec(self) -> CellSpec:
        return egru_spec(self.features, self.learn_threshold, self.pseudo_derivative, self.gamma, self.epsilon)

    def _unit_param_init(self, name: str) -> Callable:
        if name != "threshold":  # pragma: no cover
            raise NotImplementedError(name)
        ti = self.threshold_init
        if isinstance(ti, (tuple, list)):
            lo, hi = float(ti[0]), float(ti[1])

            def init(key, shape, dtype=jnp.float32):
                return jax.random.uniform(key, shape, dtype, lo, hi)

            return init
        return nn_constant(float(ti))


def nn_constant(value: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init
