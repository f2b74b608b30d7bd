"""Checkpoint/resume of the full online state is bit-identical to an uninterrupted run."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snapjax.checkpoint import restore_state, save_state
from snapjax.online import OnlineLearner


def test_resume_mid_stream_is_bit_identical(tmp_path):
    B, n_in, T = 4, 2, 10
    learner = OnlineLearner(nn.GRUCell(5), 3, method="snap1", optimizer=optax.adam(1e-2), update_every=3)
    ks = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(ks[0], (2 * T, B, n_in))
    ys = jax.random.randint(ks[1], (2 * T, B), 0, 3)
    run = jax.jit(learner.run)

    # uninterrupted: two chunks of 10 steps
    state = learner.init(jax.random.key(1), None, batch_size=B, input_size=n_in)
    a, out_a1, _ = run(state, xs[:T], ys[:T])
    a, out_a2, met_a = run(a, xs[T:], ys[T:])

    # interrupted: 10 steps, save, restore into a fresh template, 10 steps
    b, out_b1, _ = run(state, xs[:T], ys[:T])
    path = tmp_path / "ckpt" / "state.msgpack"
    save_state(path, b)
    template = learner.init(jax.random.key(99), None, batch_size=B, input_size=n_in)
    restored = restore_state(path, template)
    chex.assert_trees_all_equal(restored, b)
    assert restored.key.dtype == state.key.dtype  # typed PRNG key survives
    b, out_b2, met_b = run(restored, xs[T:], ys[T:])

    chex.assert_trees_all_equal(b, a)
    chex.assert_trees_all_equal(out_b2, out_a2)
    chex.assert_trees_all_equal(met_b, met_a)
    assert int(a.step) == 2 * T


def test_restore_rejects_mismatched_template(tmp_path):
    learner = OnlineLearner(nn.GRUCell(5), 3, method="snap1", optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(1), None, batch_size=4, input_size=2)
    save_state(tmp_path / "s", state)
    other = state._replace(carry=jnp.zeros((2,) + state.carry.shape[1:]))
    try:
        restore_state(tmp_path / "s", other)
    except ValueError:
        return
    raise AssertionError("restore into a template of another batch size must fail")
