"""What an :class:`snapjax.OnlineLearner`'s options resolve to, checked before anything runs:
the model's stages, the online method of each recurrent stage, and the shapes of a step's or a
chunk's inputs.

Every check raises ``ValueError`` with what was expected and what was given.

Example::

    >>> import flax.linen as nn, snapjax as sj
    >>> from snapjax.training.config import resolve_model, resolve_stage_methods
    >>> model, stages = resolve_model([nn.GRUCell(4), nn.GRUCell(4)], 2, "layerwise", "step")
    >>> [s.recurrent for s in stages], resolve_stage_methods("snap1", stages, None, None)
    ([True, True, False], ('snap1', 'snap1'))
    >>> resolve_stage_methods(["rtrl"], stages, None, None)
    Traceback (most recent call last):
        ...
    ValueError: 1 methods given for 2 recurrent stages
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snapjax.methods.base import OnlineMethod
from snapjax.methods.registry import OPTIONS, check_options, online_method, uses_window
from snapjax.training.model import OnlineModel, Stage, input_sizes, stage_masks
from snapjax.training.online_state import OnlineState

Array = jax.Array
PyTree = Any

__all__ = ["resolve_learner", "check_method_options", "check_positive_int", "check_optimizer", "check_finite_params", "check_mesh_axes", "check_mask_layers", "resolve_model", "resolve_stage_methods",
           "check_feedback", "build_stage_methods", "check_step_inputs", "check_chunk", "check_loss_weights"]


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is a positive int (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_optimizer(optimizer: Any) -> None:
    """``TypeError`` unless ``optimizer`` is an optax ``GradientTransformation`` (a common slip:
    ``optax.adam`` instead of ``optax.adam(1e-3)``)."""
    if not isinstance(optimizer, optax.GradientTransformation):
        hint = " (call it: e.g. optax.adam(1e-3), not optax.adam)" if callable(optimizer) else ""
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}{hint}")


def check_finite_params(params: PyTree) -> None:
    """``ValueError`` naming the leaves of concrete ``params`` that hold NaN or infinity (traced
    values are left to the step's guard, which skips and counts such steps)."""
    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if not isinstance(leaf, jax.core.Tracer) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
           and not bool(np.all(np.isfinite(np.asarray(leaf))))]
    if bad:
        raise ValueError(f"initial parameters must be finite; non-finite values in {', '.join(bad)}")


def check_mesh_axes(batch_axis: Any, param_axis: Any) -> None:
    """Mesh axis names: each a non-empty str or ``None``, and not the same axis."""
    for name, axis in (("batch_axis", batch_axis), ("param_axis", param_axis)):
        if axis is not None and (not isinstance(axis, str) or not axis):
            raise ValueError(f"{name} must be a mesh axis name (a non-empty str) or None, got {axis!r}")
    if batch_axis is not None and batch_axis == param_axis:
        raise ValueError(f"batch_axis and param_axis must be different mesh axes, got {batch_axis!r} for both")


def resolve_model(model: Any, readout_size: Any, stack: str, encoder: str) -> tuple[OnlineModel, list[Stage]]:
    """The :class:`snapjax.OnlineModel` of ``model`` (a model, a list of layers or one cell, with
    a ``Dense(readout_size)`` head appended if given) and its stages."""
    if not isinstance(model, OnlineModel):
        layers = list(model) if isinstance(model, (list, tuple)) else [model]
        if readout_size is not None:
            check_positive_int("readout_size", readout_size)
            dtype = next((getattr(m, "param_dtype") for m in layers if hasattr(m, "param_dtype")), jnp.float32)
            layers.append(nn.Dense(int(readout_size), param_dtype=dtype))
        model = OnlineModel(layers)
    elif readout_size is not None:
        raise ValueError("readout_size is only for a cell or a list of layers; add the head to the OnlineModel")
    return model, model.stages(stack, encoder)


def resolve_stage_methods(method: Any, stages: Sequence[Stage], n: int | None, window: int | None) -> tuple:
    """One method (a registered name or an :class:`OnlineMethod`) per recurrent stage, with
    names and options validated now rather than at the first step."""
    recs = [s for s in stages if s.recurrent]
    methods = list(method) if isinstance(method, (list, tuple)) else [method] * len(recs)
    if len(methods) != len(recs):
        raise ValueError(f"{len(methods)} methods given for {len(recs)} recurrent stages")
    if any(isinstance(m, OnlineMethod) for m in methods) and len(recs) != 1:
        raise ValueError("an OnlineMethod object fits one recurrent stage; pass names for a stack")
    for m in methods:
        if not isinstance(m, (str, OnlineMethod)):
            raise ValueError(f"method must be a name or an OnlineMethod, got {type(m).__name__}")
        if isinstance(m, str):
            check_options(m, n, window, strict=False)
    if window is not None and not any(isinstance(m, str) and uses_window(m) for m in methods):
        raise ValueError("tbptt_window is only used with a method that takes a window, such as 'tbptt' or "
                         "'sliding_tbptt' (in at least one stage)")
    return tuple(methods)


def resolve_learner(learner: Any) -> tuple[OnlineModel, list[Stage], tuple]:
    """Every check of an :class:`snapjax.OnlineLearner`'s arguments, then ``(model, stages,
    one method per recurrent stage)``."""
    check_mesh_axes(learner.batch_axis, learner.param_axis)
    check_optimizer(learner.optimizer)
    model, stages = resolve_model(learner.model, learner.readout_size, learner.stack, learner.encoder)
    check_mask_layers(learner.masks, model)
    check_positive_int("chunk", learner.chunk, allow_none=True)
    check_positive_int("update_every", learner.update_every, allow_none=True)
    check_method_options(learner.method_options)
    check_feedback(learner.feedback, stages)
    return model, stages, resolve_stage_methods(learner.method, stages, learner.n, learner.tbptt_window)


def check_feedback(feedback: Any, stages: Sequence[Stage]) -> None:
    """``ValueError`` unless ``feedback`` is ``"symmetric"`` or ``"random"``, and ``"random"``
    has a feed-forward head after the last recurrent layer to stand in for."""
    if feedback not in ("symmetric", "random"):
        raise ValueError(f"feedback must be 'symmetric' or 'random', got {feedback!r}")
    if feedback == "random" and stages[-1].recurrent:
        raise ValueError("feedback='random' needs a feed-forward head after the last recurrent layer "
                         "(readout_size=..., or a Dense at the end of the model)")


def build_stage_methods(
    stages: Sequence[Stage], methods: Sequence[Any], params: PyTree, input_size: int | None, *, n: int | None,
    masks: Any, precision: Any, window: int | None, batch_axis: str | None, chunk: int | None, chunked: bool,
    update_every: int | None, options: Mapping[str, Any] | None = None,
) -> tuple[OnlineMethod, ...]:
    """The online method of each recurrent stage for parameters shaped like ``params`` (names
    built with :func:`snapjax.online_method`; chunked forms where the period allows)."""
    stages = list(stages)
    out, sizes = [], input_sizes(stages, params, input_size)
    recs = [s for s in stages if s.recurrent]
    for stage, spec in zip(recs, methods):
        if isinstance(spec, OnlineMethod):
            out.append(spec)
            continue
        stage.module.check_output(stage.params(params), sizes[stage.index])
        kw = dict(n=n, masks=stage_masks(stages, masks, stage), precision=precision, input_size=sizes[stage.index],
                  window=window, batch_axis=batch_axis, strict_options=False, **(options or {}))
        if chunk is not None:
            kw.update(chunk=chunk, chunk_policy="require")
        elif chunked and (update_every or 1) > 1:
            kw.update(chunk=update_every, chunk_policy="prefer")
        out.append(online_method(spec, stage.module, stage.params(params), **kw))
    K = update_every if update_every is not None else int(np.lcm.reduce([m.period for m in out]))
    for m in out:
        if K % m.period:
            raise ValueError(f"update_every={K} is not a multiple of {m.name}'s period {m.period}")
    return tuple(out)


#: Options set by the learner's own arguments (not through ``method_options``).
_LEARNER_SET = {"n": "n", "masks": "masks", "precision": "precision", "window": "tbptt_window", "chunk": "chunk",
                "input_size": "(the stage's input size)", "batch_axis": "batch_axis"}


def check_method_options(options: Any) -> None:
    """``ValueError`` unless ``options`` is ``None`` or a dict of :func:`snapjax.online_method`
    options not set by the learner's own arguments."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise ValueError(f"method_options must be a dict of online_method options, got {type(options).__name__}")
    for k in options:
        if k in _LEARNER_SET:
            raise ValueError(f"method_options[{k!r}]: set it with the learner's {_LEARNER_SET[k]} instead")
        if k not in OPTIONS:
            raise ValueError(f"method_options has an unknown option {k!r}; options are "
                             f"{sorted(set(OPTIONS) - set(_LEARNER_SET))}")


def check_mask_layers(masks: Any, model: OnlineModel) -> None:
    """``ValueError`` unless ``masks`` is ``None``, ``{projection: mask}`` (one recurrent layer) or
    ``{"layers_i": {projection: mask}}`` naming recurrent layers only (a mask never goes unused)."""
    if masks is None:
        return
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a dict {{projection: (n_in, units) 0/1 array}} or "
                         f"{{'layers_i': {{projection: mask}}}}, got {type(masks).__name__}")
    layer_keys = [k for k in masks if isinstance(k, str) and k.startswith("layers_")]
    if not layer_keys:
        return  # one recurrent layer's projections (checked against its parameters when built)
    if len(layer_keys) != len(masks):
        raise ValueError(f"masks mix layer names and other keys: {sorted(map(str, masks))}; "
                         "use {'layers_i': {projection: mask}} throughout")
    recurrent = [n for n, r in zip(model.names, model.recurrent_flags) if r]
    for k in layer_keys:
        if k not in model.names:
            raise ValueError(f"masks for unknown layer {k!r}; the model's layers are {list(model.names)}")
        if k not in recurrent:
            raise ValueError(f"masks for {k!r}, a feed-forward layer: masks apply to recurrent layers' kernels "
                             f"({recurrent}); mask a feed-forward layer's updates with snapjax.masked_updates")
        if masks[k] is not None and not isinstance(masks[k], Mapping):
            raise ValueError(f"masks[{k!r}] must be a dict {{projection: mask}}, got {type(masks[k]).__name__}")


def check_step_inputs(state: OnlineState, x: Array, mask: Array | None) -> int:
    """The batch size; ``ValueError`` unless ``x`` is ``(B, n_in)`` floating point and ``mask``
    ``(B,)``."""
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    if jnp.ndim(x) != 2:
        raise ValueError(
            f"x_t must have shape ({batch}, n_in), got {jnp.shape(x)} (chunks are time-major (T, B, n_in))"
        )
    if jnp.shape(x)[0] != batch:
        raise ValueError(_batch_differs(f"x_t {jnp.shape(x)} (B, n_in)", jnp.shape(x)[0], batch))
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"inputs must be floating point, got {jnp.result_type(x)}")
    if mask is not None and jnp.shape(mask) != (batch,):
        raise ValueError(
            f"the loss mask must have shape ({batch},) per step, i.e. (T, {batch}) for a chunk "
            f"(time-major), got {jnp.shape(mask)}"
        )
    check_loss_weights(mask)
    return batch


def check_loss_weights(mask: Any) -> None:
    """``ValueError`` unless a concrete loss mask holds finite weights ``>= 0`` (a traced one is
    checked in the step: a bad weight is excluded and counted in ``metrics['excluded']``)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    m = np.asarray(mask)
    if m.dtype == bool:
        return
    if not np.issubdtype(m.dtype, np.number):
        raise ValueError(f"the loss mask must hold numbers (weights >= 0) or bools, got dtype {m.dtype}")
    if not (np.all(np.isfinite(m)) and np.all(m >= 0)):
        bad = m[~(np.isfinite(m) & (m >= 0))]
        raise ValueError(f"loss masks are weights >= 0 (0: no target); got {bad.size} other value(s), e.g. {bad[0]}")


def check_chunk(state: OnlineState, xs: Array, ys: Any, masks: Array | None) -> Array:
    """``xs`` as an array; ``ValueError`` unless ``xs (T, B, n_in)``, targets ``(T, ...)`` and
    ``masks (T, B)`` are time-major with the state's batch."""
    xs = jnp.asarray(xs)
    batch = jax.tree.leaves(state.carry[0])[0].shape[0]
    if jnp.ndim(xs) != 3 or (jnp.shape(xs)[1] != batch and jnp.shape(xs)[0] == batch):
        raise ValueError(
            f"xs must be time-major (T, {batch}, n_in), got {jnp.shape(xs)}"
            + (" (batch-major? transpose to (T, B, n_in))" if jnp.ndim(xs) == 3 and jnp.shape(xs)[0] == batch else "")
        )
    if jnp.shape(xs)[1] != batch:
        raise ValueError(_batch_differs(f"xs {jnp.shape(xs)} (T, B, n_in)", jnp.shape(xs)[1], batch))
    T = xs.shape[0]
    for leaf in jax.tree.leaves(ys):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != T:
            raise ValueError(f"targets must be time-major with leading axis T={T}, got shape {jnp.shape(leaf)}")
    if masks is not None and jnp.shape(masks) != (T, batch):
        raise ValueError(f"masks must have shape (T, B) = ({T}, {batch}), got {jnp.shape(masks)}")
    check_loss_weights(masks)
    return xs


def _batch_differs(what: str, got: int, batch: int) -> str:
    """The message for inputs whose batch is not the state's."""
    return (f"{what}: batch {got} differs from the state's batch {batch} (the state was built with "
            f"learner.init(..., batch_size={batch}); init a state with batch_size={got} for this batch)")


def check_input_size(stages: Sequence[Stage], params: PyTree, n_in: int) -> None:
    """``ValueError`` unless ``n_in`` input features fit the model's first layer, when its
    parameters tell its input size (a Dense kernel, a compressed cell's input kernels)."""
    p = stages[0].params(params)
    if stages[0].recurrent:
        want = stages[0].module.input_size(p)
    else:
        kernel = p.get("kernel") if isinstance(p, Mapping) else None
        want = int(jnp.shape(kernel)[0]) if kernel is not None and jnp.ndim(kernel) == 2 else None
    if want is not None and want != n_in:
        raise ValueError(f"the inputs have {n_in} features (n_in, their last axis), the model's first layer takes "
                         f"{want} (its parameters were built for input_size={want})")
