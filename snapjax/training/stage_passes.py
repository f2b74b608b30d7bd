"""One time step through a model's stages: forward, cotangents back, fault containment.

A stage (:class:`~snapjax.training.model.Stage`) is a recurrent layer with its online method,
or a feed-forward module.  :func:`forward` advances every stage and keeps a record per stage,
``(input h, carry before, StepResult, fused)`` (``fused``: :meth:`snapjax.OnlineMethod.step_fused`'s
record for the gradient; ``None``s for feed-forward stages); :func:`backward`
sends the loss cotangent down through the stages *within the step* (the stack approximation of
:mod:`snapjax.training.model`) and lets each method turn its stage's cotangent into a gradient;
:func:`contain` resets the examples a fault was seen in; :func:`forward_only` is a step
without methods (prediction).

Random feedback (RFLO, e-prop; ``OnlineLearner(feedback="random")``): :func:`backward` given a
``feedback`` matrix ``B`` (``(out, h)``, the shape of ``W_outᵀ``) sends the last recurrent stage
the cotangent ``ε_t B`` of the model's output cotangent ``ε_t`` instead of its backpropagation
through the head (``ε_t W_outᵀ`` for a ``Dense`` head); the head's own gradient is unchanged.
:func:`random_feedback` draws ``B ~ N(0, 1/h)`` (a ``Dense`` kernel's initial scale) from a key.

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

__all__ = ["forward", "backward", "contain", "settle", "head_output", "forward_only", "random_feedback"]


def forward(stages: list[Stage], params, carries, states, x, methods):
    """Advance every stage; returns per-stage records for the backward pass."""
    h, recs, j = x, [], 0
    for stage in stages:
        p = stage.params(params)
        if stage.recurrent:
            m = methods[j]
            res, fused = m.step_fused(p, carries[j], states[j], h)
            recs.append((h, carries[j], res, fused))
            h = stage.module.output(res.carry)
            j += 1
        else:
            recs.append((h, None, None, None))
            h = stage.apply(p, h)
    return h, recs


def backward(stages: list[Stage], params, recs, out_cot, methods, states, feedback=None):
    """Cotangents within the step; returns ``(grads, new method states)``.  ``feedback``: a
    fixed ``(out, h)`` matrix ``B``; the last recurrent stage then gets ``out_cot @ B``."""
    grads: dict[str, Any] = {}
    new_states = list(states)
    cot, j = out_cot, len(methods)
    has_params_below = [any(s.params(params) is not None for s in stages[:i]) for i in range(len(stages))]
    for i in reversed(range(len(stages))):
        stage, (h_in, carry_old, res, fused) = stages[i], recs[i]
        p = stage.params(params)
        need_in = has_params_below[i]
        if stage.recurrent:
            if feedback is not None and j == len(methods):  # the last recurrent stage: random feedback
                cot = jnp.matmul(out_cot, jnp.asarray(feedback, out_cot.dtype))
            j -= 1
            _, pull_out = jax.vjp(stage.module.output, res.carry)
            dcarry = pull_out(cot)[0]
            g, new_states[j] = methods[j].gradient_fused(p, res.state, fused, dcarry)
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


def random_feedback(stages: list[Stage], recs, key, out_size: int, dtype) -> jax.Array:
    """The fixed random feedback ``B`` of shape ``(out_size, h)``, ``h`` the width the last
    recurrent stage emits, ``B ~ N(0, 1/h)``: a pure function of ``key`` (the learner passes its
    state's key, which a run never changes, so ``B`` is drawn once per run and restored with it).

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> from snapjax.training.stage_passes import forward, random_feedback
        >>> model = sj.OnlineModel([nn.GRUCell(5), nn.Dense(2)])
        >>> params = model.init(jax.random.key(0), input_size=3)
        >>> method = sj.online_method("snap1", model.stages()[0].module, params["layers_0"])
        >>> out, recs = forward(model.stages(), params, (method.init_carry(1),), (method.init(1),),
        ...                     jnp.ones((1, 3)), (method,))
        >>> B = random_feedback(model.stages(), recs, jax.random.key(7), 2, jnp.float32)
        >>> B.shape, bool(jnp.array_equal(B, random_feedback(model.stages(), recs, jax.random.key(7), 2, jnp.float32)))
        ((2, 5), True)
    """
    last = max(i for i, s in enumerate(stages) if s.recurrent)
    if last + 1 >= len(stages):
        raise ValueError("random feedback needs a feed-forward head after the last recurrent layer")
    h = recs[last + 1][0].shape[-1]
    return jax.random.normal(jax.random.fold_in(key, 0xFEED), (out_size, h), dtype) * (h ** -0.5)


def contain(recs, good, methods, batch, dtype):
    """Records with the examples not in ``good`` reset (zero carry, fresh method state) and
    their saved inputs zeroed (so no NaN reaches the backward pass)."""
    fixed, j = [], 0
    for h, c_old, res, _ in recs:
        h = jnp.where(good.reshape((-1,) + (1,) * (h.ndim - 1)), h, 0)
        if res is None:
            fixed.append((h, None, None, None))
            continue
        m = methods[j]
        zero = m.init_carry(batch, dtype)
        c_old = select_examples(good, c_old, zero, 0)
        res = res._replace(carry=select_examples(good, res.carry, zero, 0), state=m.reset(res.state, ~good))
        fixed.append((h, c_old, res, None))  # reset states: the gradient reads them as they are
        j += 1
    return fixed


def settle(recs, states):
    """The records with each fused step's state (:meth:`snapjax.OnlineMethod.step_fused`) taken
    from its gradient's result ``states`` (one per recurrent stage): the same values, but reading
    them does not keep the step's own update of the state alive (XLA drops it as dead code)."""
    out, j = [], 0
    for h, c_old, res, fused in recs:
        if res is not None:
            if fused is not None:
                res, fused = res._replace(state=states[j]), None
            j += 1
        out.append((h, c_old, res, fused))
    return tuple(out)


def head_output(stages: list[Stage], params, recs):
    """Recompute the model output from the records (cheap: the last stages' forward)."""
    h = None
    for stage, (h_in, _, res, _) in zip(stages, recs):
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
