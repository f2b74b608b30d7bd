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
that mixes units (a layer norm over the units, say) is refused by :func:`verify_spec`: use the
generic dense path for it (``snapjax.as_recurrent(module, generic=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    ``residual=True``: ``h' = act(x W_i + b_i + h W_h + h)`` (SimpleCell(residual=True))."""
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

    Supported flax.linen cells, with their own parameters unchanged: ``GRUCell``, ``LSTMCell``
    and ``OptimizedLSTMCell`` (same parameters and maths), ``SimpleCell`` (also residual),
    ``MGUCell`` (either ``reset_gate``), with any ``gate_fn``/``activation_fn``; ``features``
    gives the number of units.  Other cells (e.g. ``ConvLSTMCell``) raise ``ValueError``: write
    a :class:`CellSpec` for them (module docstring) or use the generic dense path.
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
        return spec.from_internal(s), spec.layer_output(s)

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


# ---------------------------------------------------------------------------
# Verification of a (user) CellSpec against autodiff.

_FALLBACK = "pass the cell as a flax module (generic dense path: snapjax.as_recurrent(module, generic=True))"


def _check_verify_masks(spec: CellSpec, params: PyTree, masks: Any) -> dict:
    out = {p.name: None for p in spec.projections}
    if masks is None:
        return out
    if not isinstance(masks, Mapping):
        raise ValueError(f"{spec.name}: masks must be a dict projection name -> 0/1 array, got {type(masks).__name__}")
    for name, m in masks.items():
        if name not in out:
            raise ValueError(f"{spec.name}: mask for unknown projection {name!r}; projections are {sorted(out)}")
        if m is None:
            continue
        m = np.asarray(m)
        kshape = tuple(np.shape(params[name]["kernel"]))
        if m.shape != kshape or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
            raise ValueError(f"{spec.name}: mask {name!r} must be a 0/1 array of shape {kshape}, got shape {m.shape}")
        out[name] = m.astype(bool)
    return out


def _rel_err(a: Array, b: Array) -> Array:
    scale = jnp.maximum(jnp.maximum(jnp.linalg.norm(a), jnp.linalg.norm(b)), jnp.finfo(a.dtype).tiny)
    return jnp.linalg.norm(a - b) / scale


@functools.partial(jax.jit, static_argnums=0)
def _verify_errors(spec: CellSpec, params, masks, s, x, probes):
    """Relative errors (phi alone; the step's D·v + I·w) of the compressed form against ``jax.jvp``."""
    from snapjax.jacobians import step_jacobians

    t_pre, t_unit, t_s, v, w = probes
    jac = step_jacobians(spec, params, s, x, masks)
    pre = preactivations(spec, params, spec.output(s), x, masks)
    unit = {q: params[q] for q in spec.unit_params}
    # phi alone: diagonal derivatives (from all-ones tangents) against random-direction JVPs.
    phi_ref = jax.vmap(lambda tp, tu, ts: jax.jvp(spec.phi, (pre, unit, s), (tp, tu, ts))[1])(t_pre, t_unit, t_s)
    names = [p.name for p in spec.projections]
    phi_cmp = jnp.einsum("buap,nbup->nbua", jac.dphi_pre, jnp.stack([t_pre[n] for n in names], -1))
    phi_cmp += jnp.einsum("buac,nbuc->nbua", jac.dphi_state, t_s)
    if spec.unit_params:
        phi_cmp += jnp.einsum("buaq,nuq->nbua", jac.dphi_unit, jnp.stack([t_unit[q] for q in spec.unit_params], -1))
    # the whole step: D·v + I·w from the compressed factors against one JVP of cell_step.
    step = lambda st, th: cell_step(spec, th, st, x, masks)  # noqa: E731
    ref = jax.vmap(lambda vv, ww: jax.jvp(step, (s, params), (vv, ww))[1])(v, w)
    # (D v)[u,a] = Σ_c dphi_state[u,a,c] v[u,c] + Σ_{p∈state} dphi_pre[u,a,p] (v[:, readout] @ W_p ⊙ M_p)[u]
    d_cmp = jnp.einsum("buac,nbuc->nbua", jac.dphi_state, v)
    for j, p in enumerate(spec.projections):
        if p.source == "state":
            d_cmp += jac.dphi_pre[..., j] * (v[..., spec.readout] @ masked_kernel(params, p.name, masks))[..., None]

    def immediate(ww):  # Σ_{j} ∂s'_{i,a}/∂W_p[j,i] w_p[j,i] = dphi_pre[i,a,p] (v_p @ w_p)[i], + biases, unit params
        out = jnp.zeros_like(s)
        for j, p in enumerate(spec.projections):
            a = jac.inputs[p.source] @ masked_kernel(ww, p.name, masks)
            if p.use_bias:
                a = a + ww[p.name]["bias"]
            out += jac.dphi_pre[..., j] * a[..., None]
        for j, q in enumerate(spec.unit_params):
            out += jac.dphi_unit[..., j] * ww[q][:, None]
        return out

    step_cmp = d_cmp + jax.vmap(immediate)(w)
    finite = jnp.all(jnp.array([jnp.isfinite(t).all() for t in (phi_ref, phi_cmp, ref, step_cmp)]))
    return _rel_err(phi_cmp, phi_ref), _rel_err(step_cmp, ref), finite


def verify_spec(spec: CellSpec, params: PyTree, masks: PyTree | None = None, *, seed: int = 0) -> None:
    """Check ``spec``'s compressed Jacobians against ``jax.jvp`` of its step; raise if they differ.

    The compressed form (:mod:`snapjax.jacobians`) is exact only if ``phi`` acts unit by unit
    and the projections are the linear maps of the parameters the spec declares.  At a random
    state ``s (2, units, m)`` (``N(0, 0.25)``), input ``x (2, n_in)`` and random kernels
    (``N(0, 1/rows)``) and biases (``N(0, 0.25)``) of ``params``' shapes (unit parameters keep
    their given values when concrete, as they may have a restricted domain), with 2 random
    tangents each, it compares

    * ``phi`` alone: ``Σ_p ∂φ/∂a_p ⊙ t_p + Σ_q ∂φ/∂θᵘ_q ⊙ t_q + (∂φ/∂s) t_s`` (the diagonal
      derivatives that snapjax obtains from all-ones tangents) with ``jax.jvp(phi)``;
    * the step: ``D·v + I·w`` built from those factors as every method builds ``D`` and ``I``
      (:mod:`snapjax.jacobians`: ``D v = dphi_state v + Σ_{p∈state} dphi_pre_p ⊙ (v_h (W_p ⊙ M_p))``,
      kernel entry ``W_p[j, i]`` ↦ ``dphi_pre[i, a, p]·v_p[j]``, biases, unit parameters) against
      ``jax.jvp`` of :func:`cell_step` in ``(s, θ)`` along random ``(v, w)``.

    Cost: a few JVPs and matrix-vector products of the step's size; never ``D`` (``k × k``)
    nor a ``k × p`` matrix, so it stays cheap for large cells.  Runs in
    float64 when ``jax_enable_x64`` is on (tolerance ``1e-8`` on the relative error), else in
    float32 with matmul precision ``"highest"`` (tolerance ``1e-4``).

    Args:
      spec: the cell.  params: its parameter dict (arrays or ``jax.ShapeDtypeStruct``).
      masks: optional static 0/1 masks per projection name.  seed: of the random point.

    Raises:
      ValueError: bad ``params``/``masks`` layout; ``phi`` mixes units or examples ("the update
        mixes units (phi is not unit-wise)"); the step disagrees with the projections
        ("projections disagree with the parameters"); non-finite values at the random point.
    """
    if not isinstance(spec, CellSpec):
        raise ValueError(f"verify_spec needs a CellSpec, got {type(spec).__name__}")
    spec.check_params(params)
    masks = _check_verify_masks(spec, params, masks)
    x64 = bool(jax.config.jax_enable_x64)
    dtype, tol, B, n = (jnp.float64 if x64 else jnp.float32), (1e-8 if x64 else 1e-4), 2, 2
    rng = np.random.default_rng(seed)
    normal = lambda shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)  # noqa: E731
    with jax.ensure_compile_time_eval(), jax.default_matmul_precision("highest"):
        point = {}
        for p in spec.projections:
            rows = np.shape(params[p.name]["kernel"])[0]
            point[p.name] = {"kernel": normal((rows, spec.units), 1.0 / np.sqrt(rows))}
            if p.use_bias:
                point[p.name]["bias"] = normal((spec.units,), 0.5)
        for q in spec.unit_params:
            given = params[q]
            concrete = not isinstance(given, (jax.ShapeDtypeStruct, jax.core.Tracer))
            point[q] = np.asarray(given, dtype) if concrete else normal((spec.units,), 0.5)
        s = normal((B, spec.units, spec.state_dim), 0.5)
        x = normal((B, spec.input_size(params)))
        out = jax.eval_shape(lambda: cell_step(spec, point, s, x, masks))
        if out.shape != s.shape:
            raise ValueError(f"{spec.name}: phi must return shape (B, units, state_dim) = {s.shape}, got {out.shape}")
        probes = (
            {p.name: normal((n, B, spec.units)) for p in spec.projections},
            {q: normal((n, spec.units)) for q in spec.unit_params},
            normal((n, B, spec.units, spec.state_dim)),
            normal((n, B, spec.units, spec.state_dim)),
            jax.tree.map(lambda a: normal((n,) + a.shape), point),
        )
        e_phi, e_step, finite = (np.asarray(e) for e in _verify_errors(spec, point, masks, s, x, probes))
    if not finite:
        raise ValueError(
            f"{spec.name}: the step gave non-finite values or derivatives at a random point (seed={seed}), "
            "so the compressed Jacobians cannot be checked; pass concrete unit parameters, another seed, "
            "or online_method(..., verify=False) if the cell is known to be unit-wise"
        )
    if e_phi > tol:
        raise ValueError(
            f"{spec.name}: the update mixes units (phi is not unit-wise): jax.jvp of phi differs from the "
            f"unit-wise derivatives snapjax uses, relative error {e_phi:.2e} > {tol:.0e}. RTRL/SnAp's compressed "
            f"Jacobians would be wrong for this cell; {_FALLBACK}"
        )
    if e_step > tol:
        raise ValueError(
            f"{spec.name}: the projections disagree with the parameters: the compressed Jacobians differ from "
            f"jax.jvp of the step, relative error of D·v + I·w {e_step:.2e} > {tol:.0e}; {_FALLBACK}"
        )
