"""A feed-forward module that holds its own parameters (flax.nnx, equinox), as a pure function.

:class:`FeedForward` is how :class:`snapjax.OnlineModel` sees an ``nnx.Linear``, an
``nnx.Sequential``, an MLP ``nnx.Module`` or an ``eqx.nn.MLP``: the module is split once into
its static part and its parameters, a plain nested ``dict`` of arrays with string keys (the
module's attribute names, list indices as ``"0"``, ``"1"``...), so the parameters go through
optax, ``jax.jit`` and :func:`snapjax.save_state` like a linen module's; ``apply(params, h)``
merges them back into a copy of the module and calls it on the batch ``h (B, n_in)``.

Build one with :func:`snapjax.cells.nnx.nnx_feedforward` or
:func:`snapjax.cells.equinox.eqx_feedforward` (``OnlineModel`` does it for every such layer).

Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from snapjax.cells.nnx import nnx_feedforward
    >>> ff = nnx_feedforward(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu))
    >>> ff.name, jax.tree.map(jnp.shape, ff.params)
    ('Sequential', {'layers': {'0': {'bias': (4,), 'kernel': (3, 4)}}})
    >>> ff.apply(ff.params, jnp.ones((2, 3))).shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Array = jax.Array
PyTree = Any

__all__ = ["FeedForward", "nest", "get_path"]


@dataclasses.dataclass(frozen=True, eq=False)
class FeedForward:
    """Static view of a feed-forward module holding its own parameters (hash by identity).

    Attributes:
      name: the module's class name, for messages.
      apply: ``apply(params, h (B, n_in)) -> (B, n_out)`` (pure; ``params`` may be ``None``
        for a module without parameters).
      params: the module's own values at construction (the initial parameters), a nested
        ``dict`` of arrays with string keys, or ``None`` when it has none.
      module: the user's module.
      in_features: the input size the module was built for, when it says (the first
        ``in_features``/``in_size`` found), else ``None``.
    """

    name: str
    apply: Callable[[PyTree, Array], Array]
    params: PyTree
    module: Any
    in_features: int | None = None


def nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    """``{a: {b: leaf}}`` from ``[(("a", "b"), leaf)]`` (``ValueError`` on a clash)."""
    out: dict = {}
    for path, leaf in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"parameter path {'/'.join(path)} clashes with a leaf")
        if path[-1] in node:
            raise ValueError(f"two parameters have the path {'/'.join(path)}")
        node[path[-1]] = leaf
    return out


def get_path(tree: Any, path: tuple[str, ...], what: str) -> Any:
    """``tree[path[0]][path[1]]...`` with a ``ValueError`` naming the missing key."""
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ValueError(f"{what}: no parameter {'/'.join(path[: i + 1])} (keys there: {have})")
        node = node[k]
    return node
