"""optax transformations: skip_nonfinite, masked_updates, accumulate_online."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snapjax.training.transforms import (
    AccumulateOnlineState,
    SkipNonFiniteState,
    accumulate_online,
    masked_updates,
    skip_nonfinite,
    skipped_count,
)

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def _grads(scale):
    return jax.tree.map(lambda p: scale * jnp.ones_like(p), PARAMS)


def test_skip_nonfinite_keeps_params_and_inner_state():
    tx = skip_nonfinite(optax.adam(0.1))
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    assert isinstance(state, SkipNonFiniteState)
    u1, state1 = update(_grads(1.0), state, PARAMS)
    bad = _grads(1.0)
    bad["w"] = bad["w"].at[0, 1].set(jnp.nan)
    u2, state2 = update(bad, state1, PARAMS)
    chex.assert_trees_all_equal(u2, jax.tree.map(jnp.zeros_like, u2))
    chex.assert_trees_all_equal(state2.inner_state, state1.inner_state)
    assert int(state2.total_skipped) == 1 and int(state2.consecutive_skipped) == 1
    assert not bool(state2.last_finite)
    inf = jax.tree.map(lambda g: g * jnp.inf, _grads(1.0))
    _, state3 = update(inf, state2, PARAMS)
    assert int(skipped_count(state3)) == 2 and int(state3.consecutive_skipped) == 2
    # a good update afterwards is applied exactly as if the bad ones never happened
    u4, state4 = update(_grads(2.0), state3, PARAMS)
    u_ref, _ = update(_grads(2.0), state1, PARAMS)
    chex.assert_trees_all_equal(u4, u_ref)
    assert int(state4.consecutive_skipped) == 0 and int(state4.total_skipped) == 2
    new = optax.apply_updates(PARAMS, u2)
    chex.assert_trees_all_equal(new, PARAMS)


def test_masked_updates_zero_masked_weights_in_a_chain():
    mask = {"w": np.array([[1, 0, 1], [0, 1, 0]], bool), "b": None}
    tx = optax.chain(optax.adamw(0.1, weight_decay=1.0), masked_updates(mask))
    state = tx.init(PARAMS)
    u, _ = jax.jit(tx.update)(_grads(1.0), state, PARAMS)
    assert np.all(np.asarray(u["w"])[~mask["w"]] == 0)
    assert np.all(np.asarray(u["w"])[mask["w"]] != 0) and np.all(np.asarray(u["b"]) != 0)


def test_accumulate_online_matches_multisteps():
    k = 3
    ours = accumulate_online(optax.sgd(0.5), k)
    ref = optax.MultiSteps(optax.sgd(0.5), k, use_grad_mean=False)
    s_ours, s_ref = ours.init(PARAMS), ref.init(PARAMS)
    assert isinstance(s_ours, AccumulateOnlineState)
    up_ours, up_ref = jax.jit(ours.update), jax.jit(ref.update)
    p_ours = p_ref = PARAMS
    history = []
    for i in range(7):
        g = _grads(float(i + 1))
        u, s_ours = up_ours(g, s_ours, p_ours)
        v, s_ref = up_ref(g, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, v)
        history.append(p_ours)
        chex.assert_trees_all_close(p_ours, p_ref)
        if (i + 1) % k:
            chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
    # the sum, not the mean: after 3 steps every entry moved by -0.5 * (1 + 2 + 3); after 6 by
    # -0.5 * (1 + ... + 6); step 7 is only accumulated (no update yet)
    for step, moved in ((1, 0.0), (2, 0.0), (3, -3.0), (5, -3.0), (6, -10.5), (7, -10.5)):
        for name in ("w", "b"):
            np.testing.assert_allclose(history[step - 1][name], PARAMS[name] + moved, rtol=1e-6, atol=1e-6)
    mean = accumulate_online(optax.sgd(1.0), 2, mean=True)
    s = mean.init(PARAMS)
    _, s = mean.update(_grads(1.0), s, PARAMS)
    u, s = mean.update(_grads(3.0), s, PARAMS)
    np.testing.assert_allclose(u["b"], -2.0 * np.ones(3))
