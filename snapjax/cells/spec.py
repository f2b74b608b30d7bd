"""The cell description: :class:`CellSpec` (gate projections plus a unit-wise update) and one step of it.

Every cell that snapjax can differentiate online has the form

    a_p   = v_p @ (W_p ⊙ M_p) + b_p                      for each projection p
    s'_i  = φ(a_{·,i}, θᵘ_i, s_i)                         for each unit i

where ``v_p`` is either the input ``x_t`` (shape ``(B, n_in)``) or the recurrent
read-out ``h_{t-1} = s_{t-1}[..., readout]`` (shape ``(B, units)``), ``W_p`` has the
flax.linen layout ``(n_in_p, units)`` (column ``i`` feeds unit ``i``), ``M_p`` is an
optional static 0/1 mask, ``θᵘ`` are per-unit parameters (shape ``(units,)``) and the
per-unit state ``s_i`` has ``state_dim`` components (1 for vanilla/GRU, 2 for LSTM's
``(c, h)``).  Because ``φ`` acts unit by unit, all its partial derivatives are
diagonal in the unit index; that is what lets :mod:`snapjax.engine.jacobians` build the
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
    >>> from snapjax import CellSpec, Projection, cell_step, verify_spec
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
(:mod:`snapjax.engine.verify`): use the generic dense path for it (``snapjax.as_recurrent(module,
generic=True)``).  The built-in specs (``vanilla_spec``, ``gru_spec``, ``mgu_spec``, ``lstm_spec``) live in
:mod:`snapjax.cells.builtin` and the flax.linen modules ``VanillaCell``/``GRUCell``/``LSTMCell`` in
:mod:`snapjax.cells.modules`; all are re-exported by :mod:`snapjax.cells`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

__all__ = [
    "Projection",
    "CellSpec",
    "cell_step",
    "masked_kernel",
    "preactivations",
    "projection_names",
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
        LRU emits ``concat(re, im)`` (:mod:`snapjax.cells.lru`).  Must not depend on parameters.

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

    def __post_init__(self):
        for name in ("units", "state_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{self.name}: {name} must be a positive int, got {v!r}")
        if not (isinstance(self.readout, numbers.Integral) and 0 <= self.readout < self.state_dim):
            raise ValueError(f"{self.name}: readout must be a component index in [0, {self.state_dim}), "
                             f"got {self.readout!r}")

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

    def init(self, key: Array, input_size: int, dtype: Any = jnp.float32,
             unit_init: Mapping[str, Callable] | None = None) -> dict:
        """Parameters in this spec's layout, with flax.linen's default initialisers.

        The layout: ``params[p]['kernel']`` of shape ``(n_in_p, units)`` per projection ``p``
        (``n_in_p`` = ``input_size`` for ``"input"`` projections, ``units`` for ``"state"``
        ones), ``params[p]['bias']`` ``(units,)`` where the projection has one, and
        ``params[q]`` ``(units,)`` per unit parameter.  Input kernels: LeCun normal; recurrent
        kernels: orthogonal; biases: zeros; unit parameters: zeros unless ``unit_init[q](key,
        shape, dtype)`` is given (a cell module such as :class:`snapjax.EGRUCell` knows its
        own).

        Example::

            >>> import jax
            >>> from snapjax import gru_spec
            >>> params = gru_spec(4).init(jax.random.key(0), input_size=3)
            >>> params["ir"]["kernel"].shape, params["hn"]["bias"].shape, sorted(params)
            ((3, 4), (4,), ['hn', 'hr', 'hz', 'in', 'ir', 'iz'])
        """
        if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral) or input_size < 1:
            raise ValueError(f"{self.name}: input_size must be a positive int, got {input_size!r}")
        unknown = sorted(set(unit_init or {}) - set(self.unit_params))
        if unknown:
            raise ValueError(f"{self.name}: unit_init for unknown unit parameter(s) {unknown}; "
                             f"the unit parameters are {list(self.unit_params)}")
        keys = iter(jax.random.split(key, len(self.projections) + len(self.unit_params)))
        params: dict = {}
        for p in self.projections:
            rows = int(input_size) if p.source == "input" else self.units
            init = nn.initializers.lecun_normal() if p.source == "input" else nn.initializers.orthogonal()
            leaf = {"kernel": init(next(keys), (rows, self.units), dtype)}
            if p.use_bias:
                leaf["bias"] = jnp.zeros((self.units,), dtype)
            params[p.name] = leaf
        for q in self.unit_params:
            k = next(keys)
            params[q] = (unit_init or {}).get(q, nn.initializers.zeros)(k, (self.units,), dtype)
        return params

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


def projection_names(spec: CellSpec, source: str | None = None) -> Sequence[str]:
    return [p.name for p in spec.projections if source is None or p.source == source]
