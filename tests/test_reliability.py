"""No silent wrong results: every learner input checked, faults contained per example, long
fault-injected runs resume bit-identically."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj


def gru_learner(method="snap1", units=4, out=3, **kw):
    return sj.OnlineLearner(nn.GRUCell(units), readout_size=out, method=method, optimizer=optax.adam(1e-2), **kw)


@pytest.fixture(scope="module")
def setup():
    learner = gru_learner()
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    xs = jax.random.normal(jax.random.key(1), (5, 4, 2))
    ys = jax.random.randint(jax.random.key(2), (5, 4), 0, 3)
    return learner, state, xs, ys


# ----------------------------------------------------------------- item 1: loss masks
@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 4, 1), (4, 5)])
def test_loss_masks_of_the_wrong_shape_raise(setup, shape):
    learner, state, xs, ys = setup
    with pytest.raises(ValueError, match=r"masks must have shape \(T, B\) = \(5, 4\)"):
        learner.run(state, xs, ys, jnp.ones(shape))


# ----------------------------------------------------------------- item 2: targets
def test_out_of_range_labels_are_excluded_and_counted(setup):
    learner, state, xs, ys = setup
    bad = ys.at[1, 0].set(3).at[2, 3].set(-1)  # 3 == readout_size, -1 would mean "last class"
    run = jax.jit(learner.run)
    s_bad, _, m_bad = run(state, xs, bad)
    assert int(m_bad["excluded"][-1]) == 2 and int(m_bad["skipped"][-1]) == 0
    assert np.all(np.isfinite(np.asarray(m_bad["loss"])))
    # the same as masking those example-steps out
    masks = jnp.ones((5, 4)).at[1, 0].set(0).at[2, 3].set(0)
    s_ref, _, m_ref = run(state, xs, ys, masks)
    chex.assert_trees_all_close(s_bad.params, s_ref.params, atol=1e-6)
    np.testing.assert_allclose(m_bad["loss"], m_ref["loss"], rtol=1e-6)


def test_float_labels_and_one_hot_targets_raise(setup):
    learner, state, xs, ys = setup
    with pytest.raises(ValueError, match="integer labels"):
        learner.run(state, xs, ys.astype(jnp.float32))
    with pytest.raises(ValueError, match="one-hot"):
        learner.run(state, xs, jax.nn.one_hot(ys, 3))


def test_regression_targets_must_match_the_output_shape():
    learner = gru_learner(out=1, loss="mse")
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    xs = jnp.ones((5, 4, 2))
    with pytest.raises(ValueError, match=r"mse targets must have the output's shape \(4, 1\)"):
        learner.run(state, xs, jnp.ones((5, 4)))


def test_batch_major_inputs_get_a_hint(setup):
    learner, state, xs, ys = setup
    with pytest.raises(ValueError, match="time-major"):
        learner.run(state, jnp.ones((4, 5, 2)), ys)
    with pytest.raises(ValueError, match="floating point"):
        learner.run(state, xs.astype(jnp.int32), ys)


def test_custom_loss_must_return_one_value_per_example(setup):
    _, _, xs, ys = setup
    learner = gru_learner(loss=lambda o, y: jnp.mean(o))
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    with pytest.raises(ValueError, match="one value per example"):
        learner.run(state, xs, ys)


# ----------------------------------------------------------------- item 6: weight masks
def test_weight_masks_are_checked():
    p = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 2)))["params"]
    with pytest.raises(ValueError, match="unknown projection 'bogus'"):
        gru_learner(masks={"bogus": np.ones((4, 4))}).init(jax.random.key(0), batch_size=2, input_size=2)
    half = {"hr": np.full(np.shape(p["hr"]["kernel"]), 0.5)}
    with pytest.raises(ValueError, match="0/1"):
        gru_learner(method="tbptt", tbptt_window=2, masks=half).init(jax.random.key(0), batch_size=2, input_size=2)


def test_unknown_method_and_missing_window_raise():
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        gru_learner(method="bogus")
    with pytest.raises(ValueError, match="tbptt_window"):
        gru_learner(method="tbptt")


# ----------------------------------------------------------------- item 3: containment
@pytest.mark.parametrize("method,kw", [("snap1", {}), ("rtrl", {}), ("uoro", {}), ("tbptt", {"tbptt_window": 4}),
                                       ("tbptt", {"tbptt_window": 4, "units": 4})])
def test_only_the_faulty_example_is_reset(method, kw):
    B, T = 4, 12
    learner = sj.OnlineLearner(nn.GRUCell(kw.pop("units", 5)), readout_size=2, method=method,
                               optimizer=optax.sgd(0.0), **kw)
    state = learner.init(jax.random.key(0), batch_size=B, input_size=1)
    xs = jax.random.normal(jax.random.key(1), (T, B, 1))
    ys = jax.random.randint(jax.random.key(2), (T, B), 0, 2)
    run = jax.jit(learner.run)
    _, out_clean, _ = run(state, xs, ys)
    _, out_bad, m = run(state, xs.at[5, 1, 0].set(jnp.nan), ys)
    assert int(m["resets"][-1]) == 1  # one example-step
    healthy = np.array([0, 2, 3])
    np.testing.assert_array_equal(np.asarray(out_bad)[:, healthy], np.asarray(out_clean)[:, healthy])
    # the faulty example restarts from the zero carry after its fault
    _, out_restart, _ = run(learner.reset_carry(state), xs[6:], ys[6:])
    np.testing.assert_allclose(np.asarray(out_bad)[6:, 1], np.asarray(out_restart)[:, 1], rtol=1e-5, atol=1e-6)


def test_tbptt_window_gradient_excludes_only_the_faulty_example(x64):
    """float64: with a NaN input at (t=3, b=1), the TBPTT window gradient equals jax.grad of
    the loss where example 1 is unscored at t=3 and restarts from the zero carry at t=4."""
    B, T, t_bad = 3, 8, 3
    grab = optax.GradientTransformation(lambda p: p, lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    cell, head = nn.GRUCell(3), nn.Dense(2)
    learner = sj.OnlineLearner([cell, head], method="tbptt", tbptt_window=T, optimizer=grab)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), learner.online_model.init(jax.random.key(0), 1))
    state = learner.init(jax.random.key(0), params, batch_size=B, input_size=1)
    xs = jax.random.normal(jax.random.key(1), (T, B, 1), jnp.float64)
    ys = jax.random.randint(jax.random.key(2), (T, B), 0, 2)
    s_bad, _, m = jax.jit(learner.run)(state, xs.at[t_bad, 1, 0].set(jnp.nan), ys)
    assert int(m["resets"][-1]) == 1
    got = learner.optimizer_state(s_bad)

    mask = jnp.ones((T, B)).at[t_bad, 1].set(0)
    restart = jnp.zeros((T, B), bool).at[t_bad + 1, 1].set(True)

    def loss(p):
        def body(h, inp):
            x, y, mk, z = inp
            h = jnp.where(z[:, None], 0.0, h)
            h, out = cell.apply({"params": p["layers_0"]}, h, x)
            per = optax.softmax_cross_entropy_with_integer_labels(head.apply({"params": p["layers_1"]}, out), y)
            return h, jnp.sum(per * mk) / jnp.sum(mk)

        return jax.lax.scan(body, jnp.zeros((B, 3)), (xs, ys, mask, restart))[1].sum()

    ref = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- fault injection
# 2,048 steps (about 160 faulty inputs and 160 faulty targets) fast; the 10,240-step run is slow.
@pytest.mark.parametrize("chunks", [4, pytest.param(20, marks=pytest.mark.slow)])
def test_fault_injection_long_run_resumes_bit_identically(tmp_path, chunks):
    """``chunks`` x 512 steps with NaN/Inf/1e30 in ~1% of inputs and ~1% of targets; checkpoint
    mid-run."""
    B, n_in, chunk = 8, 2, 512
    rng = np.random.default_rng(0)
    T = chunk * chunks
    xs = rng.normal(size=(T, B, n_in)).astype(np.float32)
    ys = (xs[:, :, :1] + np.roll(xs[:, :, 1:], 1, axis=0)).astype(np.float32)
    bad_x = rng.random((T, B)) < 0.01
    bad_y = rng.random((T, B)) < 0.01
    vals = np.array([np.nan, np.inf, 1e30], np.float32)
    kind_x = rng.integers(0, 3, size=(T, B))
    kind_y = rng.integers(0, 3, size=(T, B))
    xs[bad_x, 0] = vals[kind_x[bad_x]]
    ys[bad_y, 0] = vals[kind_y[bad_y]]
    input_faults = bad_x & (kind_x < 2)  # NaN / Inf make the state non-finite; 1e30 saturates
    learner = sj.OnlineLearner(nn.GRUCell(6), readout_size=1, loss="mse", method="snap1",
                               optimizer=optax.adam(1e-3))
    run = jax.jit(learner.run)
    state0 = learner.init(jax.random.key(0), batch_size=B, input_size=n_in)

    def go(state, lo, hi):
        for c in range(lo, hi):
            sl = slice(c * chunk, (c + 1) * chunk)
            state, _, metrics = run(state, xs[sl], ys[sl])
        return state, metrics

    full, metrics = go(state0, 0, chunks)
    half, _ = go(state0, 0, chunks // 2)
    sj.save_state(tmp_path / "mid.ckpt", half)
    resumed = sj.restore_state(tmp_path / "mid.ckpt", learner.init(jax.random.key(9), batch_size=B, input_size=n_in))
    resumed, metrics_r = go(resumed, chunks // 2, chunks)
    chex.assert_trees_all_equal(resumed, full)
    chex.assert_trees_all_equal(metrics_r, metrics)
    flat = jax.flatten_util.ravel_pytree(full.params)[0]
    assert bool(jnp.all(jnp.isfinite(flat)))
    assert int(full.resets) == int(input_faults.sum())
    assert int(full.excluded) == int((bad_y & ~input_faults).sum())
    assert int(full.skipped) == 0
    assert int(full.step) == T


def test_given_parameters_are_checked_against_the_layer():
    learner = gru_learner()
    p = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 2)))["params"]
    with pytest.raises(ValueError, match="structure"):
        learner.init(jax.random.key(0), {"layers_0": {k: v for k, v in p.items() if k != "hr"}}, batch_size=2, input_size=2)
    bad = {**p, "ir": {**p["ir"], "kernel": jnp.zeros((3, 4))}}
    with pytest.raises(ValueError, match=r"leaf of shape \(3, 4\)"):
        learner.init(jax.random.key(0), {"layers_0": bad}, batch_size=2, input_size=2)
    with pytest.raises(ValueError, match="unknown layers"):
        learner.init(jax.random.key(0), {"layers_7": p}, batch_size=2, input_size=2)
