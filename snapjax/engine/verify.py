"""Check a :class:`~snapjax.cells.CellSpec`'s compressed Jacobians against autodiff.

Every method in snapjax differentiates a cell through the compressed per-step factors of
:mod:`snapjax.engine.jacobians`: for ``s'_{u,a} = φ(a_{·,u}, θᵘ_u, s_u)_a`` with projections
``a_p = v_p (W_p ⊙ M_p) + b_p``,

* ``dphi_pre[b, u, a, p] = ∂φ_{u,a}/∂a_{p,u}``, ``dphi_unit[b, u, a, q] = ∂φ_{u,a}/∂θᵘ_{q,u}``
  and ``dphi_state[b, u, a, c] = ∂φ_{u,a}/∂s_{u,c}``, read off one JVP of ``φ`` on all-ones
  tangents;
* the dynamics Jacobian ``D``, applied to a state tangent ``v (B, units, m)``:
  ``(D v)[u, a] = Σ_c dphi_state[u, a, c] v[u, c]
  + Σ_{p∈state} dphi_pre[u, a, p] (v[:, readout] (W_p ⊙ M_p))[u]``;
* the immediate Jacobian ``I``, applied to a parameter tangent ``w`` (same tree as ``θ``):
  ``(I w)[i, a] = Σ_p dphi_pre[i, a, p] ((v_p (w_p ⊙ M_p))[i] + w_{b_p}[i])
  + Σ_q dphi_unit[i, a, q] w_q[i]`` (kernel entry ``W_p[j, i]`` ↦ ``dphi_pre[i, a, p]·v_p[j]``).

Reading the derivatives of ``φ`` off all-ones tangents is exact only if ``φ`` acts unit by
unit (and example by example): ``∂φ_{u,a}/∂a_{p,u'} = 0`` for ``u' ≠ u``.  A hand-written spec
can break that (a layer norm over the units) or declare projections that are not the linear
maps its ``phi`` reads.  :func:`verify_spec` compares, at a random point and along random
tangents ``(t_pre, t_unit, t_s)`` and ``(v, w)``,

    e_phi  = ‖Σ_p dphi_pre_p ⊙ t_p + Σ_q dphi_unit_q ⊙ t_q + dphi_state t_s − jvp(φ)(t)‖ / scale
    e_step = ‖D v + I w − jvp(cell_step)(s, θ; v, w)‖ / scale

(``scale = max(‖compressed‖, ‖reference‖)``) against a tolerance (``1e-8`` in float64,
``1e-4`` in float32), and raises ``ValueError`` naming which check failed.  It never forms
``D`` (``k × k``) or a ``k × p`` matrix: a few JVPs and matrix-vector products of the step's
size.  :func:`snapjax.online_method` runs it on the spec of every compressed-form cell it is
given (``verify=False`` skips it).

Example: flax's GRU passes; a ``phi`` that mixes the units is refused::

    >>> import dataclasses, flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.cells import vanilla_spec, gru_spec
    >>> from snapjax.engine.verify import verify_spec
    >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    >>> verify_spec(gru_spec(4), params)          # silent: the compressed form is exact
    >>> def mixing_phi(pre, unit, s):              # adds the mean over units: not unit-wise
    ...     a = pre["i"] + pre["h"]
    ...     return jnp.tanh(a + a.mean(-1, keepdims=True))[..., None]
    >>> spec = dataclasses.replace(vanilla_spec(4), phi=mixing_phi)
    >>> params = nn.SimpleCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    >>> verify_spec(spec, params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: vanilla: the update mixes units (phi is not unit-wise): ...
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.spec import CellSpec, cell_step, masked_kernel, preactivations
from snapjax.engine.jacobians import step_jacobians

Array = jax.Array
PyTree = Any

__all__ = ["verify_spec"]

_FALLBACK = "pass the cell as a flax module (generic dense path: snapjax.as_recurrent(module, generic=True))"


def _check_verify_masks(spec: CellSpec, params: PyTree, masks: Any) -> dict:
    out: dict[str, np.ndarray | None] = {p.name: None for p in spec.projections}
    if masks is None:
        return out
    if not isinstance(masks, Mapping):
        raise ValueError(f"{spec.name}: masks must be a dict projection name -> 0/1 array, got {type(masks).__name__}")
    for name, m in masks.items():
        if name not in out:
            raise ValueError(f"{spec.name}: mask for unknown projection {name!r}; projections are {sorted(out)}")
        if m is None:
            continue
        m = np.asarray(m)
        kshape = tuple(np.shape(params[name]["kernel"]))
        if m.shape != kshape or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
            raise ValueError(f"{spec.name}: mask {name!r} must be a 0/1 array of shape {kshape}, got shape {m.shape}")
        out[name] = m.astype(bool)
    return out


def _rel_err(a: Array, b: Array) -> Array:
    scale = jnp.maximum(jnp.maximum(jnp.linalg.norm(a), jnp.linalg.norm(b)), jnp.finfo(a.dtype).tiny)
    return jnp.linalg.norm(a - b) / scale


@functools.partial(jax.jit, static_argnums=0)
def _verify_errors(spec: CellSpec, params, masks, s, x, probes):
    """Relative errors (phi alone; the step's D·v + I·w) of the compressed form against ``jax.jvp``."""
    t_pre, t_unit, t_s, v, w = probes
    jac = step_jacobians(spec, params, s, x, masks)
    pre = preactivations(spec, params, spec.output(s), x, masks)
    unit = {q: params[q] for q in spec.unit_params}
    # phi alone: diagonal derivatives (from all-ones tangents) against random-direction JVPs.
    phi_ref = jax.vmap(lambda tp, tu, ts: jax.jvp(spec.phi, (pre, unit, s), (tp, tu, ts))[1])(t_pre, t_unit, t_s)
    names = [p.name for p in spec.projections]
    phi_cmp = jnp.einsum("buap,nbup->nbua", jac.dphi_pre, jnp.stack([t_pre[n] for n in names], -1))
    phi_cmp += jnp.einsum("buac,nbuc->nbua", jac.dphi_state, t_s)
    if spec.unit_params:
        phi_cmp += jnp.einsum("buaq,nuq->nbua", jac.dphi_unit, jnp.stack([t_unit[q] for q in spec.unit_params], -1))
    # the whole step: D·v + I·w from the compressed factors against one JVP of cell_step.
    step = lambda st, th: cell_step(spec, th, st, x, masks)  # noqa: E731
    ref = jax.vmap(lambda vv, ww: jax.jvp(step, (s, params), (vv, ww))[1])(v, w)
    # (D v)[u,a] = Σ_c dphi_state[u,a,c] v[u,c] + Σ_{p∈state} dphi_pre[u,a,p] (v[:, readout] @ W_p ⊙ M_p)[u]
    d_cmp = jnp.einsum("buac,nbuc->nbua", jac.dphi_state, v)
    for j, p in enumerate(spec.projections):
        if p.source == "state":
            d_cmp += jac.dphi_pre[..., j] * (v[..., spec.readout] @ masked_kernel(params, p.name, masks))[..., None]

    def immediate(ww):  # Σ_{j} ∂s'_{i,a}/∂W_p[j,i] w_p[j,i] = dphi_pre[i,a,p] (v_p @ w_p)[i], + biases, unit params
        out = jnp.zeros_like(s)
        for j, p in enumerate(spec.projections):
            a = jac.inputs[p.source] @ masked_kernel(ww, p.name, masks)
            if p.use_bias:
                a = a + ww[p.name]["bias"]
            out += jac.dphi_pre[..., j] * a[..., None]
        for j, q in enumerate(spec.unit_params):
            out += jac.dphi_unit[..., j] * ww[q][:, None]
        return out

    step_cmp = d_cmp + jax.vmap(immediate)(w)
    finite = jnp.all(jnp.array([jnp.isfinite(t).all() for t in (phi_ref, phi_cmp, ref, step_cmp)]))
    return _rel_err(phi_cmp, phi_ref), _rel_err(step_cmp, ref), finite


def verify_spec(spec: CellSpec, params: PyTree, masks: PyTree | None = None, *, seed: int = 0) -> None:
    """Check ``spec``'s compressed Jacobians against ``jax.jvp`` of its step; raise if they differ.

    The compressed form (:mod:`snapjax.engine.jacobians`) is exact only if ``phi`` acts unit by unit
    and the projections are the linear maps of the parameters the spec declares.  At a random
    state ``s (2, units, m)`` (``N(0, 0.25)``), input ``x (2, n_in)`` and random kernels
    (``N(0, 1/rows)``) and biases (``N(0, 0.25)``) of ``params``' shapes (unit parameters keep
    their given values when concrete, as they may have a restricted domain), with 2 random
    tangents each, it compares

    * ``phi`` alone: ``Σ_p ∂φ/∂a_p ⊙ t_p + Σ_q ∂φ/∂θᵘ_q ⊙ t_q + (∂φ/∂s) t_s`` (the diagonal
      derivatives that snapjax obtains from all-ones tangents) with ``jax.jvp(phi)``;
    * the step: ``D·v + I·w`` built from those factors as every method builds ``D`` and ``I``
      (:mod:`snapjax.engine.jacobians`: ``D v = dphi_state v + Σ_{p∈state} dphi_pre_p ⊙ (v_h (W_p ⊙ M_p))``,
      kernel entry ``W_p[j, i]`` ↦ ``dphi_pre[i, a, p]·v_p[j]``, biases, unit parameters) against
      ``jax.jvp`` of :func:`cell_step` in ``(s, θ)`` along random ``(v, w)``.

    Cost: a few JVPs and matrix-vector products of the step's size; never ``D`` (``k × k``)
    nor a ``k × p`` matrix, so it stays cheap for large cells.  Runs in
    float64 when ``jax_enable_x64`` is on (tolerance ``1e-8`` on the relative error), else in
    float32 with matmul precision ``"highest"`` (tolerance ``1e-4``).

    Args:
      spec: the cell.  params: its parameter dict (arrays or ``jax.ShapeDtypeStruct``).
      masks: optional static 0/1 masks per projection name.  seed: of the random point.

    Raises:
      ValueError: bad ``params``/``masks`` layout; ``phi`` mixes units or examples ("the update
        mixes units (phi is not unit-wise)"); the step disagrees with the projections
        ("projections disagree with the parameters"); non-finite values at the random point.

    Example (the module docstring shows a ``phi`` that mixes units being refused)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells import gru_spec
        >>> from snapjax.engine.verify import verify_spec
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> verify_spec(gru_spec(4), params, {"hn": jnp.eye(4)})    # silent: exact, masks too
        >>> verify_spec(gru_spec(5), params)
        Traceback (most recent call last):
            ...
        ValueError: gru: params['ir']['kernel'] must have shape (n_in, 5), got (3, 4)
    """
    if not isinstance(spec, CellSpec):
        raise ValueError(f"verify_spec needs a CellSpec, got {type(spec).__name__}")
    spec.check_params(params)
    masks = _check_verify_masks(spec, params, masks)
    x64 = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
    dtype, tol, B, n = (jnp.float64 if x64 else jnp.float32), (1e-8 if x64 else 1e-4), 2, 2
    rng = np.random.default_rng(seed)
    normal = lambda shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    with jax.ensure_compile_time_eval(), jax.default_matmul_precision("highest"):
        point: dict[str, Any] = {}
        for p in spec.projections:
            rows = np.shape(params[p.name]["kernel"])[0]
            point[p.name] = {"kernel": normal((rows, spec.units), 1.0 / np.sqrt(rows))}
            if p.use_bias:
                point[p.name]["bias"] = normal((spec.units,), 0.5)
        for q in spec.unit_params:
            given = params[q]
            concrete = not isinstance(given, (jax.ShapeDtypeStruct, jax.core.Tracer))
            point[q] = np.asarray(given, dtype) if concrete else normal((spec.units,), 0.5)
        s = normal((B, spec.units, spec.state_dim), 0.5)
        x = normal((B, spec.input_size(params)))
        out = jax.eval_shape(lambda: cell_step(spec, point, s, x, masks))
        if out.shape != s.shape:
            raise ValueError(f"{spec.name}: phi must return shape (B, units, state_dim) = {s.shape}, got {out.shape}")
        probes = (
            {p.name: normal((n, B, spec.units)) for p in spec.projections},
            {q: normal((n, spec.units)) for q in spec.unit_params},
            normal((n, B, spec.units, spec.state_dim)),
            normal((n, B, spec.units, spec.state_dim)),
            jax.tree.map(lambda a: normal((n,) + a.shape), point),
        )
        e_phi, e_step, finite = (np.asarray(e) for e in _verify_errors(spec, point, masks, s, x, probes))
    if not finite:
        raise ValueError(
            f"{spec.name}: the step gave non-finite values or derivatives at a random point (seed={seed}), "
            "so the compressed Jacobians cannot be checked; pass concrete unit parameters, another seed, "
            "or online_method(..., verify=False) if the cell is known to be unit-wise"
        )
    if e_phi > tol:
        raise ValueError(
            f"{spec.name}: the update mixes units (phi is not unit-wise): jax.jvp of phi differs from the "
            f"unit-wise derivatives snapjax uses, relative error {e_phi:.2e} > {tol:.0e}. RTRL/SnAp's compressed "
            f"Jacobians would be wrong for this cell; {_FALLBACK}"
        )
    if e_step > tol:
        raise ValueError(
            f"{spec.name}: the projections disagree with the parameters: the compressed Jacobians differ from "
            f"jax.jvp of the step, relative error of D·v + I·w {e_step:.2e} > {tol:.0e}; {_FALLBACK}"
        )
