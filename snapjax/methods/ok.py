"""OK: optimal Kronecker-sum approximation of RTRL (Benzing, Gauy, Mujika, Martinsson & Steger,
ICML 2019, arXiv 1902.03993).

Per example and per factor pair ``g`` (the same pairs as :mod:`snapjax.methods.kfrtrl`: kernels
with identical unit-wise partials fused, biases folded in through a constant-1 entry, unit
parameters tracked exactly) the influence is a rank-``r`` Kronecker sum

    J_g ≈ Σ_{i=1}^{r} u_i ⊗ A_i,      u_i ∈ R^{n_g},  A_i ∈ R^{k × units}.

One RTRL step gives ``r + 1`` terms, ``Σ_i u_i ⊗ (D_t A_i) + v̂ ⊗ Δ``, i.e. (vectorising the
``A``'s) the matrix ``M = Ũ Ãᵀ`` with ``Ũ = [u_1 … u_r v̂]`` (``n_g × (r+1)``) and
``Ã = [D A_1 … D A_r Δ]`` (``k·units × (r+1)``).  It is compressed back to rank ``r`` by the
unbiased minimum-variance random map of the paper:

1. ``Ũ = Q_u R_u``, ``Ã = Q_a R_a`` (thin Householder QR); SVD of the small ``R_u R_aᵀ = W Σ Vᵀ``
   (one-sided Jacobi; both written in JAX: no LAPACK call inside the scan), so
   ``M = L Σ Rᵀ`` with orthonormal ``L = Q_u W``, ``R = Q_a V`` and ``σ_1 ≥ … ≥ σ_{r+1}``.
2. Let ``m`` be the smallest index with ``(r + 1 - m)·σ_m ≤ s₁ := Σ_{i≥m} σ_i``
   (``m ≤ r`` always).  The ``m - 1`` largest terms are kept exactly; the ``n = r + 2 - m``
   smallest are replaced by the rank ``n - 1`` matrix ``c (I_n - w wᵀ)``, ``c = s₁/(n-1)``,
   with ``w_i = ξ_i z_i``, ``z_i² = 1 - (n-1)σ_i/s₁`` (``Σ z_i² = 1``) and fresh independent
   signs ``ξ_i = ±1``: ``E[w wᵀ] = diag(z²)`` gives ``E[c (I - w wᵀ)] = diag(σ_m … σ_{r+1})``
   (unbiased), with variance ``s₁²/(n-1) - Σ_{i≥m} σ_i²``, the minimum over unbiased rank-r
   approximations (the paper's optimality theorem).
3. Writing ``g = (√σ_1 … √σ_{m-1}, √c … √c)`` and ``H`` the Householder reflection that maps
   ``e_{r+1}`` to ``±w`` (so its other ``r`` columns are an orthonormal basis of ``w^⊥``), the
   new factors are the ``r`` columns of ``L diag(g) H[:, :r]`` and ``R diag(g) H[:, :r]``:
   ``Σ_i u_i ⊗ A_i = L diag(g)(I - w wᵀ) diag(g) Rᵀ``, each side carrying ``√σ``.

When the ``r + 1`` terms span at most ``r`` dimensions (``σ_{r+1} = 0``) the map is
deterministic and exact (``z = e_{r+1}``); so OK equals RTRL when ``r ≥ n_g`` (the map is then
the plain SVD re-factorisation, a static case) or ``r ≥`` the number of steps.  Singular values
below ``rtol·σ_1`` (default ``10·(r+1)·eps`` of the dtype: round-off level) count as zero, so
that round-off never turns an exact case into ``√(σ_r σ_{r+1}) ≈ √eps`` noise.

Cost per step and example: ``r·(G + Q)·k²·units`` for ``D_t A_i``, ``G·(k·units + n_g)·(r+1)²``
for the QRs, ``O(G (r+1)³)`` for the small SVDs and reflections.  Memory per example:
``r·(Σ_g n_g + G·k·units) + Q·k·units`` floats.  The key is handled as in KF-RTRL (in the
state, shared, split every step; :meth:`OK.init` requires one).

Example (rank 2, flax GRU with 4 units)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.methods.ok import build
    >>> cell = nn.GRUCell(4)
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> method = build(cell, params, rank=2)
    >>> carry, state = method.init_carry(2), method.init(2, key=jax.random.key(1))
    >>> carry, state, _ = jax.jit(method.step)(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = jax.jit(method.gradient)(params, state, jnp.ones((2, 4)))
    >>> [u.shape for u in state.u], state.A.shape
    ([(2, 2, 8), (2, 2, 8), (2, 2, 4), (2, 2, 5)], (2, 4, 2, 4, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import as_recurrent
from snapjax.methods._kronecker import (
    KroneckerLayout,
    check_batch_axis,
    check_state_dtype,
    rademacher,
    require_key,
)
from snapjax.methods.base import OnlineMethod, StepResult
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["OKState", "OK", "build", "compress"]


class OKState(NamedTuple):
    """OK method state (every array leaf has the batch axis 0).

    Attributes:
      u: tuple, per factor pair ``g``, of ``(B, r, n_g)``.
      A: ``(B, G, r, k, units)``.
      E: ``(B, Q, k, units)``: exact influence of the unit parameters.
      key: typed PRNG key, shared by the batch (batch axis ``None``), split every step.

    Example (vanilla cell, rank 3: three terms ``u_i ∈ R^8``, ``A_i ∈ R^{4×4}``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.methods.ok import build, OKState
        >>> params = nn.SimpleCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> state = build(nn.SimpleCell(4), params, rank=3).init(2, key=jax.random.key(1))
        >>> isinstance(state, OKState), [u.shape for u in state.u], state.A.shape
        (True, [(2, 3, 8)], (2, 1, 3, 4, 4))
    """

    u: tuple
    A: Array
    E: Array
    key: Array


def _qr(X: Array) -> tuple[Array, Array]:
    """Thin Householder QR of ``X (B, N, c)``: ``Q (B, N, a)`` with orthonormal columns and
    ``R (B, a, c)``, ``a = min(N, c)``, ``X = Q R``.  Pure JAX (no LAPACK call: LAPACK inside
    ``lax.scan`` can deadlock XLA's CPU thread pool against OpenBLAS' threads)."""
    B, N, c = X.shape
    a = min(N, c)
    R = X
    refl = []
    for j in range(a):
        x = R[:, j:, j]
        sgn = jnp.where(x[:, :1] >= 0, 1.0, -1.0).astype(X.dtype)
        v = x + sgn * jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)) * (jnp.arange(N - j) == 0)
        vv = jnp.sum(v * v, -1)
        beta = jnp.where(vv > 0, 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)[:, None, None]
        sub = R[:, j:, :]
        R = R.at[:, j:, :].set(sub - beta * v[:, :, None] * jnp.einsum("bn,bnc->bc", v, sub)[:, None, :])
        refl.append((j, v, beta))
    Q = jnp.broadcast_to(jnp.eye(N, a, dtype=X.dtype), (B, N, a))
    for j, v, beta in reversed(refl):
        sub = Q[:, j:, :]
        Q = Q.at[:, j:, :].set(sub - beta * v[:, :, None] * jnp.einsum("bn,bnc->bc", v, sub)[:, None, :])
    return Q, R[:, :a, :]


def _svd(C: Array, sweeps: int = 12) -> tuple[Array, Array, Array]:
    """SVD of small ``C (B, a, b)`` by one-sided (Hestenes) Jacobi: ``C = W diag(σ) Vᵀ`` with
    ``V (B, b, b)`` orthogonal, ``σ (B, b)`` descending, ``W (B, a, b)`` (columns of zero singular
    values are zero).  Pure JAX, high relative accuracy, ``sweeps`` fixed cyclic sweeps."""
    B, b = C.shape[0], C.shape[2]
    pairs = np.array([(p, q) for p in range(b) for q in range(p + 1, b)] * sweeps, dtype=np.int32)
    V0 = jnp.broadcast_to(jnp.eye(b, dtype=C.dtype), (B, b, b))
    if len(pairs):
        def body(i, GV):
            G, V = GV
            p, q = pairs_j[i, 0], pairs_j[i, 1]
            gp, gq = G[:, :, p], G[:, :, q]
            al, be, ga = jnp.sum(gp * gp, -1), jnp.sum(gq * gq, -1), jnp.sum(gp * gq, -1)
            rot = jnp.abs(ga) > 0
            zeta = (be - al) / (2.0 * jnp.where(rot, ga, 1.0))
            t = jnp.where(zeta >= 0, 1.0, -1.0) / (jnp.abs(zeta) + jnp.sqrt(1.0 + zeta * zeta))
            t = jnp.where(rot, t, 0.0)
            cs = 1.0 / jnp.sqrt(1.0 + t * t)
            sn = cs * t

            def turn(M):
                mp, mq = M[:, :, p], M[:, :, q]
                M = M.at[:, :, p].set(cs[:, None] * mp - sn[:, None] * mq)
                return M.at[:, :, q].set(sn[:, None] * mp + cs[:, None] * mq)

            return turn(G), turn(V)

        pairs_j = jnp.asarray(pairs)
        G, V = jax.lax.fori_loop(0, len(pairs), body, (C, V0))
    else:
        G, V = C, V0
    sig = jnp.sqrt(jnp.sum(G * G, axis=1))  # (B, b)
    order = jnp.argsort(-sig, axis=-1)
    sig = jnp.take_along_axis(sig, order, -1)
    G = jnp.take_along_axis(G, order[:, None, :], -1)
    V = jnp.take_along_axis(V, order[:, None, :], -1)
    W = G / jnp.where(sig > 0, sig, 1.0)[:, None, :]
    return W, sig, V


def compress(Ut: Array, At: Array, signs: Array, rank: int, rtol: float) -> tuple[Array, Array]:
    """Unbiased minimum-variance rank-``rank`` compression of ``Σ_i Ut[:, i] ⊗ At[:, i]``.

    Args:
      Ut: ``(B, r+1, n)``; At: ``(B, r+1, K)`` (the ``r + 1`` terms, batched).
      signs: ``(B, r+1)`` independent Rademacher signs.  rank: ``r``.
      rtol: singular values below ``rtol·σ_1`` count as zero.
    Returns:
      ``(U (B, r, n), A (B, r, K))`` with ``E[Σ_i U_i ⊗ A_i] = Σ_i Ut_i ⊗ At_i``.

    Example (three terms of rank two compress to two, exactly, whatever the signs)::

        >>> import jax, jax.numpy as jnp
        >>> from snapjax.methods.ok import compress
        >>> Ut = jax.random.normal(jax.random.key(0), (1, 3, 5))
        >>> Ut = Ut.at[:, 2].set(Ut[:, 0] - Ut[:, 1])           # rank 2
        >>> At = jax.random.normal(jax.random.key(1), (1, 3, 6))
        >>> U, A = compress(Ut, At, jnp.array([[1.0, -1.0, 1.0]]), 2, 1e-5)
        >>> U.shape, A.shape
        ((1, 2, 5), (1, 2, 6))
        >>> bool(jnp.allclose(jnp.einsum("bin,bik->nk", U, A), jnp.einsum("bin,bik->nk", Ut, At), atol=1e-4))
        True
    """
    r = rank
    Qu, Ru = _qr(jnp.swapaxes(Ut, 1, 2))  # (B, n, a), (B, a, r+1)
    Qa, Ra = _qr(jnp.swapaxes(At, 1, 2))  # (B, K, b), (B, b, r+1)
    W, sig, V = _svd(Ru @ jnp.swapaxes(Ra, 1, 2))  # (B, a, b), (B, b), (B, b, b)
    L = Qu @ W  # (B, n, b)
    R = Qa @ V  # (B, K, b)
    s = min(Ru.shape[1], Ra.shape[1])  # rank bound of the r+1 terms
    L, sig, R = L[..., :s], sig[..., :s], R[..., :s]
    if s <= r:  # the r+1 terms live in ≤ r dimensions: exact, deterministic
        g = jnp.sqrt(sig)[:, None, :]
        pad = [(0, 0), (0, r - s), (0, 0)]
        return jnp.pad(jnp.swapaxes(L * g, 1, 2), pad), jnp.pad(jnp.swapaxes(R * g, 1, 2), pad)

    dtype = sig.dtype
    sig = jnp.where(sig > rtol * sig[:, :1], sig, 0.0)
    idx = jnp.arange(r + 1)
    tail_sum = jnp.flip(jnp.cumsum(jnp.flip(sig, -1), -1), -1)  # s₁(m) = Σ_{i≥m} σ_i
    cond = ((r - idx) * sig <= tail_sum) | (idx == r - 1)
    cond = cond & (idx < r)
    m0 = jnp.argmax(cond, axis=-1)[:, None]  # first index satisfying it (0-based m - 1)
    n1 = (r - m0).astype(dtype)  # n - 1 ≥ 1
    s1 = jnp.take_along_axis(tail_sum, m0, -1)
    tail = idx[None] >= m0
    # z_i² = (s₁ - (n-1)σ_i)/s₁, numerator first: at the usual exact case (m = r, σ_{r+1} = 0) it is
    # exactly 0 (s₁ = σ_r), whereas 1 - σ_r·(1/s₁) may leave ~eps, i.e. w_r ~ √eps of noise
    z2 = jnp.where(s1 > 0, (s1 - n1 * sig) / jnp.where(s1 > 0, s1, 1.0), 1.0 / (n1 + 1.0))
    z2 = jnp.where(tail, jnp.clip(z2, 0.0, None), 0.0)
    z2 = z2 / jnp.sum(z2, -1, keepdims=True)
    w = signs * jnp.sqrt(z2)
    g = jnp.where(tail, jnp.sqrt(s1 / n1), jnp.sqrt(sig))  # (B, r+1)
    # Householder H = I - 2 h hᵀ/(hᵀh), h = w + sgn(w_last) e_last: H e_last = -sgn·w and the other
    # columns are an orthonormal basis of w^⊥ (|h|² = 2 + 2|w_last| ≥ 2: stable)
    sgn = jnp.where(w[:, -1:] >= 0, 1.0, -1.0).astype(dtype)
    h = w + sgn * (idx[None] == r)
    H = jnp.eye(r + 1, dtype=dtype) - 2.0 * h[:, :, None] * h[:, None, :] / jnp.sum(h * h, -1)[:, None, None]
    coef = g[:, :, None] * H[:, :, :r]  # (B, r+1, r)
    return jnp.swapaxes(L @ coef, 1, 2), jnp.swapaxes(R @ coef, 1, 2)


@dataclasses.dataclass(frozen=True, eq=False)
class OK(OnlineMethod):
    """Optimal Kronecker-sum approximation of rank ``rank`` for one :class:`snapjax.CellSpec`
    cell (build with :func:`build`; see the module docstring).

    Attributes:
      cell: the :class:`snapjax.Recurrent`.  layout: the factor layout (groups, masks).
      rank: ``r``.  rtol: relative threshold of zero singular values (``None``: ``10·(r+1)·eps``).
      batch_axis: mesh axis the batch is split over, or ``None``.

    Example (GRU, rank 2: ``2·(25 + 4·16)`` floats per example)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.methods.ok import build
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
        >>> method = build(nn.GRUCell(4), params, rank=2)
        >>> method.name, method.rank, method.num_stored(), method.batch_axes()
        ('ok', 2, 178, OKState(u=0, A=0, E=0, key=None))
    """

    cell: Any
    layout: KroneckerLayout
    rank: int = 1
    rtol: float | None = None
    batch_axis: str | None = None
    name: str = "ok"

    def _zeros(self, batch: int, dtype: Any, key: Array) -> OKState:
        lay, r = self.layout, self.rank
        u = tuple(jnp.zeros((batch, r, n), dtype) for n in lay.rows)
        A = jnp.zeros((batch, len(lay.groups), r, lay.k, lay.units), dtype)
        E = jnp.zeros((batch, lay.n_unit, lay.k, lay.units), dtype)
        return OKState(u, A, E, key)

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> OKState:
        """Zero factors for ``batch_size`` examples; ``key`` is required (``ValueError`` if ``None``)."""
        b = check_state_dtype(self.name, batch_size, dtype)
        return self._zeros(b, dtype, require_key(self.name, key))

    def batch_axes(self) -> OKState:
        return OKState(u=0, A=0, E=0, key=None)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """Floats per example: ``r·(Σ_g n_g + G·k·units) + Q·k·units``."""
        lay = self.layout
        kU = lay.k * lay.units
        return int(self.rank * (sum(lay.rows) + len(lay.groups) * kU) + lay.n_unit * kU)

    def step(self, params: PyTree, carry: PyTree, state: OKState, x: Array) -> StepResult:
        """One step: the new carry and the rank-``r`` Kronecker sums compressed from ``r + 1`` terms."""
        lay, r = self.layout, self.rank
        s = lay.check_step(carry, x, state.A.shape[0])
        B, dtype = s.shape[0], state.A.dtype
        new_s, D, vs, delta, delta_u = lay.factors(params, s, x, dtype)
        key, sub = jax.random.split(state.key)
        signs = rademacher(sub, (B, len(lay.groups), r + 1), dtype, self.batch_axis)
        rtol = 10.0 * (r + 1) * float(np.finfo(np.dtype(dtype)).eps) if self.rtol is None else self.rtol
        DA = lay.propagate(D, state.A)  # (B, G, r, k, U)
        kU = lay.k * lay.units
        us, As = [], []
        for g, (u, v) in enumerate(zip(state.u, vs)):
            Ut = jnp.concatenate([u, v[:, None]], axis=1)
            At = jnp.concatenate([jnp.reshape(DA[:, g], (B, r, kU)), jnp.reshape(delta[:, g], (B, 1, kU))], axis=1)
            un, an = compress(Ut, At, signs[:, g], r, rtol)
            us.append(un)
            As.append(jnp.reshape(an, (B, r, lay.k, lay.units)))
        E_new = lay.propagate(D, state.E) + delta_u
        return StepResult(lay.spec.from_internal(new_s), OKState(tuple(us), jnp.stack(As, 1), E_new, key), {})

    def gradient(self, params: PyTree, state: OKState, dloss_dcarry: PyTree) -> tuple[PyTree, OKState]:
        """Unbiased online gradient ``Σ_b Σ_i u_{b,i} ⊗ (∂L/∂s_b · A_{b,i})`` (kernels masked)."""
        c = self.layout.cotangent(dloss_dcarry, state.A.shape[0], state.A.dtype)
        return self.layout.gradient(params, c, state.u, state.A, state.E), state


def build(
    cell: Any,
    params: PyTree,
    *,
    rank: int | None = 1,
    masks: Any = None,
    precision: Any = None,
    rtol: float | None = None,
    fuse: bool = True,
    batch_axis: str | None = None,
    verify: bool = True,
) -> OK:
    """Build :class:`OK` of rank ``rank`` for ``cell`` with parameters shaped like ``params``.

    Args:
      cell: a :class:`snapjax.Recurrent` with a ``spec`` or anything :func:`snapjax.as_recurrent`
        accepts.  params: the cell's parameter dict.
      rank: ``r ≥ 1``, Kronecker terms kept per factor pair (``r ≥ n_g``, or ``r ≥`` the number
        of steps since a reset, makes it exact RTRL).
      masks, precision, fuse, batch_axis, verify: as :func:`snapjax.methods.kfrtrl.build`.
      rtol: relative threshold below which singular values count as zero (``None``: round-off
        level, ``10·(r+1)·eps`` of the state dtype).
    Raises:
      ValueError: a cell without a :class:`snapjax.CellSpec`, ``rank < 1``, bad ``rtol``,
        parameters, masks, precision or ``batch_axis``.

    Example (rank 8 ≥ the factor length ``[x; 1; h]`` of a vanilla cell: the summed online
    gradient is BPTT's)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.methods.ok import build
        >>> cell = nn.SimpleCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> xs = jax.random.normal(jax.random.key(1), (4, 1, 3))
        >>> method = build(cell, params, rank=8)
        >>> carry, state = method.init_carry(1), method.init(1, key=jax.random.key(2))
        >>> total = jax.tree.map(jnp.zeros_like, params)
        >>> step, gradient = jax.jit(method.step), jax.jit(method.gradient)    # compiled once
        >>> for x in xs:
        ...     carry, state, _ = step(params, carry, state, x)
        ...     g, state = gradient(params, state, jnp.ones_like(carry))
        ...     total = jax.tree.map(jnp.add, total, g)
        >>> def bptt(p):
        ...     h, loss = jnp.zeros((1, 4)), 0.0
        ...     for x in xs:
        ...         h = cell.apply({"params": p}, h, x)[0]
        ...         loss = loss + h.sum()
        ...     return loss
        >>> ref = jax.grad(bptt)(params)
        >>> all(bool(jnp.allclose(a, b, atol=1e-5)) for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(ref)))
        True
    """
    rank = 1 if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"ok: rank must be an int >= 1, got {rank!r}")
    if rtol is not None and not (isinstance(rtol, (int, float, np.floating)) and 0 <= rtol < 1):
        raise ValueError(f"ok: rtol must be None or a number in [0, 1), got {rtol!r}")
    check_batch_axis("ok", batch_axis)
    rec = as_recurrent(cell)
    layout = KroneckerLayout.build("ok", rec, params, masks=masks, precision=precision, fuse=fuse, verify=verify)
    return OK(cell=rec, layout=layout, rank=int(rank), rtol=None if rtol is None else float(rtol),
              batch_axis=batch_axis)


register_method("ok", build, options=("rank", "masks", "precision", "batch_axis", "verify"), aliases=("optimal_kronecker",),
                summary="OK (Benzing et al. 2019): unbiased minimum-variance rank-r Kronecker sum per gate matrix; exact for large r")
