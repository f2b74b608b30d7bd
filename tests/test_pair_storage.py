"""Two-component diagonal influences (LSTM, LRU SnAp-1) stored as complex pairs: which leaves are
paired, and that both storages give the same influence and gradients (the float leaves are the
storage the engine had before, and the one 16-bit storage and the chunked form keep)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.checkpoint import restore_state, save_state
from snapjax.engine.influence import influence_tracker

F64 = jnp.float64


def _tracker(cell, method="snap", n=1, n_in=3):
    params = jax.tree.map(lambda a: a.astype(F64), sj.as_recurrent(cell).init_params(jax.random.key(0), n_in))
    return influence_tracker(cell, params, method, n), params


def _dtypes(tree):
    return {a.dtype for a in jax.tree.leaves(tree)}


def test_which_leaves_are_pairs():
    lstm, _ = _tracker(sj.LSTMCell(4))
    assert _dtypes(lstm.init(2)) == {jnp.dtype(jnp.complex64)}
    with jax.enable_x64(True):
        assert _dtypes(lstm.init(2, F64)) == {jnp.dtype(jnp.complex128)}
    assert _dtypes(lstm.init(2, jnp.bfloat16)) == {jnp.dtype(jnp.bfloat16)}  # no 16-bit complex: floats
    assert _dtypes(lstm.init(2, pairs=False)) == {jnp.dtype(jnp.float32)}
    shapes = lstm.leaf_shapes(2)
    assert jax.tree.map(jnp.shape, lstm.init(2)) == jax.tree.map(lambda s: s[:-1] + (1,), shapes,
                                                                 is_leaf=lambda t: isinstance(t, tuple))
    assert _dtypes(_tracker(sj.LRUCell(4))[0].init(2)) == {jnp.dtype(jnp.complex64)}
    assert _dtypes(_tracker(sj.GRUCell(4))[0].init(2)) == {jnp.dtype(jnp.float32)}  # one component
    assert _dtypes(_tracker(sj.LSTMCell(4), "rtrl", None)[0].init(2)) == {jnp.dtype(jnp.float32)}  # dense layout


@pytest.mark.parametrize("cell", [sj.LSTMCell(5), sj.LRUCell(4)], ids=["lstm", "lru"])
def test_pairs_and_floats_give_the_same_influence_and_gradients(cell):
    with jax.enable_x64(True):
        tracker, params = _tracker(cell)
        rng = np.random.default_rng(1)
        B, spec = 3, tracker.spec
        s = jnp.asarray(rng.standard_normal((B, spec.units, spec.state_dim)))
        J_pairs, J_floats = tracker.init(B, F64), tracker.init(B, F64, pairs=False)
        step = jax.jit(tracker.step)
        s_p = s_f = s
        for _ in range(6):
            x = jnp.asarray(rng.standard_normal((B, 3)))
            s_p, J_pairs = step(params, s_p, J_pairs, x)
            s_f, J_floats = step(params, s_f, J_floats, x)
        c = jnp.asarray(rng.standard_normal(s.shape))
        for a, b in zip(jax.tree.leaves(tracker.gradient(J_pairs, c)), jax.tree.leaves(tracker.gradient(J_floats, c))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(jax.tree.leaves(tracker.to_dense(J_pairs)), jax.tree.leaves(tracker.to_dense(J_floats))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(jax.tree.leaves(tracker.interleaved(J_pairs)), jax.tree.leaves(J_floats)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert float(sum(jnp.abs(a).sum() for a in jax.tree.leaves(J_floats))) > 0  # a real influence


def test_complex_leaves_refused_where_floats_are_stored():
    gru, params = _tracker(sj.GRUCell(4))
    bad = jax.tree.map(lambda a: a.astype(jnp.complex64), gru.init(2))
    with pytest.raises(ValueError, match="complex influence leaves are the pair storage"):
        gru.step(params, jnp.zeros((2, 4, 1)), bad, jnp.zeros((2, 3)))


def test_pairs_survive_a_checkpoint(tmp_path):
    """An LSTM SnAp-1 learner's state (complex pairs inside) saves and restores bit for bit."""
    learner = sj.OnlineLearner(nn.LSTMCell(4), readout_size=2, method="snap1", optimizer=optax.sgd(0.1))
    state = learner.init(jax.random.key(0), batch_size=2, input_size=1)
    bits = jax.random.bernoulli(jax.random.key(1), 0.5, (5, 2)).astype(jnp.int32)
    state, _, _ = learner.run_jit(state, bits[1:, :, None].astype(jnp.float32), bits[:-1])
    assert {a.dtype for a in jax.tree.leaves(state.method_state)} == {jnp.dtype(jnp.complex64)}
    save_state(tmp_path / "ck", state)
    back = restore_state(tmp_path / "ck", state)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)))
    assert float(sum(jnp.abs(a).sum() for a in jax.tree.leaves(back.method_state))) > 0
