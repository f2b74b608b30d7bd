"""A whole model for online learning: feed-forward modules and recurrent cells in sequence.

``OnlineModel(layers)`` applies, at every time step ``t``, ``layers[0]``, ``layers[1]``, ... in
order: a *recurrent* layer advances its carry and emits its output; any other module is
*feed-forward* (``module(h) -> h'``: an encoder, an MLP between recurrent layers, a head).
Parameters are ``{"layers_0": ..., "layers_1": ...}`` (the names of ``flax.linen.Sequential``).

What counts as recurrent (one rule, :data:`snapjax.cells.recurrent.RECURRENT_RULE`): a snapjax
cell, a :class:`snapjax.CellSpec`, a :class:`snapjax.Recurrent` (what
:func:`snapjax.as_recurrent` returns: the explicit marker for any other module), a
``flax.linen`` module defining ``initialize_carry`` and called as ``(carry, x) -> (carry, y)``
(``nn.RNNCellBase`` subclasses included), a flax.nnx module defining ``initialize_carry``
(``nnx.RNNCellBase`` subclasses included; ``GRUCell``/``LSTMCell``/``OptimizedLSTMCell``/
``SimpleCell`` take the compressed path), or an ``eqx.Module`` with an ``int`` ``hidden_size``
(``eqx.nn.GRUCell``/``LSTMCell`` included).

Layers may be ``flax.linen``, ``flax.nnx`` or equinox modules:

* flax.nnx and equinox modules hold their own values, which are the initial parameters:
  cells are converted with :func:`snapjax.from_nnx` / :func:`snapjax.from_equinox`;
  feed-forward modules (``nnx.Linear``, ``nnx.Sequential``, an MLP ``nnx.Module``,
  ``eqx.nn.Linear``, ``eqx.nn.MLP``) are split into a static part and a plain dict of their
  parameter arrays (:mod:`snapjax.cells.feedforward`), merged back at every call; an nnx module
  holding rngs (Dropout) or batch statistics (BatchNorm) is refused;
* a whole ``nnx.Module`` model declaring ``online_layers = ("encoder", "rnn", "head")`` is
  replaced by those submodules (:func:`snapjax.nnx_layers`: its own ``__call__`` is not used,
  snapjax cannot trace an arbitrary ``__call__`` into stages);
* trained values go back with :func:`snapjax.to_nnx` (in place, the whole model in one call)
  or :func:`snapjax.to_equinox` (new modules).

How gradients reach each parameter (the *stack approximation*, Zucchet et al. 2023):

* each recurrent layer is one **stage** with its own online method (exact RTRL, SnAp-n, UORO,
  TBPTT...), which carries the influence of the stage's parameters on the stage's state;
* the loss cotangent at step ``t`` reaches a stage by backpropagation through the layers above
  it **at step t only**: ``c^l_t = c^{l+1}_t ∂s^{l+1}_t/∂h^l_t``; the paths through the upper
  layers' *future* states are dropped (so per-layer methods are approximate even with exact
  RTRL in every layer);
* feed-forward parameters are trained by backpropagation within the step (``encoder="step"``),
  or (``encoder="exact"``) the modules below the first recurrent layer join that stage, whose
  method then carries their influence too (a generic stage: dense per-example Jacobians);
* ``stack="combined"`` makes one stage of everything from the first to the last recurrent
  layer (and the encoder with ``encoder="exact"``): exact RTRL on the combined state equals BPTT.

Example::

    >>> import flax.linen as nn
    >>> model = OnlineModel([nn.Dense(8), nn.GRUCell(16), nn.GRUCell(16), nn.Dense(2)])
    >>> [s.names for s in model.stages()]
    [('layers_0',), ('layers_1',), ('layers_2',), ('layers_3',)]
    >>> [s.names for s in model.stages(stack="combined", encoder="exact")]
    [('layers_0', 'layers_1', 'layers_2'), ('layers_3',)]

An nnx model, trained values written back (``state.params`` of a learner works the same)::

    >>> import jax, jax.numpy as jnp, snapjax as sj
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> layers = [nnx.GRUCell(3, 8, rngs=rngs), nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.relu,
    ...                                                      nnx.Linear(8, 2, rngs=rngs))]
    >>> params = OnlineModel(layers).init(jax.random.key(0), input_size=3)
    >>> jax.tree.map(jnp.shape, params["layers_1"])
    {'layers': {'0': {'bias': (8,), 'kernel': (8, 8)}, '2': {'bias': (2,), 'kernel': (8, 2)}}}
    >>> sj.to_nnx(layers, jax.tree.map(jnp.zeros_like, params))
    >>> float(jnp.abs(layers[1].layers[2].kernel[...]).sum())
    0.0
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.cells.builtin import as_cell_spec
from snapjax.cells.equinox import is_equinox_cell
from snapjax.cells.feedforward import FeedForward
from snapjax.cells.nnx import is_nnx_cell
from snapjax.cells.recurrent import RECURRENT_RULE, Recurrent, as_layer, as_recurrent, expand_layers
from snapjax.training.layer_masks import param_masks, stage_masks

Array = jax.Array
PyTree = Any

__all__ = ["OnlineModel", "Stage", "chain_recurrent", "is_recurrent",
           "input_sizes", "stage_masks", "param_masks"]


def is_recurrent(module: Any) -> bool:
    """Whether ``module`` is a recurrent layer rather than a feed-forward one (the rule:
    :data:`snapjax.cells.recurrent.RECURRENT_RULE`)."""
    if isinstance(module, FeedForward):
        return False
    if isinstance(module, Recurrent) or hasattr(module, "spec") or is_nnx_cell(module) or is_equinox_cell(module):
        return True
    if isinstance(module, nn.Module) and callable(getattr(module, "initialize_carry", None)):
        return True  # nn.RNNCellBase and any module (carry, x) -> (carry, y) defining initialize_carry
    try:
        as_cell_spec(module)
        return True
    except ValueError:
        return False


def _check_given(name: str, given: PyTree, expected: PyTree) -> None:
    """``ValueError`` unless ``given`` has the structure and leaf shapes of ``expected``."""
    if str(jax.tree.structure(given)) != str(jax.tree.structure(expected)):
        raise ValueError(f"params[{name!r}] do not have the layer's structure {jax.tree.structure(expected)}")
    for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(expected)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"params[{name!r}] has a leaf of shape {jnp.shape(a)}, the layer expects {jnp.shape(b)}")


def _ff_apply(module: Any) -> Callable[[PyTree, Array], Array]:
    if isinstance(module, FeedForward):
        return module.apply

    def apply(params, h):
        return module.apply({"params": params}, h) if params is not None else module.apply({}, h)

    return apply


def chain_recurrent(items: Sequence[tuple[str, Any, bool]]) -> Recurrent:
    """One :class:`Recurrent` for a chain of modules ``(name, module, is_recurrent)`` ending with
    a recurrent one: parameters ``{name: params}``, carry the tuple of the recurrent carries,
    output the last recurrent output."""
    if not items or not items[-1][2]:
        raise ValueError("a recurrent chain must end with a recurrent layer")
    recs = {name: as_recurrent(m) for name, m, r in items if r}
    ffs = {name: _ff_apply(m) for name, m, r in items if not r}
    order = [(name, r) for name, _, r in items]
    rec_names = [name for name, r in order if r]

    def apply(params, carry, x):
        h, out = x, []
        carries = dict(zip(rec_names, carry))
        for name, r in order:
            if r:
                c = recs[name].apply(params[name], carries[name], h)
                out.append(c)
                h = recs[name].output(c)
            else:
                h = ffs[name](params.get(name), h)
        return tuple(out)

    def output(carry):
        return recs[rec_names[-1]].output(carry[-1])

    def init_carry(batch_size, dtype=jnp.float32):
        return tuple(recs[n].init_carry(batch_size, dtype) for n in rec_names)

    return Recurrent("+".join(n for n, _ in order), apply, output, init_carry, None, tuple(m for _, m, _ in items))


def _as_layer(i: int, m: Any) -> Any:
    try:
        return as_layer(m)
    except ValueError as err:
        raise ValueError(f"layers_{i}: {err}") from None


def _kind(m: Any) -> str:
    """A layer's class for messages (an nnx/equinox module's own class)."""
    inner = getattr(m, "module", None) if isinstance(m, (FeedForward, Recurrent)) else None
    return type(m if inner is None else inner).__name__


def _ff_size(name: str, ff: FeedForward, p: PyTree, size: int, dtype: Any) -> int:
    """The output size of an nnx/equinox feed-forward layer on inputs of ``size`` features."""
    src = "the model's inputs have" if name == "layers_0" else f"layers_{int(name[7:]) - 1} emits"
    if ff.in_features is not None and ff.in_features != size:
        raise ValueError(f"{name} ({ff.name}) takes in_features={ff.in_features}, but {src} {size} features: "
                         f"build it with in_features={size}")
    try:
        return int(jax.eval_shape(ff.apply, p, jax.ShapeDtypeStruct((1, size), dtype)).shape[-1])
    except Exception as err:  # noqa: BLE001 - any failure of the user's module, named
        raise ValueError(f"{name} ({ff.name}) fails on inputs of {size} features ({src} {size}): "
                         f"{type(err).__name__}: {err}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """A step of the model: feed-forward (one module) or recurrent (one cell or a chain).

    Attributes:
      names: parameter keys of the modules in the stage.
      recurrent: whether the stage has a carry and an online method.
      module: the feed-forward module, or the stage's :class:`Recurrent`.
      index: position of the stage's first module in the model.
    """

    names: tuple[str, ...]
    recurrent: bool
    module: Any
    index: int

    def params(self, params: PyTree) -> PyTree:
        """This stage's parameters: a single module's own dict, or ``{name: ...}`` for a chain."""
        if len(self.names) == 1:
            return params.get(self.names[0])
        return {n: params[n] for n in self.names if n in params}

    def merge(self, grads: dict, g: PyTree) -> None:
        if len(self.names) == 1:
            grads[self.names[0]] = g
        else:
            grads.update(g)

    def apply(self, p: PyTree, h: Array) -> Array:
        return _ff_apply(self.module)(p, h)


@dataclasses.dataclass(frozen=True, eq=False)
class OnlineModel:
    """A sequence of feed-forward and recurrent layers (see the module docstring).

    Args:
      layers: modules applied in order at every step (flax.linen, flax.nnx, equinox, snapjax
        cells); at least one is recurrent (module docstring).  An ``nnx.Module`` declaring
        ``online_layers`` stands for its declared layers.

    Example (encoder, GRU, head)::

        >>> import flax.linen as nn, jax
        >>> from snapjax.training.model import OnlineModel
        >>> model = OnlineModel([nn.Dense(8), nn.GRUCell(16), nn.Dense(2)])
        >>> model.recurrent_flags, [(s.names, s.recurrent) for s in model.stages()]
        ((False, True, False), [(('layers_0',), False), (('layers_1',), True), (('layers_2',), False)])
        >>> params = model.init(jax.random.key(0), input_size=3)
        >>> params["layers_0"]["kernel"].shape, params["layers_1"]["hn"]["kernel"].shape, params["layers_2"]["kernel"].shape
        ((3, 8), (16, 16), (16, 2))
        >>> OnlineModel([nn.Dense(8)])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: OnlineModel needs at least one recurrent layer; a layer is recurrent if ... The layers are [layers_0: Dense], all feed-forward
    """

    layers: tuple
    if TYPE_CHECKING:  # set in __init__ (frozen dataclass), not dataclass fields
        _flags: tuple[bool, ...]

    def __init__(self, layers: Sequence[Any]):
        layers = tuple(_as_layer(i, m) for i, m in enumerate(expand_layers(layers)))
        if not layers:
            raise ValueError("OnlineModel needs at least one layer")
        flags = tuple(is_recurrent(m) for m in layers)
        if not any(flags):
            seen = ", ".join(f"layers_{i}: {_kind(m)}" for i, m in enumerate(layers))
            raise ValueError(f"OnlineModel needs at least one recurrent layer; {RECURRENT_RULE}. The layers are "
                             f"[{seen}], all feed-forward")
        for m, r in zip(layers, flags):
            if not r and not isinstance(m, (nn.Module, FeedForward)):
                raise ValueError(f"layer {m!r} is neither a recurrent cell nor a flax.linen, flax.nnx or equinox "
                                 "module")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "_flags", flags)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"layers_{i}" for i in range(len(self.layers)))

    @property
    def recurrent_flags(self) -> tuple[bool, ...]:
        return self._flags

    def stages(
        self, stack: Literal["layerwise", "combined"] = "layerwise", encoder: Literal["step", "exact"] = "step"
    ) -> list[Stage]:
        """The stages for a stacking mode and an encoder mode (see the module docstring)."""
        if stack not in ("layerwise", "combined"):
            raise ValueError(f"stack must be 'layerwise' or 'combined', got {stack!r}")
        if encoder not in ("step", "exact"):
            raise ValueError(f"encoder must be 'step' or 'exact', got {encoder!r}")
        flags, names = self._flags, self.names
        first = flags.index(True)
        last = len(flags) - 1 - flags[::-1].index(True)
        lo = 0 if encoder == "exact" else first
        groups: list[tuple[int, int]] = []  # [start, end] inclusive, recurrent chains
        if stack == "combined":
            groups.append((lo, last))
        else:
            for i, r in enumerate(flags):
                if r:
                    groups.append((lo if i == first else i, i))
        stages, i = [], 0
        for a, b in groups:
            for j in range(i, a):
                stages.append(Stage((names[j],), False, self.layers[j], j))
            items = [(names[j], self.layers[j], flags[j]) for j in range(a, b + 1)]
            rec = as_recurrent(self.layers[a]) if a == b else chain_recurrent(items)
            stages.append(Stage(tuple(names[a : b + 1]), True, rec, a))
            i = b + 1
        for j in range(i, len(flags)):
            stages.append(Stage((names[j],), False, self.layers[j], j))
        return stages

    def init(self, key: Array, input_size: int, dtype: Any = jnp.float32, given: dict | None = None) -> dict:
        """Initial parameters ``{"layers_i": ...}`` for inputs of size ``input_size``; layers in
        ``given`` keep the given parameters (a bare ``CellSpec`` layer must be given them)."""
        params, size, given = {}, int(input_size), given or {}
        for name, m, r, k in zip(self.names, self.layers, self._flags, jax.random.split(key, len(self.layers))):
            h = jnp.zeros((1, size), dtype)
            if r:
                rec = as_recurrent(m)
                if name in given:
                    p = given[name]
                    if isinstance(m, nn.Module) or rec.params is not None:
                        _check_given(name, p, jax.eval_shape(lambda kk: rec.init_params(kk, size, dtype), k))
                else:
                    p = rec.init_params(k, size, dtype)
                built_for = rec.input_size(p)
                if built_for is not None and built_for != size:
                    raise ValueError(f"{name} ({rec.name}) takes {built_for} input features (its parameters' input "
                                     f"kernels), but its inputs have {size}")
                size = int(jnp.shape(rec.output(rec.apply(p, rec.init_carry(1, dtype), h)))[-1])
            elif isinstance(m, FeedForward):
                p = given.get(name, m.params)
                if name in given:
                    _check_given(name, p, m.params)
                size = _ff_size(name, m, p, size, dtype)
            elif name in given:
                p = given[name]
                _check_given(name, p, jax.eval_shape(lambda kk: m.init(kk, h).get("params"), k))
                size = int(jax.eval_shape(lambda pp, hh: m.apply({"params": pp}, hh), p, h).shape[-1])
            else:
                variables = m.init(k, h)
                p = variables.get("params")
                if set(variables) - {"params"}:
                    raise ValueError(f"{name}: only stateless feed-forward modules (no batch statistics) are supported")
                size = int(jnp.shape(m.apply(variables, h))[-1])
            if p is not None:
                params[name] = p
        return params


# ---------------------------------------------------------------------------
# Static facts about the stages: input sizes (weight masks: snapjax.training.layer_masks).


def input_sizes(stages: list[Stage], params, input_size) -> dict:
    """Input size of every layer index (static shapes, by abstract evaluation)."""
    sizes, size = {}, input_size
    for stage in stages:
        sizes[stage.index] = size
        if size is None:
            continue
        h = jax.ShapeDtypeStruct((1, size), jnp.float32)
        p = stage.params(params)
        if stage.recurrent:
            rec = stage.module
            c = jax.eval_shape(lambda p, h: rec.output(rec.apply(p, rec.init_carry(1), h)), p, h)
        else:
            c = jax.eval_shape(stage.apply, p, h)
        size = int(c.shape[-1])
    return sizes
