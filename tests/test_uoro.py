"""UORO on the OnlineMethod interface: unbiasedness of the online gradient (statistical tests
with power checks) on a compressed GRU, a generic layer-norm GRU and an LSTM (tuple carry);
protocol, key handling, masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import snapjax as sj
from snapjax.methods.uoro import UORO, UOROState, uoro_method
from test_generic import LNGRU, _bptt, _loss  # shared references

UNITS, N_IN, BATCH, T = 4, 3, 1, 5
N_RUNS = 3000
Z_MAX = 5.0


def _setup(masks_density=None, module=None):
    module = sj.GRUCell(UNITS, param_dtype=jnp.float64) if module is None else module
    k = jax.random.split(jax.random.key(0), 4)
    carry = module.initialize_carry(k[0], (BATCH, N_IN))
    carry = jax.tree.map(lambda c: 0.5 * jax.random.normal(k[3], c.shape, jnp.float64), carry)
    xs = jax.random.normal(k[1], (T, BATCH, N_IN), jnp.float64)
    ys = jax.random.normal(k[2], (T, BATCH, UNITS), jnp.float64)
    params = module.init(k[0], carry, xs[0])["params"]
    masks = None
    if masks_density is not None:
        rng = np.random.default_rng(3)
        masks = {name: rng.random(np.shape(params[name]["kernel"])) < masks_density
                 for name in sorted(params) if "kernel" in params[name]}
    return module, params, carry, xs, ys, masks


def _flat(tree, lead=()):
    return jnp.concatenate([jnp.reshape(x, lead + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def _online(method, params, carry, xs, ys, state):
    """Summed online gradient, driven by lax.scan through the OnlineMethod interface."""

    def body(c, inp):
        carry, st, acc = c
        x, y = inp
        carry, st, _ = method.step(params, carry, st, x)
        dl = jax.grad(lambda cc: _loss(method.cell.output(cc), y))(carry)
        g, st = method.gradient(params, st, dl)
        return (carry, st, jax.tree.map(jnp.add, acc, g)), carry

    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, state_dtype(state)), params)
    (_, _, grads), carries = lax.scan(body, (carry, state, zero), (xs, ys))
    return grads, carries


def state_dtype(state):
    return jax.tree.leaves(state.theta_tilde)[0].dtype


def _uoro_samples(module, params, carry, xs, ys, masks, n_runs, seed):
    method = sj.online_method("uoro", module, params, masks=masks)
    assert isinstance(method, UORO)

    def one(key):
        return _online(method, params, carry, xs, ys, method.init(BATCH, jnp.float64, key=key))[0]

    g = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), n_runs))
    return _flat(g, (n_runs,))


@pytest.fixture(scope="module")
def samples():
    with jax.enable_x64(True):
        module, params, carry, xs, ys, _ = _setup()
        G = np.asarray(_uoro_samples(module, params, carry, xs, ys, None, N_RUNS, seed=42))
        exact = np.asarray(_flat(_bptt(sj.as_recurrent(module), params, carry, xs, ys)))
        g1 = _snap1(sj.online_method("snap1", module, params), params, carry, xs, ys)
        return G, exact, np.asarray(_flat(g1))


def _snap1(method, params, carry, xs, ys):
    def body(c, inp):
        carry, st = c
        carry, st, _ = method.step(params, carry, st, inp[0])
        g, st = method.gradient(params, st, jax.grad(lambda cc: _loss(method.cell.output(cc), inp[1]))(carry))
        return (carry, st), g

    gs = lax.scan(body, (carry, method.init(BATCH, jnp.float64)), (xs, ys))[1]
    return jax.tree.map(lambda a: a.sum(0), gs)


def _z(G, target):
    # z-score of the sample mean of N iid estimates against `target`, per parameter entry.
    mean = G.mean(axis=0)
    se = G.std(axis=0, ddof=1) / np.sqrt(G.shape[0])
    return (mean - target) / (se + 1e-12), se


def test_uoro_unbiased(samples):
    """Each UORO run (independent key) gives an unbiased estimate of the BPTT/RTRL gradient.

    Justification of the threshold: the N = 3000 runs are iid, so by the CLT the sample mean of
    each entry is ≈ Normal(true mean, SE²), SE = sd/√N estimated from the sample.  Under
    H0 (unbiased), P(|z| > 5) ≈ 5.7e-7 per entry; with p = 100 entries (GRU 4 units, 3 inputs)
    a Bonferroni bound gives a family-wise false alarm rate < 1e-4 (and the seeds are fixed,
    so the test is deterministic).  The tiny absolute tolerance only covers entries whose
    estimate is exactly zero (SE = 0).
    """
    G, exact, _ = samples
    assert np.all(np.isfinite(G))
    z, se = _z(G, exact)
    assert G.shape[1] == exact.size == 100
    bad = np.abs(G.mean(0) - exact) >= Z_MAX * se + 1e-10
    assert not bad.any(), f"max |z| = {np.abs(z).max():.2f} on {bad.sum()} entries"


def test_test_has_power(samples):
    """The same z-test rejects wrong means: a single run, and SnAp-1's (biased) gradient."""
    G, exact, snap1 = samples
    _, se = _z(G, exact)
    # A single UORO sample deviates by ~sd = √N·SE from the truth: far outside 5 SE somewhere.
    assert np.any(np.abs(G[0] - exact) > Z_MAX * se)
    # SnAp-1 is a biased approximation: the test tells its gradient apart from UORO's mean.
    assert np.any(np.abs(G.mean(0) - snap1) > Z_MAX * se)
    # ... and UORO's mean is much closer to the exact gradient than a single run is.
    assert np.linalg.norm(G.mean(0) - exact) < 0.2 * np.linalg.norm(G[0] - exact)


def test_uoro_unbiased_generic_layernorm_gru(x64):
    """Same z-test on a cell without a compressed form (flax module, LayerNorm'd candidate):
    p = 108 entries, N = 3000, Bonferroni family-wise false alarm < 1e-4.  Power: a single
    run is rejected."""
    module, params, carry, xs, ys, _ = _setup(module=LNGRU(UNITS))
    assert sj.as_recurrent(module).spec is None
    G = np.asarray(_uoro_samples(module, params, carry, xs, ys, None, N_RUNS, seed=8))
    exact = np.asarray(_flat(_bptt(sj.as_recurrent(module), params, carry, xs, ys)))
    assert np.all(np.isfinite(G)) and G.shape[1] == exact.size == 108
    z, se = _z(G, exact)
    bad = np.abs(G.mean(0) - exact) >= Z_MAX * se + 1e-10
    assert not bad.any(), f"max |z| = {np.abs(z).max():.2f} on {bad.sum()} entries"
    assert np.any(np.abs(G[0] - exact) > Z_MAX * se)


def test_uoro_unbiased_lstm_tuple_carry(x64):
    """Tuple carry (c, h): s̃ and ν have the carry's structure (z-test, N = 2000, p = 128)."""
    module, params, carry, xs, ys, _ = _setup(module=nn.LSTMCell(UNITS, param_dtype=jnp.float64))
    G = np.asarray(_uoro_samples(module, params, carry, xs, ys, None, 2000, seed=9))
    exact = np.asarray(_flat(_bptt(sj.as_recurrent(module), params, carry, xs, ys)))
    assert G.shape[1] == exact.size == 128
    z, se = _z(G, exact)
    bad = np.abs(G.mean(0) - exact) >= Z_MAX * se + 1e-10
    assert not bad.any(), f"max |z| = {np.abs(z).max():.2f} on {bad.sum()} entries"
    assert np.any(np.abs(G[0] - exact) > Z_MAX * se)


def test_uoro_protocol_and_state(x64):
    module, params, carry, xs, ys, _ = _setup()
    method = uoro_method(module, params)
    assert method.name == "uoro" and method.period == 1 and method.num_stored() == UNITS + 100
    assert method.batch_axes() == UOROState(s_tilde=0, theta_tilde=0, key=None)
    st = method.init(2, jnp.float64, key=jax.random.key(1))
    assert isinstance(st, UOROState)
    assert st.s_tilde.shape == (2, UNITS)  # the flax carry layout
    assert jax.tree.map(jnp.shape, st.theta_tilde) == jax.tree.map(lambda a: (2,) + a.shape, params)
    c = jnp.tile(carry, (2, 1))
    x = jnp.tile(xs[0], (2, 1))
    step = jax.jit(method.step)
    for _ in range(50):  # the state stays finite over a long run
        c, st, aux = step(params, c, st, x)
    assert aux == {}
    leaves = [st.s_tilde] + jax.tree.leaves(st.theta_tilde)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    g, st2 = method.gradient(params, st, jnp.ones_like(c))
    assert st2 is st and jax.tree.map(jnp.shape, g) == jax.tree.map(jnp.shape, params)
    # the new carry equals the plain cell step
    c2, _, _ = method.step(params, c, st, x)
    np.testing.assert_allclose(c2, module.apply({"params": params}, c, x)[0], rtol=1e-12)
    # key changes between steps (fresh signs every step)
    assert not np.array_equal(jax.random.key_data(st.key), jax.random.key_data(jax.random.key(1)))
    with pytest.raises(ValueError, match="carry must be shaped like the carry"):
        method.step(params, c[..., None], st, x)
    with pytest.raises(ValueError, match=r"x must have shape \(2, n_in\)"):
        method.step(params, c, st, x[:1])
    with pytest.raises(ValueError, match="UORO state is for batch 2, the carry has 3"):
        method.step(params, jnp.ones((3, UNITS)), st, jnp.ones((3, N_IN)))
    with pytest.raises(ValueError, match="dloss_dcarry must be shaped like the carry"):
        method.gradient(params, st, jnp.ones((2, UNITS, 1)))


def test_reset_keeps_the_key_and_zeroes_only_selected_examples(x64):
    module, params, carry, xs, _, _ = _setup()
    method = uoro_method(module, params)
    st = method.init(3, jnp.float64, key=jax.random.key(5))
    c = jnp.tile(carry, (3, 1))
    for t in range(3):
        c, st, _ = method.step(params, c, st, jnp.tile(xs[t], (3, 1)))
    new = method.reset(st, jnp.array([True, False, True]), key=jax.random.key(123))
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(st.key))  # never rewound
    for a, b in zip(jax.tree.leaves((new.s_tilde, new.theta_tilde)), jax.tree.leaves((st.s_tilde, st.theta_tilde))):
        assert float(jnp.abs(a[0]).sum()) == 0.0 and float(jnp.abs(a[2]).sum()) == 0.0
        np.testing.assert_array_equal(a[1], b[1])
    assert float(jnp.abs(st.s_tilde[0]).sum()) > 0  # there was something to reset


def test_raw_uint32_key_is_wrapped():
    module = sj.GRUCell(3)
    params = module.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    method = uoro_method(module, params)
    st = method.init(2, key=jax.random.PRNGKey(4))
    assert jnp.issubdtype(st.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(st.key), jax.random.PRNGKey(4))
    default = method.init(2)
    np.testing.assert_array_equal(jax.random.key_data(default.key), jax.random.key_data(jax.random.key(0)))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        method.init(2, key=jnp.zeros(2, jnp.float32))


def test_uoro_float32_default_key():
    cell = sj.GRUCell(8)
    xs = jax.random.normal(jax.random.key(1), (20, 4, 5))
    carry = jnp.zeros((4, 8))
    params = cell.init(jax.random.key(0), carry, xs[0])["params"]
    method = sj.online_method("uoro", cell, params, precision="highest")
    ys = jax.random.normal(jax.random.key(2), (20, 4, 8))
    out, carries = jax.jit(lambda p: _online(method, p, carry, xs, ys, method.init(4)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and g.dtype == jnp.float32 for g in jax.tree.leaves(out))
    ref = lax.scan(lambda c, x: (cell.apply({"params": params}, c, x)[0],) * 2, carry, xs)[1]
    np.testing.assert_allclose(carries, ref, rtol=1e-5, atol=1e-6)


def test_uoro_masked_weights_get_zero(x64):
    module, params, carry, xs, ys, masks = _setup(masks_density=0.5)
    method = uoro_method(module, params, masks=masks)
    out, _ = _online(method, params, carry, xs, ys, method.init(BATCH, jnp.float64, key=jax.random.key(7)))
    for name, m in masks.items():
        assert np.all(np.asarray(out[name]["kernel"])[~m] == 0)
        assert np.any(np.asarray(out[name]["kernel"])[m] != 0)


def test_uoro_masked_unbiased_small(x64):
    """Masked UORO averages to the masked BPTT gradient (smaller z-test, same justification)."""
    module, params, carry, xs, ys, masks = _setup(masks_density=0.5)
    G = np.asarray(_uoro_samples(module, params, carry, xs, ys, masks, 2000, seed=5))
    exact = np.asarray(_flat(_bptt(sj.as_recurrent(module), params, carry, xs, ys, masks)))
    mean, se = G.mean(0), G.std(0, ddof=1) / np.sqrt(G.shape[0])
    assert not np.any(np.abs(mean - exact) >= Z_MAX * se + 1e-10)


def test_uoro_bad_args():
    cell = sj.GRUCell(3)
    params = cell.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        uoro_method(cell, params, eps=0.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        uoro_method(cell, params, masks={"nope": np.ones((2, 3), bool)})
    with pytest.raises(ValueError, match="precision must be"):
        uoro_method(cell, params, precision="bogus")
    method = uoro_method(cell, params)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        method.init(0)
    with pytest.raises(ValueError, match="dtype must be floating point"):
        method.init(1, jnp.int32)
