"""EGRU cell: exact RTRL == BPTT, thresholds, pseudo-derivatives, SnAp-1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from conftest import random_masks, tree_rel_err
from snapjax.cells.egru import EGRUCell, egru_spec, heaviside


def _setup(units=6, n_in=3, batch=2, T=8, seed=0, **kw):
    kw.setdefault("threshold_init", (0.0, 0.4))
    kw.setdefault("epsilon", 0.5)
    cell = EGRUCell(units, param_dtype=jnp.float64, **kw)
    keys = jax.random.split(jax.random.key(seed), 4)
    carry0 = cell.initialize_carry(keys[0], (batch, n_in))
    carry0 = (0.5 * jax.random.normal(keys[3], (batch, units), jnp.float64), carry0[1])
    xs = 2.0 * jax.random.normal(keys[1], (T, batch, n_in), jnp.float64)
    ys = jax.random.normal(keys[2], (T, batch, units), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    return cell, params, carry0, xs, ys


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def test_params_and_apply(x64):
    cell, params, carry0, xs, _ = _setup(threshold_init=(0.2, 0.3))
    assert set(params) == {"iu", "ir", "iz", "hu", "hr", "hz", "threshold"}
    assert set(params["iu"]) == {"kernel", "bias"} and set(params["hu"]) == {"kernel"}
    th = np.asarray(params["threshold"])
    assert th.shape == (6,) and np.all((th >= 0.2) & (th <= 0.3))
    (c, h), out = cell.apply({"params": params}, carry0, xs[0])
    np.testing.assert_array_equal(out, h)
    # h is c where c exceeds the threshold, exactly 0 elsewhere (events)
    np.testing.assert_array_equal(np.asarray(h), np.where(np.asarray(c) > th, np.asarray(c), 0.0))
    const = EGRUCell(4, threshold_init=0.7).init(jax.random.key(0), EGRUCell(4).initialize_carry(None, (1, 2)),
                                                  jnp.ones((1, 2)))["params"]["threshold"]
    np.testing.assert_allclose(const, 0.7)


@pytest.mark.parametrize("density,shape", [(None, "triangle"), (0.4, "rectangle"), (None, "fast_sigmoid")])
def test_rtrl_equals_bptt(x64, density, shape):
    cell, params, carry0, xs, ys = _setup(pseudo_derivative=shape, seed=1)
    masks = None if density is None else random_masks(np.random.default_rng(0), cell.spec, params, density)
    ref = sj.bptt_gradient(cell, params, carry0, xs, ys, _loss, masks=masks)
    out = sj.online_gradient(sj.online_method("rtrl", cell, params, masks=masks), params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10
    np.testing.assert_allclose(out.outputs, ref.outputs, rtol=1e-12, atol=1e-14)
    frac = float(np.mean(np.asarray(ref.outputs) != 0))
    assert 0.05 < frac < 0.95  # events happen, but not everywhere: the test exercises H
    assert float(jnp.linalg.norm(ref.grads["threshold"])) > 0


def test_fixed_threshold_zero_gradient(x64):
    cell, params, carry0, xs, ys = _setup(learn_threshold=False, seed=2)
    ref = sj.bptt_gradient(cell, params, carry0, xs, ys, _loss)
    out = sj.online_gradient(sj.online_method("rtrl", cell, params), params, carry0, xs, ys, _loss)
    snap = sj.online_gradient(sj.online_method("snap1", cell, params), params, carry0, xs, ys, _loss)
    for g in (ref, out, snap):
        assert np.all(np.asarray(g.grads["threshold"]) == 0)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10


def test_snap1_runs(x64):
    cell, params, carry0, xs, ys = _setup(units=10, seed=3)
    out = sj.online_gradient(sj.online_method("snap1", cell, params), params, carry0, xs, ys, _loss)
    leaves = jax.tree.leaves(out.grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.linalg.norm(out.grads["threshold"])) > 0


@pytest.mark.parametrize("shape", ["triangle", "rectangle", "fast_sigmoid"])
def test_pseudo_derivative_shapes(x64, shape):
    gamma, eps = 0.7, 0.25
    H = heaviside(shape, gamma, eps)
    x = jnp.array([-1.0, -0.3, -0.2, -0.1, 0.0, 0.05, 0.2, 0.3, 1.0])
    np.testing.assert_array_equal(H(x), (np.asarray(x) > 0).astype(float))
    d = jax.vmap(jax.grad(H))(x)
    a = np.abs(np.asarray(x)) / eps
    want = {
        "triangle": gamma * np.maximum(0, 1 - a),
        "rectangle": gamma * (a < 1),
        "fast_sigmoid": gamma / (1 + a) ** 2,
    }[shape]
    np.testing.assert_allclose(d, want, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown pseudo-derivative 'gaussian'"):
        heaviside("gaussian")
    assert egru_spec(8, True, shape, gamma, eps) is egru_spec(8, True, shape, gamma, eps)
