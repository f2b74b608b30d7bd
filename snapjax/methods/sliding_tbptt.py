"""Sliding-window truncated BPTT: at every step, the gradient of ``L_t`` through the last W steps.

Williams & Peng's BPTT(k1, k2) with ``k1 = 1`` (a backward pass after every step) and
``k2 = W`` (each pass goes ``W`` steps back).  With ``s_t = f(θ, s_{t-1}, x_t)`` and ``c_t =
∂L_t/∂s_t`` the gradient returned at step ``t`` is

    g_t = c_t · ds_t/dθ |_{s_{t-W} held constant}
        = c_t · Σ_{τ=t-W+1}^{t} D_t D_{t-1} ··· D_{τ+1} I_τ,

the exact RTRL gradient ``c_t J_t`` with ``J`` truncated to the last ``W`` immediate Jacobians.
The method state keeps, per example, the last ``W`` inputs ``x_{t-W+1..t}`` and the carries
entering them ``s_{t-W..t-1}`` (shift buffers, newest last) and the number of steps since the
example's stream (re)started, ``age ≤ W``.  :meth:`SlidingTBPTT.gradient` replays the window
from the carry entering its first step (a constant) and takes one ``jax.vjp`` of the replay
w.r.t. the parameters with cotangent ``c_t``.  Early in a stream (``age < W``) the window is
the ``age`` steps seen so far, starting from the stream's initial carry; the slots before it
run on zeros and receive no cotangent.

* shapes: ``carries`` carry-shaped with a leading ``W`` (batch axis 1), ``xs (W, B, n_in)``,
  ``age (B,)`` int32; gradients parameter-shaped; period 1.
* cost per step: ``W`` cell steps forward and ``W`` backward (``O(W·d(k² + p))``), on top of
  the forward step.
* memory per example: ``W·(k + n_in)`` floats and one int.
* bias: **biased** (truncation); **exact** when ``W ≥`` the number of steps since the stream
  started: then ``Σ_t g_t`` is the BPTT gradient of ``Σ_t L_t`` (exact RTRL).  ``W = 1`` is the
  immediate rule (SnAp-0).
* per-example reset (the base class's: fresh zero buffers, ``age = 0``) is exact: the example's
  next window starts at the carry entering its next step and never reaches its pre-reset
  history; a reset between a step and its ``gradient`` drops that example's contribution.
* any cell (only ``cell.apply``); static masks (``{projection: (n_in, units)}`` or
  params-shaped): masked weights act as zeros and get exactly zero gradient.

References: R. J. Williams, J. Peng, "An efficient gradient-based algorithm for on-line
training of recurrent network trajectories", Neural Computation 2(4):490-501, 1990;
I. Sutskever, "Training recurrent neural networks", PhD thesis, 2013, §3.2 (BPTT(k1, k2)).

Example (float32 GRU, window 2: at step 3 the gradient of ``L_3`` through steps 2 and 3)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.GRUCell(4)
    >>> xs = jax.random.normal(jax.random.key(1), (3, 2, 3))
    >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), xs[0])["params"]
    >>> method = sj.online_method("sliding_tbptt", cell, params, window=2)
    >>> carry, state, hs = method.init_carry(2), method.init(2), []
    >>> for x in xs:
    ...     hs.append(carry)
    ...     carry, state, _ = method.step(params, carry, state, x)
    ...     grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> def last_two(p):                    # L_3 = Σ h_3 from s_1 held constant
    ...     h = hs[1]
    ...     for x in xs[1:]:
    ...         h = cell.apply({"params": p}, h, x)[0]
    ...     return h.sum()
    >>> ref = jax.grad(last_two)(params)
    >>> all(bool(jnp.allclose(a, b, atol=1e-5)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from snapjax.cells.recurrent import Recurrent
from snapjax.methods.base import OnlineMethod, StepResult, check_batch_size
from snapjax.methods.generic_support import (
    CarryCheck,
    ParamMasks,
    check_params,
    check_precision,
    input_size_of,
    matmul_precision,
    param_masks,
)
from snapjax.methods.registry import register_method

Array = jax.Array
PyTree = Any

__all__ = ["SlidingState", "SlidingTBPTT"]


class SlidingState(NamedTuple):
    """Per-example window buffers (newest last).

    Attributes:
      carries: the carries entering the last ``W`` steps, carry-shaped with a leading ``W``.
      xs: the last ``W`` inputs ``(W, B, n_in)``.
      age: ``(B,)`` int32, steps since the example's stream (re)started, capped at ``W``.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> params = nn.GRUCell(3).init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
        >>> method = sj.online_method("sliding_tbptt", nn.GRUCell(3), params, window=4)
        >>> st = method.init(2)
        >>> st.carries.shape, st.xs.shape, st.age.tolist(), method.batch_axes(), method.num_stored()
        ((4, 2, 3), (4, 2, 2), [0, 0], SlidingState(carries=1, xs=1, age=0), 21)
    """

    carries: PyTree
    xs: Array
    age: Array


def _per_example(v: Array, a: Array) -> Array:
    return jnp.reshape(v, (-1,) + (1,) * (jnp.ndim(a) - 1))


def _push(buf: Array, new: Array) -> Array:
    return jnp.concatenate([buf[1:], jnp.asarray(new).astype(buf.dtype)[None]], axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class SlidingTBPTT(OnlineMethod):
    """Sliding-window truncated BPTT (build with ``snapjax.online_method("sliding_tbptt", ...,
    window=W)``).

    Attributes:
      cell: the :class:`snapjax.Recurrent`.
      window: ``W``.
      n_in: input size.
      masks: static masks (:class:`~snapjax.methods.generic_support.ParamMasks`).
      precision: matmul precision of the cell step.
      name: ``f"sliding_tbptt{W}"``.
    """

    cell: Recurrent
    window: int
    n_in: int
    masks: ParamMasks
    precision: Any = None
    name: str = "sliding_tbptt"

    def init(self, batch_size: int, dtype: Any = jnp.float32, *, key: Array | None = None) -> SlidingState:
        del key
        b, W = check_batch_size(batch_size), self.window
        carry = self.cell.init_carry(b, dtype)
        return SlidingState(
            carries=jax.tree.map(lambda a: jnp.zeros((W,) + a.shape, a.dtype), carry),
            xs=jnp.zeros((W, b, self.n_in), dtype),
            age=jnp.zeros((b,), jnp.int32),
        )

    def batch_axes(self) -> SlidingState:
        return SlidingState(carries=1, xs=1, age=0)  # type: ignore[arg-type]

    def num_stored(self) -> int:
        """``W·(k + n_in) + 1`` per example (the window's carries and inputs, and its age)."""
        return self.window * (CarryCheck.of(self.cell).size + self.n_in) + 1

    def _f(self, params: PyTree, carry: PyTree, x: Array) -> PyTree:
        with matmul_precision(self.precision):
            return self.cell.apply(self.masks.apply(params), carry, x)

    def step(self, params: PyTree, carry: PyTree, state: SlidingState, x: Array) -> StepResult:
        x = jnp.asarray(x)
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.n_in:
            raise ValueError(f"{self.name}: x must have shape (B, {self.n_in}), got {jnp.shape(x)}")
        if jnp.shape(x)[0] != jnp.shape(state.age)[0]:
            raise ValueError(f"{self.name}: x has batch {jnp.shape(x)[0]}, the state {jnp.shape(state.age)[0]}")
        new_carry = self._f(params, carry, x)
        return StepResult(new_carry, SlidingState(
            carries=jax.tree.map(_push, state.carries, carry),
            xs=_push(state.xs, x),
            age=jnp.minimum(state.age + 1, self.window).astype(jnp.int32),
        ), {})

    def _replay(self, params: PyTree, state: SlidingState) -> PyTree:
        """The carry at the end of the window, from the carry entering its first step."""
        W = self.window
        first = W - state.age  # (B,): slot of the window's first step (W: empty window)
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), state.carries)

        def body(s, inp):
            j, c_in, x = inp
            start, inside = j == first, j >= first
            s = jax.tree.map(lambda a, c: jnp.where(_per_example(start, a), c,
                                                    jnp.where(_per_example(inside, a), a, 0)), s, c_in)
            s = self._f(params, s, jnp.where(inside[:, None], x, 0))
            return s, None

        return lax.scan(body, zero, (jnp.arange(W), state.carries, state.xs))[0]

    def gradient(self, params: PyTree, state: SlidingState, dloss_dcarry: PyTree) -> tuple[PyTree, SlidingState]:
        """``Σ_b c_b · ds_{t,b}/dθ`` through the example's window (one vjp of the replay)."""
        out, pull = jax.vjp(lambda p: self._replay(p, state), params)
        live = state.age > 0  # an example reset after its step contributes nothing
        cot = jax.tree.map(lambda c, o: jnp.where(_per_example(live, o), jnp.asarray(c).astype(o.dtype), 0),
                           dloss_dcarry, out)
        return self.masks.apply(pull(cot)[0]), state


def _build(cell: Recurrent, params: PyTree, *, window: int | None = None, masks: Any = None,
           precision: Any = None, input_size: int | None = None) -> SlidingTBPTT:
    """:class:`SlidingTBPTT` with ``W = window`` for ``cell``.  ``ValueError``: ``window`` missing
    or not a positive int; bad parameters, masks, precision or ``input_size``."""
    if window is None:
        raise ValueError("sliding_tbptt needs window=W (the steps each backward pass goes back), W >= 1")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"sliding_tbptt window must be a positive int, got {window!r}")
    check_params(cell.name, params)
    check_precision(precision)
    n_in = input_size_of(cell, params, input_size, "sliding_tbptt")
    return SlidingTBPTT(cell, int(window), n_in, param_masks(params, masks), precision, f"sliding_tbptt{int(window)}")


register_method("sliding_tbptt", _build, options=("window", "masks", "precision", "input_size"),
                aliases=("tbptt_sliding",),
                summary="sliding-window truncated BPTT: every step, the gradient of L_t through the last W steps")
