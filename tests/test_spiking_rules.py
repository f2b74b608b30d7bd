"""Spiking cells (LIF, ALIF), the leaky RNN, e-prop, RFLO and random feedback.

References written out here, in float64: the cells' compressed Jacobians against autodiff
(``verify_spec``); exact RTRL on LIF/ALIF against BPTT (``jax.grad`` through ``lax.scan``, the same
``custom_jvp`` pseudo-derivative); e-prop against its recursion with ``Δ = ∂φ/∂s`` taken by
``jax.jacfwd`` of the cell's unit-wise ``phi`` and ``∂s_t/∂θ`` by ``jax.jacfwd`` of the whole step;
RFLO against Murray's trace ``p ← (1 − 1/τ) p + (1/τ) φ'(u) r``.  Exact limits: no recurrent
weights (e-prop and RFLO are exact RTRL), no self-connections (e-prop is SnAp-1).  Then the
learner's random feedback and each rule training a small memory task through OnlineLearner.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_rel_err
from jax import lax

import snapjax as sj
from snapjax.training.stage_passes import backward, forward, random_feedback

F64 = jnp.float64
UNITS, N_IN, B, T = 4, 3, 2, 8


# ------------------------------------------------------------------------------- helpers
def _lif(**kw):
    return sj.LIFCell(UNITS, param_dtype=F64, tau_m=5.0, v_th=0.6, **kw)


def _alif(**kw):
    return sj.ALIFCell(UNITS, param_dtype=F64, tau_m=5.0, tau_a=8.0, beta=0.3, v_th=0.6, **kw)


def _leaky(**kw):
    return sj.LeakyRNNCell(UNITS, param_dtype=F64, tau=3.0, **kw)


def _data(module, seed=0, zero_recurrent=False):
    k = jax.random.split(jax.random.key(seed), 5)
    carry = module.initialize_carry(k[0], (B, N_IN))
    leaves, treedef = jax.tree.flatten(carry)
    leaves = [0.3 * jnp.abs(jax.random.normal(kk, a.shape, F64)) for kk, a in zip(jax.random.split(k[3], 3), leaves)]
    if len(leaves) > 1:  # spiking: a binary z
        leaves[-1] = (leaves[-1] > 0.25).astype(F64)
    carry = jax.tree.unflatten(treedef, leaves)
    xs = 1.5 * jax.random.normal(k[1], (T, B, N_IN), F64)
    ys = jax.random.normal(k[2], (T, B, UNITS), F64)
    params = module.init(k[0], carry, xs[0])["params"]
    params = jax.tree.map(lambda a: a * 1.5, params)
    if zero_recurrent:
        params["h"]["kernel"] = jnp.zeros_like(params["h"]["kernel"])
    return params, carry, xs, ys


def _loss(carry, y):
    """A loss on every carry component (v, a and z alike)."""
    return sum(jnp.sum(jnp.sin(c) * y) + 0.5 * jnp.sum(c**2) for c in jax.tree.leaves(carry))


def _run(method, params, carry, xs, ys, resets=None):
    """Per-step gradients (leading T) and carries through the OnlineMethod interface."""
    resets = jnp.zeros(xs.shape[:2], bool) if resets is None else resets

    def body(c, inp):
        carry, st = c
        x, y, r = inp
        carry = jax.tree.map(lambda a: jnp.where(r[:, None], 0, a), carry)
        carry, st, _ = method.step(params, carry, method.reset(st, r), x)
        g, st = method.gradient(params, st, jax.grad(_loss)(carry, y))
        return (carry, st), (g, carry)

    return jax.jit(lambda c0: lax.scan(body, (c0, method.init(xs.shape[1], F64)), (xs, ys, resets))[1])(carry)


def _bptt(module, params, carry, xs, ys):
    def total(p):
        def body(c, inp):
            c = module.apply({"params": p}, c, inp[0])[0]
            return c, _loss(c, inp[1])

        return lax.scan(body, carry, (xs, ys))[1].sum()

    return jax.jit(jax.grad(total))(params)


def _sum_t(tree):
    return jax.tree.map(lambda a: a.sum(0), tree)


def _assert_steps(got, ref, tol=1e-10):
    for t in range(jax.tree.leaves(ref)[0].shape[0]):
        assert tree_rel_err(jax.tree.map(lambda a: a[t], got), jax.tree.map(lambda a: a[t], ref)) < tol, t


def _spike_rate(carries):
    return float(jnp.mean(jax.tree.leaves(carries)[-1]))


# ------------------------------------------------------------------------------ cells
@pytest.mark.parametrize("make", [_lif, _alif], ids=["lif", "alif"])
@pytest.mark.parametrize("detach", [True, False], ids=["detach", "reset-grad"])
def test_spiking_spec_verifies_and_rtrl_is_bptt(x64, make, detach):
    module = make(detach_reset=detach)
    params, carry, xs, ys = _data(module, seed=1)
    sj.verify_spec(module.spec, params)
    grads, carries = _run(sj.online_method("rtrl", module, params), params, carry, xs, ys)
    assert 0.1 < _spike_rate(carries) < 0.9  # spikes and silences: the pseudo-derivative matters
    ref = _bptt(module, params, carry, xs, ys)
    assert tree_rel_err(_sum_t(grads), ref) < 1e-10
    assert float(jnp.abs(ref["h"]["kernel"]).sum()) > 0


def test_pseudo_derivative_and_dynamics(x64):
    """z = H((v − A)/v_th) with ∂z/∂v = (γ/v_th)·max(0, 1 − |v − A|/v_th); ALIF's a and A."""
    spec = sj.lif_spec(1, alpha=0.5, v_th=0.8, gamma=0.3)
    zeros = jnp.zeros(1, F64)
    for v in (0.3, 0.7, 0.8, 1.0, 1.7):
        z = lambda i: spec.phi({"i": i, "h": zeros}, {}, jnp.zeros((1, 2), F64))[0, 1]
        want = 0.3 / 0.8 * max(0.0, 1 - abs(v - 0.8) / 0.8)
        assert abs(float(jax.grad(z)(jnp.array([v], F64))[0]) - want) < 1e-12
        assert float(z(jnp.array([v], F64))) == float(v > 0.8)
    alif = sj.alif_spec(1, alpha=0.5, rho=0.9, beta=0.2, v_th=0.8)
    s = jnp.array([[0.4, 2.0, 1.0]], F64)  # (v, a, z)
    new = alif.phi({"i": jnp.array([0.9], F64), "h": zeros}, {}, s)
    v, a = 0.5 * 0.4 + 0.9 - 0.8, 0.9 * 2.0 + 1.0
    np.testing.assert_allclose(np.asarray(new), [[v, a, float(v > 0.8 + 0.2 * a)]], rtol=1e-14)
    assert sj.ALIFCell(3, tau_a=10.0).rho == pytest.approx(np.exp(-0.1))
    with pytest.raises(ValueError, match="need v_th > 0"):
        sj.lif_spec(2, v_th=0.0)
    with pytest.raises(ValueError, match=r"decay factors must lie in \[0, 1\]"):
        sj.alif_spec(2, rho=1.5)
    with pytest.raises(ValueError, match="unknown pseudo-derivative"):
        sj.lif_spec(2, pseudo_derivative="sine")
    with pytest.raises(ValueError, match="tau must be >= 1"):
        sj.leaky_spec(2, tau=0.5)


# ------------------------------------------------------------------------------ e-prop
def _eprop_reference(module, params, carry, xs, ys, kappa, masks=None):
    """e-prop written out: Δ_j = ∂φ_j/∂s_j by jax.jacfwd of spec.phi (pre-activations held
    fixed); ∂s_{j,t}/∂θ by jax.jacfwd of the whole step at fixed s_{t-1}; per-step gradients."""
    spec = module.spec
    p = sj.apply_masks(params, masks)

    def pre_of(s, x):
        h = s[:, spec.readout]
        return {"i": x @ p["i"]["kernel"] + p["i"].get("bias", 0.0), "h": h @ p["h"]["kernel"]}

    def one(s, x):  # one example: s (U, m), x (n_in,)
        delta = jax.jacfwd(lambda ss: spec.phi(pre_of(s, x), {}, ss))(s)  # (U, m, U, m)
        delta = jnp.einsum("uaub->uab", delta)  # the diagonal blocks
        step = lambda q: spec.phi({"i": x @ q["i"]["kernel"] + q["i"].get("bias", 0.0),
                                   "h": s[:, spec.readout] @ q["h"]["kernel"]}, {}, s)
        imm = jax.jacfwd(step)(p)  # leaves (U, m, *shape); keep the entries of the unit they feed
        imm = {n: {k: (jnp.einsum("uaiu->iua", a) if a.ndim == 4 else jnp.einsum("uau->ua", a))
                   for k, a in leaf.items()} for n, leaf in imm.items()}
        return step(p), delta, imm

    s, eps, filt, out = spec.to_internal(carry), None, None, []
    for x, y in zip(xs, ys):
        s_new, delta, imm = jax.vmap(one)(s, x)
        if eps is None:  # ε_0 = ē_0 = 0
            eps = filt = jax.tree.map(jnp.zeros_like, imm)
        eps = jax.tree.map(lambda e, i: jnp.einsum("xuac,x...uc->x...ua", delta, e) + i, eps, imm)
        filt = jax.tree.map(lambda f, e: kappa * f + e, filt, eps)
        s = s_new
        c = spec.to_internal(jax.grad(_loss)(spec.from_internal(s), y))
        g = jax.tree.map(lambda f: jnp.einsum("xua,x...ua->...u", c, f), filt)
        out.append(sj.apply_masks(g, masks))
    return jax.tree.map(lambda *a: jnp.stack(a), *out)


@pytest.mark.parametrize("make", [_lif, _alif], ids=["lif", "alif"])
@pytest.mark.parametrize("kappa", [0.0, 0.6])
def test_eprop_equals_written_out_recursion(x64, make, kappa):
    module = make(detach_reset=kappa == 0.0)  # both reset variants
    params, carry, xs, ys = _data(module, seed=2)
    method = sj.online_method("eprop", module, params, decay=kappa)
    assert (method.name, method.period, method.kappa) == ("eprop", 1, kappa)
    grads, _ = _run(method, params, carry, xs, ys)
    _assert_steps(grads, _eprop_reference(module, params, carry, xs, ys, kappa))


def test_eprop_masks_and_reset(x64):
    module = _alif()
    params, carry, xs, ys = _data(module, seed=3)
    rng = np.random.default_rng(0)
    masks = {"i": rng.random((N_IN, UNITS)) < 0.6, "h": rng.random((UNITS, UNITS)) < 0.6}
    method = sj.online_method("eprop", module, params, decay=0.5, masks=masks)
    grads, _ = _run(method, params, carry, xs, ys)
    _assert_steps(grads, _eprop_reference(module, params, carry, xs, ys, 0.5, masks))
    for name, m in masks.items():
        g = np.asarray(_sum_t(grads)[name]["kernel"])
        assert np.all(g[~m] == 0) and np.abs(g[m]).sum() > 0
    # example 0 reset before step t0: from then on, its fresh run plus example 1's own
    t0 = 3
    resets = jnp.zeros((T, B), bool).at[t0, 0].set(True)
    g_batch, _ = _run(method, params, carry, xs, ys, resets)
    ex = lambda tree, b: jax.tree.map(lambda a: a[b:b + 1], tree)
    g0, _ = _run(method, params, jax.tree.map(jnp.zeros_like, ex(carry, 0)), xs[t0:, :1], ys[t0:, :1])
    g1, _ = _run(method, params, ex(carry, 1), xs[:, 1:], ys[:, 1:])
    for t in range(t0, T):
        ref = jax.tree.map(lambda a, b, t=t: a[t - t0] + b[t], g0, g1)
        assert tree_rel_err(jax.tree.map(lambda a, t=t: a[t], g_batch), ref) < 1e-10


@pytest.mark.parametrize("make", [_lif, _alif], ids=["lif", "alif"])
def test_eprop_exact_without_recurrent_weights(x64, make):
    module = make()
    params, carry, xs, ys = _data(module, seed=4, zero_recurrent=True)
    grads, carries = _run(sj.online_method("eprop", module, params), params, carry, xs, ys)
    rtrl, _ = _run(sj.online_method("rtrl", module, params), params, carry, xs, ys)
    assert 0.1 < _spike_rate(carries) < 0.9
    _assert_steps(grads, rtrl)
    assert float(jnp.abs(_sum_t(grads)["h"]["kernel"]).sum()) > 0  # W_h = 0 still gets a gradient


@pytest.mark.parametrize("make", [_lif, _alif], ids=["lif", "alif"])
def test_eprop_vs_snap1(x64, make):
    """With recurrent weights e-prop is not SnAp-1 (it drops the self-connection's path too).
    Without self-connections (the paper's networks) LIF's e-prop is SnAp-1; ALIF's is not:
    SnAp-1 keeps only the components one step reaches (``v``, ``z``: the pattern of ``I_t``)
    and drops the adaptation's ``ε^a``, which e-prop keeps."""
    module = make()
    params, carry, xs, ys = _data(module, seed=5)
    eprop, _ = _run(sj.online_method("eprop", module, params), params, carry, xs, ys)
    snap1, _ = _run(sj.online_method("snap1", module, params), params, carry, xs, ys)
    rtrl, _ = _run(sj.online_method("rtrl", module, params), params, carry, xs, ys)
    assert tree_rel_err(_sum_t(eprop), _sum_t(snap1)) > 1e-3
    assert tree_rel_err(_sum_t(eprop), _sum_t(rtrl)) > 1e-3
    no_self = {"h": 1 - np.eye(UNITS, dtype=int)}
    a, _ = _run(sj.online_method("eprop", module, params, masks=no_self), params, carry, xs, ys)
    b, _ = _run(sj.online_method("snap1", module, params, masks=no_self), params, carry, xs, ys)
    if module.spec.name == "lif":
        _assert_steps(a, b, tol=1e-12)
    else:
        assert tree_rel_err(_sum_t(a), _sum_t(b)) > 1e-3


def test_eprop_errors():
    cell = sj.LIFCell(3)
    params = cell.init(jax.random.key(0), cell.initialize_carry(None, (1, 2)), jnp.zeros((1, 2)))["params"]
    with pytest.raises(ValueError, match=r"eprop needs a cell with a compressed form .*generic cell 'NormRNN'"):
        sj.online_method("eprop", sj.as_recurrent(NormRNN(3)), params)
    with pytest.raises(ValueError, match=r"kappa \(option decay\) must be a number in \[0, 1\)"):
        sj.online_method("eprop", cell, params, decay=1.0)
    with pytest.raises(ValueError, match=r"rflo needs a cell with one state per unit .*'lif' with state_dim=2"):
        sj.online_method("rflo", cell, params)
    with pytest.raises(ValueError, match=r"x must have shape \(1, 2\)"):
        method = sj.online_method("e-prop", cell, params)
        method.step(params, cell.initialize_carry(None, (1, 2)), method.init(1), jnp.zeros((1, 3)))
    entries = sj.registered_methods()
    assert set(entries["eprop"].options) == {"decay", "masks", "precision", "verify"}
    assert set(entries["rflo"].options) == {"masks", "precision", "verify"}


class NormRNN(nn.Module):
    """A generic cell (no compressed form)."""

    features: int

    @nn.compact
    def __call__(self, carry, x):
        h = jnp.tanh(nn.LayerNorm()(nn.Dense(self.features)(x) + carry))
        return h, h

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(input_shape[:-1] + (self.features,))


# ------------------------------------------------------------------------------- RFLO
def _rflo_reference(params, carry, xs, ys, tau):
    """Murray's traces: p_ij ← (1 − 1/τ) p_ij + (1/τ) φ'(u_i) r_j; gradient Σ_b c_i p_ij."""
    p = {"i": {"kernel": jnp.zeros((B, N_IN, UNITS), F64), "bias": jnp.zeros((B, UNITS), F64)},
         "h": {"kernel": jnp.zeros((B, UNITS, UNITS), F64)}}
    h, out, leak = carry, [], 1 - 1 / tau
    for x, y in zip(xs, ys):
        u = h @ params["h"]["kernel"] + x @ params["i"]["kernel"] + params["i"]["bias"]
        dphi = (1 - jnp.tanh(u) ** 2) / tau  # (B, U)
        p = {"i": {"kernel": leak * p["i"]["kernel"] + x[:, :, None] * dphi[:, None],
                   "bias": leak * p["i"]["bias"] + dphi},
             "h": {"kernel": leak * p["h"]["kernel"] + h[:, :, None] * dphi[:, None]}}
        h = leak * h + jnp.tanh(u) / tau
        c = jax.grad(_loss)(h, y)
        out.append({"i": {"kernel": jnp.einsum("bu,blu->lu", c, p["i"]["kernel"]), "bias": (c * p["i"]["bias"]).sum(0)},
                    "h": {"kernel": jnp.einsum("bu,blu->lu", c, p["h"]["kernel"])}})
    return jax.tree.map(lambda *a: jnp.stack(a), *out)


def test_rflo_equals_murray_recursion_and_is_exact_without_recurrence(x64):
    module = _leaky()
    params, carry, xs, ys = _data(module, seed=6)
    method = sj.online_method("rflo", module, params)
    assert (type(method).__name__, method.name) == ("RFLO", "rflo")
    assert method.num_stored() == N_IN * UNITS + UNITS + UNITS**2
    grads, _ = _run(method, params, carry, xs, ys)
    _assert_steps(grads, _rflo_reference(params, carry, xs, ys, tau=3.0))
    snap1, _ = _run(sj.online_method("snap1", module, params), params, carry, xs, ys)
    assert tree_rel_err(_sum_t(grads), _sum_t(snap1)) > 1e-3  # W_h's diagonal path is what RFLO drops
    eprop, _ = _run(sj.online_method("eprop", module, params), params, carry, xs, ys)
    _assert_steps(grads, eprop, tol=1e-14)  # one-state cell, κ = 0: the same rule
    params, carry, xs, ys = _data(module, seed=7, zero_recurrent=True)
    grads, _ = _run(sj.online_method("rflo", module, params), params, carry, xs, ys)
    rtrl, _ = _run(sj.online_method("rtrl", module, params), params, carry, xs, ys)
    _assert_steps(grads, rtrl)
    assert tree_rel_err(_sum_t(grads), _bptt(module, params, carry, xs, ys)) < 1e-10


# ---------------------------------------------------------------------- random feedback
def test_random_feedback_replaces_the_heads_transpose():
    """feedback="random": the head's gradient is unchanged; the recurrent layer's is its
    method's gradient of the cotangent ε B (B from random_feedback with the state's key)."""
    xs = jax.random.normal(jax.random.key(0), (1, 3, 2))
    ys = jnp.array([[0, 1, 1]])
    grads = {}
    for fb in ("symmetric", "random"):
        learner = sj.OnlineLearner(sj.LeakyRNNCell(5, tau=2.0), readout_size=2, method="rflo",
                                   optimizer=optax.sgd(1.0), feedback=fb)
        state = learner.init(jax.random.key(1), batch_size=3, input_size=2)
        new, _, _ = jax.jit(learner.step)(state, xs[0], ys[0])
        grads[fb] = jax.tree.map(jnp.subtract, state.params, new.params)  # sgd(1): the gradient
    np.testing.assert_allclose(grads["random"]["layers_1"]["kernel"], grads["symmetric"]["layers_1"]["kernel"],
                               rtol=1e-6)
    assert tree_rel_err(grads["random"]["layers_0"], grads["symmetric"]["layers_0"]) > 1e-2
    # the same gradient by hand
    stages, methods = learner.stages, learner.methods(state.params)
    carries, mstates = state.carry, state.method_state
    out, recs = forward(stages, state.params, carries, mstates, xs[0], methods)
    cot = jax.grad(lambda o: learner.loss_fn(o, ys[0]).mean())(out)
    fbm = random_feedback(stages, recs, state.key, 2, jnp.float32)
    assert fbm.shape == (2, 5) and 0.2 < float(jnp.std(fbm)) * np.sqrt(5) < 2.0
    g, _ = backward(stages, state.params, recs, cot, methods, (recs[0][2].state,), fbm)
    c = cot @ fbm
    g_hand, _ = methods[0].gradient(state.params["layers_0"], recs[0][2].state, c)
    assert tree_rel_err(grads["random"]["layers_0"], g_hand) < 1e-6
    assert tree_rel_err(g["layers_0"], g_hand) < 1e-6
    with pytest.raises(ValueError, match="feedback must be 'symmetric' or 'random', got 'transpose'"):
        sj.OnlineLearner(sj.LeakyRNNCell(5), readout_size=2, feedback="transpose")
    with pytest.raises(ValueError, match="feedback='random' needs a feed-forward head"):
        sj.OnlineLearner(sj.LeakyRNNCell(5), feedback="random")


# ------------------------------------------------------------------- learning a memory task
LN2 = float(np.log(2))  # chance, in nats


def _recall_task(key, steps, batch, delay):
    """The target at t is the bit shown at t − delay; the bit is shown on two input channels
    (``[b, 1 − b]``, so a spiking layer always gets a positive drive)."""
    bits = jax.random.bernoulli(key, 0.5, (steps + delay, batch)).astype(jnp.int32)
    xs = jnp.stack([bits, 1 - bits], -1).astype(jnp.float32)
    return xs[delay:], bits[:-delay]


def _learn(cell, method, delay, chunks=6, lr=1e-2, **kw):
    """``cell`` + Dense(2) head, float32, trained online on ``chunks`` chunks of 50 steps
    (batch 16); the mean loss of each chunk."""
    learner = sj.OnlineLearner(cell, readout_size=2, method=method, optimizer=optax.adam(lr), **kw)
    state = learner.init(jax.random.key(1), batch_size=16, input_size=2)
    run = jax.jit(learner.run)
    key, losses = jax.random.key(2), []
    for _ in range(chunks):
        key, k = jax.random.split(key)
        xs, ys = _recall_task(k, 50, 16, delay)
        state, _, metrics = run(state, xs, ys)
        losses.append(float(metrics["loss"].mean()))
    return learner, state, losses


def test_eprop_learns_the_memory_task():
    """Spiking layer (32 neurons, τ_m = 2) + Dense head, 400 online steps: recall the bit of the
    previous step (chance ln 2 = 0.69 nats).  Mean loss of the last 100 steps, measured: ALIF
    with symmetric feedback 0.12, LIF with random feedback 0.10 (over 4 other seeds: 0.07-0.14
    and 0.05-0.11).  The bit of two steps back was not learned in 300 steps (e-prop 0.45-0.55
    nats, exact RTRL on the same network 0.34-0.39)."""
    learner, state, losses = _learn(sj.ALIFCell(32, tau_m=2.0, tau_a=20.0, v_th=0.5), "eprop", delay=1, chunks=8)
    assert [m.name for m in learner.methods(state.params)] == ["eprop"]
    assert np.mean(losses[-2:]) < 0.3 * LN2, losses
    _, _, losses = _learn(sj.LIFCell(32, tau_m=2.0, v_th=0.5), "eprop", delay=1, chunks=8, feedback="random")
    assert np.mean(losses[-2:]) < 0.3 * LN2, losses


def test_rflo_learns_the_memory_task():
    """A leaky RNN (16 units, τ = 1.5), 300 online steps.  Mean loss of the last 100 steps,
    measured: the bit of two steps back with symmetric feedback 0.16 (4 other seeds:
    0.13-0.16); the previous bit with random feedback (Murray's rule) 0.06 (0.05-0.08).  With
    random feedback the bit of two steps back is seed-dependent (0.13-0.43 nats)."""
    learner, state, losses = _learn(sj.LeakyRNNCell(16, tau=1.5), "rflo", delay=2)
    assert [type(m).__name__ for m in learner.methods(state.params)] == ["RFLO"]
    assert np.mean(losses[-2:]) < 0.4 * LN2, losses
    _, _, losses = _learn(sj.LeakyRNNCell(16, tau=1.5), "rflo", delay=1, feedback="random")
    assert np.mean(losses[-2:]) < 0.3 * LN2, losses
