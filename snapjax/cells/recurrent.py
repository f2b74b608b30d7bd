"""A recurrent cell as the online methods see it: a pure step on the *flax* carry.

:class:`Recurrent` is the one view every method and the learner use, whatever the cell is:

* ``apply(params, carry, x) -> carry``: one step ``s_t = f(θ, s_{t-1}, x_t)`` on the flax
  carry (``(B, units)`` for GRU/vanilla/MGU, the tuple ``(c, h)`` for LSTM), ``x (B, n_in)``;
* ``output(carry) -> y (B, features)``: what the layer emits (flax cells emit ``h``);
* ``init_carry(batch_size, dtype)``: the zero carry;
* ``spec``: the compressed :class:`snapjax.CellSpec` when the cell has one (then RTRL/SnAp use
  the compressed Jacobians), else ``None`` (the generic dense path, see
  :mod:`snapjax.methods.dense`).

Build it with :func:`as_recurrent` from a snapjax cell, a supported ``flax.linen`` cell, a
:class:`snapjax.CellSpec` or any ``flax.linen`` module ``(carry, x) -> (carry, y)``::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> cell = as_recurrent(nn.GRUCell(4))
    >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    >>> carry = cell.apply(params, cell.init_carry(2), jnp.ones((2, 3)))
    >>> cell.output(carry).shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from snapjax.cells.builtin import as_cell_spec
from snapjax.cells.equinox import (
    eqx_feedforward,
    eqx_step,
    from_equinox,
    is_equinox,
    is_equinox_builtin,
    is_equinox_cell,
)
from snapjax.cells.feedforward import FeedForward
from snapjax.cells.nnx import SUPPORTED_NNX, from_nnx, is_nnx_cell, nnx_feedforward, nnx_layers, nnx_step
from snapjax.cells.spec import CellSpec, cell_step

Array = jax.Array
PyTree = Any

__all__ = ["Recurrent", "as_recurrent", "as_layer", "expand_layers", "RECURRENT_RULE"]


@dataclasses.dataclass(frozen=True, eq=False)
class Recurrent:
    """Static view of a recurrent cell on the flax carry (hash by identity).

    Attributes:
      name: for messages.
      apply: ``apply(params, carry, x) -> carry`` (pure, batched over the leading axis).
      output: ``output(carry) -> (B, features)``.
      init_carry: ``init_carry(batch_size, dtype=float32) -> carry`` of zeros.
      spec: compressed form, or ``None`` for a generic cell.
      module: the object it was built from (a flax module, a spec, ...).
      params: the values the module holds itself (a flax.nnx or equinox cell; linen layout for
        a compressed one), its initial parameters; ``None`` for modules that hold none.
      in_features: the input size the held ``params`` were built for, when known.

    Example (an LSTM, compressed and forced onto the generic path)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> rec = sj.as_recurrent(nn.LSTMCell(4))
        >>> rec.name, rec.spec is sj.lstm_spec(4)
        ('lstm', True)
        >>> params = rec.init_params(jax.random.key(0), 3)
        >>> rec.input_size(params), params["hi"]["kernel"].shape
        (3, (4, 4))
        >>> c, h = rec.apply(params, rec.init_carry(2), jnp.ones((2, 3)))
        >>> generic = sj.as_recurrent(nn.LSTMCell(4), generic=True)
        >>> generic.spec is None, bool(jnp.allclose(generic.output(generic.apply(params, (c, h), jnp.ones((2, 3)))),
        ...                                         rec.output(rec.apply(params, (c, h), jnp.ones((2, 3)))), atol=1e-6))
        (True, True)
    """

    name: str
    apply: Callable[[PyTree, PyTree, Array], PyTree]
    output: Callable[[PyTree], Array]
    init_carry: Callable[..., PyTree]
    spec: CellSpec | None = None
    module: Any = None
    default_output: bool = False  # a generic module whose output is guessed from its carry
    params: Any = None
    in_features: int | None = None

    def check_output(self, params: PyTree, input_size: int | None) -> None:
        """``ValueError`` when a generic module cannot run on its parameters alone (it needs other
        variable collections, e.g. batch statistics, or rngs, e.g. Dropout) or emits a ``y``
        other than ``output(carry)`` (the layer would pass on the wrong values).  Checked once,
        on concrete parameters, with a random carry and input; skipped for traced parameters."""
        leaves = jax.tree.leaves(params)
        generic = self.spec is None and isinstance(self.module, nn.Module)
        if not generic or input_size is None or any(isinstance(a, jax.core.Tracer) for a in leaves):
            return
        with jax.ensure_compile_time_eval():
            dtype = jnp.result_type(*leaves)
            k1, k2 = jax.random.split(jax.random.key(0))
            carry = jax.tree.map(lambda a: jax.random.normal(k1, a.shape, dtype), self.init_carry(2, dtype))
            try:
                new, y = self.module.apply({"params": params}, carry, jax.random.normal(k2, (2, input_size), dtype))
            except (flax.errors.InvalidRngError, flax.errors.ScopeCollectionNotFound) as err:
                raise ValueError(_needs_more(self.name, err)) from None
            if not self.default_output:
                return
            guess = self.output(new)
            same = str(jax.tree.structure(y)) == str(jax.tree.structure(guess)) and all(
                jnp.shape(a) == jnp.shape(b) and bool(jnp.allclose(a, b, rtol=1e-5, atol=1e-6))
                for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(guess)))
        if not same:
            raise ValueError(
                f"{self.name} returns (carry, y) with y other than its carry (or the carry's last element): the layer "
                "would pass the carry on. Return the carry as y and put the read-out in the next layer (e.g. an "
                "nn.Dense), or give snapjax.as_recurrent(module, output=fn) with fn(carry) == y")

    def init_params(self, key: Array, input_size: int, dtype: Any = jnp.float32) -> PyTree:
        """``module.init(...)['params']`` for a flax module; :meth:`snapjax.CellSpec.init` for a
        bare spec (default initialisers); the module's own values for an nnx or equinox cell."""
        if self.params is not None:
            return self.params
        if isinstance(self.module, CellSpec):
            return self.module.init(key, input_size, dtype)
        if not isinstance(self.module, nn.Module):
            raise ValueError(f"{self.name}: cannot initialise parameters of a {type(self.module).__name__}; pass them "
                             "(the model's parameters are {'layers_i': params of layer i})")
        x0 = jnp.zeros((1, input_size), dtype)
        try:
            variables = self.module.init(key, self.init_carry(1, dtype), x0)
        except flax.errors.InvalidRngError as err:
            raise ValueError(_needs_more(self.name, err)) from None
        if set(variables) != {"params"}:
            raise ValueError(f"{self.name} has variable collections {sorted(variables)}: a recurrent cell trained "
                             "online may hold only 'params' (batch statistics or counters are not supported)")
        return variables["params"]

    def input_size(self, params: PyTree) -> int | None:
        """The input size read from ``params`` (compressed cells), else the size the module's
        own parameters were built for, else ``None``."""
        return self.in_features if self.spec is None else self.spec.input_size(params)


def _needs_more(name: str, err: Exception) -> str:
    return (f"{name}: the generic path runs module.apply({{'params': ...}}, carry, x) with no other variable "
            "collections and no rngs, and this module needs them (a Dropout needs deterministic=True; batch "
            f"statistics or counters are not supported in a recurrent cell): {type(err).__name__}")


def _from_spec(spec: CellSpec, module: Any, params: Any = None) -> Recurrent:
    def apply(params, carry, x):
        return spec.from_internal(cell_step(spec, params, spec.to_internal(carry), x))

    def output(carry):
        return spec.layer_output(spec.to_internal(carry))

    def init_carry(batch_size, dtype=jnp.float32):
        return spec.from_internal(spec.zero_state(int(batch_size), dtype))

    return Recurrent(spec.name, apply, output, init_carry, spec, module, params=params)


def _default_output(carry):
    """flax convention: an array carry is ``h``; a tuple carry ends with ``h`` (LSTM ``(c, h)``)."""
    return carry[-1] if isinstance(carry, (tuple, list)) else carry


def _from_module(module: nn.Module, output: Callable | None, zeros: Callable | None) -> Recurrent:
    out_fn = output or _default_output
    if zeros is None and not callable(getattr(module, "initialize_carry", None)):
        raise ValueError(f"{type(module).__name__} has no initialize_carry(rng, input_shape): give its zero carry, "
                         "snapjax.as_recurrent(module, init_carry=fn) with fn(batch_size, dtype) -> carry")

    def apply(params, carry, x):
        try:
            return module.apply({"params": params}, carry, x)[0]
        except (flax.errors.InvalidRngError, flax.errors.ScopeCollectionNotFound) as err:
            raise ValueError(_needs_more(type(module).__name__, err)) from None

    def init_carry(batch_size, dtype=jnp.float32):
        carry = module.initialize_carry(jax.random.key(0), (int(batch_size), 1))
        return jax.tree.map(lambda a: jnp.zeros(a.shape, dtype), carry)

    return Recurrent(type(module).__name__, apply, out_fn, zeros or init_carry, None, module,
                     default_output=output is None)


#: What makes a layer recurrent (the one rule; ``OnlineModel`` quotes it in its errors).
RECURRENT_RULE = (
    "a layer is recurrent if it is a snapjax cell, a CellSpec or a snapjax.Recurrent (what "
    "snapjax.as_recurrent returns: the explicit marker for any other module), a flax.linen module defining "
    "initialize_carry (nn.RNNCellBase subclasses included), a flax.nnx module defining initialize_carry "
    "(nnx.RNNCellBase subclasses included), or an eqx.Module with an int hidden_size (eqx.nn.GRUCell/LSTMCell "
    "included); every other module is feed-forward")


def as_recurrent(cell: Any, *, output: Callable | None = None, generic: bool = False,
                 init_carry: Callable | None = None) -> Recurrent:
    """The :class:`Recurrent` view of ``cell``: the explicit way to make any module a recurrent layer.

    Args:
      cell: a :class:`Recurrent` (returned as is), a :class:`snapjax.CellSpec`, a snapjax cell
        (anything with a ``.spec``), a supported ``flax.linen`` cell (``GRUCell``, ``LSTMCell``,
        ``SimpleCell``; see :func:`snapjax.as_cell_spec`), a flax.nnx cell (:func:`snapjax.from_nnx`,
        or the generic path for other nnx modules ``(carry, x) -> (carry, y)`` defining
        ``initialize_carry``; their values are the initial parameters), an ``eqx.nn.GRUCell``/``LSTMCell`` or any
        ``eqx.Module`` step ``(x, carry) -> carry`` (:mod:`snapjax.cells.equinox`), or any
        ``flax.linen`` module called as ``module(carry, x) -> (carry, y)`` (the generic path).
      output: for generic modules, ``output(carry) -> y``; default: the carry itself, or its
        last element for a linen tuple carry (flax's ``(c, h)``), its first for an equinox one
        (``(h, c)``).
      generic: use the generic dense path even when a compressed form exists (for comparisons).
      init_carry: ``init_carry(batch_size, dtype) -> carry`` of zeros, for a generic module
        without ``initialize_carry`` (linen) or ``hidden_size`` (equinox).

    Raises:
      ValueError: ``cell`` is none of these, or a generic module whose zero carry is unknown.

    Example (a flax module without a compressed form takes the generic path)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells.recurrent import as_recurrent
        >>> class NormGRU(nn.Module):                 # a GRU with layer norm: mixes the units
        ...     features: int
        ...     @nn.compact
        ...     def __call__(self, carry, x):
        ...         h = nn.LayerNorm()(nn.GRUCell(self.features)(carry, x)[0])
        ...         return h, h
        >>> rec = as_recurrent(NormGRU(4), init_carry=lambda b, dtype: jnp.zeros((b, 4), dtype))
        >>> rec.name, rec.spec is None
        ('NormGRU', True)
        >>> params = rec.init_params(jax.random.key(0), 3)
        >>> rec.output(rec.apply(params, rec.init_carry(2), jnp.ones((2, 3)))).shape
        (2, 4)
        >>> as_recurrent(NormGRU(4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: NormGRU has no initialize_carry(rng, input_shape): give its zero carry, ...
        >>> as_recurrent("gru")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: unsupported cell str: ...
    """
    if isinstance(cell, Recurrent):
        return cell
    if is_nnx_cell(cell):
        if type(cell) in SUPPORTED_NNX and not generic:
            spec, params = from_nnx(cell)
            return _from_spec(spec, cell, params)
        apply, out_fn, zeros, params = nnx_step(cell, _zeros(init_carry), output)
        n_in = getattr(cell, "in_features", None)
        return Recurrent(type(cell).__name__, apply, out_fn, zeros, None, cell, params=params,
                         in_features=n_in if isinstance(n_in, int) else None)
    if is_equinox(cell):
        if is_equinox_builtin(cell) and not generic:
            spec, params = from_equinox(cell)
            return _from_spec(spec, cell, params)
        apply, out_fn, zeros, params = eqx_step(cell, _zeros(init_carry))
        n_in = getattr(cell, "input_size", None)
        return Recurrent(type(cell).__name__, apply, output or out_fn, zeros, None, cell, params=params,
                         in_features=n_in if isinstance(n_in, int) else None)
    if not generic:
        try:
            compressed: CellSpec | None = as_cell_spec(cell)
        except ValueError:
            compressed = None
        if compressed is not None:
            return _from_spec(compressed, cell)
    if isinstance(cell, nn.Module):
        return _from_module(cell, output, _zeros(init_carry))
    raise ValueError(
        f"unsupported cell {type(cell).__name__}: expected a snapjax cell, a flax.linen recurrent cell, "
        "a CellSpec, a flax.nnx or equinox cell, or a flax.linen module (carry, x) -> (carry, y)"
    )


def _zeros(fn: Callable | None) -> Callable | None:
    """A user's ``init_carry(batch_size, dtype)`` with the dtype defaulting to float32."""
    return None if fn is None else (lambda batch_size, dtype=jnp.float32: fn(int(batch_size), dtype))


def expand_layers(layers: Any) -> list:
    """``layers`` as a list, each ``nnx.Module`` that declares ``online_layers`` replaced by its
    declared layers (:func:`snapjax.nnx_layers`)."""
    out: list = []
    for m in layers:
        if isinstance(m, nnx.Module) and hasattr(m, "online_layers"):
            out.extend(nnx_layers(m))
        else:
            out.append(m)
    return out


def as_layer(module: Any) -> Any:
    """How :class:`snapjax.OnlineModel` holds a layer: flax.nnx and equinox cells as their
    :class:`Recurrent` (with their own values), their feed-forward modules as a
    :class:`~snapjax.cells.feedforward.FeedForward`, anything else as it is."""
    if is_nnx_cell(module) or is_equinox_cell(module):
        return as_recurrent(module)
    if is_equinox(module):
        return eqx_feedforward(module)
    if isinstance(module, (FeedForward, nn.Module, CellSpec, Recurrent)):
        return module
    if isinstance(module, nnx.Module):
        return nnx_feedforward(module)
    return module
