"""A jitted function that donates its first argument, with a clear error for a reused state.

:meth:`snapjax.OnlineLearner.run_jit` donates the state it is given (XLA reuses its buffers for
the new state).  Passing the same state again would fail deep in jax ("Array has been
deleted"); :class:`DonatingJit` says instead which call donated it and what to pass.  Anything
else (``lower``, ``trace``, ...) is the jitted function's own.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> xs, ys = jnp.ones((3, 2, 3)), jnp.zeros((3, 2), jnp.int32)
    >>> new, _, _ = learner.run_jit(state, xs, ys)
    >>> learner.run_jit(state, xs, ys)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: run_jit: this state was donated to an earlier run_jit call ...
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["DonatingJit"]


class DonatingJit:
    """``jax.jit(fn, donate_argnums=0)`` that refuses a first argument whose buffers are gone."""

    def __init__(self, fn: Callable, name: str):
        self._jitted = jax.jit(fn, donate_argnums=0)
        self._name = name

    def __call__(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.is_deleted()
               for a in jax.tree.leaves(state)):
            raise ValueError(
                f"{self._name}: this state was donated to an earlier {self._name} call (its buffers were reused "
                f"for that call's result): pass the state it returned (state, outputs, metrics = "
                f"learner.{self._name}(state, ...)), or keep a copy first (jax.tree.map(jnp.copy, state))")
        return self._jitted(state, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)
