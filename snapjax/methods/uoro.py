"""UORO: Unbiased Online Recurrent Optimization (Tallec & Ollivier 2017), for any cell.

UORO keeps, per batch example, a rank-one estimate of the influence ``J_t = ds_t/dθ``:

    J_t ≈ s̃_t θ̃_tᵀ,      s̃ (carry-shaped),  θ̃ (parameter-shaped)

updated with fresh random signs ``ν`` (Rademacher, carry-shaped) each step:

    s̃_t = ρ₀ D_t s̃_{t-1} + ρ₁ ν
    θ̃_t = θ̃_{t-1} / ρ₀ + (νᵀ I_t) / ρ₁
    ρ₀ = sqrt(|θ̃_{t-1}| / (|D_t s̃_{t-1}| + eps)) + eps,   ρ₁ = sqrt(|νᵀ I_t| / (|ν| + eps)) + eps

Expanding ``s̃_t θ̃_tᵀ = D s̃ θ̃ᵀ + ννᵀ I + (ρ₀/ρ₁) D s̃ (νᵀI) + (ρ₁/ρ₀) ν θ̃ᵀ``: the two cross
terms are odd in ``ν`` (ρ₀, ρ₁ are even in ``ν``) and ``E[ννᵀ] = 1``, so given the past,
``E[s̃_t θ̃_tᵀ] = D_t E[s̃θ̃ᵀ]_{t-1} + I_t`` — the estimate is unbiased for every ``t``, and so
is the online gradient ``g = Σ_b (∂L/∂s_b · s̃_b) θ̃_b`` (linear in ``s̃ θ̃ᵀ``).  The ρ's only
balance the two factors to minimise variance.

Only ``cell.apply`` on the flax carry is used, so UORO works for every
:class:`snapjax.Recurrent` (compressed or generic): ``D s̃`` is one batched ``jax.jvp`` of the
step w.r.t. the carry, ``νᵀ I`` one per-example ``jax.vjp`` w.r.t. the parameters (``vmap``
over examples).  Cost per step O(d·(k² + p)) like BPTT; memory ``k + p`` per example.  Masked
weights (static masks) act as zeros and get exactly zero ``θ̃`` and gradient.

The random key is carried inside the method state (shared by the batch, batch axis ``None``)
and split every step, so a whole sequence is a pure function of the initial key; a per-example
:meth:`~snapjax.OnlineMethod.reset` zeroes ``s̃, θ̃`` of those examples and never rewinds it.
With ``batch_axis`` (the batch split over that mesh axis inside ``jax.shard_map``, see
:mod:`snapjax.parallel.sharding`) each device draws the signs of the whole batch and keeps its own rows,
so a sharded run draws exactly the single-device signs.

Example (float32, flax GRU with 4 units)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> method = uoro_method(sj.as_recurrent(cell), params)
    >>> carry, state = method.init_carry(2), method.init(2, key=jax.random.key(1))
    >>> carry, state, _ = method.step(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> state.s_tilde.shape, grads["hn"]["kernel"].shape
    ((2, 4), (4, 4))
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size, typed_key
from snapjax.methods.generic_support import (
    CarryCheck,
    ParamMasks,
    check_params,
    check_precision,
    matmul_precision,
    param_masks,
)
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["UOROState", "UORO", "uoro_method"]


class UOROState(NamedTuple):
    """UORO method state.

    Attributes:
      s_tilde: carry-shaped (each leaf with the batch axis 0).
      theta_tilde: parameter-shaped, each leaf with a leading batch axis ``B``.
      key: typed PRNG key, shared by the batch, split every step.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> state = sj.uoro_method(nn.GRUCell(4), params).init(2, key=jax.random.key(1))
        >>> isinstance(state, sj.UOROState), state.s_tilde.shape, state.theta_tilde["hn"]["kernel"].shape
        (True, (2, 4), (2, 4, 4))
        >>> bool(jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key))
        True
    """

    s_tilde: PyTree
    theta_tilde: PyTree
    key: Array


def _sq_norm_per_example(tree: PyTree) -> Array:
    # summed in place over the non-batch axes (no reshape: a leaf split over devices stays split)
    return sum(jnp.sum(x * x, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tree))  # type: ignore[return-value]


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0], tree)


def _lead(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[None], tree)


def _signs(key: Array, shape: tuple, dtype: Any, axis_name: str | None) -> Array:
    """Rademacher signs ``shape`` (batch axis 0); with ``axis_name``, this device's rows of
    the draw for the whole batch (``D·B_local`` rows), i.e. the single-device signs."""
    if axis_name is None:
        return jax.random.rademacher(key, shape, dtype)
    rows = shape[0]
    full = jax.random.rademacher(key, (rows * lax.axis_size(axis_name),) + tuple(shape[1:]), dtype)
    return lax.dynamic_slice_in_dim(full, lax.axis_index(axis_name) * rows, rows, 0)


def _per_example(v: Array, x: Array) -> Array:
    return jnp.reshape(v, (-1,) + (1,) * (jnp.ndim(x) - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class UORO(OnlineMethod):
    """UORO for one cell and parameter layout (build with :func:`uoro_method`).

    Attributes:
      cell: the cell.  masks: :class:`snapjax.methods.generic_support.ParamMasks`.
      carry: per-example carry shapes (checks).  param_shapes: ``ShapeDtypeStruct`` tree.
      eps: stabiliser of ρ₀, ρ₁.  precision: matmul precision of the cell step.
      batch_axis: mesh axis the batch is split over (inside ``jax.shard_map``), or ``None``.

    Example (GRU with 4 units and 3 inputs: ``k + p = 4 + 100`` floats per example)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> method = sj.online_method("uoro", nn.GRUCell(4), params)
        >>> isinstance(method, sj.UORO), method.num_stored()
        (True, 104)
        >>> method.batch_axes()                     # the key is shared by the batch
        UOROState(s_tilde=0, theta_tilde=0, key=None)
    """

    cell: Recurrent
    masks: ParamMasks
    carry: CarryCheck
    param_shapes: PyTree
    eps: float = 1e-7
    precision: Any = None
    name: str = "uoro"
    batch_axis: str | None = None

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> UOROState:
        """Zero ``s̃, θ̃`` for ``batch_size`` examples; ``key`` seeds the random signs (a raw
        ``uint32`` key is wrapped).  Without a key, ``jax.random.key(0)`` is used and a
        ``UserWarning`` says so: states built that way (e.g. vmapped over seeds) share one
        sequence of signs, so their estimates are not independent."""
        b = check_batch_size(batch_size)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"UORO state dtype must be floating point, got {dtype}")
        if key is None:
            warnings.warn("UORO.init without key= draws its random signs from jax.random.key(0): every state "
                          "built without a key shares them; pass key=jax.random.key(seed)", UserWarning, stacklevel=2)
            key = jax.random.key(0)
        key = typed_key(key)
        s_tilde = self.cell.init_carry(b, dtype)
        theta = jax.tree.map(lambda s: jnp.zeros((b,) + tuple(s.shape), dtype), self.param_shapes)
        return UOROState(s_tilde, theta, key)

    def batch_axes(self) -> UOROState:
        return UOROState(s_tilde=0, theta_tilde=0, key=None)  # type: ignore[arg-type]

    def param_axes(self) -> UOROState:
        # θ̃ is parameter-shaped: split along each leaf's last axis (a kernel's columns)
        return UOROState(s_tilde=None, theta_tilde=-1, key=None)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """Stored floats per example: ``k + p`` (dense-equivalent p; masked entries are zeros)."""
        return int(self.carry.size + sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.param_shapes)))

    def _f(self, params: PyTree, carry: PyTree, x: Array) -> PyTree:
        with matmul_precision(self.precision):
            return self.cell.apply(self.masks.apply(params), carry, x)

    def step(self, params: PyTree, carry: PyTree, state: UOROState, x: Array) -> StepResult:
        """One step: the new carry and the updated rank-one estimate (see module docstring)."""
        batch = self.carry.step_args(carry, x)
        n_in = self.cell.input_size(params)
        if n_in is not None and jnp.shape(x)[-1] != n_in:
            raise ValueError(f"UORO: x has {jnp.shape(x)[-1]} features, the cell's input kernels take {n_in}")
        s_tilde, theta, key = state
        if self.carry.like(s_tilde, "s_tilde") != batch:
            raise ValueError(f"UORO state is for batch {jax.tree.leaves(s_tilde)[0].shape[0]}, the carry has {batch}")
        dtype = jax.tree.leaves(s_tilde)[0].dtype
        eps = self.eps

        # D s̃ (forward mode; examples are independent so one batched JVP does all of them).
        tangent = jax.tree.map(lambda t, c: t.astype(jnp.result_type(c)), s_tilde, carry)
        new_carry, ds = jax.jvp(lambda c: self._f(params, c, x), (carry,), (tangent,))
        ds = jax.tree.map(lambda a: a.astype(dtype), ds)

        key, sub = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(new_carry)
        nu = jax.tree.unflatten(treedef, [
            _signs(k, a.shape, dtype, self.batch_axis) for k, a in zip(jax.random.split(sub, len(leaves)), leaves)
        ])

        # νᵀ I per example (reverse mode w.r.t. the parameters, one example at a time).
        def vjp_one(c_b, x_b, nu_b):
            out, pull = jax.vjp(lambda p: _first(self._f(p, _lead(c_b), x_b[None])), params)
            return pull(jax.tree.map(lambda v, o: v.astype(o.dtype), nu_b, out))[0]

        nu_i = jax.vmap(vjp_one)(carry, x, nu)
        nu_i = self.masks.apply(jax.tree.map(lambda a: a.astype(dtype), nu_i))

        theta_norm = jnp.sqrt(_sq_norm_per_example(theta))
        ds_norm = jnp.sqrt(_sq_norm_per_example(ds))
        nui_norm = jnp.sqrt(_sq_norm_per_example(nu_i))
        nu_norm = jnp.sqrt(jnp.asarray(self.carry.size, dtype))
        rho0 = jnp.sqrt(theta_norm / (ds_norm + eps)) + eps  # (B,)
        rho1 = jnp.sqrt(nui_norm / (nu_norm + eps)) + eps  # (B,)

        s_new = jax.tree.map(lambda d, v: _per_example(rho0, d) * d + _per_example(rho1, v) * v, ds, nu)
        theta_new = jax.tree.map(lambda th, ni: th / _per_example(rho0, th) + ni / _per_example(rho1, ni), theta, nu_i)
        return StepResult(new_carry, UOROState(s_new, theta_new, key), {})

    def gradient(self, params: PyTree, state: UOROState, dloss_dcarry: PyTree) -> tuple[PyTree, UOROState]:
        """Unbiased online gradient ``Σ_b (∂L/∂s_b · s̃_b) θ̃_b`` in the parameters' shapes."""
        del params
        batch = self.carry.like(dloss_dcarry, "dloss_dcarry")
        s_tilde, theta, _ = state
        if self.carry.like(s_tilde, "s_tilde") != batch:
            raise ValueError(f"dloss_dcarry has batch {batch}, the UORO state {jax.tree.leaves(s_tilde)[0].shape[0]}")
        c = sum(
            jnp.sum(d.astype(s.dtype) * s, axis=tuple(range(1, jnp.ndim(s))))
            for d, s in zip(jax.tree.leaves(dloss_dcarry), jax.tree.leaves(s_tilde))
        )  # (B,)
        return jax.tree.map(lambda th: jnp.tensordot(c, th, axes=(0, 0)), theta), state


def uoro_method(
    cell: Any,
    params: PyTree,
    *,
    masks: Any = None,
    eps: float = 1e-7,
    precision: Any = None,
    batch_axis: str | None = None,
) -> UORO:
    """Build :class:`UORO` for ``cell`` with parameters shaped like ``params``.

    Args:
      cell: a :class:`snapjax.Recurrent` or anything :func:`snapjax.as_recurrent` accepts.
      params: the cell's parameter dict (shapes and dtypes are read).
      masks: optional static 0/1 masks, ``{projection: (n_in, units)}`` for
        ``params[name]['kernel']`` or a params-shaped tree (masked weights get zero gradient).
      eps: stabiliser in ρ₀ and ρ₁ (must be > 0).
      precision: matmul precision of the cell step (``"highest"``, ``jax.lax.Precision``...).
      batch_axis: the mesh axis the batch is split over inside ``jax.shard_map`` (the signs
        then equal the single-device run's); ``None``: not split.
    Raises:
      ValueError: ``eps <= 0``, bad masks, parameters, precision or ``batch_axis``.

    Example (masked weights get exactly zero gradient; the same key gives the same estimate)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from snapjax.methods.uoro import uoro_method
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> keep = np.eye(4, dtype=bool)                # W_hn: the diagonal only
        >>> method = uoro_method(nn.GRUCell(4), params, masks={"hn": keep})
        >>> def hn_grad(key):
        ...     state = method.init(2, key=key)
        ...     _, state, _ = method.step(params, 0.5 * jnp.ones((2, 4)), state, jnp.ones((2, 3)))
        ...     return method.gradient(params, state, jnp.ones((2, 4)))[0]["hn"]["kernel"]
        >>> g = hn_grad(jax.random.key(1))
        >>> bool(jnp.all(g[~keep] == 0)), bool(jnp.any(g[keep] != 0)), bool(jnp.array_equal(g, hn_grad(jax.random.key(1))))
        (True, True, True)
    """
    rec = as_recurrent(cell)
    check_params(rec.name, params)
    if not (isinstance(eps, (int, float, np.floating)) and eps > 0):
        raise ValueError(f"UORO: eps must be a number > 0, got {eps!r}")
    check_precision(precision)
    if batch_axis is not None and (not isinstance(batch_axis, str) or not batch_axis):
        raise ValueError(f"UORO: batch_axis must be a mesh axis name (a non-empty str) or None, got {batch_axis!r}")
    return UORO(
        cell=rec,
        masks=param_masks(params, masks),
        carry=CarryCheck.of(rec),
        param_shapes=jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params),
        eps=float(eps),
        precision=precision,
        batch_axis=batch_axis,
    )


def _build(cell: Any, params: PyTree, *, masks: Any = None, precision: Any = None, eps: float | None = None,
           batch_axis: str | None = None) -> UORO:
    return uoro_method(cell, params, masks=masks, precision=precision, batch_axis=batch_axis,
                       eps=1e-7 if eps is None else eps)


register_method("uoro", _build, options=("masks", "precision", "eps", "batch_axis"),
                summary="UORO: unbiased rank-one estimate of the influence (any cell)")
