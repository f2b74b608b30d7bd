"""flax.nnx cells: convert to a compressed :class:`snapjax.CellSpec` with linen-layout parameters,
train online, write the parameters back.

=========================  ==============================================  ====================
flax.nnx cell              linen-layout parameters (``from_nnx``)          spec
=========================  ==============================================  ====================
``LSTMCell``               ``ii if ig io`` (kernel), ``hi hf hg ho``       :func:`lstm_spec`
                           (kernel, bias) — nnx's ``if_`` is ``if``
``OptimizedLSTMCell``      the same, split from ``dense_i.kernel``         :func:`lstm_spec`
                           ``(n_in, 4H)`` and ``dense_h.kernel/bias``
                           (gate order i, f, g, o)
``GRUCell``                ``ir iz in`` (kernel, bias) from ``dense_i``,   ``gru_spec(H,
                           ``hr hz hn`` (kernel) from ``dense_h``          hn_bias=False)``
                           (order r, z, n); nnx has no ``b_hn``
``SimpleCell``             ``i`` (kernel, bias) from ``dense_i``, ``h``    :func:`vanilla_spec`
                           (kernel) from ``dense_h``; also residual
=========================  ==============================================  ====================

Each cell's ``gate_fn``/``activation_fn`` is kept.  :func:`to_nnx` is the inverse: it writes a
(trained) linen-layout parameter dict into the module's ``nnx.Param`` variables in place, in
the variables' own dtype.

Example::

    >>> import jax, jax.numpy as jnp, optax, snapjax as sj
    >>> from flax import nnx
    >>> from snapjax.cells.nnx import from_nnx, to_nnx
    >>> cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> spec, params = from_nnx(cell)
    >>> method = sj.online_method("snap1", spec, params)
    >>> carry, state = method.init_carry(2), method.init(2)
    >>> carry, state, _ = method.step(params, carry, state, jnp.ones((2, 3)))
    >>> grads, state = method.gradient(params, state, jnp.ones((2, 4)))
    >>> params = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
    >>> to_nnx(cell, params)                      # the nnx module now holds the new values
    >>> bool(jnp.array_equal(cell.dense_h.kernel[...][:, 8:], params["hn"]["kernel"]))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from snapjax.cells.builtin import gru_spec, lstm_spec, vanilla_spec
from snapjax.cells.spec import CellSpec

PyTree = Any

__all__ = ["from_nnx", "to_nnx"]

_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")
_SUPPORTED = "flax.nnx GRUCell, LSTMCell, OptimizedLSTMCell or SimpleCell"


def _get(var: nnx.Variable) -> jax.Array:
    return var.get_value()


def _layout(cell: nnx.Module) -> tuple[CellSpec, dict]:
    """``(spec, {linen name: {leaf: (variable, column slice)}})`` for a supported nnx cell."""
    if not isinstance(cell, nnx.Module):
        raise ValueError(f"expected a {_SUPPORTED} module, got {type(cell).__name__}")
    H = int(getattr(cell, "hidden_features", 0) or 0)
    full = slice(None)

    def split(var, k):  # gate k of a fused (n_in, gates * H) kernel / (gates * H,) bias
        return var, slice(k * H, (k + 1) * H)

    if type(cell) is nnx.OptimizedLSTMCell:
        spec = lstm_spec(H, cell.gate_fn, cell.activation_fn)
        vars_ = {f"i{g}": {"kernel": split(cell.dense_i.kernel, k)} for k, g in enumerate(_LSTM_GATES)}
        vars_.update({
            f"h{g}": {"kernel": split(cell.dense_h.kernel, k), "bias": split(cell.dense_h.bias, k)}
            for k, g in enumerate(_LSTM_GATES)
        })
    elif type(cell) is nnx.LSTMCell:
        spec = lstm_spec(H, cell.gate_fn, cell.activation_fn)
        attr = {"i": "i", "f": "f_", "g": "g", "o": "o"}  # nnx names the input forget gate `if_`
        vars_ = {f"i{g}": {"kernel": (getattr(cell, "i" + attr[g]).kernel, full)} for g in _LSTM_GATES}
        vars_.update({
            f"h{g}": {"kernel": (getattr(cell, "h" + g).kernel, full), "bias": (getattr(cell, "h" + g).bias, full)}
            for g in _LSTM_GATES
        })
    elif type(cell) is nnx.GRUCell:
        spec = gru_spec(H, cell.gate_fn, cell.activation_fn, hn_bias=False)
        vars_ = {
            f"i{g}": {"kernel": split(cell.dense_i.kernel, k), "bias": split(cell.dense_i.bias, k)}
            for k, g in enumerate(_GRU_GATES)
        }
        vars_.update({f"h{g}": {"kernel": split(cell.dense_h.kernel, k)} for k, g in enumerate(_GRU_GATES)})
    elif type(cell) is nnx.SimpleCell:
        spec = vanilla_spec(H, cell.activation_fn, bool(cell.residual))
        vars_ = {
            "i": {"kernel": (cell.dense_i.kernel, full), "bias": (cell.dense_i.bias, full)},
            "h": {"kernel": (cell.dense_h.kernel, full)},
        }
    else:  # subclasses too: their maths or parameters may differ from the built-in's
        raise ValueError(f"unsupported nnx cell {type(cell).__name__}: expected a {_SUPPORTED} "
                         "(exactly that class; a subclass may change the maths)")
    dtype, param_dtype = getattr(cell, "dtype", None), getattr(cell, "param_dtype", None)
    if dtype is not None and param_dtype is not None and jnp.dtype(dtype) != jnp.dtype(param_dtype):
        raise ValueError(f"nnx {type(cell).__name__} with dtype={jnp.dtype(cell.dtype).name}: the compressed form computes in the "
                         "parameters' dtype; use dtype=None or dtype=param_dtype")
    return spec, vars_


def from_nnx(cell: nnx.Module) -> tuple[CellSpec, dict]:
    """The compressed spec of a flax.nnx cell and its parameters in the flax.linen layout.

    Args:
      cell: a flax.nnx ``GRUCell``, ``LSTMCell``, ``OptimizedLSTMCell`` or ``SimpleCell``.
    Returns:
      ``(spec, params)``: ``cell_step(spec, params, ...)`` computes the module's own step
      (module docstring for the layout); ``params`` holds copies (splits) of the module's
      arrays, ready for :func:`snapjax.online_method` and optax.
    Raises:
      ValueError: another module type.

    Example (the spec's step on the split parameters is the nnx module's own step)::

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from snapjax.cells import cell_step
        >>> from snapjax.cells.nnx import from_nnx
        >>> cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
        >>> spec, params = from_nnx(cell)
        >>> spec.name, sorted(params)
        ('lstm', ['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io'])
        >>> carry, x = (jnp.zeros((2, 4)), 0.5 * jnp.ones((2, 4))), jnp.ones((2, 3))
        >>> (c, h), _ = cell(carry, x)
        >>> c2, h2 = spec.from_internal(cell_step(spec, params, spec.to_internal(carry), x))
        >>> bool(jnp.allclose(c, c2, atol=1e-6) and jnp.allclose(h, h2, atol=1e-6))
        True
    """
    spec, vars_ = _layout(cell)
    params = {name: {leaf: _get(var)[..., cols] for leaf, (var, cols) in leaves.items()} for name, leaves in vars_.items()}
    spec.check_params(params)
    return spec, params


def to_nnx(cell: nnx.Module, params: PyTree) -> None:
    """Write linen-layout ``params`` (as returned by :func:`from_nnx`, e.g. after training) into
    ``cell``'s ``nnx.Param`` variables, in place, cast to each variable's dtype.

    Raises:
      ValueError: unsupported cell; ``params`` not in the cell's layout (keys, shapes) — nothing
        is written then.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from snapjax.cells.nnx import from_nnx, to_nnx
        >>> cell = nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0))
        >>> _, params = from_nnx(cell)
        >>> doubled = jax.tree.map(lambda a: 2 * a, params)
        >>> to_nnx(cell, doubled)
        >>> bool(jnp.array_equal(cell.dense_h.kernel[...], doubled["h"]["kernel"]))
        True
        >>> to_nnx(cell, {"i": params["i"]})          # nothing is written
        Traceback (most recent call last):
            ...
        ValueError: vanilla: params keys ['i'] != expected ['h', 'i']
    """
    spec, vars_ = _layout(cell)
    spec.check_params(params)
    n_in = int(_get(cell.dense_i.kernel if hasattr(cell, "dense_i") else cell.ii.kernel).shape[0])  # type: ignore[attr-defined]
    if spec.input_size(params) != n_in:
        raise ValueError(f"params have input size {spec.input_size(params)}, the nnx cell has {n_in}")
    new: dict[int, tuple[nnx.Variable, jax.Array]] = {}
    for name, leaves in vars_.items():
        for leaf, (var, cols) in leaves.items():
            old = new.get(id(var), (var, _get(var)))[1]
            new[id(var)] = (var, old.at[..., cols].set(jnp.asarray(params[name][leaf], old.dtype)))
    for var, value in new.values():
        var.set_value(value)
