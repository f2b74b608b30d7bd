"""Shared engine of the Kronecker-factored online methods (:mod:`snapjax.methods.kfrtrl`,
:mod:`snapjax.methods.ok`): the cell side of ``J ≈ Σ_i u_i ⊗ A_i``.

For a cell written as projections ``a_p = v_p @ (W_p ⊙ M_p) + b_p`` plus a unit-wise update
``s'_u = φ(a_{·,u}, θᵘ_u, s_u)`` (:class:`snapjax.CellSpec`), the immediate Jacobian of kernel
``W_p`` (``n_p × units``) and bias ``b_p`` is one Kronecker product:

    ∂s'_{(u,a)} / ∂W_p[j, i] = v_p[j] · Δ_p[(u,a), i],   Δ_p[(u,a), i] = δ_ui ∂φ_{u,a}/∂a_{p,u}

(``∂/∂b_p[i]``: the same with ``v_p[j]`` replaced by 1), so the bias is *folded into its
projection's factor* through a constant-1 entry: ``v̂_p = [v_p; 1]`` (the paper's
``[h; x; 1]``).  Projections with identical unit-wise partials (``∂φ/∂a_p ≡ ∂φ/∂a_q``, i.e. φ
reads them only through ``a_p + a_q``: a vanilla cell's ``i, h``; a GRU's ``ir, hr`` and
``iz, hz``; an LSTM's ``ii, hi``...) share ``Δ`` and are *fused* into one factor pair with
``v̂ = [v̂_p; v̂_q]`` (``fuse=True``, found by probing ``φ`` at random points at build time:
bitwise-equal JVPs).  The influence of a group ``g`` of kernels (and biases) is then the
matrix ``J_g[(u,a), (j, i)]`` (``k × (n_g·units)``) and RTRL's recursion acts on the
second Kronecker factor only:

    J_g ← D_t J_g + v̂_g ⊗ Δ_g,     D_t (u ⊗ A) = u ⊗ (D_t A).

Unit parameters ``θᵘ_q`` (e.g. EGRU thresholds, LRU's ν, θ) have a one-entry factor
(``u = [1]``): their influence ``E_q`` (``k × units``) is tracked *exactly*,
``E_q ← D_t E_q + Δ_q``.

``D_t`` is built densely per example (``k × k``) from the recurrent kernels and the unit-wise
partials, ``D[(u,a),(v,c)] = δ_uv ∂φ_{u,a}/∂s_{u,c} + δ_{c,readout} Σ_{p∈state}
∂φ_{u,a}/∂a_{p,u} (W_p ⊙ M_p)[v, u]``; the partials come from
:func:`snapjax.engine.jacobians.step_jacobians` (one JVP of ``φ`` per input along all-ones
tangents, valid because ``φ`` acts unit by unit).

Masked kernel entries get zero gradient: the factors estimate the influence of *every* entry
of ``W_p`` in the masked network (columns of ``J`` evolve independently, so each unmasked
entry's column is estimated without bias) and the gradient is multiplied by the mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells import CellSpec, masked_kernel
from snapjax.engine.jacobians import step_jacobians
from snapjax.engine.verify import verify_spec
from snapjax.methods.base import check_batch_size, typed_key

Array = jax.Array
PyTree = Any


# --------------------------------------------------------------------------- build-time checks
def check_masks(method: str, spec: CellSpec, params: PyTree, masks: Any) -> dict:
    """``{projection: (n_p, units) bool ndarray}`` from ``None``, ``{name: array | None}`` or a
    params-shaped tree of kernel masks (``{name: {"kernel": array}}``)."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise ValueError(f"{method}: masks must be a dict (projection name -> (n_in, units) 0/1 array), "
                         f"got {type(masks).__name__}")
    names = {p.name for p in spec.projections}
    unknown = sorted(set(masks) - names - set(spec.unit_params))
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) in masks: {unknown}; projections are {sorted(names)}")
    out = {}
    for name, m in masks.items():
        if isinstance(m, Mapping):
            extra = [k for k, v in m.items() if k != "kernel" and v is not None]
            if extra:
                raise ValueError(f"{method}: only kernel masks are supported, got masks[{name!r}] keys {sorted(m)}")
            m = m.get("kernel")
        if m is None:
            continue
        if name not in names:
            raise ValueError(f"{method}: unit parameter {name!r} cannot be masked")
        if isinstance(m, jax.core.Tracer):
            raise ValueError(f"{method}: masks must be static (NumPy) arrays, not traced values: build outside jit")
        arr = np.asarray(m)
        want = tuple(np.shape(params[name]["kernel"]))
        if arr.shape != want:
            raise ValueError(f"{method}: masks[{name!r}] must have the kernel's shape {want}, got {arr.shape}")
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{method}: masks[{name!r}] must hold only 0/1 (or bool) values")
        out[name] = arr.astype(bool)
    return out


def check_precision(method: str, precision: Any) -> None:
    try:
        jnp.matmul(jnp.ones((1, 1)), jnp.ones((1, 1)), precision=precision)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{method}: precision must be None, a jax.lax.Precision or a string such as 'highest', "
                         f"got {precision!r} ({err})") from None


def fusion_groups(spec: CellSpec, params: PyTree, fuse: bool) -> tuple[tuple[int, ...], ...]:
    """Projection indices grouped by identical unit-wise partials ``∂φ/∂a_p`` (``fuse=False``:
    one group per projection).  Probed with ``jax.jvp`` of ``φ`` at two random points (fixed
    seed): projections whose JVPs along all-ones tangents agree bitwise at both share ``Δ``."""
    n = len(spec.projections)
    if not fuse or n < 2:
        return tuple((i,) for i in range(n))
    rng = np.random.default_rng(1234)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    u, m = spec.units, spec.state_dim
    with jax.ensure_compile_time_eval():
        unit = {}
        for q in spec.unit_params:
            leaf = params[q]
            concrete = not isinstance(leaf, (jax.core.Tracer, jax.ShapeDtypeStruct))
            unit[q] = jnp.asarray(leaf if concrete else np.full((u,), 0.5), dtype)
        sigs: list[list] = [[] for _ in range(n)]
        for scale in (0.7, 2.3):
            pre = {p.name: jnp.asarray(scale * rng.standard_normal((3, u)), dtype) for p in spec.projections}
            s = jnp.asarray(scale * rng.standard_normal((3, u, m)), dtype)
            for i, p in enumerate(spec.projections):
                tan = {k: (jnp.ones_like(v) if k == p.name else jnp.zeros_like(v)) for k, v in pre.items()}
                out = jax.jvp(lambda a, s=s: spec.phi(a, unit, s), (pre,), (tan,))[1]
                sigs[i].append(np.asarray(out))
    groups: list[list[int]] = []
    for i in range(n):
        for g in groups:
            if all(np.array_equal(a, b) for a, b in zip(sigs[g[0]], sigs[i])):
                g.append(i)
                break
        else:
            groups.append([i])
    return tuple(tuple(g) for g in groups)


# --------------------------------------------------------------------------- the cell layout
@dataclasses.dataclass(frozen=True, eq=False)
class KroneckerLayout:
    """Static layout of the Kronecker factors of one cell (hash by identity).

    Attributes:
      method: name for messages.  spec: the cell.
      groups: per factor pair, the fused projection indices (spec order).
      segments: per group, ``(projection name, kernel rows, has bias)`` in ``u``'s order.
      rows: per group, ``n_g = Σ (rows + bias)``, the length of ``u_g``.
      masks: ``{projection: (n_p, units) bool}`` (static).
      n_in: input size (``None`` if the cell has no input projection).
      precision: matmul precision.
    """

    method: str
    spec: CellSpec
    groups: tuple
    segments: tuple
    rows: tuple
    masks: dict
    n_in: int | None
    precision: Any = None

    @classmethod
    def build(cls, method: str, cell: Any, params: PyTree, *, masks=None, precision=None, fuse=True, verify=True):
        spec = getattr(cell, "spec", None)
        if not isinstance(spec, CellSpec):
            raise ValueError(
                f"{method} needs a cell with a compressed form (snapjax.CellSpec: vanilla/SimpleCell, GRU, MGU, "
                f"LSTM, EGRU, LRU or a user spec); {getattr(cell, 'name', type(cell).__name__)!r} has none "
                "(a generic flax module): use 'uoro' or 'rtrl' for it")
        spec.check_params(params)
        mk = check_masks(method, spec, params, masks)
        check_precision(method, precision)
        if verify:
            verify_spec(spec, params, mk or None)
        groups = fusion_groups(spec, params, bool(fuse))
        segments, rows = [], []
        for g in groups:
            seg = tuple((spec.projections[i].name, int(np.shape(params[spec.projections[i].name]["kernel"])[0]),
                         bool(spec.projections[i].use_bias)) for i in g)
            segments.append(seg)
            rows.append(sum(r + b for _, r, b in seg))
        n_in = next((int(np.shape(params[p.name]["kernel"])[0]) for p in spec.projections if p.source == "input"),
                    None)
        return cls(method, spec, tuple(groups), tuple(segments), tuple(rows), mk, n_in, precision)

    # ------------------------------------------------------------------ sizes
    @property
    def k(self) -> int:
        return self.spec.state_size

    @property
    def units(self) -> int:
        return self.spec.units

    @property
    def n_unit(self) -> int:
        return len(self.spec.unit_params)

    def group_names(self) -> tuple[tuple[str, ...], ...]:
        """The projection names of each factor pair, e.g. GRU: ``(('ir','hr'), ('iz','hz'), ('in',), ('hn',))``."""
        return tuple(tuple(name for name, _, _ in seg) for seg in self.segments)

    # ------------------------------------------------------------------ checks
    def check_step(self, carry: PyTree, x: Array, state_batch: int) -> Array:
        """Internal state ``(B, units, m)`` of ``carry``; ``ValueError`` on bad shapes."""
        s = self.spec.to_internal(carry)
        if s.ndim != 3:
            raise ValueError(f"{self.method}: carry must be batched, (B, {self.units}) per component, got {s.shape[:-1]}")
        batch = s.shape[0]
        if self.n_in is not None and jnp.shape(x) != (batch, self.n_in):
            raise ValueError(f"{self.method}: x must have shape ({batch}, {self.n_in}), got {jnp.shape(x)}")
        if state_batch != batch:
            raise ValueError(f"{self.method}: state is for batch {state_batch}, the carry has {batch}")
        return s

    def cotangent(self, dloss_dcarry: PyTree, state_batch: int, dtype) -> Array:
        """``c = ∂L/∂s`` flattened to ``(B, k)``."""
        s = self.spec.to_internal(dloss_dcarry)
        if s.ndim != 3 or s.shape[0] != state_batch:
            raise ValueError(f"{self.method}: dloss_dcarry must be shaped like the carry of batch {state_batch}, "
                             f"got {s.shape[:-1]} per component")
        return jnp.reshape(s, (state_batch, self.k)).astype(dtype)

    # ------------------------------------------------------------------ one step
    def factors(self, params: PyTree, s: Array, x: Array, dtype):
        """Forward one step; returns ``(new_state, D (B,k,k), vs [(B,n_g)], Δ (B,G,k,U), Δᵘ (B,Q,k,U))``."""
        spec, prec = self.spec, self.precision
        jac = step_jacobians(spec, params, s, x, self.masks or None, prec)
        h = jac.inputs["state"]  # spec.output(s), as step_jacobians read it
        new_s, names, n_q = jac.new_state, [p.name for p in spec.projections], self.n_unit
        dpre, dunit, dstate = (a.astype(dtype) for a in (jac.dphi_pre, jac.dphi_unit, jac.dphi_state))

        B, U = s.shape[0], s.shape[1]
        eye = jnp.eye(U, dtype=dtype)
        D = jnp.einsum("buac,uv->buavc", dstate, eye)
        idx = [i for i, p in enumerate(spec.projections) if p.source == "state"]
        if idx:
            kern = jnp.stack([masked_kernel(params, names[i], self.masks or None) for i in idx]).astype(dtype)
            off = jnp.einsum("buap,pvu->buav", dpre[..., idx], kern, precision=prec)
            D = D.at[..., spec.readout].add(off)
        D = jnp.reshape(D, (B, self.k, self.k))

        sources = {"input": x, "state": h}
        vs = []
        for seg in self.segments:
            parts = []
            for name, _, bias in seg:
                parts.append(sources[spec.projection(name).source].astype(dtype))
                if bias:
                    parts.append(jnp.ones((B, 1), dtype))
            vs.append(jnp.concatenate(parts, axis=-1))
        first = jnp.stack([dpre[..., g[0]] for g in self.groups], axis=1)  # (B, G, U, m)
        delta = jnp.reshape(jnp.einsum("bgua,ui->bguai", first, eye), (B, len(self.groups), self.k, U))
        delta_u = jnp.reshape(jnp.einsum("buaq,ui->bquai", dunit, eye), (B, n_q, self.k, U))
        return new_s, D, vs, delta, delta_u

    def propagate(self, D: Array, A: Array) -> Array:
        """``D_t A`` for every stacked ``A (B, ..., k, U)``."""
        return jnp.einsum("bkl,b...li->b...ki", D, A, precision=self.precision)

    # ------------------------------------------------------------------ gradient
    def gradient(self, params: PyTree, c: Array, us: tuple, A: Array, E: Array) -> PyTree:
        """``Σ_b Σ_i u_i ⊗ (cᵀ A_i)`` split into kernels (masked) and biases, plus ``cᵀ E`` for the
        unit parameters.  ``us[g]``: ``(B, R, n_g)``; ``A``: ``(B, G, R, k, U)``; ``E``: ``(B, Q, k, U)``."""
        prec = self.precision
        q = jnp.einsum("bk,bgrki->bgri", c, A, precision=prec)
        grads: dict = {}
        for g, (seg, u) in enumerate(zip(self.segments, us)):
            full = jnp.einsum("brn,bri->ni", u, q[:, g], precision=prec)
            off = 0
            for name, rows, bias in seg:
                kern = full[off:off + rows]
                if name in self.masks:
                    kern = kern * jnp.asarray(self.masks[name], kern.dtype)
                grads[name] = {"kernel": kern}
                off += rows
                if bias:
                    grads[name]["bias"] = full[off]
                    off += 1
        if self.n_unit:
            gu = jnp.einsum("bk,bqki->qi", c, E, precision=prec)
            for j, name in enumerate(self.spec.unit_params):
                grads[name] = gu[j]
        return {name: grads[name] for name in params}


# --------------------------------------------------------------------------- keys and signs
def require_key(method: str, key: Any) -> Array:
    if key is None:
        raise ValueError(
            f"{method}: init needs key=jax.random.key(seed) (the PRNG key of its random signs); there is no "
            "default key, so that independent runs never silently share their randomness")
    return typed_key(key)


def check_state_dtype(method: str, batch_size: Any, dtype: Any) -> int:
    b = check_batch_size(batch_size)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{method}: state dtype must be floating point, got {dtype}")
    return b


def rademacher(key: Array, shape: tuple, dtype: Any, axis_name: str | None) -> Array:
    """Rademacher signs ``shape`` (batch axis 0); with ``axis_name`` (inside ``jax.shard_map``),
    this device's rows of the draw for the whole batch, i.e. the single-device signs."""
    if axis_name is None:
        return jax.random.rademacher(key, shape, dtype)
    rows = shape[0]
    full = jax.random.rademacher(key, (rows * lax.axis_size(axis_name),) + tuple(shape[1:]), dtype)
    return lax.dynamic_slice_in_dim(full, lax.axis_index(axis_name) * rows, rows, 0)


def check_batch_axis(method: str, batch_axis: Any) -> None:
    if batch_axis is not None and (not isinstance(batch_axis, str) or not batch_axis):
        raise ValueError(f"{method}: batch_axis must be a mesh axis name (a non-empty str) or None, got {batch_axis!r}")


def check_eps(method: str, eps: Any) -> float:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float, np.floating)) and eps > 0):
        raise ValueError(f"{method}: eps must be a number > 0, got {eps!r}")
    return float(eps)


def fro(a: Array, axes: tuple) -> Array:
    return jnp.sqrt(jnp.sum(a * a, axis=axes))
