"""Kronecker-factored online methods: KF-RTRL (Mujika et al. 2018) and OK (Benzing et al. 2019).

Unbiasedness of KF-RTRL by z-tests over many seeds (with power checks), its variance against
UORO's on the same problem, exact cases (T = 1 for KF-RTRL; OK with a rank large enough), masks,
key handling and errors.  float64, small problems (4 units, 3 inputs, 5 steps).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import snapjax as sj
from snapjax.methods import kfrtrl, ok

F64 = jnp.float64
UNITS, N_IN, BATCH, T = 4, 3, 2, 5
N_RUNS = 3000
Z_MAX = 5.0


# --------------------------------------------------------------------------- problem and references
def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def _out(carry):
    return carry[-1] if isinstance(carry, tuple) else carry


def _problem(module, seed=0, steps=T, batch=BATCH):
    k = jax.random.split(jax.random.key(seed), 4)
    carry = module.initialize_carry(k[0], (batch, N_IN))
    carry = jax.tree.map(lambda c: 0.5 * jax.random.normal(k[3], c.shape, F64), carry)
    xs = jax.random.normal(k[1], (steps, batch, N_IN), F64)
    ys = jax.random.normal(k[2], (steps, batch, UNITS), F64)
    params = module.init(k[0], carry, xs[0])["params"]
    return params, carry, xs, ys


def _exact(module, params, carry, xs, ys, masks=None):
    """jax.grad of Σ_t L_t through a hand-written lax.scan of the flax cell (masked kernels zeroed)."""

    def total(p):
        if masks:
            p = {**p, **{n: {**p[n], "kernel": p[n]["kernel"] * m} for n, m in masks.items()}}

        def body(c, inp):
            c = module.apply({"params": p}, c, inp[0])[0]
            return c, _loss(_out(c), inp[1])

        return jnp.sum(lax.scan(body, carry, (xs, ys))[1])

    return jax.grad(total)(params)


def _online(method, params, carry, xs, ys, state):
    """Σ_t of the online gradients, driven through the OnlineMethod interface by lax.scan."""

    def body(acc, inp):
        c, st, total = acc
        c, st, _ = method.step(params, c, st, inp[0])
        g, st = method.gradient(params, st, jax.grad(lambda cc: _loss(_out(cc), inp[1]))(c))
        return (c, st, jax.tree.map(jnp.add, total, g)), None

    zero = jax.tree.map(jnp.zeros_like, params)
    return lax.scan(body, (carry, state, zero), (xs, ys))[0][2]


def _flat(tree, lead=()):
    return jnp.concatenate([jnp.reshape(x, lead + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def _samples(method, params, carry, xs, ys, n_runs, seed):
    """(n_runs, p): one summed online gradient per independent key (one jit, vmapped keys)."""
    batch = jax.tree.leaves(carry)[0].shape[0]

    def one(key):
        return _flat(_online(method, params, carry, xs, ys, method.init(batch, F64, key=key)))

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), n_runs)))


def _z_ok(G, exact):
    """No entry's sample mean is ≥ Z_MAX standard errors from ``exact`` (see test docstrings)."""
    se = G.std(0, ddof=1) / np.sqrt(G.shape[0])
    bad = np.abs(G.mean(0) - exact) >= Z_MAX * se + 1e-10
    return not bad.any(), se


# --------------------------------------------------------------------------- KF-RTRL unbiasedness
@pytest.fixture(scope="module")
def gru_samples():
    with jax.enable_x64(True):
        module = nn.GRUCell(UNITS, param_dtype=F64)
        params, carry, xs, ys = _problem(module)
        exact = np.asarray(_flat(_exact(module, params, carry, xs, ys)))
        method = kfrtrl.build(module, params)
        G = _samples(method, params, carry, xs, ys, N_RUNS, seed=42)
        U = _samples(sj.online_method("uoro", module, params), params, carry, xs, ys, N_RUNS, seed=43)
        return {"module": module, "params": params, "data": (carry, xs, ys), "exact": exact, "G": G, "U": U,
                "method": method}


def test_kfrtrl_unbiased_gru(gru_samples):
    """The mean of N = 3000 independent KF-RTRL runs equals the exact (BPTT) gradient entry by entry.

    By the CLT each entry's sample mean is ≈ Normal(true mean, SE²), SE = sd/√N from the sample;
    under H0 P(|z| > 5) ≈ 5.7e-7 per entry, and with p = 100 entries (GRU, 4 units, 3 inputs) a
    Bonferroni bound gives a family-wise false alarm rate < 1e-4 (fixed seeds: deterministic).
    """
    G, exact = gru_samples["G"], gru_samples["exact"]
    assert G.shape == (N_RUNS, exact.size) and exact.size == 100 and np.all(np.isfinite(G))
    ok_, se = _z_ok(G, exact)
    assert ok_, f"max |z| = {np.max(np.abs(G.mean(0) - exact) / (se + 1e-300)):.2f}"


class _SkewedSigns(kfrtrl.KFRTRL):
    """A wrong KF-RTRL: c₁ = 1 and P(c₂ = 1) = 3/4, so E[c₁c₂] = 1/2 and half the cross terms
    ``(ρ₁/ρ₂) u ⊗ Δ + (ρ₂/ρ₁) v̂ ⊗ DA`` survive in expectation (a random, biased estimate).
    (Merely coupling c₂ = c₁ would stay unbiased: u and A already carry a uniformly random sign.)"""

    def _draw_signs(self, key, batch, dtype):
        c = jnp.where(jax.random.uniform(key, (batch, len(self.layout.groups))) < 0.75, 1.0, -1.0).astype(dtype)
        return jnp.ones_like(c), c


def test_kfrtrl_ztest_has_power(gru_samples):
    """The same z-test rejects: the estimate × 1.1, skewed signs (E[c₁c₂] = 1/2), and a single run."""
    G, exact, method = gru_samples["G"], gru_samples["exact"], gru_samples["method"]
    assert not _z_ok(1.1 * G, exact)[0]
    _, se = _z_ok(G, exact)
    assert np.any(np.abs(G[0] - exact) > Z_MAX * se)
    with jax.enable_x64(True):
        bad = _SkewedSigns(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})
        carry, xs, ys = gru_samples["data"]
        Gb = _samples(bad, gru_samples["params"], carry, xs, ys, N_RUNS, seed=42)
    assert np.all(Gb.std(0) > 0) and not _z_ok(Gb, exact)[0]


def test_kfrtrl_variance_below_uoro(gru_samples):
    """Same problem, same number of seeds: KF-RTRL's variance is below UORO's for every entry
    (measured: total ≈ 8% of UORO's, largest per-entry ratio ≈ 0.7; sampling error of a variance
    ratio at N = 3000 is ≈ 4%, so the margins below are many standard errors wide)."""
    G, U, exact = gru_samples["G"], gru_samples["U"], gru_samples["exact"]
    assert _z_ok(U, exact)[0]  # UORO is unbiased on this problem too
    vk, vu = G.var(0, ddof=1), U.var(0, ddof=1)
    assert vk.sum() < 0.25 * vu.sum(), (vk.sum(), vu.sum())
    assert np.all(vk < 0.9 * vu), np.max(vk / vu)


def test_kfrtrl_unbiased_lstm_masked(x64):
    """LSTM (state (c, h), k = 2·units, A ∈ R^{8×4}) with 50%-masked kernels: z-test as above
    (N = 2000, p = 128, Bonferroni < 1e-4) against the gradient of the masked network; masked
    entries get exactly zero gradient in every run."""
    module = nn.LSTMCell(UNITS, param_dtype=F64)
    params, carry, xs, ys = _problem(module, seed=3)
    rng = np.random.default_rng(0)
    masks = {n: rng.random(np.shape(params[n]["kernel"])) < 0.5 for n in sorted(params)}
    method = kfrtrl.build(module, params, masks=masks)
    assert method.layout.group_names() == (("ii", "hi"), ("if", "hf"), ("ig", "hg"), ("io", "ho"))
    assert method.layout.k == 2 * UNITS
    exact_tree = _exact(module, params, carry, xs, ys, masks)
    G = _samples(method, params, carry, xs, ys, 2000, seed=7)
    exact = np.asarray(_flat(exact_tree))
    assert G.shape[1] == exact.size == 128
    ok_, se = _z_ok(G, exact)
    assert ok_
    assert np.any(np.abs(G[0] - exact) > Z_MAX * se)  # power: a single run is rejected
    zero = np.asarray(_flat(jax.tree.map(lambda a: jnp.zeros_like(a, bool), params))).astype(bool)
    mask_flat = np.asarray(_flat({n: {**{k: np.ones_like(v, bool) for k, v in params[n].items()},
                                      "kernel": masks[n]} for n in params})).astype(bool)
    assert np.all(G[:, ~mask_flat] == 0) and not zero.any()
    assert np.all(np.any(G[:, mask_flat] != 0, axis=0))


@pytest.mark.parametrize("cell", ["vanilla", "gru", "lstm", "egru"])
def test_kfrtrl_exact_for_one_step(cell, x64):
    """T = 1: J_1 = I_1 = v̂ ⊗ Δ is one Kronecker term per pair, so KF-RTRL equals RTRL exactly
    (any key), for fused and unfused pairs (EGRU: its unit parameter, the threshold, is tracked
    exactly)."""
    cls = {"vanilla": nn.SimpleCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell, "egru": sj.EGRUCell}[cell]
    module = cls(UNITS, param_dtype=F64)
    params, carry, xs, ys = _problem(module, seed=5, steps=1)
    exact = _flat(_exact(module, params, carry, xs, ys))
    for fuse in (True, False):
        method = kfrtrl.build(module, params, fuse=fuse)
        got = _flat(_online(method, params, carry, xs, ys, method.init(BATCH, F64, key=jax.random.key(11))))
        np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-13)
    if cell == "vanilla":  # the paper's single factor u = [x; 1; h] for [W_i; b_i; W_h]
        assert kfrtrl.build(module, params).layout.group_names() == (("i", "h"),)


# --------------------------------------------------------------------------- OK
@pytest.mark.parametrize("cell,rank", [("vanilla", 8), ("vanilla", T - 1), ("gru", T - 1), ("lstm", T - 1)])
def test_ok_full_rank_is_rtrl(cell, rank, x64):
    """OK equals exact RTRL (sum of online gradients == BPTT gradient) to 1e-10 when the rank
    suffices: r ≥ n_g (the factor length; static exact re-factorisation) or r ≥ the number of
    steps so far (T - 1 steps are scored after the first, which is a single term: the random
    compression with σ_{r+1} = 0 is deterministic)."""
    module = {"vanilla": nn.SimpleCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](UNITS, param_dtype=F64)
    params, carry, xs, ys = _problem(module, seed=2, steps=T - 1)
    exact = np.asarray(_flat(_exact(module, params, carry, xs, ys)))
    method = ok.build(module, params, rank=rank)
    assert max(method.layout.rows) == 8
    run = jax.jit(lambda key: _flat(_online(method, params, carry, xs, ys, method.init(BATCH, F64, key=key))))
    for seed in (0, 1):
        np.testing.assert_allclose(run(jax.random.key(seed)), exact, rtol=1e-10, atol=1e-10)


def test_ok_compress_is_unbiased_and_optimal(x64):
    """The (r+1) → r map alone: its mean over 4000 sign draws is the (r+1)-term sum (z-test), its
    mean squared error matches the paper's minimum ``s₁²/(n-1) - Σ_{i≥m} σ_i²``, and it is exact
    when the terms have rank ≤ r."""
    r, n, K = 3, 6, 7
    k = jax.random.split(jax.random.key(0), 3)
    Ut = jax.random.normal(k[0], (1, r + 1, n), F64)
    At = jax.random.normal(k[1], (1, r + 1, K), F64) * jnp.array([3.0, 1.0, 0.5, 0.2])[None, :, None]
    target = np.asarray(jnp.einsum("bin,bik->nk", Ut, At))
    signs = jax.random.rademacher(k[2], (4000, 1, r + 1), F64)
    est = np.asarray(jax.jit(jax.vmap(lambda s: jnp.einsum("bin,bik->nk", *ok.compress(Ut, At, s, r, 1e-13))))(signs))
    ok_, _ = _z_ok(est.reshape(4000, -1), target.ravel())
    assert ok_
    sig = np.linalg.svd(target, compute_uv=False)[: r + 1]
    best = None
    for m0 in range(r):
        s1 = sig[m0:].sum()
        if (r - m0) * sig[m0] <= s1:
            best = s1**2 / (r - m0) - np.sum(sig[m0:] ** 2)
            break
    mse = np.mean(np.sum((est - target) ** 2, axis=(1, 2)))
    assert abs(mse - best) < 0.05 * best, (mse, best)
    # rank-deficient input (two equal terms): exact, whatever the signs
    Ut2 = Ut.at[:, -1].set(Ut[:, 0])
    At2 = At.at[:, -1].set(At[:, 0])
    t2 = np.asarray(jnp.einsum("bin,bik->nk", Ut2, At2))
    e2 = jnp.einsum("bin,bik->nk", *jax.jit(ok.compress, static_argnums=(3, 4))(Ut2, At2, signs[0], r, 1e-12))
    np.testing.assert_allclose(e2, t2, atol=1e-10)


def test_ok_unbiased_gru_low_rank(gru_samples):
    """OK with r = 2 (< n_g and < T, so the random map is used) is unbiased: z-test as for
    KF-RTRL (N = 1500, p = 100, Bonferroni < 1e-4); its variance is below KF-RTRL's."""
    with jax.enable_x64(True):
        module, params = gru_samples["module"], gru_samples["params"]
        carry, xs, ys = gru_samples["data"]
        method = ok.build(module, params, rank=2)
        G = _samples(method, params, carry, xs, ys, 1500, seed=9)
    ok_, se = _z_ok(G, gru_samples["exact"])
    assert ok_ and np.any(np.abs(G[0] - gru_samples["exact"]) > Z_MAX * se)
    assert G.var(0, ddof=1).sum() < 0.25 * gru_samples["G"].var(0, ddof=1).sum()  # measured ≈ 3%


# --------------------------------------------------------------------------- protocol and errors
@pytest.mark.parametrize("mod", [kfrtrl, ok])
def test_protocol_reset_and_key(mod, x64):
    module = nn.GRUCell(UNITS, param_dtype=F64)
    params, carry, xs, _ = _problem(module, batch=3)
    method = mod.build(module, params)
    assert method.batch_axes() == type(method.batch_axes())(u=0, A=0, E=0, key=None)
    st = method.init(3, F64, key=jax.random.PRNGKey(4))  # a raw uint32 key is wrapped
    assert jnp.issubdtype(st.key.dtype, jax.dtypes.prng_key)
    c, step = carry, jax.jit(method.step)
    for t in range(3):
        c, st, aux = step(params, c, st, xs[t])
    assert aux == {}
    np.testing.assert_allclose(c, lax.scan(lambda h, x: (module.apply({"params": params}, h, x)[0], None),
                                           carry, xs[:3])[0], rtol=1e-13)
    new = method.reset(st, jnp.array([True, False, True]))
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(st.key))
    for a, b in zip(jax.tree.leaves((new.u, new.A)), jax.tree.leaves((st.u, st.A))):
        assert float(jnp.abs(a[0]).sum()) == 0.0 == float(jnp.abs(a[2]).sum())
        np.testing.assert_array_equal(a[1], b[1])
        assert float(jnp.abs(b[0]).sum()) > 0
    stored = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves((st.u, st.A, st.E)))
    assert method.num_stored() == stored


def test_errors():
    gru = nn.GRUCell(3)
    params = gru.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    method = kfrtrl.build(gru, params)
    with pytest.raises(ValueError, match=r"kfrtrl: init needs key=jax.random.key\(seed\)"):
        method.init(2)
    with pytest.raises(ValueError, match=r"ok: init needs key="):
        ok.build(gru, params).init(2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        method.init(0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="state dtype must be floating point"):
        method.init(1, jnp.int32, key=jax.random.key(0))

    class NormGRU(nn.Module):  # mixes units: no CellSpec, generic path only
        features: int = 3

        @nn.compact
        def __call__(self, carry, x):
            h = nn.LayerNorm()(nn.GRUCell(self.features)(carry, x)[0])
            return h, h

        @nn.nowrap
        def initialize_carry(self, rng, input_shape):
            return jnp.zeros(input_shape[:-1] + (self.features,))

    norm = NormGRU()
    p2 = norm.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    for mod, name in ((kfrtrl, "kfrtrl"), (ok, "ok")):
        with pytest.raises(ValueError, match=name + r" needs a cell with a compressed form \(snapjax.CellSpec"):
            mod.build(norm, p2)
    with pytest.raises(ValueError, match="unknown parameter"):
        kfrtrl.build(gru, params, masks={"nope": np.ones((2, 3))})
    with pytest.raises(ValueError, match="must have the kernel's shape"):
        kfrtrl.build(gru, params, masks={"hn": np.ones((2, 3))})
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        kfrtrl.build(gru, params, eps=0.0)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        ok.build(gru, params, rank=0)
    with pytest.raises(ValueError, match="precision must be"):
        kfrtrl.build(gru, params, precision="bogus")
    st = method.init(2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 2\)"):
        method.step(params, jnp.zeros((2, 3)), st, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="state is for batch 2, the carry has 3"):
        method.step(params, jnp.zeros((3, 3)), st, jnp.zeros((3, 2)))


def test_registered_and_built_by_name():
    params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    for mod, name in ((kfrtrl, "kfrtrl"), (ok, "ok")):
        entry = sj.registered_methods()[name]
        assert entry.build is mod.build and set(entry.options) <= set(mod.build.__code__.co_varnames)
        assert type(sj.online_method(name, nn.GRUCell(4), params)).__name__ == ("KFRTRL" if name == "kfrtrl" else "OK")
    assert sj.online_method("ok", nn.GRUCell(4), params, rank=3).rank == 3
    assert type(sj.online_method("kf_rtrl", nn.GRUCell(4), params)).__name__ == "KFRTRL"


def _memory_task(T=300, B=16, lag=1, seed=0):
    bits = jax.random.bernoulli(jax.random.key(seed), 0.5, (T, B)).astype(jnp.int32)
    xs = (2.0 * bits - 1.0)[..., None]
    ys = jnp.concatenate([jnp.zeros((lag, B), jnp.int32), bits[:-lag]])
    return xs, ys


@pytest.mark.parametrize("name", ["kfrtrl", pytest.param("ok", marks=pytest.mark.slow)])
def test_trains_the_stack_memory_task_through_the_learner(name):
    """Dense + 2 GRU + MLP head, recall the previous bit; chance is ln 2 = 0.693.  (OK's
    estimator is checked fast by its z-test and its full-rank == RTRL test; its learning run,
    the same learner path as KF-RTRL's, is in the slow suite.)"""
    learner = sj.OnlineLearner([nn.Dense(8), nn.GRUCell(16), nn.GRUCell(16), nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])],
                               method=name, optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(1), batch_size=16, input_size=1)
    xs, ys = _memory_task()
    losses = []
    for _ in range(2):
        state, _, metrics = learner.run_jit(state, xs, ys)
        losses.append(float(metrics["loss"][-100:].mean()))
    assert losses[-1] < 0.2, losses
