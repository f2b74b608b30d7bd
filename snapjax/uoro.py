"""UORO: Unbiased Online Recurrent Optimization (Tallec & Ollivier 2017).

UORO keeps, per batch example, a rank-one estimate of the influence ``J_t = ds_t/dθ``:

    J_t ≈ s̃_t θ̃_tᵀ,      s̃ (units, m),  θ̃ (parameter-shaped)

updated with fresh random signs ``ν`` (Rademacher, shape of the state) each step:

    s̃_t = ρ₀ D_t s̃_{t-1} + ρ₁ ν
    θ̃_t = θ̃_{t-1} / ρ₀ + (νᵀ I_t) / ρ₁
    ρ₀ = sqrt(|θ̃_{t-1}| / (|D_t s̃_{t-1}| + eps)) + eps,   ρ₁ = sqrt(|νᵀ I_t| / (|ν| + eps)) + eps

Expanding ``s̃_t θ̃_tᵀ = D s̃ θ̃ᵀ + ννᵀ I + (ρ₀/ρ₁) D s̃ (νᵀI) + (ρ₁/ρ₀) ν θ̃ᵀ``: the two cross
terms are odd in ``ν`` (ρ₀, ρ₁ are even in ``ν``) and ``E[ννᵀ] = 1``, so given the past,
``E[s̃_t θ̃_tᵀ] = D_t E[s̃θ̃ᵀ]_{t-1} + I_t`` — the estimate is unbiased for every ``t``, and so
is the online gradient ``g = Σ_b (∂L/∂s_b · s̃_b) θ̃_b`` (linear in ``s̃ θ̃ᵀ``).  The ρ's only
balance the two factors to minimise variance.

Cost per step: one ``jax.jvp`` of the cell step w.r.t. the state (``D s̃``) and one per-example
``jax.vjp`` w.r.t. the parameters (``νᵀ I``), i.e. O(d·(k² + p)) like BPTT; memory ``k + p``
per example.  Masked weights (static masks) get exactly zero ``θ̃`` and gradient.

The random key is carried inside the method state and split every step, so a whole sequence
is a pure function of the initial key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells import CellSpec, as_cell_spec, cell_step
from snapjax.influence import _check_masks

Array = jax.Array
PyTree = Any

__all__ = ["UOROState", "UOROTracker", "uoro_tracker"]


class UOROState(NamedTuple):
    """UORO method state: ``s_tilde (B, units, m)``, ``theta_tilde`` (parameter pytree, each
    leaf with a leading batch axis ``B``), ``key`` (PRNG key, split every step)."""

    s_tilde: Array
    theta_tilde: PyTree
    key: Array


def _sq_norm_per_example(tree: PyTree) -> Array:
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(jnp.reshape(x * x, (x.shape[0], -1)), axis=1) for x in leaves)


def _is_key(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _typed_key(key: Any) -> Array:
    """A typed PRNG key; legacy raw ``uint32`` keys (``jax.random.PRNGKey``) are wrapped, so that
    the state's running key is recognised as a key (never rewound, never treated as batched)."""
    if _is_key(key):
        return key
    raw = jnp.asarray(key)
    if raw.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key (jax.random.key) or a raw uint32 key, got dtype {raw.dtype}")
    return jax.random.wrap_key_data(raw)

@dataclasses.dataclass(frozen=True, eq=False)
class UOROTracker:
    """Static configuration of UORO for one cell and parameter layout.

    Shares the online-method protocol of :class:`snapjax.InfluenceTracker`:
    ``init(batch_size, dtype, key=None)``, ``step(params, state, method_state, x)``,
    ``gradient(method_state, dloss_dstate)``, attributes ``spec`` and ``masks``.

    Attributes:
      spec: the cell.  masks: per projection name a bool ``(n_in, units)`` array or ``None``.
      param_shapes: shapes of the parameter leaves (dict structure of the parameters).
      n_in: input size.  eps: stabiliser of ρ₀, ρ₁.  precision: matmul precision of the cell.
    """

    spec: CellSpec
    masks: dict
    param_shapes: PyTree
    n_in: int
    eps: float = 1e-7
    precision: Any = None
    method: str = "uoro"

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> UOROState:
        """Zero ``s̃, θ̃`` for ``batch_size`` examples; ``key`` seeds the random signs
        (``jax.random.key(0)`` if ``None``: pass distinct keys for independent estimates)."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"UORO state dtype must be floating point, got {dtype}")
        key = jax.random.key(0) if key is None else _typed_key(key)
        b = int(batch_size)
        s_tilde = jnp.zeros((b, self.spec.units, self.spec.state_dim), dtype)
        theta = jax.tree.map(
            lambda s: jnp.zeros((b,) + tuple(s), dtype), self.param_shapes, is_leaf=lambda x: isinstance(x, tuple)
        )
        return UOROState(s_tilde, theta, key)

    def num_stored(self) -> int:
        """Stored floats per example: ``k + p`` (dense-equivalent p; masked entries are zeros)."""
        leaves = jax.tree.leaves(self.param_shapes, is_leaf=lambda x: isinstance(x, tuple))
        return int(self.spec.state_size + sum(int(np.prod(s)) for s in leaves))

    def _f(self, params, s, x):
        return cell_step(self.spec, params, s, x, self.masks, self.precision)

    def step(self, params: PyTree, state: Array, method_state: UOROState, x: Array) -> tuple[Array, UOROState]:
        """One step: ``s_t`` and the updated rank-one estimate (see module docstring)."""
        spec = self.spec
        if jnp.ndim(state) != 3 or jnp.shape(state)[1:] != (spec.units, spec.state_dim):
            raise ValueError(
                f"state must have shape (B, {spec.units}, {spec.state_dim}) (internal layout), got {jnp.shape(state)}"
            )
        batch = jnp.shape(state)[0]
        if jnp.ndim(x) != 2 or jnp.shape(x) != (batch, self.n_in):
            raise ValueError(f"x must have shape ({batch}, {self.n_in}), got {jnp.shape(x)}")
        s_tilde, theta, key = method_state
        if jnp.shape(s_tilde) != jnp.shape(state):
            raise ValueError(f"UORO state is for shape {jnp.shape(s_tilde)}, state has {jnp.shape(state)}")
        dtype = s_tilde.dtype
        eps = self.eps

        # D s̃ (forward mode; examples are independent so one batched JVP does all of them).
        new_state, ds = jax.jvp(lambda s: self._f(params, s, x), (state,), (s_tilde.astype(state.dtype),))
        ds = ds.astype(dtype)

        key, sub = jax.random.split(key)
        nu = jax.random.rademacher(sub, jnp.shape(state), dtype)

        # νᵀ I per example (reverse mode w.r.t. the parameters, one example at a time).
        def vjp_one(s_b, x_b, nu_b):
            _, pull = jax.vjp(lambda p: self._f(p, s_b[None], x_b[None])[0], params)
            return pull(nu_b.astype(new_state.dtype))[0]

        nu_i = jax.vmap(vjp_one)(state, x, nu)
        nu_i = jax.tree.map(lambda a: a.astype(dtype), nu_i)

        theta_norm = jnp.sqrt(_sq_norm_per_example(theta))
        ds_norm = jnp.sqrt(jnp.sum(ds * ds, axis=(1, 2)))
        nui_norm = jnp.sqrt(_sq_norm_per_example(nu_i))
        nu_norm = jnp.sqrt(jnp.asarray(spec.state_size, dtype))
        rho0 = jnp.sqrt(theta_norm / (ds_norm + eps)) + eps  # (B,)
        rho1 = jnp.sqrt(nui_norm / (nu_norm + eps)) + eps  # (B,)

        s_new = rho0[:, None, None] * ds + rho1[:, None, None] * nu

        def upd(th, ni):
            shape = (batch,) + (1,) * (th.ndim - 1)
            return th / rho0.reshape(shape) + ni / rho1.reshape(shape)

        theta_new = jax.tree.map(upd, theta, nu_i)
        return new_state, UOROState(s_new, theta_new, key)

    def gradient(self, method_state: UOROState, dloss_dstate: Array) -> PyTree:
        """Unbiased online gradient ``Σ_b (∂L/∂s_b · s̃_b) θ̃_b`` in the parameters' shapes."""
        spec = self.spec
        if jnp.ndim(dloss_dstate) != 3 or jnp.shape(dloss_dstate)[1:] != (spec.units, spec.state_dim):
            raise ValueError(
                f"dloss_dstate must have shape (B, {spec.units}, {spec.state_dim}), got {jnp.shape(dloss_dstate)}"
            )
        s_tilde, theta, _ = method_state
        c = jnp.sum(dloss_dstate.astype(s_tilde.dtype) * s_tilde, axis=(1, 2))  # (B,)
        return jax.tree.map(lambda th: jnp.tensordot(c, th, axes=(0, 0)), theta)


def uoro_tracker(
    cell: Any,
    params: PyTree,
    masks: Mapping[str, Any] | None = None,
    eps: float = 1e-7,
    precision: Any = None,
) -> UOROTracker:
    """Build a :class:`UOROTracker` for ``cell`` with parameters ``params`` (shapes only).

    Args:
      cell: a snapjax cell, a supported flax.linen cell or a :class:`CellSpec`.
      params: the cell's parameter dict.
      masks: optional static 0/1 masks per projection name (masked weights get zero gradient).
      eps: stabiliser in ρ₀ and ρ₁ (must be > 0).
      precision: matmul precision of the cell step.
    """
    spec = as_cell_spec(cell)
    spec.check_params(params)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    mask_dict = _check_masks(spec, params, masks)
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    return UOROTracker(
        spec=spec,
        masks=mask_dict,
        param_shapes=shapes,
        n_in=spec.input_size(params),
        eps=float(eps),
        precision=precision,
    )
