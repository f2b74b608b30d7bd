"""Per-step Jacobians of a cell in compressed form.

For a cell ``s'_u = φ(a_{·,u}, θᵘ_u, s_u)`` with projections ``a_p = v_p (W_p ⊙ M_p) + b_p``
(see :mod:`snapjax.cells`), the chain rule gives, per example ``b``:

* ``dphi_pre[b, u, a, p] = ∂φ_{u,a} / ∂a_{p,u}``               shape ``(B, units, m, P)``
* ``dphi_unit[b, u, a, q] = ∂φ_{u,a} / ∂θᵘ_{q,u}``            shape ``(B, units, m, Q)``
* ``dphi_state[b, u, a, c] = ∂φ_{u,a} / ∂s_{u,c}`` (direct)   shape ``(B, units, m, m)``

each from one ``jax.jvp`` of ``φ`` along an all-ones tangent of one input, every other
tangent zero (valid because ``φ`` acts unit by unit).  From these:

* dynamics Jacobian ``D[(u,a),(v,c)] = δ_uv dphi_state[u,a,c]
  + δ_{c,readout} Σ_{p∈state} dphi_pre[u,a,p] (W_p ⊙ M_p)[v, u]``;
* immediate Jacobian of kernel entry ``W_p[j, i]``: nonzero only on unit ``i``,
  ``∂s'_{i,a}/∂W_p[j,i] = dphi_pre[i,a,p] · v_p[j]`` (an outer product, never a k×p matrix);
  of a bias ``b_p[i]``: ``dphi_pre[i,a,p]``; of a unit parameter: ``dphi_unit[i,a,q]``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from snapjax.cells.spec import CellSpec, masked_kernel, preactivations

Array = jax.Array


class StepJacobians(NamedTuple):
    """Compressed Jacobians of one step (see module docstring for the maths).

    Attributes:
      new_state: ``s_t``, ``(B, units, m)``.
      dphi_pre: ``(B, units, m, P)``, P = number of projections (spec order).
      dphi_unit: ``(B, units, m, Q)``, Q = number of unit parameters (may be 0).
      dphi_state: ``(B, units, m, m)``, the direct (within-unit) state derivative.
      inputs: the vectors the projections read: ``{"input": x (B, n_in), "state": h (B, units)}``.
    """

    new_state: Array
    dphi_pre: Array
    dphi_unit: Array
    dphi_state: Array
    inputs: dict


def computed_once(tree: Any) -> Any:
    """``tree`` itself, each array computed once into its own buffer before its consumers read it.

    XLA's CPU fusion copies a chain of cheap elementwise operations (a cell's derivative, a
    loss gradient) into every consumer that broadcasts it, recomputing the chain for each
    element the consumer writes: in the SnAp-1 update of a GRU-256 (B = 16) every ``(B, k)``
    coefficient was recomputed for each of its ``k`` influence entries.  In a standalone scan
    of that update (quiet 2-core CPU) the fused form took 870-920 µs per step, the same update
    reading materialised coefficients 77-85 µs.  XLA does not fuse across a conditional, so on
    CPU the arrays pass through a ``lax.cond`` on a value read at run time, both branches the
    identity; ``lax.optimization_barrier`` does not do it (XLA:CPU removes barriers before
    fusion), a sum with a zero slab does at 1.7x the cost (the reduction's own kernel).  Other
    backends get ``tree`` unchanged (:func:`jax.lax.platform_dependent`): a GPU conditional
    would wait for its predicate on the host every step.  Under ``vmap`` the conditional
    becomes a select of two identical values.

    Example::

        >>> import jax.numpy as jnp
        >>> from snapjax.engine.jacobians import computed_once
        >>> computed_once({"d": jnp.array([1.5, -2.0, jnp.inf])})["d"].tolist()
        [1.5, -2.0, inf]
    """
    leaves = jax.tree.leaves(tree)
    if not leaves or any(jnp.size(a) == 0 for a in leaves):
        return tree

    def on_cpu(t: Any) -> Any:
        probe = jnp.ravel(jax.tree.leaves(t)[0])[0]
        return jax.lax.cond(probe != probe, lambda u: u, lambda u: jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), u), t)

    return jax.lax.platform_dependent(tree, cpu=on_cpu, default=lambda t: t)


def step_jacobians(
    spec: CellSpec, params: Any, s: Array, x: Array, masks: Any = None, precision=None, *, materialize: bool = False
) -> StepJacobians:
    """Forward one step and return its compressed Jacobians.

    Args:
      spec: the cell.
      params: parameter dict (flax.linen names).
      s: state ``(B, units, m)``; x: input ``(B, n_in)``.
      masks: optional static masks per projection name.
      materialize: each derivative column :func:`computed_once` (for elementwise consumers that
        broadcast it over many entries, the diagonal layout's update; a matmul consumer such as
        RTRL's ``D J`` measured slower with it: XLA's own placement of the small chains wins).
    """
    h = spec.output(s)
    pre = preactivations(spec, params, h, x, masks, precision)
    unit = {q: params[q] for q in spec.unit_params}

    new_state = spec.phi(pre, unit, s)
    names = [p.name for p in spec.projections]

    def column(fn, primal, tangent=None):  # ∂φ along one input's tangent (default: all ones)
        return jax.jvp(fn, (primal,), (jnp.ones_like(primal) if tangent is None else tangent,))[1]

    # one JVP per input with every other tangent a symbolic zero: each column is just its own
    # derivative (a stacked one-hot basis through one linearisation left XLA:CPU to recompute
    # every column inside each consumer of one of them: the SnAp-1 update took 5x longer)
    cols = [column(lambda v, n=n: spec.phi({**pre, n: v}, unit, s), pre[n]) for n in names]
    cols += [column(lambda v, q=q: spec.phi(pre, {**unit, q: v}, s), unit[q]) for q in spec.unit_params]
    m = spec.state_dim
    cols += [column(lambda v: spec.phi(pre, unit, v), s, None if m == 1 else jnp.zeros_like(s).at[..., c].set(1.0))
             for c in range(m)]
    outs = jnp.stack(computed_once(cols) if materialize else cols, -1)  # (B, units, m, P + Q + m)
    n_p, n_q = len(names), len(spec.unit_params)
    return StepJacobians(
        new_state=new_state,
        dphi_pre=outs[..., :n_p],
        dphi_unit=outs[..., n_p : n_p + n_q],
        dphi_state=outs[..., n_p + n_q :],
        inputs={"input": x, "state": h},
    )


def dense_dynamics(spec: CellSpec, params: Any, jac: StepJacobians, masks: Any = None) -> Array:
    """Full per-example dynamics Jacobian ``D``, shape ``(B, units, m, units, m)``.

    ``D[b, u, a, v, c] = ∂s'_{u,a} / ∂s_{v,c}``.  Used by exact RTRL.
    """
    idx = [i for i, p in enumerate(spec.projections) if p.source == "state"]
    eye = jnp.eye(spec.units, dtype=jac.dphi_state.dtype)
    if not idx:  # no recurrent projection (e.g. the LRU): D is block-diagonal per unit
        return jnp.einsum("buac,uv->buavc", jac.dphi_state, eye)
    kernels = jnp.stack([masked_kernel(params, spec.projections[i].name, masks) for i in idx])  # (Ps, v, u)
    off = jnp.einsum("buap,pvu->buav", jac.dphi_pre[..., idx], kernels)
    d = jnp.zeros(off.shape + (spec.state_dim,), off.dtype).at[..., spec.readout].set(off)
    return d + jnp.einsum("buac,uv->buavc", jac.dphi_state, eye)
