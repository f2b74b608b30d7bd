"""flax.linen modules for the cells of :mod:`snapjax.cells`.

A module here is a thin wrapper over a :class:`~snapjax.cells.CellSpec`: its ``spec`` property
gives the projections and the unit-wise update, ``__call__`` declares one parameter scope per
projection under the flax.linen names (``params[p]['kernel']`` of shape ``(n_in_p, features)``,
``params[p]['bias']`` of shape ``(features,)`` when the projection has one) plus the per-unit
parameters ``params[q]`` of shape ``(features,)``, and computes one step

    s_t = φ(a(h_{t-1}, x_t), θᵘ, s_{t-1}),   (carry_t, y_t) = (from_internal(s_t), layer_output(s_t))

with :func:`~snapjax.cells.cell_step`.  The carry is flax's (``h`` of shape ``(B, features)``;
LSTM's tuple ``(c, h)``), so the modules are drop-in replacements for ``flax.linen.SimpleCell``,
``GRUCell`` and ``LSTMCell`` (same parameter trees, same maths) and work with ``nn.RNN``.
New cells subclass :class:`_SpecCell` and define ``spec`` (see :mod:`snapjax.cells.egru`,
:mod:`snapjax.cells.lru`); they are re-exported from :mod:`snapjax.cells`.

Example (snapjax's GRU on flax's own parameters)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.cells.modules import GRUCell
    >>> h, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
    >>> params = nn.GRUCell(4).init(jax.random.key(0), h, x)
    >>> (h_new, y), (h_flax, _) = GRUCell(4).apply(params, h, x), nn.GRUCell(4).apply(params, h, x)
    >>> h_new.shape, bool(jnp.allclose(h_new, h_flax, atol=1e-6)), bool(jnp.array_equal(y, h_new))
    ((2, 4), True, True)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.cells.builtin import gru_spec, lstm_spec, vanilla_spec
from snapjax.cells.spec import CellSpec, cell_step

__all__ = ["VanillaCell", "GRUCell", "LSTMCell"]


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

    __call__._snapjax_spec_step = True  # type: ignore[attr-defined]  # read by as_cell_spec

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
    """Elman tanh cell with flax.linen.SimpleCell's parameter layout (``i``, ``h``):
    ``h' = act(x W_i + b_i + h W_h)`` (:func:`snapjax.cells.vanilla_spec`).

    Example (flax's ``SimpleCell`` computes the same step on these parameters)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells.modules import VanillaCell
        >>> h, x = 0.5 * jnp.ones((2, 4)), jnp.ones((2, 3))
        >>> variables = VanillaCell(4).init(jax.random.key(0), h, x)
        >>> jax.tree.map(jnp.shape, variables["params"])
        {'h': {'kernel': (4, 4)}, 'i': {'bias': (4,), 'kernel': (3, 4)}}
        >>> h_new, y = VanillaCell(4).apply(variables, h, x)
        >>> bool(jnp.allclose(h_new, nn.SimpleCell(4).apply(variables, h, x)[0], atol=1e-6))
        True
    """

    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return vanilla_spec(self.features, self.activation_fn)


class GRUCell(_SpecCell):
    """GRU with flax.linen.GRUCell's parameter layout and maths (see :func:`gru_spec`).

    Example (in ``flax.linen.RNN`` over a batch-major sequence ``(B, T, n_in)``)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells.modules import GRUCell
        >>> from snapjax.cells import gru_spec
        >>> GRUCell(4).spec is gru_spec(4)
        True
        >>> rnn, xs = nn.RNN(GRUCell(4)), jnp.ones((2, 5, 3))
        >>> variables = rnn.init(jax.random.key(0), xs)
        >>> rnn.apply(variables, xs).shape
        (2, 5, 4)
    """

    gate_fn: Callable = jax.nn.sigmoid
    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return gru_spec(self.features, self.gate_fn, self.activation_fn)


class LSTMCell(_SpecCell):
    """LSTM with flax.linen.LSTMCell's parameter layout; carry ``(c, h)`` (see :func:`lstm_spec`).

    Example (flax's ``LSTMCell`` computes the same step on these parameters)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.cells.modules import LSTMCell
        >>> cell, x = LSTMCell(4), jnp.ones((2, 3))
        >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
        >>> variables = cell.init(jax.random.key(1), carry, x)
        >>> (c, h), y = cell.apply(variables, carry, x)
        >>> (c_ref, h_ref), _ = nn.LSTMCell(4).apply(variables, carry, x)
        >>> c.shape, bool(jnp.allclose(h, h_ref, atol=1e-6)), bool(jnp.array_equal(y, h))
        ((2, 4), True, True)
    """

    gate_fn: Callable = jax.nn.sigmoid
    activation_fn: Callable = jnp.tanh

    @property
    def spec(self) -> CellSpec:
        return lstm_spec(self.features, self.gate_fn, self.activation_fn)
