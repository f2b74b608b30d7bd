"""The state of an online run (:class:`OnlineState`) and the learner's initial parameters.

An :class:`OnlineState` is everything needed to continue or resume a stream: parameters,
optimizer state, one carry and one method state per recurrent stage, the gradient and loss
accumulated over the current optimizer period, the PRNG key and the fault counters.  It is a
pytree (a ``NamedTuple``): jit it, donate it, shard it (:mod:`snapjax.parallel.sharding`), checkpoint it
(:mod:`snapjax.checkpoint`).  :func:`initial_params` merges the parameters a user gives for
some layers with freshly initialised ones for the others, checking every given leaf.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from snapjax.training.model import OnlineModel

Array = jax.Array
PyTree = Any

__all__ = ["OnlineState", "initial_params"]


class OnlineState(NamedTuple):
    """Everything needed to continue (or resume) an online run; a pytree.

    Attributes:
      params: ``{"layers_i": ...}``.
      opt_state: of ``chain(optimizer, masked_updates)`` (the optimizer alone without masks)
        (:meth:`OnlineLearner.optimizer_state` returns the user optimizer's own state).
      carry: tuple of flax carries, one per recurrent stage (batch axis 0).
      method_state: tuple of method states, one per recurrent stage.
      grad_acc: gradients summed since the last update (``None`` when ``update_every == 1``).
      loss_acc: loss summed since the last update.
      scored: a scored example since the last update.
      step: int32, steps seen.
      key: PRNG key.
      skipped: non-finite updates skipped.
      resets: example-steps reset as non-finite.
      excluded: example-steps with invalid targets.

    Example::

        >>> import flax.linen as nn, jax, snapjax as sj
        >>> learner = sj.OnlineLearner([nn.GRUCell(8), nn.GRUCell(8)], readout_size=3, method=["snap1", "uoro"])
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=4)
        >>> isinstance(state, sj.OnlineState), sorted(state.params)
        (True, ['layers_0', 'layers_1', 'layers_2'])
        >>> [c.shape for c in state.carry], [type(s).__name__ for s in state.method_state]
        ([(2, 8), (2, 8)], ['InfluenceState', 'UOROState'])
        >>> int(state.step), int(state.skipped), int(state.resets), int(state.excluded), state.grad_acc
        (0, 0, 0, 0, None)
    """

    params: dict
    opt_state: Any
    carry: tuple
    method_state: tuple
    grad_acc: Any
    loss_acc: Array
    scored: Array
    step: Array
    key: Array
    skipped: Array
    resets: Array
    excluded: Array


def initial_params(model: OnlineModel, params: PyTree | None, key: Array, input_size: int) -> dict:
    """``{"layers_i": ...}`` for ``model``: the given ``params`` where given (a dict of layers,
    flax's ``{"params": ...}``, or for a model with one recurrent layer that layer's own
    parameters), freshly initialised from ``key`` elsewhere.

    Raises:
      ValueError: parameters for a layer the model does not have, or given parameters whose
        structure or leaf shapes differ from the layer's.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.training.model import OnlineModel
        >>> from snapjax.training.online_state import initial_params
        >>> model = OnlineModel([nn.GRUCell(4), nn.Dense(2)])
        >>> mine = nn.GRUCell(4).init(jax.random.key(1), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> params = initial_params(model, mine, jax.random.key(0), 3)  # the GRU's own, a fresh head
        >>> sorted(params), bool(jnp.array_equal(params["layers_0"]["hn"]["kernel"], mine["hn"]["kernel"]))
        (['layers_0', 'layers_1'], True)
        >>> initial_params(model, {"layers_7": {}}, jax.random.key(0), 3)
        Traceback (most recent call last):
            ...
        ValueError: params for unknown layers ['layers_7']; the model has ['layers_0', 'layers_1']
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    given = {}
    if params is not None:
        params = dict(params)
        if all(k.startswith("layers_") for k in params):
            given = params
        elif any(str(k).startswith("layer") for k in params):  # e.g. a typo "layer_0"
            raise ValueError(f"params keys {sorted(map(str, params))}: a model's parameters are "
                             f"{{'layers_i': params of layer i}} for layers {list(model.names)}")
        else:
            first = model.recurrent_flags.index(True)
            given = {f"layers_{first}": params}
    unknown = set(given) - set(model.names)
    if unknown:
        raise ValueError(f"params for unknown layers {sorted(unknown)}; the model has {list(model.names)}")
    fresh = model.init(key, input_size, given=jax.tree.map(jnp.asarray, given))
    params = {**fresh, **jax.tree.map(jnp.asarray, given)}
    for name in given:
        if jax.tree.structure(given[name]) != jax.tree.structure(fresh.get(name)):  # type: ignore[operator]
            raise ValueError(f"params[{name!r}] do not have the layer's structure {jax.tree.structure(fresh.get(name))}")
        for a, b in zip(jax.tree.leaves(given[name]), jax.tree.leaves(fresh[name])):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"params[{name!r}] leaf of shape {jnp.shape(a)}, the layer expects {jnp.shape(b)}")
    return params
