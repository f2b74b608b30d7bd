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
``flax.linen.GRUCell/LSTMCell/SimpleCell.init`` work unchanged (``as_cell_spec``).
"""

from __future__ import annotations

import dataclasses
import functools
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
    "as_cell_spec",
    "cell_step",
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
    """

    name: str
    units: int
    state_dim: int
    readout: int
    projections: tuple[Projection, ...]
    unit_params: tuple[str, ...]
    phi: PhiFn
    carry_kind: Literal["array", "tuple"] = "array"

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
        """The cell output ``h`` (the read-out component), shape ``(B, units)``."""
        return s[..., self.readout]

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
    """
    pre = preactivations(spec, params, spec.output(s), x, masks, precision)
    unit = {q: params[q] for q in spec.unit_params}
    return spec.phi(pre, unit, s)


# ---------------------------------------------------------------------------
# Built-in cells (flax.linen conventions).


def _vanilla_phi(activation, pre, unit, s):
    del unit, s
    return activation(pre["i"] + pre["h"])[..., None]


def _gru_phi(gate_fn, activation, pre, unit, s):
    del unit
    h = s[..., 0]
    r = gate_fn(pre["ir"] + pre["hr"])
    z = gate_fn(pre["iz"] + pre["hz"])
    n = activation(pre["in"] + r * pre["hn"])
    return ((1.0 - z) * n + z * h)[..., None]


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


@functools.lru_cache(maxsize=None)
def vanilla_spec(units: int, activation: Callable = jnp.tanh) -> CellSpec:
    """Elman cell ``h' = act(x W_i + b_i + h W_h)`` (flax.linen.SimpleCell layout)."""
    return CellSpec(
        name="vanilla",
        units=units,
        state_dim=1,
        readout=0,
        projections=(Projection("i", "input", True), Projection("h", "state", False)),
        unit_params=(),
        phi=functools.partial(_vanilla_phi, activation),
    )


@functools.lru_cache(maxsize=None)
def gru_spec(units: int, gate_fn: Callable = jax.nn.sigmoid, activation: Callable = jnp.tanh) -> CellSpec:
    """GRU in flax.linen.GRUCell form (reset gate inside the recurrent projection):

    r = σ(x W_ir + b_ir + h W_hr), z = σ(x W_iz + b_iz + h W_hz),
    n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn)), h' = (1 - z) ⊙ n + z ⊙ h.
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
            Projection("hn", "state", True),
        ),
        unit_params=(),
        phi=functools.partial(_gru_phi, gate_fn, activation),
    )


@functools.lru_cache(maxsize=None)
def lstm_spec(units: int, gate_fn: Callable = jax.nn.sigmoid, activation: Callable = jnp.tanh) -> CellSpec:
    """LSTM in flax.linen.LSTMCell form, state ``(c, h)`` (state_dim 2, read-out h)."""
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

    Supported flax.linen cells: ``GRUCell``, ``LSTMCell``, ``SimpleCell`` (non-residual),
    with any ``gate_fn``/``activation_fn``; ``features`` gives the number of units.
    Other cells (e.g. ``OptimizedLSTMCell``, ``MGUCell``, ``ConvLSTMCell``) raise ``ValueError``:
    write a :class:`CellSpec` for them.
    """
    del params
    if isinstance(cell, CellSpec):
        return cell
    spec = getattr(cell, "spec", None)
    if isinstance(spec, CellSpec):
        return spec
    if isinstance(cell, nn.GRUCell):
        return gru_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if isinstance(cell, nn.LSTMCell):
        return lstm_spec(cell.features, cell.gate_fn, cell.activation_fn)
    if isinstance(cell, nn.SimpleCell):
        if cell.residual:
            raise ValueError("SimpleCell(residual=True) is not supported")
        return vanilla_spec(cell.features, cell.activation_fn)
    raise ValueError(
        f"unsupported cell {type(cell).__name__}: use snapjax's VanillaCell/GRUCell/LSTMCell/EGRUCell, "
        "flax.linen GRUCell/LSTMCell/SimpleCell, or pass a CellSpec"
    )


# ---------------------------------------------------------------------------
# Flax modules.


class _SpecCell(nn.Module):
    """Base class: a flax.linen recurrent cell defined by a :class:`CellSpec`."""

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    recurrent_kernel_init: Callable = nn.initializers.orthogonal()
    bias_init: Callable = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32

    @property
    def spec(self) -> CellSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    @nn.compact
    def __call__(self, carry, inputs):
        spec = self.spec
        params = self._params_from_scope(inputs.shape[-1])
        s = cell_step(spec, params, spec.to_internal(carry), inputs)
        return spec.from_internal(s), spec.output(s)

    def _params_from_scope(self, n_in: int) -> dict:
        spec = self.spec
        params = {}
        for p in spec.projections:
            init = self.kernel_init if p.source == "input" else self.recurrent_kernel_init
            rows = n_in if p.source == "input" else self.features
            scope = _Leaf(name=p.name, shape=(rows, self.features), use_bias=p.use_bias,
                          kernel_init=init, bias_init=self.bias_init, param_dtype=self.param_dtype)
            params[p.name] = scope()
        for q in spec.unit_params:
            params[q] = self.param(q, self._unit_param_init(q), (self.features,), self.param_dtype)
        return params

    def _unit_param_init(self, name: str) -> Callable:  # pragma: no cover - overridden when used
        raise NotImplementedError(name)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        del rng
        batch = input_shape[:-1]
        zeros = jnp.zeros(batch + (self.features,), self.param_dtype)
        if self.spec.carry_kind == "array":
            return zeros
        return tuple(zeros for _ in range(self.spec.state_dim))

    @property
    def num_feature_axes(self) -> int:
        return 1


class _Leaf(nn.Module):
    """Holds one projection's ``kernel`` (and ``bias``) under the flax.linen names."""

    shape: tuple[int, int]
    use_bias: bool
    kernel_init: Callable
    bias_init: Callable
    param_dtype: Any

    @nn.compact
    def __call__(self):
        out = {"kernel": self.param("kernel", self.kernel_init, self.shape, self.param_dtype)}
        if self.use_bias:
            out["bias"] = self.param("bias", self.bias_init, (self.shape[1],), self.param_dtype)
        return out


class VanillaCell(_SpecCell):
    """Elman tanh cell with flax.linen.SimpleCell's parameter layout (``i``, ``h``)."""

    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return vanilla_spec(self.features, self.activation_fn)


class GRUCell(_SpecCell):
    """GRU with flax.linen.GRUCell's parameter layout and maths (see :func:`gru_spec`)."""

    gate_fn: Callable = jax.nn.sigmoid
    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return gru_spec(self.features, self.gate_fn, self.activation_fn)


class LSTMCell(_SpecCell):
    """LSTM with flax.linen.LSTMCell's parameter layout; carry ``(c, h)``."""

    gate_fn: Callable = jax.nn.sigmoid
    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return lstm_spec(self.features, self.gate_fn, self.activation_fn)


def projection_names(spec: CellSpec, source: str | None = None) -> Sequence[str]:
    return [p.name for p in spec.projections if source is None or p.source == source]
