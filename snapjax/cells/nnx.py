"""flax.nnx modules as layers: cells to a compressed :class:`snapjax.CellSpec` with linen-layout
parameters, feed-forward modules to a plain dict of their ``nnx.Param`` values, whole models by
their declared layers; trained parameters written back in place.

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

Any other nnx cell (an ``nnx.RNNCellBase``, a subclass of the cells above, any module
``(carry, x) -> (carry, y)`` defining ``initialize_carry``) takes the generic path
(:func:`nnx_step`); any other nnx module (``nnx.Linear``, ``nnx.Sequential``, an MLP
``nnx.Module``) is a feed-forward layer (:func:`nnx_feedforward`).  Both are ``nnx.split``
into graphdef and ``nnx.Param`` state once (:mod:`snapjax.cells.nnx_modules`), the values
kept as a plain dict with string keys (``{"layers": {"0": {"kernel", "bias"}}}`` for a
``Sequential``), merged back into a copy of the module at each call.  Modules
holding other variables (rngs of a Dropout, batch statistics of a BatchNorm) are refused.  A
whole model declares its layers (``online_layers``, :func:`nnx_layers`: its ``__call__`` is not
traced), and :func:`to_nnx` on the layer list (or the model) and ``state.params`` writes every
nnx layer back in one call.

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

A whole model through the learner, written back in one call::

    >>> layers = [nnx.Linear(3, 4, rngs=nnx.Rngs(1)), nnx.GRUCell(4, 4, rngs=nnx.Rngs(2)),
    ...           nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(3)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(4)))]
    >>> learner = sj.OnlineLearner(layers, method="snap1", loss="mse", optimizer=optax.sgd(0.1))
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> state, _, _ = learner.run(state, jnp.ones((4, 2, 3)), jnp.zeros((4, 2, 2)))
    >>> to_nnx(layers, state.params)
    >>> bool(jnp.array_equal(layers[2].layers[2].kernel[...], state.params["layers_2"]["layers"]["2"]["kernel"]))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from snapjax.cells.builtin import gru_spec, lstm_spec, vanilla_spec
from snapjax.cells.nnx_modules import ff_writes, is_nnx_cell, nnx_feedforward, nnx_layers, nnx_step
from snapjax.cells.spec import CellSpec

PyTree = Any

__all__ = ["from_nnx", "to_nnx", "nnx_feedforward", "nnx_layers", "nnx_step", "is_nnx_cell", "SUPPORTED_NNX"]

_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")
_SUPPORTED = "flax.nnx GRUCell, LSTMCell, OptimizedLSTMCell or SimpleCell"
#: The nnx cells with a compressed form (exact classes; any other nnx cell takes the generic path).
SUPPORTED_NNX = (nnx.GRUCell, nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.SimpleCell)


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


def _cell_writes(cell: nnx.Module, params: PyTree) -> list[tuple[nnx.Variable, jax.Array]]:
    """The ``(variable, new value)`` pairs that write linen-layout ``params`` into a cell."""
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
    return list(new.values())


def to_nnx(target: Any, params: PyTree) -> None:
    """Write trained parameters back into flax.nnx modules, in place (``nnx.update``-style), cast
    to each variable's dtype.

    Args:
      target: an nnx cell (``params`` in the linen layout of :func:`from_nnx`), an nnx
        feed-forward module (``params`` as in :func:`nnx_feedforward`), or a whole model: the
        list of layers given to ``OnlineLearner``/``OnlineModel`` or an ``nnx.Module`` declaring
        ``online_layers`` (:func:`nnx_layers`), with ``params`` the model's ``{"layers_i": ...}``
        (``state.params``); its nnx layers are written, other layers (linen, equinox) left alone.
    Raises:
      ValueError: unsupported cell; ``params`` not in a module's layout (keys, shapes) —
        nothing is written then.

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
        >>> head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))
        >>> to_nnx([cell, head], {"layers_0": params, "layers_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}})
        >>> float(head.kernel[...].sum()), bool(jnp.array_equal(cell.dense_h.kernel[...], params["h"]["kernel"]))
        (8.0, True)
    """
    writes: list[tuple[nnx.Variable, jax.Array]] = []
    if isinstance(target, (list, tuple)) or (isinstance(target, nnx.Module) and hasattr(target, "online_layers")):
        layers = list(target) if isinstance(target, (list, tuple)) else nnx_layers(target)
        if not isinstance(params, dict) or not all(isinstance(k, str) and k.startswith("layers_") for k in params):
            raise ValueError("to_nnx on a model takes the model's parameters {'layers_i': ...} (state.params), got "
                             f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
        unknown = sorted(set(params) - {f"layers_{i}" for i in range(len(layers))})
        if unknown:
            raise ValueError(f"params for unknown layers {unknown}; the model has {len(layers)} layers")
        for i, m in enumerate(layers):
            if isinstance(m, nnx.Module):
                writes += _writes(m, params.get(f"layers_{i}"), f"layers_{i}")
    else:
        writes = _writes(target, params, type(target).__name__)
    for var, value in writes:
        var.set_value(value)


def _writes(module: Any, params: PyTree, where: str) -> list[tuple[nnx.Variable, jax.Array]]:
    if not isinstance(module, nnx.Module):
        raise ValueError(f"{where}: expected a flax.nnx module, got {type(module).__name__}")
    if type(module) in SUPPORTED_NNX:
        if params is None:
            raise ValueError(f"{where}: no parameters given for the nnx {type(module).__name__}")
        return _cell_writes(module, params)
    return ff_writes(module, params)
