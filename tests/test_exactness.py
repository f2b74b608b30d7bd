"""Exact RTRL == BPTT, SnAp-n (n >= k) == RTRL, SnAp-1 == hand-derived formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from conftest import random_masks, tree_rel_err

CELLS = [sj.VanillaCell, sj.GRUCell, sj.LSTMCell]


def _setup(cell_cls, units, n_in, batch, T, seed):
    cell = cell_cls(units, param_dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(seed), 4)
    carry0 = cell.initialize_carry(keys[0], (batch, n_in))
    # A non-zero initial state exercises every term of D from the first step.
    carry0 = jax.tree.map(lambda c: 0.5 * jax.random.normal(keys[3], c.shape, jnp.float64), carry0)
    xs = jax.random.normal(keys[1], (T, batch, n_in), jnp.float64)
    ys = jax.random.normal(keys[2], (T, batch, units), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    return cell, params, carry0, xs, ys


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


@pytest.mark.parametrize("cell_cls", CELLS)
# The dense 7-unit case is slow: the dense case is fast at 3 units, 7 and 10 units fast with masks.
@pytest.mark.parametrize("units,n_in,batch,T,density", [
    (3, 2, 2, 6, None), pytest.param(7, 5, 3, 9, None, marks=pytest.mark.slow), (7, 5, 3, 9, 0.5), (10, 4, 2, 5, 0.1)])
def test_rtrl_equals_bptt(x64, cell_cls, units, n_in, batch, T, density):
    cell, params, carry0, xs, ys = _setup(cell_cls, units, n_in, batch, T, seed=units * 7 + batch)
    masks = None
    if density is not None:
        masks = random_masks(np.random.default_rng(units), cell.spec, params, density)
    ref = sj.bptt_gradient(cell, params, carry0, xs, ys, _loss, masks=masks)
    method = sj.online_method("rtrl", cell, params, masks=masks)
    out = sj.online_gradient(method, params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-12)
    np.testing.assert_allclose(out.outputs, ref.outputs, rtol=1e-12, atol=1e-14)
    if masks is not None:  # masked weights get exactly zero gradient
        for name, m in masks.items():
            assert np.all(np.asarray(out.grads[name]["kernel"])[~m] == 0)


@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("density", [None, 0.3])
def test_snap_n_ge_k_equals_rtrl(x64, cell_cls, density):
    units = 6
    cell, params, carry0, xs, ys = _setup(cell_cls, units, 3, 2, 8, seed=3)
    masks = None if density is None else random_masks(np.random.default_rng(1), cell.spec, params, density)
    rtrl = sj.online_gradient(sj.online_method("rtrl", cell, params, masks=masks), params, carry0, xs, ys, _loss)
    k = cell.spec.state_size
    for n in (k, k + 3):
        snap = sj.online_gradient(sj.online_method("snap", cell, params, n=n, masks=masks), params, carry0, xs, ys, _loss)
        assert tree_rel_err(snap.grads, rtrl.grads) < 1e-12


def test_snap_table_layout_full_equals_rtrl(x64):
    """A sparse net whose reachable sets are not all full still uses the gather ('table')
    layout; with n >= k it must equal RTRL exactly."""
    cell, params, carry0, xs, ys = _setup(sj.GRUCell, 10, 3, 2, 7, seed=5)
    # Block-diagonal recurrent masks: two disconnected groups of 5 units.
    block = np.kron(np.eye(2, dtype=bool), np.ones((5, 5), bool))
    masks = {name: block for name in ("hr", "hz", "hn")}
    method = sj.online_method("snap", cell, params, n=10, masks=masks)
    assert method.tracker.layout == "table" and method.tracker.width == 5
    rtrl = sj.online_gradient(sj.online_method("rtrl", cell, params, masks=masks), params, carry0, xs, ys, _loss)
    snap = sj.online_gradient(method, params, carry0, xs, ys, _loss)
    assert tree_rel_err(snap.grads, rtrl.grads) < 1e-12


@pytest.mark.parametrize("cell_cls", CELLS)
def test_snap1_equals_rtrl_on_one_step(x64, cell_cls):
    cell, params, carry0, xs, ys = _setup(cell_cls, 5, 3, 3, 1, seed=11)
    rtrl = sj.online_gradient(sj.online_method("rtrl", cell, params), params, carry0, xs, ys, _loss)
    snap1 = sj.online_gradient(sj.online_method("snap1", cell, params), params, carry0, xs, ys, _loss)
    assert tree_rel_err(snap1.grads, rtrl.grads) < 1e-13


def test_snap1_differs_from_rtrl_on_longer_sequences(x64):
    """Sanity check that the approximation is an approximation (the tests above can fail)."""
    cell, params, carry0, xs, ys = _setup(sj.GRUCell, 5, 3, 3, 6, seed=11)
    rtrl = sj.online_gradient(sj.online_method("rtrl", cell, params), params, carry0, xs, ys, _loss)
    snap1 = sj.online_gradient(sj.online_method("snap1", cell, params), params, carry0, xs, ys, _loss)
    assert tree_rel_err(snap1.grads, rtrl.grads) > 1e-3


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def test_snap1_gru_hand_derived_three_steps(x64):
    """SnAp-1 on a tiny GRU against the closed form, written out by hand in NumPy.

    For h' = (1-z) n + z h with r = σ(a_r), z = σ(a_z), n = tanh(a_n + r·q), q = U_hn h + b_hn:
      δ_z = (h - n) z (1-z),  δ_n = (1-z)(1-n²),  δ_r = δ_n q r (1-r)
      D_ii = z + δ_z U_hz[i,i] + δ_r U_hr[i,i] + δ_n r U_hn[i,i]
      I[W_ir[j,i]] = δ_r x_j,  I[W_iz[j,i]] = δ_z x_j,  I[W_in[j,i]] = δ_n x_j  (biases: x_j → 1)
      I[U_hr[j,i]] = δ_r h_j,  I[U_hz[j,i]] = δ_z h_j,  I[U_hn[j,i]] = δ_n r h_j  (b_hn: δ_n r)
      J_t[i, θ_i] = D_ii J_{t-1}[i, θ_i] + I_t[i, θ_i]; gradient Σ_t Σ_b (∂L/∂h_t)_i J_t[i, θ_i].
    """
    units, n_in, batch, T = 3, 2, 2, 3
    cell, params, carry0, xs, ys = _setup(sj.GRUCell, units, n_in, batch, T, seed=21)
    P = jax.tree.map(np.asarray, params)
    X, Y, h = np.asarray(xs), np.asarray(ys), np.asarray(carry0)
    J = {k: np.zeros((batch,) + np.shape(v)) for k, v in [
        ("ir", P["ir"]["kernel"]), ("iz", P["iz"]["kernel"]), ("in", P["in"]["kernel"]),
        ("hr", P["hr"]["kernel"]), ("hz", P["hz"]["kernel"]), ("hn", P["hn"]["kernel"]),
        ("b_ir", P["ir"]["bias"]), ("b_iz", P["iz"]["bias"]), ("b_in", P["in"]["bias"]), ("b_hn", P["hn"]["bias"]),
    ]}
    G = {k: np.zeros(v.shape[1:]) for k, v in J.items()}
    for t in range(T):
        x = X[t]
        r = _sigmoid(x @ P["ir"]["kernel"] + P["ir"]["bias"] + h @ P["hr"]["kernel"])
        z = _sigmoid(x @ P["iz"]["kernel"] + P["iz"]["bias"] + h @ P["hz"]["kernel"])
        q = h @ P["hn"]["kernel"] + P["hn"]["bias"]
        n = np.tanh(x @ P["in"]["kernel"] + P["in"]["bias"] + r * q)
        d_z = (h - n) * z * (1 - z)
        d_n = (1 - z) * (1 - n**2)
        d_r = d_n * q * r * (1 - r)
        Dii = (z + d_z * np.diag(P["hz"]["kernel"]) + d_r * np.diag(P["hr"]["kernel"])
               + d_n * r * np.diag(P["hn"]["kernel"]))
        imm = {
            "ir": x[:, :, None] * d_r[:, None, :], "iz": x[:, :, None] * d_z[:, None, :],
            "in": x[:, :, None] * d_n[:, None, :], "hr": h[:, :, None] * d_r[:, None, :],
            "hz": h[:, :, None] * d_z[:, None, :], "hn": h[:, :, None] * (d_n * r)[:, None, :],
            "b_ir": d_r, "b_iz": d_z, "b_in": d_n, "b_hn": d_n * r,
        }
        for k in J:
            scale = Dii[:, None, :] if J[k].ndim == 3 else Dii
            J[k] = scale * J[k] + imm[k]
        h = (1 - z) * n + z * h
        dl_dh = np.cos(h) * Y[t] + h  # derivative of _loss
        for k in J:
            G[k] += np.einsum("bi,b...i->...i", dl_dh, J[k])

    out = sj.online_gradient(sj.online_method("snap1", cell, params), params, carry0, xs, ys, _loss)
    g = jax.tree.map(np.asarray, out.grads)
    for name in ("ir", "iz", "in", "hr", "hz", "hn"):
        np.testing.assert_allclose(g[name]["kernel"], G[name], rtol=1e-12, atol=1e-14)
    for name in ("ir", "iz", "in", "hn"):
        np.testing.assert_allclose(g[name]["bias"], G["b_" + name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("flax_cls", [nn.GRUCell, nn.LSTMCell, nn.SimpleCell])
def test_flax_linen_cells_rtrl_equals_bptt(x64, flax_cls):
    """Parameters from flax.linen's own cells plug in unchanged."""
    cell = flax_cls(4, param_dtype=jnp.float64)
    carry0 = cell.initialize_carry(jax.random.key(0), (2, 3))
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (5, 2, 4), jnp.float64)
    params = cell.init(jax.random.key(3), carry0, xs[0])["params"]
    # BPTT through flax's own module (not through snapjax's cell_step) as the reference.
    def total(p):
        def body(c, xy):
            c, h = cell.apply({"params": p}, c, xy[0])
            return c, _loss(h, xy[1])
        return jax.lax.scan(body, carry0, (xs, ys))[1].sum()
    ref = jax.grad(total)(params)
    out = sj.online_gradient(sj.online_method("rtrl", cell, params), params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref) < 1e-10


@pytest.mark.parametrize("method", ["rtrl", "snap2"])
def test_online_gradient_continues_across_chunks(x64, method):
    """Two chunks chained through ``final_carry`` / ``final_method_state`` give exactly the
    one-sequence result (the influence is carried, not reset)."""
    cell, params, carry0, xs, ys = _setup(sj.GRUCell, 5, 3, 2, 8, seed=13)
    online = sj.online_method(method, cell, params)
    whole = sj.online_gradient(online, params, carry0, xs, ys, _loss)
    a = sj.online_gradient(online, params, carry0, xs[:3], ys[:3], _loss)
    b = sj.online_gradient(online, params, a.final_carry, xs[3:], ys[3:], _loss, method_state=a.final_method_state)
    assert tree_rel_err(jax.tree.map(jnp.add, a.grads, b.grads), whole.grads) < 1e-13
    assert sj.bptt_gradient(cell, params, carry0, xs, ys, _loss).final_method_state is None
