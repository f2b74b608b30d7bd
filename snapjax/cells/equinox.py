"""Equinox modules as layers: cells to compressed specs, any step on the generic path,
feed-forward modules, and trained parameters back into the user's (immutable) modules.

Equinox is an optional dependency (``pip install snapjax[equinox]``); without it every function
here raises ``ImportError`` saying so.

=========================  ==============================================  =====================
equinox module             linen-layout parameters (:func:`from_equinox`)   spec
=========================  ==============================================  =====================
``eqx.nn.GRUCell``         ``ir iz in`` (kernel ``weight_ih[gH:(g+1)H].T``,  ``gru_spec(H)``: the
                           bias ``bias[gH:(g+1)H]``), ``hr hz`` (kernel      n-gate hidden bias
                           from ``weight_hh``), ``hn`` (kernel, bias         ``b_hn`` is eqx's
                           ``bias_n``); order r, z, n                        ``bias_n``
``eqx.nn.LSTMCell``        ``ii if ig io`` (kernel from ``weight_ih``),     :func:`lstm_spec`
                           ``hi hf hg ho`` (kernel from ``weight_hh``,
                           bias from ``bias``); order i, f, g, o
=========================  ==============================================  =====================

With ``use_bias=False`` the same specs without any bias.  The compressed step runs on flax's
carry layout: an array ``h`` for the GRU, ``(c, h)`` for the LSTM (equinox's own is ``(h, c)``).

Any other ``eqx.Module`` with an ``int`` attribute ``hidden_size`` is a recurrent *step*
``module(x (n_in,), carry) -> carry`` (equinox's cell convention, unbatched; snapjax vmaps it
over the batch): it takes the generic path, its zero carry is ``zeros(hidden_size)``, and the
layer emits the new carry (the first element of a tuple carry, equinox's ``(h, c)``).  A step
module without ``hidden_size`` is made recurrent by ``snapjax.as_recurrent(module,
init_carry=...)``.  Any other ``eqx.Module`` (``eqx.nn.Linear``, ``eqx.nn.MLP``) is a feed-forward
layer ``module(h (n_in,)) -> (n_out,)``, vmapped over the batch.

Parameters of the generic and feed-forward forms are the module's inexact arrays as a plain
dict keyed by attribute name (list indices as ``"0"``...; ``eqx.nn.MLP``:
``{"layers": {"0": {"weight", "bias"}, ...}}``).  Modules are immutable, so
:func:`to_equinox` returns new modules (``eqx.combine``-style).

Example::

    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> from snapjax.cells.equinox import from_equinox, to_equinox
    >>> cell = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    >>> spec, params = from_equinox(cell)
    >>> spec.name, params["hn"]["kernel"].shape, params["hn"]["bias"].shape
    ('gru', (4, 4), (4,))
    >>> trained = to_equinox(cell, jax.tree.map(lambda a: 2 * a, params))
    >>> bool(jnp.allclose(trained.bias_n, 2 * cell.bias_n))
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from snapjax.cells.builtin import gru_spec, lstm_spec
from snapjax.cells.feedforward import FeedForward, get_path, nest
from snapjax.cells.spec import CellSpec, Projection

try:
    import equinox as eqx
except ImportError:  # pragma: no cover - equinox is optional
    eqx = None  # type: ignore[assignment]

PyTree = Any

__all__ = ["from_equinox", "to_equinox", "eqx_feedforward", "eqx_step", "is_equinox", "is_equinox_cell",
           "is_equinox_builtin"]

_GATES = {"gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}


def _require() -> Any:
    if eqx is None:
        raise ImportError("snapjax's equinox support needs equinox: pip install snapjax[equinox]")
    return eqx


def is_equinox(module: Any) -> bool:
    """Whether ``module`` is an ``eqx.Module`` (``False`` without equinox installed)."""
    return eqx is not None and isinstance(module, eqx.Module)


def is_equinox_cell(module: Any) -> bool:
    """Whether ``module`` is an equinox recurrent layer: ``eqx.nn.GRUCell``/``LSTMCell`` or any
    ``eqx.Module`` with an ``int`` attribute ``hidden_size``."""
    return is_equinox(module) and isinstance(getattr(module, "hidden_size", None), int)


def is_equinox_builtin(module: Any) -> bool:
    """Whether ``module`` is an ``eqx.nn.GRUCell`` or ``eqx.nn.LSTMCell`` (or a subclass)."""
    return is_equinox(module) and isinstance(module, (eqx.nn.GRUCell, eqx.nn.LSTMCell))


@functools.lru_cache(maxsize=None)
def _no_bias(spec: CellSpec) -> CellSpec:
    return dataclasses.replace(spec, projections=tuple(Projection(p.name, p.source, False) for p in spec.projections))


def _spec(cell: Any) -> CellSpec:
    kind = {eqx.nn.GRUCell: "gru", eqx.nn.LSTMCell: "lstm"}.get(type(cell))
    if kind is None:
        sub = [c.__name__ for c in (eqx.nn.GRUCell, eqx.nn.LSTMCell) if isinstance(cell, c)]
        raise ValueError(f"unsupported equinox cell {type(cell).__name__}: expected exactly eqx.nn.GRUCell or "
                         f"eqx.nn.LSTMCell{' (a subclass of ' + sub[0] + ' may change the maths)' if sub else ''}; "
                         "a step module (x, carry) -> carry takes the generic path: snapjax.as_recurrent(module, "
                         "generic=True)")
    for name in ("weight_ih", "weight_hh", "bias", "bias_n"):
        a = getattr(cell, name, None)
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"equinox {type(cell).__name__} with {name} of dtype {a.dtype}: the compressed form "
                             "supports real floating parameters (float16/bfloat16/float32/float64)")
    H = int(cell.hidden_size)
    spec = gru_spec(H) if kind == "gru" else lstm_spec(H)
    return spec if cell.use_bias else _no_bias(spec)


def from_equinox(cell: Any) -> tuple[CellSpec, dict]:
    """The compressed spec of an ``eqx.nn.GRUCell``/``eqx.nn.LSTMCell`` and its parameters in
    the flax.linen layout (module docstring).

    Raises:
      ImportError: equinox is not installed.
      ValueError: another module, a subclass, or non-floating parameters.

    Example (the spec's step is the equinox cell's own step, vmapped over the batch)::

        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step
        >>> cell = eqx.nn.LSTMCell(3, 4, key=jax.random.key(0))
        >>> spec, params = from_equinox(cell)
        >>> h, c, x = 0.5 * jnp.ones((2, 4)), 0.1 * jnp.ones((2, 4)), jnp.ones((2, 3))
        >>> h_eqx, c_eqx = jax.vmap(cell)(x, (h, c))
        >>> c2, h2 = spec.from_internal(cell_step(spec, params, spec.to_internal((c, h)), x))
        >>> bool(jnp.allclose(h_eqx, h2, atol=1e-6) and jnp.allclose(c_eqx, c2, atol=1e-6))
        True
    """
    _require()
    spec = _spec(cell)
    gates, H = _GATES[spec.name], spec.units
    rows = lambda w, k: w[k * H:(k + 1) * H]  # gate k of a fused (gates * H, n) weight
    params: dict = {}
    for k, g in enumerate(gates):
        params[f"i{g}"] = {"kernel": rows(cell.weight_ih, k).T}
        params[f"h{g}"] = {"kernel": rows(cell.weight_hh, k).T}
        if cell.use_bias:
            params[f"i{g}" if spec.name == "gru" else f"h{g}"]["bias"] = rows(cell.bias, k)
    if spec.name == "gru" and cell.use_bias:
        params["hn"]["bias"] = cell.bias_n
    spec.check_params(params)
    return spec, params


def _cell_back(cell: Any, params: PyTree) -> Any:
    spec = _spec(cell)
    spec.check_params(params)
    if spec.input_size(params) != cell.input_size:
        raise ValueError(f"params have input size {spec.input_size(params)}, the equinox cell has {cell.input_size}")
    gates, dtype = _GATES[spec.name], cell.weight_ih.dtype
    cat = lambda parts: jnp.concatenate([jnp.asarray(a, dtype) for a in parts])
    new = {"weight_ih": cat([params[f"i{g}"]["kernel"].T for g in gates]),
           "weight_hh": cat([params[f"h{g}"]["kernel"].T for g in gates])}
    if cell.use_bias:
        new["bias"] = cat([params[f"i{g}" if spec.name == "gru" else f"h{g}"]["bias"] for g in gates])
        if spec.name == "gru":
            new["bias_n"] = jnp.asarray(params["hn"]["bias"], dtype)
    names = tuple(new)
    return eqx.tree_at(lambda m: tuple(getattr(m, n) for n in names), cell, tuple(new[n] for n in names))


# ---------------------------------------------------------------------------
# Generic modules: the inexact arrays as a plain dict, merged back with eqx.combine.


def _key(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _split(module: Any) -> tuple[dict | None, Callable[[PyTree], Any], list, list]:
    """``(params, rebuild, paths, leaves)``: ``rebuild(params)`` is the module with them."""
    arrays, static = eqx.partition(module, eqx.is_inexact_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    paths = [tuple(_key(k) for k in path) for path, _ in flat]
    leaves = [v for _, v in flat]
    name = type(module).__name__

    def rebuild(params):
        return eqx.combine(jax.tree.unflatten(treedef, [get_path(params, p, name) for p in paths]), static)

    return (nest(list(zip(paths, leaves))) if paths else None), rebuild, paths, leaves


def _in_size(module: Any) -> int | None:
    for attr in ("in_features", "in_size", "input_size"):
        n = getattr(module, attr, None)
        if isinstance(n, int):
            return n
    return None


def eqx_feedforward(module: Any) -> FeedForward:
    """An ``eqx.Module`` called per example, ``module(h (n_in,)) -> (n_out,)`` (``eqx.nn.Linear``,
    ``eqx.nn.MLP``), as a :class:`~snapjax.cells.feedforward.FeedForward` vmapped over the batch.

    Example::

        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> ff = eqx_feedforward(eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0)))
        >>> sorted(ff.params["layers"]), ff.in_features, ff.apply(ff.params, jnp.ones((5, 3))).shape
        (['0', '1'], 3, (5, 2))
    """
    _require()
    if not isinstance(module, eqx.Module):
        raise ValueError(f"expected an eqx.Module, got {type(module).__name__}")
    params, rebuild, _, _ = _split(module)

    def apply(p, h):
        return jax.vmap(rebuild(p))(h)

    return FeedForward(type(module).__name__, apply, params, module, _in_size(module))


def eqx_step(module: Any, init_carry: Callable | None = None) -> tuple[Callable, Callable, Callable, PyTree]:
    """``(apply, output, init_carry, params)`` of a recurrent ``eqx.Module`` step
    ``module(x, carry) -> carry`` (module docstring): ``apply(params, carry, x)`` batched by
    ``vmap``; ``init_carry(batch_size, dtype)`` zeros of ``hidden_size`` unless given."""
    _require()
    if not isinstance(module, eqx.Module):
        raise ValueError(f"expected an eqx.Module, got {type(module).__name__}")
    params, rebuild, _, _ = _split(module)
    H = getattr(module, "hidden_size", None)
    if init_carry is None and not isinstance(H, int):
        raise ValueError(f"{type(module).__name__}: a recurrent equinox step needs an int attribute hidden_size (its "
                         "carry is zeros(hidden_size)), or snapjax.as_recurrent(module, init_carry=fn) with "
                         "fn(batch_size, dtype) -> carry")

    def apply(p, carry, x):
        return jax.vmap(rebuild(p))(x, carry)

    def output(carry):
        return carry[0] if isinstance(carry, (tuple, list)) else carry

    def zeros(batch_size, dtype=jnp.float32):
        h = jnp.zeros((int(batch_size), H), dtype)
        return (h, h) if isinstance(module, eqx.nn.LSTMCell) else h

    return apply, output, init_carry or zeros, params


def to_equinox(module: Any, params: PyTree) -> Any:
    """The module with trained ``params`` (``eqx.combine``-style; equinox modules are immutable),
    each leaf cast to the module's own dtype.

    Args:
      module: an ``eqx.nn.GRUCell``/``LSTMCell`` (``params`` in the layout of
        :func:`from_equinox`), any other ``eqx.Module`` (``params`` its array dict, module
        docstring), or the list of layers given to ``OnlineLearner`` with ``params`` its
        ``{"layers_i": ...}``: then a new list, equinox layers replaced, others as they were.
    Raises:
      ValueError: ``params`` not in the module's layout (keys, shapes).

    Example::

        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> head = eqx.nn.Linear(4, 2, key=jax.random.key(0))
        >>> new = to_equinox([head], {"layers_0": {"weight": jnp.ones((2, 4)), "bias": jnp.zeros(2)}})
        >>> float(new[0].weight.sum()), float(head.weight.sum()) != 8.0
        (8.0, True)
    """
    _require()
    if isinstance(module, (list, tuple)):
        if not isinstance(params, dict) or not all(isinstance(k, str) and k.startswith("layers_") for k in params):
            raise ValueError("to_equinox on a list of layers takes the model's parameters {'layers_i': ...} "
                             "(state.params)")
        return [to_equinox(m, params[f"layers_{i}"]) if is_equinox(m) and f"layers_{i}" in params else m
                for i, m in enumerate(module)]
    if type(module) in (eqx.nn.GRUCell, eqx.nn.LSTMCell):
        return _cell_back(module, params)
    own, rebuild, paths, leaves = _split(module)
    name = type(module).__name__
    got = sorted(tuple(_key(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params or {})[0])
    if got != sorted(paths):
        raise ValueError(f"{name}: params have the leaves {['/'.join(p) for p in got]}, the module "
                         f"{['/'.join(p) for p in sorted(paths)]}")
    cast = []
    for path, old in zip(paths, leaves):
        new = jnp.asarray(get_path(params, path, name))
        if new.shape != old.shape:
            raise ValueError(f"{name}: params {'/'.join(path)} has shape {new.shape}, the module's {old.shape}")
        cast.append((path, new.astype(old.dtype)))
    return rebuild(nest(cast)) if own is not None else module
