"""No silent wrong results, round two (issue #22), streams: a fault in a chunked period stays
in its example, checkpoints restore only into a template with the same leaves, chunked methods
notice parameters changed mid-chunk, and shape slips and long-run counters give clear
snapjax errors or documented behaviour. Each test names the class it covers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import snapjax as sj
from snapjax.methods.chunked_sweeps import params_fingerprint
from snapjax.training.update import COUNT_MAX, saturating_add


# -- item 5: a fault in a chunked period is contained per example, as per step ---------------
def _fault_run(method, chunked, faults, cell=None):
    B, T, n_in = 3, 12, 2
    cell = nn.GRUCell(4, param_dtype=jnp.float64) if cell is None else cell
    learner = sj.OnlineLearner(cell, readout_size=2, method=method, optimizer=optax.sgd(0.1), update_every=4,
                               chunked=chunked)
    state = learner.init(jax.random.key(0), batch_size=B, input_size=n_in)
    assert ("chunk4" in learner.methods(state.params)[0].name) == chunked
    xs = jax.random.normal(jax.random.key(1), (T, B, n_in), jnp.float64)
    ys = jax.random.randint(jax.random.key(2), (T, B), 0, 2)
    run = jax.jit(learner.run)
    return [run(state, xs.at[t, b, 0].set(v), ys)[::2] for t, b, v in faults]


@pytest.mark.parametrize("method", ["rtrl", "snap1"])
def test_a_fault_in_a_chunked_period_is_contained_per_example(method, x64):
    """float64, GRU, B = 3, update_every = 4: a NaN in one example's input mid-chunk (and an
    infinite input, whose carry stays finite, at a chunk's first and last step) gives the
    per-step learner's parameters, resets and skipped counts."""
    faults = [(5, 1, jnp.nan), (4, 0, jnp.inf), (7, 2, jnp.inf)]
    chunked, per_step = _fault_run(method, True, faults), _fault_run(method, False, faults)
    for (a, ma), (b, mb) in zip(chunked, per_step):
        for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(p, q, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(ma["resets"], mb["resets"])
        np.testing.assert_array_equal(ma["skipped"], mb["skipped"])
        assert int(ma["resets"][-1]) == 1 and int(ma["skipped"][-1]) == 0


# -- item 9: a checkpoint restores only into a template with the same leaves ------------------
def test_restore_into_a_template_with_other_leaves_names_them(tmp_path):
    """A linen GRU learner's checkpoint (with the ``hn`` bias) into an nnx GRU learner (without
    it), and back: refused, naming the leaf paths on both sides; a wrong shape names the path."""
    linen = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    nnx_learner = sj.OnlineLearner(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), readout_size=2)
    a = linen.init(jax.random.key(0), batch_size=2, input_size=3)
    b = nnx_learner.init(jax.random.key(0), batch_size=2, input_size=3)
    sj.save_state(tmp_path / "linen.ckpt", a)
    sj.save_state(tmp_path / "nnx.ckpt", b)
    bias = r"\.params\['layers_0'\]\['hn'\]\['bias'\]"
    with pytest.raises(ValueError, match=r"linen\.ckpt does not match the template's structure: leaves in the "
                                         r"checkpoint but not in the template: .*" + bias + r".*; leaves in the "
                                         r"template but not in the checkpoint: none"):
        sj.restore_state(tmp_path / "linen.ckpt", b)
    with pytest.raises(ValueError, match=r"in the checkpoint but not in the template: none; leaves in the template "
                                         r"but not in the checkpoint: .*\.opt_state\[0\]\.mu\['layers_0'\]\['hn'\]"
                                         r"\['bias'\].*" + bias):
        sj.restore_state(tmp_path / "nnx.ckpt", jax.eval_shape(lambda: a))
    wide = sj.OnlineLearner(nn.GRUCell(5), readout_size=2).init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match=r"leaf " + bias + r" is \(4,\)/float32, the template expects \(5,\)/float32"):
        sj.restore_state(tmp_path / "linen.ckpt", wide)
    back = sj.restore_state(tmp_path / "linen.ckpt", jax.eval_shape(lambda: a))  # the right template still works
    chex.assert_trees_all_equal(back, a)


# -- item 13: an optimizer stepping inside a chunk is detected -------------------------------
def _user_loop(method, params, xs, optimizer, every):
    """A user's own loop: step, gradient, and the optimizer every ``every`` steps."""
    B = xs.shape[1]
    carry, state, opt_state = method.init_carry(B, xs.dtype), method.init(B, xs.dtype), optimizer.init(params)

    @jax.jit
    def one(p, c, s, x):
        c, s, _ = method.step(p, c, s, x)
        g, s = method.gradient(p, s, c)  # the loss Σ_t Σ h_t
        return c, s, g

    acc, grads = jax.tree.map(jnp.zeros_like, params), []
    for t in range(xs.shape[0]):
        carry, state, g = one(params, carry, state, xs[t])
        grads.append(g)
        acc = jax.tree.map(jnp.add, acc, g)
        if (t + 1) % every == 0:
            updates, opt_state = optimizer.update(acc, opt_state, params)
            params, acc = optax.apply_updates(params, updates), jax.tree.map(jnp.zeros_like, acc)
    return params, grads


@pytest.mark.parametrize("name", ["rtrl", "snap1"])
def test_an_optimizer_stepping_inside_a_chunk_is_detected(name, x64):
    cell = nn.GRUCell(3, param_dtype=jnp.float64)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
    xs = jax.random.normal(jax.random.key(1), (8, 2, 2), jnp.float64)
    chunked, per_step = sj.online_method(name, cell, params, chunk=4), sj.online_method(name, cell, params)
    # correct use (the optimizer at chunk ends): per-step RTRL/SnAp-1, nothing flagged
    a, grads = _user_loop(chunked, params, xs, optax.adam(0.1), 4)
    b, _ = _user_loop(per_step, params, xs, optax.adam(0.1), 4)
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-12)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # misuse: Adam every step moves the parameters after the first chunk's close (momentum);
    # from the next step to the chunk's end the gradient is NaN (optax.apply_if_finite skips it)
    _, grads = _user_loop(chunked, params, xs, optax.adam(0.1), 1)
    flagged = [bool(jnp.all(jnp.isnan(jax.tree.leaves(g)[0]))) for g in grads]
    assert flagged == [False] * 5 + [True] * 3
    # flush sees it too, and a fresh chunk starts clean
    carry, state = chunked.init_carry(2, jnp.float64), chunked.init(2, jnp.float64)
    carry, state, _ = chunked.step(params, carry, state, xs[0])
    _, state = chunked.gradient(params, state, carry)
    moved = jax.tree.map(lambda p: p + 1e-3, params)
    g, state = chunked.flush(moved, state)
    assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(g))
    carry, state, _ = chunked.step(moved, carry, state, xs[1])
    g, state = chunked.gradient(moved, state, carry)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g)) and not bool(state.moved)


def test_the_parameter_fingerprint_is_exact_and_order_free(x64):
    params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.arange(3.0, dtype=jnp.bfloat16),
              "c": jnp.ones((2,), jnp.float32)}
    fp = params_fingerprint(params)
    assert fp.shape == () and fp.dtype == jnp.uint32
    np.testing.assert_array_equal(jax.jit(params_fingerprint)(params), fp)
    one_ulp = {**params, "a": params["a"].at[1, 2].set(jnp.nextafter(params["a"][1, 2], 2.0))}
    swapped = {**params, "a": params["a"][::-1]}  # the same values elsewhere
    for other in (one_ulp, swapped, {**params, "b": params["b"] + 1}):
        assert int(params_fingerprint(other)) != int(fp)


# -- crashes that are now clear snapjax errors ------------------------------------------------
@pytest.fixture
def gru_state():
    learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    return learner, learner.init(jax.random.key(0), batch_size=2, input_size=3)


def test_predict_checks_the_input_size_and_the_carry(gru_state):
    learner, state = gru_state
    with pytest.raises(ValueError, match=r"the inputs have 5 features \(n_in, their last axis\), the model's first "
                                         r"layer takes 3 \(its parameters were built for input_size=3\)"):
        learner.predict(state, jnp.ones((4, 2, 5)))
    dense_first = sj.OnlineLearner([nn.Dense(6), nn.GRUCell(4)], readout_size=2)
    s = dense_first.init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match=r"inputs have 2 features .* first layer takes 3"):
        dense_first.evaluate(s, jnp.ones((4, 2, 2)), jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"carry\[0\] has batch 3, xs \(T, B, n_in\) has batch 2"):
        learner.predict(state, jnp.ones((4, 2, 3)), (jnp.zeros((3, 4)),))
    with pytest.raises(ValueError, match=r"carry must be a tuple of 1 carries .* got ArrayImpl"):
        learner.predict(state, jnp.ones((4, 2, 3)), jnp.zeros((2, 4)))
    outs, carry = learner.predict(state, jnp.ones((4, 2, 3)))  # its own carry continues the stream
    assert learner.predict(state, jnp.ones((1, 2, 3)), carry)[0].shape == (1, 2, 2)


@pytest.mark.parametrize("name,kw", [("rtrl", {}), ("snap1", {}), ("rtrl", {"chunk": 2}), ("snap1", {"chunk": 2})])
def test_a_method_built_for_another_input_size_says_so(name, kw):
    cell = nn.GRUCell(4)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    method = sj.online_method(name, cell, params, **kw)
    with pytest.raises(ValueError, match=r"x must .*shape \(2, 3\), got .*\(2, 5\)"):
        method.step(params, method.init_carry(2), method.init(2), jnp.ones((2, 5)))


def test_a_batch_other_than_the_states_is_named(gru_state):
    learner, state = gru_state
    with pytest.raises(ValueError, match=r"x_t \(3, 3\) \(B, n_in\): batch 3 differs from the state's batch 2"):
        learner.step(state, jnp.ones((3, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"xs \(4, 3, 3\) \(T, B, n_in\): batch 3 differs from the state's batch 2"):
        learner.run(state, jnp.ones((4, 3, 3)), jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"time-major .* \(batch-major\? transpose"):  # the hint stays
        learner.run(state, jnp.ones((2, 4, 3)), jnp.zeros((4, 2), jnp.int32))


def test_fault_counters_saturate_instead_of_wrapping(gru_state):
    """``resets``/``excluded``/``skipped`` are int32 and hold at 2³¹ − 1 (documented)."""
    learner, state = gru_state
    top = COUNT_MAX
    assert top == 2**31 - 1
    state = state._replace(resets=jnp.int32(top - 1), excluded=jnp.int32(top - 1), skipped=jnp.int32(top))
    x = jnp.ones((2, 3)).at[0, 0].set(jnp.nan)  # example 0 is reset
    y = jnp.array([0, 7], jnp.int32)  # example 1's label is out of range: excluded
    for expected in (top, top):  # reaches the top, then stays there
        state, _, m = learner.step(state, x, y)
        assert int(m["resets"]) == int(m["excluded"]) == int(state.resets) == expected
        assert int(m["skipped"]) == top
    assert int(saturating_add(jnp.int32(5), jnp.int32(2))) == 7
    assert int(saturating_add(jnp.int32(top - 2), jnp.int32(2))) == top
    assert int(saturating_add(jnp.int32(top), jnp.int32(0))) == top
