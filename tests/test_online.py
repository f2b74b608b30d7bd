"""OnlineLearner: learning, exactness against BPTT (RTRL and TBPTT), loss masks, flax cells,
non-finite robustness, jit tracing, update periods and weight masks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from conftest import tree_rel_err
from snapjax.online import OnlineLearner, softmax_xent_loss


def bit_task(key, T, B):
    """x_t random bits, target y_t = x_{t-1} (y_0 = 0)."""
    bits = jax.random.bernoulli(key, 0.5, (T + 1, B)).astype(jnp.int32)
    return bits[1:, :, None].astype(jnp.float32), bits[:-1]


def test_learns_previous_bit_online():
    # The README example: a 15-line training loop with optax.adam.
    learner = OnlineLearner(nn.GRUCell(16), readout_size=2, method="snap1", optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(0), None, batch_size=8, input_size=1)
    xs, ys = bit_task(jax.random.key(1), 300, 8)
    state, logits, metrics = learner.run_jit(state, xs, ys)
    loss = np.asarray(metrics["loss"])
    assert loss[:20].mean() > 0.5  # chance level is ln 2 = 0.69
    assert loss[-50:].mean() < 0.1 * loss[:20].mean()
    assert int(metrics["skipped"][-1]) == 0
    assert logits.shape == (300, 8, 2) and bool(metrics["updated"].all())
    acc = (np.asarray(logits[-50:]).argmax(-1) == np.asarray(ys[-50:])).mean()
    assert acc > 0.95


def _capture_grads():
    """An optax transformation whose state is the last gradient it received (and no update)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def _captured(state):
    return state.opt_state.inner_state[0]


def _reference_grads(cell, params, xs, ys, masks):
    """BPTT gradient (cell, via snapjax.bptt_gradient) + readout gradient of Σ_t masked mean xent."""
    dense = nn.Dense(params["readout"]["kernel"].shape[1])
    spec = sj.as_cell_spec(cell)
    carry0 = spec.from_internal(spec.zero_state(xs.shape[1], xs.dtype))

    def step_loss(ro, h, y, m):
        per = softmax_xent_loss(dense.apply({"params": ro}, h), y)
        return jnp.sum(per * m) / jnp.maximum(m.sum(), 1)

    ref = sj.bptt_gradient(
        cell, params["cell"], carry0, xs, (ys, masks), lambda h, ym: step_loss(params["readout"], h, *ym)
    )
    g_ro = jax.grad(lambda ro: jnp.sum(jax.vmap(lambda h, y, m: step_loss(ro, h, y, m))(ref.outputs, ys, masks)))(
        params["readout"]
    )
    return {"cell": ref.grads, "readout": g_ro}, ref


@pytest.mark.parametrize("method", ["rtrl", "tbptt"])
def test_window_gradient_equals_bptt_and_masks(x64, method):
    """With the update at the end of the sequence, exact RTRL's summed online gradient and
    TBPTT with W = T both equal the BPTT gradient; masked steps contribute nothing."""
    T, B, n_in, units = 7, 3, 2, 5
    cell = sj.GRUCell(units, param_dtype=jnp.float64)
    kw = dict(tbptt_window=T) if method == "tbptt" else {}
    learner = OnlineLearner(cell, 3, method=method, optimizer=_capture_grads(), update_every=1 if kw else T, **kw)
    state0 = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    ks = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(ks[0], (T, B, n_in), jnp.float64)
    ys = jax.random.randint(ks[1], (T, B), 0, 3)
    masks = (jax.random.uniform(ks[2], (T, B)) < 0.6).astype(jnp.float64).at[2].set(0.0)
    run = jax.jit(learner.run)
    state, logits, metrics = run(state0, xs, ys, masks)
    assert np.asarray(metrics["updated"]).tolist() == [False] * (T - 1) + [True]
    want, ref = _reference_grads(cell, state0.params, xs, ys, masks)
    assert tree_rel_err(_captured(state), want) < 1e-10
    np.testing.assert_allclose(metrics["loss"].sum(), ref.loss, rtol=1e-12)
    # Garbage targets on masked (example, step) pairs change nothing.
    ys2 = jnp.where(masks > 0, ys, (ys + 1) % 3)
    state2, _, metrics2 = run(state0, xs, ys2, masks)
    chex.assert_trees_all_equal(_captured(state2), _captured(state))
    chex.assert_trees_all_equal(metrics2["loss"], metrics["loss"])


@pytest.mark.slow
def test_all_masked_steps_leave_params_unchanged():
    learner = OnlineLearner(sj.VanillaCell(6), 2, method="snap1", optimizer=optax.adam(1e-1))
    state0 = learner.init(jax.random.key(0), None, batch_size=4, input_size=3)
    xs = jax.random.normal(jax.random.key(2), (5, 4, 3))
    ys = jnp.ones((5, 4), jnp.int32)
    state, _, metrics = jax.jit(learner.run)(state0, xs, ys, jnp.zeros((5, 4)))
    chex.assert_trees_all_equal(state.params, state0.params)
    assert np.all(np.asarray(metrics["loss"]) == 0)


@pytest.mark.parametrize(
    "cell",
    [
        nn.GRUCell(5),
        pytest.param(nn.LSTMCell(5), marks=pytest.mark.slow),
        pytest.param(nn.SimpleCell(5), marks=pytest.mark.slow),
    ],
    ids=lambda c: type(c).__name__,
)
def test_flax_linen_cells(cell):
    """Parameters from flax.linen cell.init are used unchanged; the forward pass matches flax."""
    B, n_in, T = 2, 3, 4
    key = jax.random.key(3)
    carry0 = cell.initialize_carry(key, (B, n_in))
    variables = cell.init(key, carry0, jnp.zeros((B, n_in)))
    learner = OnlineLearner(cell, 2, method="rtrl", optimizer=optax.sgd(0.0))
    state = learner.init(jax.random.key(0), variables, batch_size=B, input_size=n_in)
    chex.assert_trees_all_equal(state.params["cell"], variables["params"])
    xs = jax.random.normal(jax.random.key(4), (T, B, n_in))
    state, logits, metrics = jax.jit(learner.run)(state, xs, jnp.zeros((T, B), jnp.int32))
    carry = carry0
    for t in range(T):
        carry, h = cell.apply(variables, carry, xs[t])
    np.testing.assert_allclose(learner.spec.output(state.carry), h, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(metrics["loss"])).all()


def test_flax_cells_params_accepted():
    """All three supported flax.linen cells: parameters from cell.init are taken unchanged."""
    for cell in (nn.LSTMCell(3), nn.SimpleCell(3)):
        variables = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(0), (1, 2)), jnp.zeros((1, 2)))
        learner = OnlineLearner(cell, 2, method="rtrl")
        state = learner.init(jax.random.key(0), variables["params"], batch_size=1, input_size=2)
        chex.assert_trees_all_equal(state.params["cell"], variables["params"])
        assert state.carry.shape == (1, 3, learner.spec.state_dim)


def test_unsupported_cells_raise():
    for cell in (nn.OptimizedLSTMCell(4), nn.MGUCell(4)):
        with pytest.raises(ValueError, match="unsupported cell"):
            OnlineLearner(cell, 2)
    with pytest.raises(ValueError):
        OnlineLearner(nn.GRUCell(4), 2, method="bogus")
    with pytest.raises(ValueError):
        OnlineLearner(nn.GRUCell(4), 2, method="tbptt")  # no window


def test_nonfinite_inputs_do_not_corrupt_state():
    B, n_in, T = 4, 2, 12
    learner = OnlineLearner(nn.GRUCell(6), 2, method="snap1", optimizer=optax.adam(1e-2), update_every=2)
    state0 = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    xs = jax.random.normal(jax.random.key(5), (T, B, n_in))
    xs = xs.at[3, 1, 0].set(jnp.nan).at[6, 2, 1].set(jnp.inf).at[8].set(1e30)  # NaN, Inf, exploding
    ys = jnp.zeros((T, B), jnp.int32)
    state, logits, metrics = jax.jit(learner.run)(state0, xs, ys)
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.carry, state.method_state, state.grad_acc)):
        assert np.isfinite(np.asarray(leaf)).all()
    skipped = np.asarray(metrics["skipped"])
    assert skipped[-1] >= 1 and int(state.skipped) == skipped[-1]
    assert int(state.resets) >= 2
    # updates after the bad steps are applied again
    assert not np.array_equal(np.asarray(state.params["readout"]["bias"]), np.asarray(state0.params["readout"]["bias"]))
    assert skipped[-1] < T // 2


def test_run_traces_once_and_update_every():
    B, n_in, T, K = 2, 2, 6, 3
    learner = OnlineLearner(sj.LSTMCell(4), 2, method="snap2", optimizer=optax.sgd(0.1), update_every=K)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(state, xs, ys):
        return learner.run(state, xs, ys)

    state = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    p0 = state.params
    xs = jax.random.normal(jax.random.key(6), (T, B, n_in))
    ys = jnp.ones((T, B), jnp.int32)
    state, _, m = run(state, xs, ys)
    state, _, m = run(state, xs + 1.0, ys)  # same shapes: no retrace
    assert np.asarray(m["updated"]).tolist() == [False, False, True] * 2
    assert int(state.step) == 2 * T
    assert not np.array_equal(np.asarray(state.params["cell"]["hi"]["kernel"]), np.asarray(p0["cell"]["hi"]["kernel"]))
    # grad_acc is zero right after an update
    chex.assert_trees_all_equal(state.grad_acc, jax.tree.map(jnp.zeros_like, state.grad_acc))


def test_weight_masks_stay_exactly_zero_and_reset_carry():
    units, n_in, B = 6, 3, 3
    rng = np.random.default_rng(0)
    masks = {"h": rng.random((units, units)) < 0.5, "i": rng.random((n_in, units)) < 0.5}
    opt = optax.adamw(1e-1, weight_decay=0.5)  # weight decay would move zero weights
    learner = OnlineLearner(sj.VanillaCell(units), 2, method="snap2", optimizer=opt, masks=masks)
    state = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    for name, m in masks.items():
        assert np.all(np.asarray(state.params["cell"][name]["kernel"])[~m] == 0)
    xs = jax.random.normal(jax.random.key(7), (8, B, n_in))
    state, _, _ = jax.jit(learner.run)(state, xs, jnp.ones((8, B), jnp.int32))
    for name, m in masks.items():
        k = np.asarray(state.params["cell"][name]["kernel"])
        assert np.all(k[~m] == 0) and np.any(k[m] != 0)
    reset = learner.reset_carry(state, jnp.array([True, False, True]))
    assert np.all(np.asarray(reset.carry[0]) == 0) and np.all(np.asarray(reset.carry[2]) == 0)
    np.testing.assert_array_equal(reset.carry[1], state.carry[1])
    for a, b in zip(jax.tree.leaves(reset.method_state), jax.tree.leaves(state.method_state)):
        assert np.all(np.asarray(a[0]) == 0)
        np.testing.assert_array_equal(a[1], b[1])
    chex.assert_trees_all_equal(reset.params, state.params)


def test_uoro_method_runs_and_stays_finite():
    pytest.importorskip("snapjax.uoro")
    learner = OnlineLearner(nn.GRUCell(4), 2, method="uoro", optimizer=optax.adam(1e-2), update_every=2)
    state = learner.init(jax.random.key(0), None, batch_size=2, input_size=1)
    xs, ys = bit_task(jax.random.key(1), 6, 2)
    xs = xs.at[2, 0].set(jnp.nan)
    state, _, metrics = jax.jit(learner.run)(state, xs, ys)
    assert int(state.step) == 6 and int(metrics["skipped"][-1]) >= 1
    for leaf in jax.tree.leaves((state.params, state.carry, state.method_state.s_tilde, state.method_state.theta_tilde)):
        assert np.isfinite(np.asarray(leaf)).all()
    reset = learner.reset_carry(state)
    assert np.all(np.asarray(reset.method_state.s_tilde) == 0)


@pytest.mark.parametrize("method", ["snap1", "uoro"])
def test_skip_unscored_updates_leaves_params_and_opt_state_bit_identical(method):
    """With skip_unscored_updates=True a step whose mask is all zero makes no optimizer call;
    by default Adam still moves the parameters (momentum) on such a step."""
    B, n_in, T = 3, 2, 4
    xs = jax.random.normal(jax.random.key(8), (T + 1, B, n_in))
    ys = jnp.ones((T + 1, B), jnp.int32)
    masks = jnp.ones((T + 1, B)).at[T].set(0.0)  # T scored steps, then a fully masked one
    masks = masks.at[1, 0].set(0.0)  # a partly masked step is still scored
    kw = dict(method=method, optimizer=optax.adam(1e-2))
    skip = OnlineLearner(nn.GRUCell(4), 2, skip_unscored_updates=True, **kw)
    default = OnlineLearner(nn.GRUCell(4), 2, **kw)
    out = {}
    for name, learner in (("skip", skip), ("default", default)):
        run = jax.jit(learner.run)
        state0 = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
        state, _, m1 = run(state0, xs[:T], ys[:T], masks[:T])
        after, _, m2 = run(state, xs[T:], ys[T:], masks[T:])
        out[name] = (state0, state, after, m1, m2)
    # Same updates on the scored steps (same maths; equal up to XLA rounding).
    chex.assert_trees_all_close(out["skip"][1].params, out["default"][1].params, rtol=1e-6, atol=1e-7)
    assert np.asarray(out["skip"][3]["updated"]).tolist() == [True] * T
    # Fully masked step: no update with the option ...
    _, state, after, _, m2 = out["skip"]
    assert np.asarray(m2["updated"]).tolist() == [False]
    chex.assert_trees_all_equal(after.params, state.params)
    chex.assert_trees_all_equal(after.opt_state, state.opt_state)
    chex.assert_trees_all_equal(after.grad_acc, jax.tree.map(jnp.zeros_like, after.grad_acc))
    assert int(after.step) == T + 1
    assert not np.array_equal(np.asarray(after.carry), np.asarray(state.carry))  # state advances
    # ... while the default applies Adam to a zero gradient, which moves the parameters.
    _, state_d, after_d, _, m2_d = out["default"]
    assert np.asarray(m2_d["updated"]).tolist() == [True]
    assert not np.array_equal(
        np.asarray(after_d.params["readout"]["kernel"]), np.asarray(state_d.params["readout"]["kernel"])
    )


def test_skip_unscored_updates_traces_once_and_tbptt_windows():
    """The option compiles once for mixed chunks; TBPTT skips windows with no scored example."""
    B, n_in, W = 2, 2, 3
    learner = OnlineLearner(sj.GRUCell(4), 2, method="snap1", optimizer=optax.adam(1e-2), skip_unscored_updates=True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(state, xs, ys, ms):
        return learner.run(state, xs, ys, ms)

    state = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    xs = jax.random.normal(jax.random.key(9), (4, B, n_in))
    ys = jnp.zeros((4, B), jnp.int32)
    pattern = jnp.array([[0, 0], [1, 0], [0, 0], [1, 1]], jnp.float32)
    state, _, m = run(state, xs, ys, pattern)
    state, _, m2 = run(state, xs + 1.0, ys, 1.0 - pattern)  # same shapes: no retrace
    assert np.asarray(m["updated"]).tolist() == [False, True, False, True]
    assert np.asarray(m2["updated"]).tolist() == [True, True, True, False]

    tb = OnlineLearner(sj.GRUCell(4), 2, method="tbptt", tbptt_window=W, optimizer=optax.adam(1e-2),
                       skip_unscored_updates=True)
    st0 = tb.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    xs = jax.random.normal(jax.random.key(10), (3 * W, B, n_in))
    ys = jnp.zeros((3 * W, B), jnp.int32)
    ms = jnp.zeros((3 * W, B)).at[W + 1, 1].set(1.0)  # only the second window is scored
    st1, _, m = jax.jit(tb.run)(st0, xs[:W], ys[:W], ms[:W])
    assert not np.asarray(m["updated"]).any()
    chex.assert_trees_all_equal((st1.params, st1.opt_state), (st0.params, st0.opt_state))
    st2, _, m = jax.jit(tb.run)(st1, xs[W:2 * W], ys[W:2 * W], ms[W:2 * W])
    assert np.asarray(m["updated"]).tolist() == [False, False, True]
    assert not np.array_equal(np.asarray(st2.params["readout"]["bias"]), np.asarray(st1.params["readout"]["bias"]))
    st3, _, m = jax.jit(tb.run)(st2, xs[2 * W:], ys[2 * W:], ms[2 * W:])
    assert not np.asarray(m["updated"]).any()
    chex.assert_trees_all_equal((st3.params, st3.opt_state), (st2.params, st2.opt_state))

    with pytest.raises(ValueError, match="update_every=1"):
        OnlineLearner(sj.GRUCell(4), 2, update_every=2, skip_unscored_updates=True)


def test_raw_uint32_keys_are_wrapped_as_typed_keys():
    """A legacy ``jax.random.PRNGKey`` gives the same run as the typed key with the same data,
    and the state's running key is a typed key (kept across resets, not treated as batched)."""
    learner = OnlineLearner(nn.GRUCell(4), 2, method="uoro", optimizer=optax.adam(1e-2))
    xs = jax.random.normal(jax.random.key(1), (6, 2, 3))
    ys = jnp.zeros((6, 2), jnp.int32)
    out = {}
    for name, key in (("raw", jax.random.PRNGKey(0)), ("typed", jax.random.key(0))):
        st = learner.init(key, None, batch_size=2, input_size=3)
        assert jnp.issubdtype(st.key.dtype, jax.dtypes.prng_key)
        st, _, _ = learner.run(st, xs, ys)
        st2 = learner.reset_carry(st)
        assert jnp.issubdtype(st2.key.dtype, jax.dtypes.prng_key)
        out[name] = st
    assert tree_rel_err(out["raw"].params, out["typed"].params) == 0.0
    with pytest.raises(ValueError, match="PRNG key"):
        learner.init(jnp.zeros((2,), jnp.float32), None, batch_size=2, input_size=3)
    # the UORO tracker itself wraps a raw key the same way (so do drivers that init it directly)
    ms = learner.tracker(out["raw"].params["cell"]).init(2, key=jax.random.PRNGKey(3))
    assert jnp.issubdtype(ms.key.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(ms.key), jax.random.key_data(jax.random.key(3)))
