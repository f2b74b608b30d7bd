"""UORO: unbiasedness of the online gradient (statistical test with power check), protocol, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from snapjax.uoro import UOROState, uoro_tracker

UNITS, N_IN, BATCH, T = 4, 3, 1, 5
N_RUNS = 3000
Z_MAX = 5.0


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def _setup(masks_density=None):
    cell = sj.GRUCell(UNITS, param_dtype=jnp.float64)
    k = jax.random.split(jax.random.key(0), 4)
    carry = 0.5 * jax.random.normal(k[3], (BATCH, UNITS), jnp.float64)
    xs = jax.random.normal(k[1], (T, BATCH, N_IN), jnp.float64)
    ys = jax.random.normal(k[2], (T, BATCH, UNITS), jnp.float64)
    params = cell.init(k[0], carry, xs[0])["params"]
    masks = None
    if masks_density is not None:
        rng = np.random.default_rng(3)
        masks = {p.name: rng.random(np.shape(params[p.name]["kernel"])) < masks_density for p in cell.spec.projections}
    return cell, params, carry, xs, ys, masks


def _flat(tree, lead=()):
    return jnp.concatenate([jnp.reshape(x, lead + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def _uoro_samples(cell, params, carry, xs, ys, masks, n_runs, seed):
    tr = uoro_tracker(cell, params, masks=masks)

    def one(key):
        st = tr.init(BATCH, jnp.float64, key=key)
        return sj.online_gradient(tr, params, carry, xs, ys, _loss, influence=st).grads

    g = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), n_runs))
    return _flat(g, (n_runs,))


@pytest.fixture(scope="module")
def samples():
    with jax.enable_x64(True):
        cell, params, carry, xs, ys, _ = _setup()
        G = np.asarray(_uoro_samples(cell, params, carry, xs, ys, None, N_RUNS, seed=42))
        exact = np.asarray(_flat(sj.bptt_gradient(cell, params, carry, xs, ys, _loss).grads))
        snap1 = sj.online_gradient(sj.influence_tracker(cell, params, "snap", 1), params, carry, xs, ys, _loss)
        return G, exact, np.asarray(_flat(snap1.grads))


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


def test_uoro_protocol_and_state(x64):
    cell, params, carry, xs, ys, _ = _setup()
    tr = uoro_tracker(cell, params)
    assert tr.spec is cell.spec and set(tr.masks) == {p.name for p in cell.spec.projections}
    st = tr.init(2, jnp.float64, key=jax.random.key(1))
    assert isinstance(st, UOROState)
    assert st.s_tilde.shape == (2, UNITS, 1)
    assert jax.tree.map(jnp.shape, st.theta_tilde) == jax.tree.map(lambda a: (2,) + a.shape, params)
    s = cell.spec.to_internal(jnp.tile(carry, (2, 1)))
    x = jnp.tile(xs[0], (2, 1))
    step = jax.jit(tr.step)
    for t in range(50):  # the state stays finite over a long run
        s, st = step(params, s, st, x)
    leaves = [st.s_tilde] + jax.tree.leaves(st.theta_tilde)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    g = tr.gradient(st, jnp.ones_like(s))
    assert jax.tree.map(jnp.shape, g) == jax.tree.map(jnp.shape, params)
    # the new state equals the plain cell step
    s2, _ = tr.step(params, s, st, x)
    np.testing.assert_allclose(s2, sj.cell_step(cell.spec, params, s, x), rtol=1e-12)
    # key changes between steps (fresh signs every step)
    assert not np.array_equal(jax.random.key_data(st.key), jax.random.key_data(jax.random.key(1)))
    with pytest.raises(ValueError):
        tr.step(params, s[..., 0], st, x)
    with pytest.raises(ValueError):
        tr.gradient(st, jnp.ones((2, UNITS)))


def test_uoro_float32_default_key():
    cell = sj.GRUCell(8)
    xs = jax.random.normal(jax.random.key(1), (20, 4, 5))
    carry = jnp.zeros((4, 8))
    params = cell.init(jax.random.key(0), carry, xs[0])["params"]
    tr = uoro_tracker(cell, params)
    out = jax.jit(lambda p: sj.online_gradient(tr, p, carry, xs, xs[..., :1], lambda h, y: jnp.sum(h * y)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(out.grads))
    ref = sj.bptt_gradient(cell, params, carry, xs, xs[..., :1], lambda h, y: jnp.sum(h * y))
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-5)


def test_uoro_masked_weights_get_zero(x64):
    cell, params, carry, xs, ys, masks = _setup(masks_density=0.5)
    tr = uoro_tracker(cell, params, masks=masks)
    out = sj.online_gradient(tr, params, carry, xs, ys, _loss, influence=tr.init(BATCH, jnp.float64, key=jax.random.key(7)))
    for name, m in masks.items():
        assert np.all(np.asarray(out.grads[name]["kernel"])[~m] == 0)
        assert np.any(np.asarray(out.grads[name]["kernel"])[m] != 0)


def test_uoro_masked_unbiased_small(x64):
    """Masked UORO averages to the masked BPTT gradient (smaller z-test, same justification)."""
    cell, params, carry, xs, ys, masks = _setup(masks_density=0.5)
    G = np.asarray(_uoro_samples(cell, params, carry, xs, ys, masks, 2000, seed=5))
    exact = np.asarray(_flat(sj.bptt_gradient(cell, params, carry, xs, ys, _loss, masks=masks).grads))
    mean, se = G.mean(0), G.std(0, ddof=1) / np.sqrt(G.shape[0])
    assert not np.any(np.abs(mean - exact) >= Z_MAX * se + 1e-10)


def test_uoro_bad_args():
    cell = sj.GRUCell(3)
    params = cell.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    with pytest.raises(ValueError):
        uoro_tracker(cell, params, eps=0.0)
    with pytest.raises(ValueError):
        uoro_tracker(cell, params, masks={"nope": np.ones((2, 3), bool)})
    tr = uoro_tracker(cell, params)
    with pytest.raises(ValueError):
        tr.init(0)
