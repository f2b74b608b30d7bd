"""Static weight masks of a model's recurrent stages: per stage (for its online method) and as
a params-shaped tree (for :func:`snapjax.masked_updates`).  Re-exported by
:mod:`snapjax.training.model`.

``masks`` is ``{projection: (n_in, units) 0/1 array}`` for a model with one recurrent layer, or
``{"layers_i": {projection: mask}}`` for a stack.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from snapjax.training.model import OnlineModel
    >>> model = OnlineModel([nn.GRUCell(4), nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), input_size=3)
    >>> tree = param_masks(model.stages(), {"hr": jnp.eye(4)}, params)
    >>> tree["layers_0"]["hr"]["kernel"].dtype, tree["layers_0"]["hz"]["kernel"], tree["layers_1"]["kernel"]
    (dtype('bool'), None, None)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

PyTree = Any

__all__ = ["stage_masks", "param_masks"]


def stage_masks(stages: list, masks, stage: Any):
    """The weight masks of one recurrent stage: ``masks`` is ``{projection: (n_in, units)}`` for a
    model with one recurrent layer, or ``{"layers_i": {projection: mask}}``."""
    if masks is None:
        return None
    named = isinstance(masks, Mapping) and any(k.startswith("layers_") for k in masks)
    if not named:
        recs = [s for s in stages if s.recurrent]
        if len(recs) != 1 or len(stage.names) != 1:
            raise ValueError("with several recurrent layers pass masks as {'layers_i': {projection: mask}}")
        return masks
    if len(stage.names) == 1:
        return masks.get(stage.names[0])
    return {n: masks.get(n) for n in stage.names}


def param_masks(stages: list, masks, params: PyTree) -> PyTree:
    """Params-shaped tree of static masks for ``masked_updates`` (``None`` = unmasked)."""
    out = jax.tree.map(lambda _: None, params)
    for stage in stages:
        if not stage.recurrent:
            continue
        m = stage_masks(stages, masks, stage)
        if m is None:
            continue
        per_layer = {stage.names[0]: m} if len(stage.names) == 1 else m
        for lname, lm in per_layer.items():
            for proj, mk in (lm or {}).items():
                if mk is None:
                    continue
                if lname not in params or proj not in params[lname]:
                    raise ValueError(
                        f"mask for unknown projection {proj!r} of {lname}; its parameters are "
                        f"{sorted(params.get(lname, {}))}"
                    )
                if not isinstance(params[lname][proj], Mapping) or "kernel" not in params[lname][proj]:
                    kernels = sorted(k for k, v in params[lname].items() if isinstance(v, Mapping) and "kernel" in v)
                    raise ValueError(f"mask for {proj!r} of {lname}: masks apply to projection kernels ({kernels}); "
                                     f"{proj!r} is a per-unit parameter")
                kshape = tuple(np.shape(params[lname][proj]["kernel"]))
                mk = np.asarray(mk)
                if mk.shape != kshape:
                    raise ValueError(f"mask {lname}/{proj} has shape {mk.shape}, kernel has shape {kshape}")
                if not (mk.dtype == bool or np.isin(mk, (0, 1)).all()):
                    raise ValueError(f"mask {lname}/{proj} must hold only 0/1 values")
                out[lname][proj]["kernel"] = mk.astype(bool)
    return out
