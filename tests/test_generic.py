"""Generic (dense-Jacobian) RTRL / SnAp-n: exact against BPTT through lax.scan for a layer-norm
GRU, equal to the compressed engine on flax cells forced through the generic path."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import snapjax as sj
from conftest import tree_rel_err
from snapjax.methods.dense import DenseInfluence, GenericInfluence, dense_method
from snapjax.methods.generic_support import param_masks

F64 = jnp.float64
UNITS, N_IN, B, T = 4, 3, 2, 6


class LNGRU(nn.Module):
    """GRU (flax form, reset gate on the recurrent projection) whose candidate is LayerNorm'd."""

    features: int
    param_dtype: Any = F64

    @nn.compact
    def __call__(self, carry, x):
        dense = functools.partial(nn.Dense, self.features, param_dtype=self.param_dtype)
        r = nn.sigmoid(dense(name="ir")(x) + dense(use_bias=False, name="hr")(carry))
        z = nn.sigmoid(dense(name="iz")(x) + dense(use_bias=False, name="hz")(carry))
        n = jnp.tanh(nn.LayerNorm(param_dtype=self.param_dtype, name="ln")(dense(name="in")(x) + r * dense(name="hn")(carry)))
        h = (1.0 - z) * n + z * carry
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        del rng
        return jnp.zeros(input_shape[:-1] + (self.features,), self.param_dtype)


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def _data(module, units, seed, batch=B, n_in=N_IN, steps=T):
    k = jax.random.split(jax.random.key(seed), 4)
    carry = module.initialize_carry(k[0], (batch, n_in))
    carry = jax.tree.map(lambda c: 0.5 * jax.random.normal(k[3], c.shape, F64), carry)
    xs = jax.random.normal(k[1], (steps, batch, n_in), F64)
    ys = jax.random.normal(k[2], (steps, batch, units), F64)
    params = module.init(k[0], carry, xs[0])["params"]
    return params, carry, xs, ys


def _online(method, params, carry, xs, ys):
    """Per-step online gradients (leading axis T) and carries, driven by a jitted lax.scan."""

    def body(c, inp):
        carry, st = c
        x, y = inp
        carry, st, _ = method.step(params, carry, st, x)
        dl = jax.grad(lambda cc: _loss(method.cell.output(cc), y))(carry)
        g, st = method.gradient(params, st, dl)
        return (carry, st), (g, carry)

    batch = jax.tree.leaves(carry)[0].shape[0]
    run = jax.jit(lambda c0: lax.scan(body, (c0, method.init(batch, F64)), (xs, ys))[1])
    return run(carry)


def _bptt(rec, params, carry, xs, ys, masks=None):
    """Reference: jax.grad of the summed loss through lax.scan, masked weights zeroed."""

    def total(p):
        p = sj.apply_masks(p, masks)

        def body(c, inp):
            c = rec.apply(p, c, inp[0])
            return c, _loss(rec.output(c), inp[1])

        return jnp.sum(lax.scan(body, carry, (xs, ys))[1])

    return jax.grad(total)(params)


def _sum_t(tree):
    return jax.tree.map(lambda a: a.sum(0), tree)


def _step(tree, t):
    return jax.tree.map(lambda a: a[t], tree)


@pytest.mark.parametrize("density", [None, 0.5])
def test_rtrl_equals_bptt_layernorm_gru(x64, density):
    module = LNGRU(UNITS)
    params, carry, xs, ys = _data(module, UNITS, seed=1)
    masks = None if density is None else sj.random_masks(3, params, density)
    rec = sj.as_recurrent(module)
    assert rec.spec is None  # the generic path
    method = sj.online_method("rtrl", rec, params, masks=masks)
    assert isinstance(method, DenseInfluence) and method.name == "rtrl"
    grads, carries = _online(method, params, carry, xs, ys)
    ref = _bptt(rec, params, carry, xs, ys, masks)
    assert tree_rel_err(_sum_t(grads), ref) < 1e-10
    assert np.abs(np.asarray(ref["ln"]["scale"])).sum() > 0  # layer-norm parameters are trained too
    fwd = lax.scan(lambda c, x: (rec.apply(sj.apply_masks(params, masks), c, x),) * 2, carry, xs)[1]
    np.testing.assert_allclose(carries, fwd, rtol=1e-13, atol=1e-14)
    if masks is not None:  # masked weights get exactly zero gradient, unmasked ones do not
        for name, m in masks.items():
            g = np.asarray(_sum_t(grads)[name]["kernel"])
            assert np.all(g[~m] == 0) and np.all(g[m] != 0)


def _flax_gru():
    module = nn.GRUCell(5, param_dtype=F64)
    params, carry, xs, ys = _data(module, 5, seed=2, steps=5)
    return module, params, carry, xs, ys


@pytest.mark.parametrize("name", ["rtrl", "snap1", "snap2"])
@pytest.mark.parametrize("density", [None, 0.3])
def test_generic_equals_compressed_gru(x64, name, density):
    module, params, carry, xs, ys = _flax_gru()
    masks = None if density is None else sj.random_masks(7, params, density)
    compressed = sj.online_method(name, module, params, masks=masks)
    generic = sj.online_method(name, sj.as_recurrent(module, generic=True), params, masks=masks)
    assert isinstance(generic, DenseInfluence) and generic.name == compressed.name == name
    g_gen, c_gen = _online(generic, params, carry, xs, ys)
    g_cmp, c_cmp = _online(compressed, params, carry, xs, ys)
    np.testing.assert_allclose(c_gen, c_cmp, rtol=1e-13, atol=1e-14)
    for t in range(xs.shape[0]):  # the gradient of every step, not only the sum
        assert tree_rel_err(_step(g_gen, t), _step(g_cmp, t)) < 1e-10, t
    assert generic.pattern_count(N_IN) == compressed.pattern_count()
    if name == "snap2" and density is not None:  # the sparse pattern really truncates J here
        rtrl = sj.online_method("rtrl", sj.as_recurrent(module, generic=True), params, masks=masks)
        assert tree_rel_err(_sum_t(g_gen), _sum_t(_online(rtrl, params, carry, xs, ys)[0])) > 1e-3
        assert generic.pattern_count(N_IN) < rtrl.pattern_count(N_IN)


@pytest.mark.parametrize("name", ["rtrl", "snap2"])
def test_generic_equals_compressed_lstm_tuple_carry(x64, name):
    module = nn.LSTMCell(3, param_dtype=F64)
    params, carry, xs, ys = _data(module, 3, seed=4, steps=4)
    masks = sj.random_masks(1, params, 0.5)
    generic = sj.online_method(name, sj.as_recurrent(module, generic=True), params, masks=masks)
    compressed = sj.online_method(name, module, params, masks=masks)
    g_gen, _ = _online(generic, params, carry, xs, ys)
    g_cmp, _ = _online(compressed, params, carry, xs, ys)
    assert generic.carry.size == 6
    for t in range(xs.shape[0]):
        assert tree_rel_err(_step(g_gen, t), _step(g_cmp, t)) < 1e-10, t


@pytest.mark.parametrize("density", [None, 0.3])
def test_snap_n_ge_k_equals_rtrl(x64, density):
    module, params, carry, xs, ys = _flax_gru()
    rec = sj.as_recurrent(module, generic=True)
    masks = None if density is None else sj.random_masks(5, params, density)
    rtrl, _ = _online(dense_method(rec, params, masks=masks), params, carry, xs, ys)
    for n in (5, 9):  # k = 5
        snap, _ = _online(dense_method(rec, params, n=n, masks=masks), params, carry, xs, ys)
        assert tree_rel_err(snap, rtrl) < 1e-12


def test_pattern_grows_with_n_and_construction_equals_lazy(x64):
    """M_1 is row-local (one entry per unmasked parameter of a GRU), M_n grows with n; the
    pattern built at construction (input_size=) equals the one built at the first step."""
    module, params, *_ = _flax_gru()
    rec = sj.as_recurrent(module, generic=True)
    masks = sj.random_masks(11, params, 0.3)
    unmasked = sum(np.size(a) for a in jax.tree.leaves(params)) - sum((~m).sum() for m in masks.values())
    counts = [dense_method(rec, params, n=n, masks=masks).pattern_count(N_IN) for n in (1, 2, 3)]
    assert counts[0] == unmasked and counts[0] < counts[1] <= counts[2] <= 5 * unmasked
    eager = dense_method(rec, params, n=2, masks=masks, input_size=N_IN)
    assert eager.built_patterns == (N_IN,)
    lazy = dense_method(rec, params, n=2, masks=masks)
    assert lazy.built_patterns == ()
    np.testing.assert_array_equal(lazy.pattern(N_IN), eager.pattern(N_IN))


def test_full_tree_masks_equal_projection_masks(x64):
    module = LNGRU(UNITS)
    params, carry, xs, ys = _data(module, UNITS, seed=6)
    rec = sj.as_recurrent(module)
    proj = sj.random_masks(2, params, 0.5)
    tree = {name: {"kernel": m} for name, m in proj.items()}
    tree["ln"] = {"scale": np.array([1, 0, 1, 1]), "bias": None}
    a = param_masks(params, proj)
    b = param_masks(params, tree)
    for ma, mb, leaf in zip(a.leaves, b.leaves, jax.tree.leaves(params)):
        if mb is not None and mb.shape == (UNITS,):  # the extra LayerNorm scale mask
            assert ma is None
        else:
            assert (ma is None and mb is None) or np.array_equal(ma, mb)
    g_tree = _sum_t(_online(dense_method(rec, params, masks=tree), params, carry, xs, ys)[0])
    assert float(g_tree["ln"]["scale"][1]) == 0.0 and np.all(np.asarray(g_tree["ln"]["scale"])[[0, 2, 3]] != 0)
    g_proj = _sum_t(_online(dense_method(rec, params, masks=proj), params, carry, xs, ys)[0])
    for name in proj:
        np.testing.assert_array_equal(g_tree[name]["kernel"] == 0, g_proj[name]["kernel"] == 0)


def test_state_reset_and_float32_highest():
    module = LNGRU(3, jnp.float32)
    params = module.init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
    method = dense_method(sj.as_recurrent(module), params, n=1, precision="highest")
    st = method.init(2)
    assert isinstance(st, GenericInfluence) and st.influence.shape == (2, 3, method.p)
    assert method.batch_axes() == GenericInfluence(influence=0) and method.num_stored() == 3 * method.p
    carry = jnp.ones((2, 3), jnp.float32)
    carry, st, aux = jax.jit(method.step)(params, carry, st, jnp.ones((2, 2), jnp.float32))
    assert aux == {} and bool(jnp.all(jnp.isfinite(st.influence))) and float(jnp.abs(st.influence).sum()) > 0
    st2 = method.reset(st, jnp.array([True, False]))
    assert float(jnp.abs(st2.influence[0]).sum()) == 0.0
    np.testing.assert_array_equal(st2.influence[1], st.influence[1])


def test_bad_arguments(x64):
    module, params, carry, xs, _ = _flax_gru()
    rec = sj.as_recurrent(module, generic=True)
    with pytest.raises(ValueError, match="integer n >= 1"):
        dense_method(rec, params, n=0)
    with pytest.raises(ValueError, match="integer n >= 1"):
        dense_method(rec, params, n=True)
    with pytest.raises(ValueError, match="unknown parameter"):
        dense_method(rec, params, masks={"nope": np.ones((3, 5))})
    with pytest.raises(ValueError, match=r"has shape \(2, 5\), the parameter has shape \(3, 5\)"):
        dense_method(rec, params, masks={"ir": np.ones((2, 5))})
    with pytest.raises(ValueError, match="only 0/1"):
        dense_method(rec, params, masks={"ir": np.full((3, 5), 0.5)})
    with pytest.raises(ValueError, match="floating point"):
        dense_method(rec, jax.tree.map(lambda a: a.astype(jnp.int32), params))
    with pytest.raises(ValueError, match="precision must be"):
        dense_method(rec, params, precision="bogus")
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        dense_method(rec, params, n=1, input_size=0)
    method = dense_method(rec, params)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        method.init(0)
    with pytest.raises(ValueError, match="dtype must be floating point"):
        method.init(2, jnp.int32)
    st = method.init(B, F64)
    with pytest.raises(ValueError, match="carry must be shaped like the carry"):
        method.step(params, carry[:, :3], st, xs[0])
    with pytest.raises(ValueError, match=r"x must have shape \(2, n_in\)"):
        method.step(params, carry, st, xs[0][:1])
    with pytest.raises(ValueError, match=r"influence must have shape \(2, 5, "):
        method.step(params, carry, method.init(3, F64), xs[0])
    with pytest.raises(ValueError, match="dloss_dcarry must be shaped like the carry"):
        method.gradient(params, st, (carry, carry))
    with pytest.raises(ValueError, match="dloss_dcarry has batch 1"):
        method.gradient(params, st, carry[:1])
