"""flax.nnx modules as pure functions of a plain dict of their ``nnx.Param`` values: feed-forward
modules, recurrent cells without a compressed form (the generic path), and whole models by
their declared layers.  Re-exported by :mod:`snapjax.cells.nnx`.

A module is ``nnx.split`` once into its graphdef and its ``nnx.Param`` state; the values are
kept as a nested ``dict`` with string keys (the attribute names, list indices as ``"0"``...),
which optax, ``jax.jit`` and checkpoints handle like any parameters; each call merges them
back into a copy of the module (the user's module is not touched; :func:`snapjax.to_nnx`
writes trained values into it).  Modules holding variables other than ``nnx.Param`` (rngs of
a Dropout, batch statistics of a BatchNorm) are refused: they are not pure functions of their
parameters.

Example (a custom nnx cell on the generic path, next to its own call)::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> class NormGRU(nnx.Module):
    ...     def __init__(self, n_in, n, rngs):
    ...         self.gru, self.norm = nnx.GRUCell(n_in, n, rngs=rngs), nnx.LayerNorm(n, rngs=rngs)
    ...         self.in_features = n_in
    ...     def __call__(self, h, x):
    ...         h = self.norm(self.gru(h, x)[0])
    ...         return h, h
    ...     def initialize_carry(self, input_shape, rngs=None):
    ...         return self.gru.initialize_carry(input_shape, rngs)
    >>> cell = NormGRU(3, 4, nnx.Rngs(0))
    >>> apply, output, init_carry, params = nnx_step(cell)
    >>> sorted(params), init_carry(2).shape
    (['gru', 'norm'], (2, 4))
    >>> h, x = jnp.ones((2, 4)), jnp.ones((2, 3))
    >>> bool(jnp.allclose(output(apply(params, h, x)), cell(h, x)[1]))
    True
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from snapjax.cells.feedforward import FeedForward, get_path, nest

PyTree = Any

__all__ = ["is_nnx_cell", "nnx_feedforward", "nnx_step", "nnx_layers", "ff_writes"]


def is_nnx_cell(module: Any) -> bool:
    """Whether ``module`` is a recurrent flax.nnx module: an ``nnx.RNNCellBase`` or any
    ``nnx.Module`` defining ``initialize_carry`` (called as ``module(carry, x) -> (carry, y)``)."""
    return isinstance(module, nnx.RNNCellBase) or (
        isinstance(module, nnx.Module) and callable(getattr(module, "initialize_carry", None)))


def _extra_state(module: nnx.Module) -> None:
    """``ValueError`` when ``module`` holds variables other than ``nnx.Param``."""
    rest = nnx.split(module, nnx.Param, ...)[2]  # type: ignore[misc]
    found = jax.tree_util.tree_flatten_with_path(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    if not found:
        return
    where = ", ".join(f"{'/'.join(str(getattr(k, 'key', k)) for k in path)} ({type(v).__name__})" for path, v in found)
    name = type(module).__name__
    if any(isinstance(v, nnx.RngState) for _, v in found):
        raise ValueError(f"{name}: a feed-forward layer runs as a pure function of its nnx.Param values, and this "
                         f"module draws random numbers at call time ({where}; e.g. an nnx.Dropout given rngs): "
                         "build it without rngs (nnx.Dropout(rate, deterministic=True)) or leave it out")
    raise ValueError(f"{name}: a feed-forward layer runs as a pure function of its nnx.Param values, and this module "
                     f"carries other mutable state ({where}; e.g. nnx.BatchNorm's batch statistics), which is not "
                     "supported: use nnx.LayerNorm or leave it out")


def _param_layout(module: nnx.Module) -> tuple[Any, Any, Any, list[tuple[str, ...]], list[jax.Array]]:
    """``(graphdef, param treedef, rest, string paths, values)`` of ``module``'s ``nnx.Param`` s."""
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)) for path, _ in flat]
    return graphdef, treedef, rest, paths, [v for _, v in flat]


def _in_features(module: Any) -> int | None:
    """``in_features`` of an ``nnx.Linear``-like module, or of a ``Sequential``'s first layer."""
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    layers = getattr(module, "layers", None) if isinstance(module, nnx.Sequential) else None
    return _in_features(layers[0]) if layers else None


def nnx_feedforward(module: nnx.Module) -> FeedForward:
    """A flax.nnx feed-forward module (``nnx.Linear``, ``nnx.Sequential``, an MLP ``nnx.Module``
    called as ``module(h) -> h'``) as a :class:`~snapjax.cells.feedforward.FeedForward`.

    The module is split into its graphdef and its ``nnx.Param`` values, kept as a plain dict
    with string keys (``{"layers": {"0": {"kernel", "bias"}}}`` for a ``Sequential``);
    ``apply(params, h)`` merges them into a copy of the module and calls it on the batch.

    Raises:
      ValueError: a recurrent cell, or a module holding variables other than ``nnx.Param``
        (rngs for a Dropout, ``BatchNorm`` batch statistics).

    Example::

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> ff = nnx_feedforward(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        >>> sorted(ff.params), ff.in_features, ff.apply(ff.params, jnp.ones((5, 3))).shape
        (['bias', 'kernel'], 3, (5, 2))
        >>> nnx_feedforward(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: BatchNorm: a feed-forward layer runs as a pure function of its nnx.Param values, and ...
    """
    if not isinstance(module, nnx.Module) or is_nnx_cell(module):
        raise ValueError(f"expected a flax.nnx feed-forward module, got {type(module).__name__}")
    _extra_state(module)
    graphdef, treedef, rest, paths, values = _param_layout(module)
    params = nest(list(zip(paths, values))) if paths else None
    name = type(module).__name__

    def apply(p, h):
        leaves = [get_path(p, path, name) for path in paths]
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)(h)

    return FeedForward(name, apply, params, module, _in_features(module))


def _default_output(carry: PyTree) -> jax.Array:
    """flax convention: an array carry is ``h``; a tuple carry ends with ``h`` (LSTM ``(c, h)``)."""
    return carry[-1] if isinstance(carry, (tuple, list)) else carry


def nnx_step(module: nnx.Module, init_carry: Callable | None = None,
             output: Callable | None = None) -> tuple[Callable, Callable, Callable, PyTree]:
    """``(apply, output, init_carry, params)`` of a recurrent nnx module without a compressed
    form (the generic path): ``apply(params, carry, x) -> carry`` merges ``params`` into a copy
    of the module and calls ``module(carry, x)``; ``output(carry)`` is the carry (the last
    element of a tuple carry) unless ``output`` is given; ``init_carry(batch_size, dtype)`` zeros
    shaped like the module's ``initialize_carry((batch_size, 1), nnx.Rngs(0))``, unless given.

    Raises:
      ValueError: variables other than ``nnx.Param`` (module docstring); no way to build the
        zero carry; a ``y`` other than ``output(carry)`` (checked once when the module has an
        ``int`` ``in_features``; the layer would pass on the wrong values).
    """
    _extra_state(module)
    graphdef, treedef, rest, paths, values = _param_layout(module)
    params = nest(list(zip(paths, values))) if paths else None
    name = type(module).__name__

    def call(p, carry, x):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, [get_path(p, path, name) for path in paths]), rest)(
            carry, x)

    if init_carry is None:
        try:
            one = getattr(module, "initialize_carry")((1, 1), nnx.Rngs(0))
        except Exception as err:  # noqa: BLE001 - the user's initialize_carry, named
            raise ValueError(f"{name}: its initialize_carry((batch, features), rngs) failed ({type(err).__name__}: "
                             f"{err}); give the zero carry: snapjax.as_recurrent(module, init_carry=fn) with "
                             "fn(batch_size, dtype) -> carry") from None

        def init_carry(batch_size, dtype=jnp.float32):
            return jax.tree.map(lambda a: jnp.zeros((int(batch_size), *jnp.shape(a)[1:]), dtype), one)

    n_in = getattr(module, "in_features", None)
    if output is None and isinstance(n_in, int):
        k1, k2 = jax.random.split(jax.random.key(0))
        dtype = jnp.result_type(*values) if values else jnp.float32
        carry = jax.tree.map(lambda a: jax.random.normal(k1, a.shape, a.dtype), init_carry(2, dtype))
        new, y = call(params, carry, jax.random.normal(k2, (2, n_in), dtype))
        guess = _default_output(new)
        if jnp.shape(y) != jnp.shape(guess) or not bool(jnp.allclose(y, guess, rtol=1e-5, atol=1e-6)):
            raise ValueError(f"{name} returns (carry, y) with y other than its carry (or the carry's last element): "
                             "the layer would pass the carry on. Return the carry as y and put the read-out in the "
                             "next layer, or give snapjax.as_recurrent(module, output=fn) with fn(carry) == y")

    def apply(p, carry, x):
        return call(p, carry, x)[0]

    return apply, output or _default_output, init_carry, params


def ff_writes(module: nnx.Module, params: PyTree) -> list[tuple[nnx.Variable, jax.Array]]:
    _, _, _, paths, values = _param_layout(module)
    name = type(module).__name__
    want = sorted(paths)
    got = sorted(tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params or {})[0])
    if got != want:
        raise ValueError(f"{name}: params have the leaves {['/'.join(p) for p in got]}, the module "
                         f"{['/'.join(p) for p in want]}")
    variables: dict[tuple[str, ...], nnx.Variable] = {
        tuple(str(k) for k in path): v for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}
    out = []
    for path, old in zip(paths, values):
        new = jnp.asarray(get_path(params, path, name))
        if new.shape != old.shape:
            raise ValueError(f"{name}: params {'/'.join(path)} has shape {new.shape}, the module's {old.shape}")
        out.append((variables[path], new.astype(old.dtype)))
    return out


# ---------------------------------------------------------------------------
# Whole nnx models: the declared layers, and writing trained parameters back.


def nnx_layers(model: nnx.Module, names: Sequence[str] | None = None) -> list:
    """The layers of a whole ``nnx.Module`` model, in the order a step applies them.

    snapjax cannot trace an arbitrary ``__call__`` into stages: the model declares them, by
    ``names`` or by a class attribute ``online_layers = ("encoder", "rnn", "head")``.  Each name
    is an attribute path (``"blocks.0"`` indexes a list); the submodules found are the layers,
    applied one after the other at every step, exactly like the list ``[model.encoder,
    model.rnn, model.head]`` (the model's own ``__call__`` is not used).  ``OnlineModel`` (and
    so ``OnlineLearner``) expands a model that declares ``online_layers`` by itself.

    Raises:
      ValueError: no names given or declared, or a name that is not an attribute path.

    Example::

        >>> from flax import nnx
        >>> class Net(nnx.Module):
        ...     online_layers = ("encoder", "rnn", "head")
        ...     def __init__(self, rngs):
        ...         self.encoder = nnx.Linear(3, 4, rngs=rngs)
        ...         self.rnn = nnx.GRUCell(4, 8, rngs=rngs)
        ...         self.head = nnx.Linear(8, 2, rngs=rngs)
        >>> [type(m).__name__ for m in nnx_layers(Net(nnx.Rngs(0)))]
        ['Linear', 'GRUCell', 'Linear']
    """
    names = getattr(model, "online_layers", None) if names is None else names
    if names is None or isinstance(names, str) or not all(isinstance(n, str) for n in names) or not names:
        raise ValueError(f"{type(model).__name__}: name its layers in order, nnx_layers(model, ('encoder', 'rnn', "
                         f"'head')) or a class attribute online_layers = (...); got {names!r}")
    out = []
    for name in names:
        node: Any = model
        for part in name.split("."):
            try:
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            except (AttributeError, IndexError, KeyError, TypeError):
                raise ValueError(f"{type(model).__name__} has no layer {name!r} (at {part!r})") from None
        out.append(node)
    return out
