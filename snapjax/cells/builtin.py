"""The built-in cells as :class:`snapjax.CellSpec` s, in flax.linen's conventions: vanilla
(``SimpleCell``, optionally residual), GRU, MGU and LSTM.

Each spec is its projections (``a_p = v_p @ W_p + b_p``, flax's parameter names) plus the
unit-wise update ``φ`` written out in its docstring; specs are cached, so equal arguments give
the identical spec (cheap to hash and compare under jit).  Re-exported by :mod:`snapjax.cells`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.cells.spec import CellSpec, Projection

__all__ = ["vanilla_spec", "gru_spec", "mgu_spec", "lstm_spec", "as_cell_spec"]


# ---------------------------------------------------------------------------
# Built-in cells (flax.linen conventions).


def _cached_spec(fn: Callable) -> Callable:
    """``lru_cache`` keyed on the arguments with defaults filled in, so ``gru_spec(4)`` and
    ``gru_spec(4, sigmoid, tanh)`` return the same (identical, hence equal) spec."""
    sig = inspect.signature(fn)
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return cached(*bound.args)

    return wrapper


def _vanilla_phi(activation, residual, pre, unit, s):
    del unit
    a = pre["i"] + pre["h"]
    return activation(a + s[..., 0] if residual else a)[..., None]


def _gru_phi(gate_fn, activation, pre, unit, s):
    del unit
    h = s[..., 0]
    r = gate_fn(pre["ir"] + pre["hr"])
    z = gate_fn(pre["iz"] + pre["hz"])
    n = activation(pre["in"] + r * pre["hn"])
    return ((1.0 - z) * n + z * h)[..., None]


def _mgu_phi(gate_fn, activation, reset_gate, pre, unit, s):
    del unit
    h = s[..., 0]
    f = gate_fn(pre["if"] + pre["hf"])
    n = activation(pre["in"] + (f * pre["hn"] if reset_gate else pre["hn"]))
    return ((1.0 - f) * n + f * h)[..., None]


def _lstm_phi(gate_fn, activation, pre, unit, s):
    del unit
    c = s[..., 0]
    i = gate_fn(pre["ii"] + pre["hi"])
    f = gate_fn(pre["if"] + pre["hf"])
    g = activation(pre["ig"] + pre["hg"])
    o = gate_fn(pre["io"] + pre["ho"])
    c_new = f * c + i * g
    h_new = o * activation(c_new)
    return jnp.stack([c_new, h_new], axis=-1)


@_cached_spec
def vanilla_spec(units: int, activation: Callable = jnp.tanh, residual: bool = False) -> CellSpec:
    """Elman cell ``h' = act(x W_i + b_i + h W_h)`` (flax.linen.SimpleCell layout);
    ``residual=True``: ``h' = act(x W_i + b_i + h W_h + h)`` (SimpleCell(residual=True)).

    Example (same step as flax's ``SimpleCell`` on its own parameters)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step, vanilla_spec
        >>> spec = vanilla_spec(4)
        >>> [p.name for p in spec.projections], spec.state_dim
        (['i', 'h'], 1)
        >>> h, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
        >>> params = nn.SimpleCell(4).init(jax.random.key(0), h, x)["params"]
        >>> h_new = spec.from_internal(cell_step(spec, params, spec.to_internal(h), x))
        >>> h_flax, _ = nn.SimpleCell(4).apply({"params": params}, h, x)
        >>> bool(jnp.allclose(h_new, h_flax, atol=1e-6))
        True
    """
    return CellSpec(
        name="vanilla",
        units=units,
        state_dim=1,
        readout=0,
        projections=(Projection("i", "input", True), Projection("h", "state", False)),
        unit_params=(),
        phi=functools.partial(_vanilla_phi, activation, bool(residual)),
    )


@_cached_spec
def gru_spec(
    units: int, gate_fn: Callable = jax.nn.sigmoid, activation: Callable = jnp.tanh, hn_bias: bool = True
) -> CellSpec:
    """GRU in flax.linen.GRUCell form (reset gate inside the recurrent projection):

    r = σ(x W_ir + b_ir + h W_hr), z = σ(x W_iz + b_iz + h W_hz),
    n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn)), h' = (1 - z) ⊙ n + z ⊙ h.

    ``hn_bias=False`` drops ``b_hn`` (flax.nnx.GRUCell's form, see :mod:`snapjax.cells.nnx`).

    Example (same step as flax's ``GRUCell``; specs are cached, so equal arguments give the
    same object)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step, gru_spec
        >>> spec = gru_spec(4)
        >>> spec is gru_spec(4, jax.nn.sigmoid, jnp.tanh), spec.projection("hn").use_bias
        (True, True)
        >>> gru_spec(4, hn_bias=False).projection("hn").use_bias
        False
        >>> h, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
        >>> params = nn.GRUCell(4).init(jax.random.key(0), h, x)["params"]
        >>> h_new = spec.from_internal(cell_step(spec, params, spec.to_internal(h), x))
        >>> bool(jnp.allclose(h_new, nn.GRUCell(4).apply({"params": params}, h, x)[0], atol=1e-6))
        True
    """
    return CellSpec(
        name="gru",
        units=units,
        state_dim=1,
        readout=0,
        projections=(
            Projection("ir", "input", True),
            Projection("iz", "input", True),
            Projection("in", "input", True),
            Projection("hr", "state", False),
            Projection("hz", "state", False),
            Projection("hn", "state", bool(hn_bias)),
        ),
        unit_params=(),
        phi=functools.partial(_gru_phi, gate_fn, activation),
    )


@_cached_spec
def mgu_spec(
    units: int, gate_fn: Callable = jax.nn.sigmoid, activation: Callable = jnp.tanh, reset_gate: bool = True
) -> CellSpec:
    """Minimal gated unit in flax.linen.MGUCell form (parameters ``if``, ``in`` with bias,
    ``hf`` without, ``hn`` with a bias iff ``reset_gate``):

    f = σ(x W_if + b_if + h W_hf),  n = tanh(x W_in + b_in + f ⊙ (h W_hn + b_hn)),
    h' = (1 - f) ⊙ n + f ⊙ h;  with ``reset_gate=False``: n = tanh(x W_in + b_in + h W_hn).

    Example (same step as flax's ``MGUCell(reset_gate=False)``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step, mgu_spec
        >>> spec = mgu_spec(4, reset_gate=False)
        >>> [(p.name, p.use_bias) for p in spec.projections]
        [('if', True), ('in', True), ('hf', False), ('hn', False)]
        >>> h, x, cell = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3)), nn.MGUCell(4, reset_gate=False)
        >>> params = cell.init(jax.random.key(0), h, x)["params"]
        >>> h_new = spec.from_internal(cell_step(spec, params, spec.to_internal(h), x))
        >>> bool(jnp.allclose(h_new, cell.apply({"params": params}, h, x)[0], atol=1e-6))
        True
    """
    return CellSpec(
        name="mgu",
        units=units,
        state_dim=1,
        readout=0,
        projections=(
            Projection("if", "input", True),
            Projection("in", "input", True),
            Projection("hf", "state", False),
            Projection("hn", "state", bool(reset_gate)),
        ),
        unit_params=(),
        phi=functools.partial(_mgu_phi, gate_fn, activation, bool(reset_gate)),
    )


@_cached_spec
def lstm_spec(units: int, gate_fn: Callable = jax.nn.sigmoid, activation: Callable = jnp.tanh) -> CellSpec:
    """LSTM in flax.linen.LSTMCell form, state ``(c, h)`` (state_dim 2, read-out h):

    i = σ(x W_ii + h W_hi + b_hi), f = σ(x W_if + h W_hf + b_hf), g = tanh(x W_ig + h W_hg + b_hg),
    o = σ(x W_io + h W_ho + b_ho), c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c').

    Example (same step as flax's ``LSTMCell``, carry ``(c, h)``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells import cell_step, lstm_spec
        >>> spec, x = lstm_spec(4), jnp.ones((2, 3))
        >>> carry = (0.1 * jnp.ones((2, 4)), 0.5 * jnp.ones((2, 4)))
        >>> params = nn.LSTMCell(4).init(jax.random.key(0), carry, x)["params"]
        >>> c, h = spec.from_internal(cell_step(spec, params, spec.to_internal(carry), x))
        >>> (c_ref, h_ref), _ = nn.LSTMCell(4).apply({"params": params}, carry, x)
        >>> bool(jnp.allclose(c, c_ref, atol=1e-6) and jnp.allclose(h, h_ref, atol=1e-6))
        True
    """
    return CellSpec(
        name="lstm",
        units=units,
        state_dim=2,
        readout=1,
        projections=tuple(Projection("i" + g, "input", False) for g in "ifgo")
        + tuple(Projection("h" + g, "state", True) for g in "ifgo"),
        unit_params=(),
        phi=functools.partial(_lstm_phi, gate_fn, activation),
        carry_kind="tuple",
    )


_LINEN = (nn.GRUCell, nn.LSTMCell, nn.OptimizedLSTMCell, nn.SimpleCell, nn.MGUCell)


def as_cell_spec(cell: Any, params: Any = None) -> CellSpec:
    """Return the :class:`CellSpec` of a snapjax cell, a supported flax.linen cell or a spec.

    Supported flax.linen cells, with their own parameters unchanged: ``GRUCell``, ``LSTMCell``
    and ``OptimizedLSTMCell`` (same parameters and maths), ``SimpleCell`` (also residual),
    ``MGUCell`` (either ``reset_gate``), with any ``gate_fn``/``activation_fn``; ``features``
    gives the number of units.  Only those exact classes: a subclass may change the maths or add
    parameters, and a cell with a computation ``dtype`` other than its parameters' is not what
    the compressed form computes; these, and other cells (e.g. ``ConvLSTMCell``), raise
    ``ValueError`` (:func:`snapjax.as_recurrent` then takes the generic path).  A snapjax cell
    gives its ``spec``, unless its class overrides the step.

    Example::

        >>> import flax.linen as nn
        >>> from snapjax.cells import as_cell_spec, gru_spec, lstm_spec
        >>> as_cell_spec(nn.GRUCell(4)) is gru_spec(4), as_cell_spec(nn.OptimizedLSTMCell(4)) is lstm_spec(4)
        (True, True)
        >>> as_cell_spec(nn.ConvLSTMCell(4, kernel_size=(3,)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: unsupported cell ConvLSTMCell: ...
    """
    del params
    if isinstance(cell, CellSpec):
        return cell
    spec = getattr(cell, "spec", None)
    if isinstance(spec, CellSpec):
        step = getattr(type(cell), "__call__", None)
        if not getattr(step, "_snapjax_spec_step", False):  # a subclass that computes its own step
            raise ValueError(f"{type(cell).__name__} overrides the step of its spec cell: the spec no longer "
                             "describes it (it takes the generic path)")
        return spec
    if type(cell) in _LINEN and cell.dtype is not None and jnp.dtype(cell.dtype) != jnp.dtype(cell.param_dtype):
        raise ValueError(f"flax {type(cell).__name__} with dtype={jnp.dtype(cell.dtype).name}: the compressed form computes in the "
                         "parameters' dtype (it takes the generic path, which honours dtype)")
    if type(cell) is nn.GRUCell:  # exact types: a subclass may change the maths or add parameters
        return gru_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if type(cell) in (nn.LSTMCell, nn.OptimizedLSTMCell):
        return lstm_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if type(cell) is nn.SimpleCell:
        return vanilla_spec(cell.features, cell.activation_fn, bool(cell.residual))
    if type(cell) is nn.MGUCell:
        return mgu_spec(cell.features, cell.gate_fn, cell.activation_fn, bool(cell.reset_gate))
    raise ValueError(
        f"unsupported cell {type(cell).__name__}: use snapjax's VanillaCell/GRUCell/LSTMCell/EGRUCell, "
        "flax.linen GRUCell/LSTMCell/OptimizedLSTMCell/SimpleCell/MGUCell, or pass a CellSpec"
    )
