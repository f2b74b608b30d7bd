"""Recurrent cells described as gate projections plus a unit-wise update.

Every cell that snapjax can differentiate online has the form

    a_p   = v_p @ (W_p ⊙ M_p) + b_p                      for each projection p
    s'_i  = φ(a_{·,i}, θᵘ_i, s_i)                         for each unit i

where ``v_p`` is either the input ``x_t`` (shape ``(B, n_in)``) or the recurrent
read-out ``h_{t-1} = s_{t-1}[..., readout]`` (shape ``(B, units)``), ``W_p`` has the
flax.linen layout ``(n_in_p, units)`` (column ``i`` feeds unit ``i``), ``M_p`` is an
optional static 0/1 mask, ``θᵘ`` are per-unit parameters (shape ``(units,)``) and the
per-unit state ``s_i`` has ``state_dim`` components (1 for vanilla/GRU, 2 for LSTM's
``(c, h)``).  Because ``φ`` acts unit by unit, all its partial derivatives are
diagonal in the unit index; that is what lets :mod:`snapjax.jacobians` build the
dynamics Jacobian ``D_t`` and the immediate Jacobian ``I_t`` in compressed form.

The internal state layout is ``(B, units, state_dim)``; ``CellSpec.to_internal`` and
``CellSpec.from_internal`` convert to and from the flax.linen carry (an array for
vanilla/GRU, the tuple ``(c, h)`` for LSTM).

Parameter trees use the flax.linen names, so parameters from
``flax.linen.GRUCell/LSTMCell/OptimizedLSTMCell/SimpleCell/MGUCell.init`` work unchanged
(``as_cell_spec``).

Writing a cell
--------------
A cell is a :class:`CellSpec`: its projections and a unit-wise ``phi``.  The minimal gated
unit (MGU, flax.linen.MGUCell's maths: ``f = σ(x W_if + b_if + h W_hf)``,
``n = tanh(x W_in + b_in + f ⊙ (h W_hn + b_hn))``, ``h' = (1 - f) ⊙ n + f ⊙ h``) by hand::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.cells import CellSpec, Projection, cell_step, verify_spec
    >>> def mgu_phi(pre, unit, s):              # pre[name]: (B, units); s: (B, units, 1)
    ...     f = jax.nn.sigmoid(pre["if"] + pre["hf"])
    ...     n = jnp.tanh(pre["in"] + f * pre["hn"])
    ...     return ((1.0 - f) * n + f * s[..., 0])[..., None]
    >>> spec = CellSpec(
    ...     name="my_mgu", units=4, state_dim=1, readout=0, unit_params=(), phi=mgu_phi,
    ...     projections=(Projection("if", "input", True), Projection("in", "input", True),
    ...                  Projection("hf", "state", False), Projection("hn", "state", True)))
    >>> x, h = jnp.ones((2, 3)), 0.5 * jnp.ones((2, 4))
    >>> params = nn.MGUCell(4).init(jax.random.key(0), h, x)["params"]
    >>> spec.check_params(params)                # flax's own parameters fit the spec
    >>> h_new = spec.from_internal(cell_step(spec, params, spec.to_internal(h), x))
    >>> h_flax, _ = nn.MGUCell(4).apply({"params": params}, h, x)
    >>> bool(jnp.allclose(h_new, h_flax, atol=1e-6))
    True
    >>> verify_spec(spec, params)                # compressed Jacobians == jax.jvp (else ValueError)

The spec now gets every method (``snapjax.online_method("snap1", spec, params)``).  A ``phi``
that mixes units (a layer norm over the units, say) is refused by :func:`verify_spec`
(:mod:`snapjax.verify`): use the generic dense path for it (``snapjax.as_recurrent(module,
generic=True)``).  The flax.linen modules ``VanillaCell``/``GRUCell``/``LSTMCell`` live in
:mod:`snapjax.cell_modules`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

__all__ = [
    "Projection",
    "CellSpec",
    "vanilla_spec",
    "gru_spec",
    "lstm_spec",
    "mgu_spec",
    "as_cell_spec",
    "cell_step",
    "verify_spec",
    "VanillaCell",
    "GRUCell",
    "LSTMCell",
]


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear map feeding the unit-wise update.

    Attributes:
      name: key of the projection in the parameter dict (``params[name]['kernel']``
        of shape ``(n_in, units)`` and optionally ``params[name]['bias']`` of shape
        ``(units,)``).
      source: ``"input"`` (reads ``x_t``) or ``"state"`` (reads ``h_{t-1}``).
      use_bias: whether ``params[name]`` holds a ``'bias'``.

    Example (the recurrent projections of flax's GRU)::

        >>> from snapjax.cells import Projection, gru_spec
        >>> [(p.name, p.use_bias) for p in gru_spec(4).projections if p.source == "state"]
        [('hr', False), ('hz', False), ('hn', True)]
        >>> Projection("hn", "state", True) in gru_spec(4).projections
        True
    """

    name: str
    source: Literal["input", "state"]
    use_bias: bool


PhiFn = Callable[[Mapping[str, Array], Mapping[str, Array], Array], Array]


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """Static description of a recurrent cell (hashable, usable as a jit static).

    Attributes:
      name: human readable name.
      units: number of units ``k_u``; the state size is ``k = units * state_dim``.
      state_dim: components per unit (``m``).
      readout: index of the component fed back to the ``"state"`` projections and
        returned as the cell output.
      projections: the gate projections, in a fixed order.
      unit_params: names of per-unit parameters of shape ``(units,)`` that enter
        ``phi`` directly (e.g. EGRU thresholds).
      phi: ``phi(pre, unit_params, s) -> s_new``, ``pre[name]`` of shape
        ``(..., units)``, ``s`` and ``s_new`` of shape ``(..., units, state_dim)``.
        Must act unit by unit (no mixing across the ``units`` axis).
      carry_kind: ``"array"`` (carry is ``h``) or ``"tuple"`` (carry is the tuple of
        components, e.g. ``(c, h)``).
      emit: optional ``emit(s (B, units, m)) -> (B, features)``, what the layer passes to the
        next module (:meth:`layer_output`); ``None`` emits the read-out component.  E.g. the
        LRU emits ``concat(re, im)`` (:mod:`snapjax.lru`).  Must not depend on parameters.

    Example (LSTM: flax carry ``(c, h)`` ↔ internal ``(B, units, 2)``; the module docstring
    writes a whole cell)::

        >>> import jax.numpy as jnp
        >>> from snapjax.cells import lstm_spec
        >>> spec = lstm_spec(4)
        >>> spec.state_size, spec.state_dim, spec.readout, spec.carry_kind
        (8, 2, 1, 'tuple')
        >>> c, h = jnp.zeros((2, 4)), jnp.ones((2, 4))
        >>> s = spec.to_internal((c, h))
        >>> s.shape, bool(jnp.array_equal(spec.output(s), h))
        ((2, 4, 2), True)
        >>> back = spec.from_internal(s)
        >>> bool(jnp.array_equal(back[0], c) and jnp.array_equal(back[1], h))
        True
    """

    name: str
    units: int
    state_dim: int
    readout: int
    projections: tuple[Projection, ...]
    unit_params: tuple[str, ...]
    phi: PhiFn
    carry_kind: Literal["array", "tuple"] = "array"
    emit: Callable[[Array], Array] | None = None

    # ------------------------------------------------------------------ layout
    @property
    def state_size(self) -> int:
        """k = units * state_dim (the size of s_t in the maths)."""
        return self.units * self.state_dim

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_internal(self, carry: PyTree) -> Array:
        """flax carry -> internal state ``(B, units, state_dim)``."""
        if self.carry_kind == "array":
            carry = jnp.asarray(carry)
            if carry.ndim < 1 or carry.shape[-1] != self.units:
                raise ValueError(
                    f"{self.name}: carry must have trailing dimension {self.units}, got shape {carry.shape}"
                )
            return carry[..., None]
        if not isinstance(carry, (tuple, list)) or len(carry) != self.state_dim:
            raise ValueError(f"{self.name}: carry must be a tuple of {self.state_dim} arrays")
        shapes = {jnp.shape(c) for c in carry}
        if len(shapes) != 1 or next(iter(shapes))[-1:] != (self.units,):
            raise ValueError(f"{self.name}: carry components must share a shape (..., {self.units}), got {shapes}")
        return jnp.stack([jnp.asarray(c) for c in carry], axis=-1)

    def from_internal(self, s: Array) -> PyTree:
        """internal state ``(B, units, state_dim)`` -> flax carry."""
        if self.carry_kind == "array":
            return s[..., 0]
        return tuple(s[..., c] for c in range(self.state_dim))

    def output(self, s: Array) -> Array:
        """The read-out component ``h`` (what the ``"state"`` projections read), ``(B, units)``."""
        return s[..., self.readout]

    def layer_output(self, s: Array) -> Array:
        """What the layer emits to the next module: ``emit(s)`` if set, else :meth:`output`."""
        return self.output(s) if self.emit is None else self.emit(s)

    def zero_state(self, batch_size: int, dtype: Any = jnp.float32) -> Array:
        return jnp.zeros((batch_size, self.units, self.state_dim), dtype)

    # --------------------------------------------------------------- validation
    def input_size(self, params: PyTree) -> int:
        for p in self.projections:
            if p.source == "input":
                return int(jnp.shape(params[p.name]["kernel"])[0])
        raise ValueError(f"{self.name}: cell has no input projection")

    def check_params(self, params: PyTree) -> None:
        """Raise ``ValueError`` unless ``params`` has this cell's layout and a float dtype."""
        if not isinstance(params, Mapping):
            raise ValueError(f"{self.name}: params must be a dict, got {type(params).__name__}")
        if "params" in params and len(params) == 1:
            raise ValueError(
                f"{self.name}: pass params['params'] (the inner dict), not the full flax variables dict"
            )
        expected = {p.name for p in self.projections} | set(self.unit_params)
        if set(params) != expected:
            raise ValueError(f"{self.name}: params keys {sorted(params)} != expected {sorted(expected)}")
        n_in = None
        for p in self.projections:
            leaf = params[p.name]
            want = {"kernel", "bias"} if p.use_bias else {"kernel"}
            if not isinstance(leaf, Mapping) or set(leaf) != want:
                raise ValueError(f"{self.name}: params[{p.name!r}] must have keys {sorted(want)}")
            kshape = jnp.shape(leaf["kernel"])
            if len(kshape) != 2 or kshape[1] != self.units:
                raise ValueError(
                    f"{self.name}: params[{p.name!r}]['kernel'] must have shape (n_in, {self.units}), got {kshape}"
                )
            if p.source == "state" and kshape[0] != self.units:
                raise ValueError(
                    f"{self.name}: recurrent kernel {p.name!r} must be ({self.units}, {self.units}), got {kshape}"
                )
            if p.source == "input":
                if n_in is None:
                    n_in = kshape[0]
                elif kshape[0] != n_in:
                    raise ValueError(f"{self.name}: input kernels disagree on the input size")
            if p.use_bias and jnp.shape(leaf["bias"]) != (self.units,):
                raise ValueError(f"{self.name}: params[{p.name!r}]['bias'] must have shape ({self.units},)")
        for q in self.unit_params:
            if jnp.shape(params[q]) != (self.units,):
                raise ValueError(f"{self.name}: params[{q!r}] must have shape ({self.units},)")
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(f"{self.name}: parameters must be floating point, got {jnp.result_type(leaf)}")


def masked_kernel(params: PyTree, name: str, masks: PyTree | None) -> Array:
    kernel = params[name]["kernel"]
    if masks is not None and masks.get(name) is not None:
        kernel = kernel * jnp.asarray(masks[name], kernel.dtype)
    return kernel


def preactivations(
    spec: CellSpec, params: PyTree, h: Array, x: Array, masks: PyTree | None = None, precision=None
) -> dict[str, Array]:
    """All projections ``a_p = v_p @ (W_p ⊙ M_p) + b_p``, each ``(B, units)``."""
    sources = {"input": x, "state": h}
    pre = {}
    for p in spec.projections:
        a = jnp.matmul(sources[p.source], masked_kernel(params, p.name, masks), precision=precision)
        if p.use_bias:
            a = a + params[p.name]["bias"]
        pre[p.name] = a
    return pre


def cell_step(
    spec: CellSpec, params: PyTree, s: Array, x: Array, masks: PyTree | None = None, precision=None
) -> Array:
    """One step ``s_t = f(θ, s_{t-1}, x_t)`` on the internal layout.

    Args:
      spec: the cell.
      params: parameter dict (flax.linen names).
      s: state ``(B, units, state_dim)``.
      x: input ``(B, n_in)``.
      masks: optional dict ``projection name -> (n_in, units)`` 0/1 array.
    Returns:
      new state ``(B, units, state_dim)``.

    Example (a masked kernel acts as the kernel with zeros in place)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from snapjax.cells import cell_step, gru_spec
        >>> spec, x = gru_spec(4), jnp.ones((2, 3))
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 4)), x)["params"]
        >>> s = 0.5 * jnp.ones((2, 4, 1))
        >>> cell_step(spec, params, s, x).shape
        (2, 4, 1)
        >>> masks = {"hn": np.eye(4)}             # keep only the diagonal of W_hn
        >>> zeroed = {**params, "hn": {**params["hn"], "kernel": params["hn"]["kernel"] * np.eye(4)}}
        >>> bool(jnp.allclose(cell_step(spec, params, s, x, masks), cell_step(spec, zeroed, s, x)))
        True
    """
    pre = preactivations(spec, params, spec.output(s), x, masks, precision)
    unit = {q: params[q] for q in spec.unit_params}
    return spec.phi(pre, unit, s)


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

    ``hn_bias=False`` drops ``b_hn`` (flax.nnx.GRUCell's form, see :mod:`snapjax.nnx`).

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


def as_cell_spec(cell: Any, params: PyTree | None = None) -> CellSpec:
    """Return the :class:`CellSpec` of a snapjax cell, a supported flax.linen cell or a spec.

    Supported flax.linen cells, with their own parameters unchanged: ``GRUCell``, ``LSTMCell``
    and ``OptimizedLSTMCell`` (same parameters and maths), ``SimpleCell`` (also residual),
    ``MGUCell`` (either ``reset_gate``), with any ``gate_fn``/``activation_fn``; ``features``
    gives the number of units.  Other cells (e.g. ``ConvLSTMCell``) raise ``ValueError``: write
    a :class:`CellSpec` for them (module docstring) or use the generic dense path.

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
        return spec
    if isinstance(cell, nn.GRUCell):
        return gru_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if isinstance(cell, (nn.LSTMCell, nn.OptimizedLSTMCell)):
        return lstm_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if isinstance(cell, nn.SimpleCell):
        return vanilla_spec(cell.features, cell.activation_fn, bool(cell.residual))
    if isinstance(cell, nn.MGUCell):
        return mgu_spec(cell.features, cell.gate_fn, cell.activation_fn, bool(cell.reset_gate))
    raise ValueError(
        f"unsupported cell {type(cell).__name__}: use snapjax's VanillaCell/GRUCell/LSTMCell/EGRUCell, "
        "flax.linen GRUCell/LSTMCell/OptimizedLSTMCell/SimpleCell/MGUCell, or pass a CellSpec"
    )


def projection_names(spec: CellSpec, source: str | None = None) -> Sequence[str]:
    return [p.name for p in spec.projections if source is None or p.source == source]


# ---------------------------------------------------------------------------
# Re-exports (``from snapjax.cells import GRUCell, _SpecCell, verify_spec`` keeps working).  Those
# modules import this one, so they are imported last, once every name they use is defined; the
# package __init__ imports snapjax.cells first, so this module always starts loading before them.
from snapjax.cell_modules import GRUCell, LSTMCell, VanillaCell, _Leaf, _SpecCell  # noqa: E402, F401
from snapjax.verify import verify_spec  # noqa: E402, F401
