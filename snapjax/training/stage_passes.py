"""One time step through a model's stages: forward, cotangents back, fault containment.

A stage (:class:`~snapjax.training.model.Stage`) is a recurrent layer with its online method,
or a feed-forward module.  :func:`forward` advances every stage and keeps a record per stage,
``(input h, carry before, StepResult)`` (``None``s for feed-forward stages); :func:`backward`
sends the loss cotangent down through the stages *within the step* (the stack approximation of
:mod:`snapjax.training.model`) and lets each method turn its stage's cotangent into a gradient;
:func:`contain` resets the examples a fault was seen in; :func:`forward_only` is a step
without methods (prediction).

Example (a Dense encoder and a GRU: the forward records, then the gradient of ``Σ out``)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> from snapjax.training.stage_passes import backward, forward
    >>> model = sj.OnlineModel([nn.Dense(3), nn.GRUCell(4)])
    >>> stages = model.stages()
    >>> params = model.init(jax.random.key(0), input_size=2)
    >>> method = sj.online_method("rtrl", stages[1].module, params["layers_1"])
    >>> out, recs = forward(stages, params, (method.init_carry(2),), (method.init(2),), jnp.ones((2, 2)), (method,))
    >>> grads, states = backward(stages, params, recs, jnp.ones_like(out), (method,), (recs[1][2].state,))
    >>> sorted(grads), out.shape
    (['layers_0', 'layers_1'], (2, 4))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from snapjax.methods.base import select_examples
from snapjax.training.model import Stage

__all__ = ["forward", "backward", "contain", "head_output", "forward_only"]


def forward(stages: list[Stage], params, carries, states, x, methods):
    """Advance every stage; returns per-stage records for the backward pass."""
    h, recs, j = x, [], 0
    for stage in stages:
        p = stage.params(params)
        if stage.recurrent:
            m = methods[j]
            res = m.step(p, carries[j], states[j], h)
            recs.append((h, carries[j], res))
            h = stage.module.output(res.carry)
            j += 1
        else:
            recs.append((h, None, None))
            h = stage.apply(p, h)
    return h, recs


def backward(stages: list[Stage], params, recs, out_cot, methods, states):
    """Cotangents within the step; returns ``(grads, new method states)``."""
    grads: dict[str, Any] = {}
    new_states = list(states)
    cot, j = out_cot, len(methods)
    has_params_below = [any(s.params(params) is not None for s in stages[:i]) for i in range(len(stages))]
    for i in reversed(range(len(stages))):
        stage, (h_in, carry_old, res) = stages[i], recs[i]
        p = stage.params(params)
        need_in = has_params_below[i]
        if stage.recurrent:
            j -= 1
            _, pull_out = jax.vjp(stage.module.output, res.carry)
            dcarry = pull_out(cot)[0]
            g, new_states[j] = methods[j].gradient(p, res.state, dcarry)
            if need_in:
                cell = stage.module
                _, pull_in = jax.vjp(lambda hh: cell.apply(p, carry_old, hh), h_in)
                cot = pull_in(dcarry)[0]
        else:
            if p is None:
                g = None
                if need_in:
                    _, pull = jax.vjp(lambda hh: stage.apply(None, hh), h_in)
                    cot = pull(cot)[0]
            else:
                _, pull = jax.vjp(stage.apply, p, h_in)
                g, cot = pull(cot)
        if g is not None:
            stage.merge(grads, g)
    return grads, tuple(new_states)


def contain(recs, good, methods, batch, dtype):
    """Records with the examples not in ``good`` reset (zero carry, fresh method state) and
    their saved inputs zeroed (so no NaN reaches the backward pass)."""
    fixed, j = [], 0
    for h, c_old, res in recs:
        h = jnp.where(good.reshape((-1,) + (1,) * (h.ndim - 1)), h, 0)
        if res is None:
            fixed.append((h, None, None))
            continue
        m = methods[j]
        zero = m.init_carry(batch, dtype)
        c_old = select_examples(good, c_old, zero, 0)
        res = res._replace(carry=select_examples(good, res.carry, zero, 0), state=m.reset(res.state, ~good))
        fixed.append((h, c_old, res))
        j += 1
    return fixed


def head_output(stages: list[Stage], params, recs):
    """Recompute the model output from the records (cheap: the last stages' forward)."""
    h = None
    for stage, (h_in, _, res) in zip(stages, recs):
        if stage.recurrent:
            h = stage.module.output(res.carry)
        else:
            h = stage.apply(stage.params(params), h_in if h is None else h)
    return h


def forward_only(stages: list[Stage], params, carries, x):
    """One step without online methods (prediction): ``(new carries, output)``."""
    h, new, j = x, [], 0
    for stage in stages:
        p = stage.params(params)
        if stage.recurrent:
            c = stage.module.apply(p, carries[j], h)
            new.append(c)
            h, j = stage.module.output(c), j + 1
        else:
            h = stage.apply(p, h)
    return tuple(new), h
