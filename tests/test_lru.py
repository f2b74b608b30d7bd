"""LRU: the maths against complex arithmetic, ring initialisation, and exactness
RTRL == SnAp-1 == BPTT (the recurrence is diagonal, so SnAp-1 is exact)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import snapjax as sj
from conftest import tree_rel_err
from snapjax.cells import cell_step
from snapjax.engine.influence import influence_tracker
from snapjax.cells.lru import LRUCell, lru_lambda, lru_spec


def _setup(units, n_in, batch, T, seed, learn_gamma=True, r_min=0.5, r_max=0.99):
    cell = LRUCell(units, r_min=r_min, r_max=r_max, learn_gamma=learn_gamma, param_dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(seed), 4)
    carry0 = cell.initialize_carry(keys[0], (batch, n_in))
    carry0 = jax.tree.map(lambda c: 0.5 * jax.random.normal(keys[3], c.shape, jnp.float64), carry0)
    xs = jax.random.normal(keys[1], (T, batch, n_in), jnp.float64)
    ys = jax.random.normal(keys[2], (T, batch, 2 * units), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    return cell, params, carry0, xs, ys


def _loss(y_out, y):
    return jnp.sum(jnp.sin(y_out) * y) + 0.5 * jnp.sum(y_out**2)


def _online(tracker, params, carry0, xs, ys):
    """Σ_t (∂L_t/∂s_t) J_t with the loss on the layer output concat(re, im)."""
    spec = tracker.spec
    s0 = spec.to_internal(carry0)

    def body(c, inp):
        s, J, g = c
        x, y = inp
        s, J = tracker.step(params, s, J, x)
        dlds = jax.grad(lambda st: _loss(spec.layer_output(st), y))(s)
        return (s, J, jax.tree.map(jnp.add, g, tracker.gradient(J, dlds))), None

    init = (s0, tracker.init(s0.shape[0], jnp.float64), jax.tree.map(jnp.zeros_like, params))
    (_, _, g), _ = lax.scan(body, init, (xs, ys))
    return g


def _bptt(spec, params, carry0, xs, ys):
    """Independent reference: jax.grad of Σ_t L_t through lax.scan of the step."""

    def total(p):
        def body(s, inp):
            s = cell_step(spec, p, s, inp[0])
            return s, _loss(spec.layer_output(s), inp[1])

        return lax.scan(body, spec.to_internal(carry0), (xs, ys))[1].sum()

    return jax.grad(total)(params)


def test_step_is_the_complex_recurrence(x64):
    cell, params, carry0, xs, _ = _setup(4, 3, 2, 5, seed=1)
    P = jax.tree.map(np.asarray, params)
    lam = np.exp(-np.exp(P["nu_log"]) + 1j * np.exp(P["theta_log"]))
    gamma = np.exp(P["gamma_log"])
    B = P["B_re"]["kernel"] + 1j * P["B_im"]["kernel"]  # (n_in, N)
    h = np.asarray(carry0[0]) + 1j * np.asarray(carry0[1])
    carry = carry0
    for x in np.asarray(xs):
        h = lam * h + gamma * (x @ B)
        carry, y = cell.apply({"params": params}, carry, x)
        np.testing.assert_allclose(carry[0], h.real, rtol=0, atol=1e-13)
        np.testing.assert_allclose(carry[1], h.imag, rtol=0, atol=1e-13)
        np.testing.assert_allclose(y, np.concatenate([h.real, h.imag], -1), rtol=0, atol=1e-13)
    re, im = lru_lambda(params)
    np.testing.assert_allclose(re + 1j * im, lam, rtol=1e-14)


def test_dense_on_the_output_is_re_of_c_h(x64):
    """A Dense on concat(re, im) with kernel [C_reᵀ; −C_imᵀ] computes Re(C h)."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))
    C = rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))
    s = jnp.stack([h.real, h.imag], -1)
    y = lru_spec(4).layer_output(s)
    kernel = np.concatenate([C.real.T, -C.imag.T], 0)
    out = nn.Dense(3, use_bias=False).apply({"params": {"kernel": kernel}}, y)
    np.testing.assert_allclose(out, (h @ C.T).real, rtol=1e-13)


@pytest.mark.parametrize("r_min,r_max,max_phase", [(0.0, 1.0, 6.28), (0.9, 0.999, 3.14), (0.4, 0.6, 0.5)])
def test_ring_initialisation(x64, r_min, r_max, max_phase):
    cell = LRUCell(512, r_min=r_min, r_max=r_max, max_phase=max_phase, param_dtype=jnp.float64)
    params = cell.init(jax.random.key(3), cell.initialize_carry(jax.random.key(0), (1, 2)), jnp.zeros((1, 2)))["params"]
    re, im = lru_lambda(params)
    mod = np.abs(np.asarray(re + 1j * im))
    assert np.all(mod < 1.0) and np.all(mod >= r_min) and np.all(mod <= r_max)
    assert mod.max() - mod.min() > 0.5 * (r_max - r_min)  # spread over the ring
    phase = np.exp(np.asarray(params["theta_log"]))
    assert np.all(phase > 0) and np.all(phase <= max_phase)
    np.testing.assert_allclose(np.exp(params["gamma_log"]), np.sqrt(1 - mod**2), rtol=1e-12)
    assert np.var(np.asarray(params["B_re"]["kernel"])) == pytest.approx(1 / (2 * 2), rel=0.1)


def test_float32_init_keeps_lambda_inside_the_circle():
    cell = LRUCell(4096)  # r_max = 1: the uniform draw is kept 16 eps below 1
    params = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(0), (1, 2)), jnp.zeros((1, 2)))["params"]
    re, im = lru_lambda(params)
    assert np.all(np.abs(np.asarray(re + 1j * im)) < 1.0)
    assert np.all(np.isfinite(np.asarray(params["gamma_log"])))


def _diagonal_rtrl(params, carry0, xs, ys):
    """Hand-written exact RTRL for the LRU in complex form (Zucchet et al. 2023): every
    parameter of unit i has a complex influence e = dh_i/dθ with e_t = λ e_{t-1} + ∂h_t/∂θ|_imm;
    the gradient is Σ_t Re(conj(g_t) e_t) with g = ∂L/∂re + i ∂L/∂im."""
    P = jax.tree.map(np.asarray, params)
    lam = np.exp(-np.exp(P["nu_log"]) + 1j * np.exp(P["theta_log"]))
    dlam_dnu, dlam_dtheta = -np.exp(P["nu_log"]) * lam, 1j * np.exp(P["theta_log"]) * lam
    gamma = np.exp(P["gamma_log"])
    B = P["B_re"]["kernel"] + 1j * P["B_im"]["kernel"]
    h = np.asarray(carry0[0]) + 1j * np.asarray(carry0[1])
    e = {k: np.zeros((h.shape[0],) + np.shape(v), complex) for k, v in
         [("B_re", B), ("B_im", B), ("nu_log", lam), ("theta_log", lam), ("gamma_log", lam)]}
    grads = {k: np.zeros(v.shape[1:]) for k, v in e.items()}
    for x, y in zip(np.asarray(xs), np.asarray(ys)):
        u = x @ B
        imm = {"B_re": gamma * x[:, :, None], "B_im": 1j * gamma * x[:, :, None],
               "nu_log": dlam_dnu * h, "theta_log": dlam_dtheta * h, "gamma_log": gamma * u}
        e = {k: lam * e[k] + np.broadcast_to(imm[k], e[k].shape) for k in e}
        h = lam * h + gamma * u
        out = np.concatenate([h.real, h.imag], -1)
        dl = np.cos(out) * y + out  # derivative of _loss
        g = dl[:, : h.shape[1]] + 1j * dl[:, h.shape[1]:]
        for k in e:
            gk = np.conj(g[:, None, :]) * e[k] if e[k].ndim == 3 else np.conj(g) * e[k]
            grads[k] += gk.real.sum(0)
    return {k: ({"kernel": v} if k in ("B_re", "B_im") else v) for k, v in grads.items()}


def test_diagonal_rtrl_reference_equals_bptt(x64):
    """The claim behind 'SnAp-1 is RTRL for the LRU': an influence kept only on the parameter's
    own unit (both components) is exact, because D is block diagonal."""
    cell, params, carry0, xs, ys = _setup(5, 3, 2, 9, seed=7)
    ref = _bptt(cell.spec, params, carry0, xs, ys)
    assert tree_rel_err(_diagonal_rtrl(params, carry0, xs, ys), ref) < 1e-10



def test_rtrl_equals_bptt(x64):
    cell, params, carry0, xs, ys = _setup(5, 3, 2, 9, seed=7)
    tracker = influence_tracker(cell, params, "rtrl")
    assert tracker.layout == "diag" and tracker.width == 1  # O(p) exact RTRL: D is unit-diagonal
    rtrl = _online(tracker, params, carry0, xs, ys)
    assert tree_rel_err(rtrl, _bptt(cell.spec, params, carry0, xs, ys)) < 1e-10
    dense = _online(influence_tracker(cell, params, "rtrl", layout="dense"), params, carry0, xs, ys)
    assert tree_rel_err(dense, rtrl) < 1e-10


@pytest.mark.parametrize("learn_gamma", [True, False])
def test_snap1_equals_bptt(x64, learn_gamma):
    cell, params, carry0, xs, ys = _setup(5, 3, 2, 9, seed=7, learn_gamma=learn_gamma)
    assert set(params) == {"B_re", "B_im", "nu_log", "theta_log"} | ({"gamma_log"} if learn_gamma else set())
    snap1 = _online(influence_tracker(cell, params, "snap", 1), params, carry0, xs, ys)
    assert tree_rel_err(snap1, _bptt(cell.spec, params, carry0, xs, ys)) < 1e-10


def test_online_method_snap1_equals_bptt(x64):
    """The same through the method interface (flax carry (re, im), dL/dcarry)."""
    cell, params, carry0, xs, ys = _setup(4, 3, 2, 7, seed=5)
    method = sj.online_method("snap1", cell, params)

    def carry_loss(carry, y):
        return _loss(jnp.concatenate(carry, -1), y)

    def body(c, inp):
        carry, st, g = c
        carry, st, _ = method.step(params, carry, st, inp[0])
        gi, st = method.gradient(params, st, jax.grad(carry_loss)(carry, inp[1]))
        return (carry, st, jax.tree.map(jnp.add, g, gi)), None

    init = (carry0, method.init(2, jnp.float64), jax.tree.map(jnp.zeros_like, params))
    (_, _, grads), _ = lax.scan(body, init, (xs, ys))
    assert tree_rel_err(grads, _bptt(cell.spec, params, carry0, xs, ys)) < 1e-10


def test_online_method_builds_and_steps():
    cell = LRUCell(8)
    carry = cell.initialize_carry(jax.random.key(0), (2, 3))
    params = cell.init(jax.random.key(1), carry, jnp.zeros((2, 3)))["params"]
    method = sj.online_method("snap1", cell, params)  # runs verify_spec
    carry, state = method.init_carry(2), method.init(2)
    for _ in range(2):  # from a zero carry, ν and θ act only from the second step on
        carry, state, _ = method.step(params, carry, state, jnp.ones((2, 3)))
    grads, _ = method.gradient(params, state, jax.tree.map(jnp.ones_like, carry))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.isfinite(np.asarray(g)).all() and np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_bad_configuration():
    with pytest.raises(ValueError, match="r_min < r_max"):
        LRUCell(4, r_min=0.9, r_max=0.5).initialize_carry(jax.random.key(0), (1, 2))
    with pytest.raises(ValueError, match="positive int"):
        lru_spec(0)
