"""Generic-path SnAp-n storing only its pattern: the state holds the padded pattern, and its
values are ``(D J + I) ⊙ M_n`` with ``D``, ``I`` from ``jax.jacfwd`` (float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_generic import LNGRU, _data

import snapjax as sj
from snapjax.methods.dense import dense_method
from snapjax.methods.generic_pattern import pattern_layout

F64 = jnp.float64
K, N_IN, B, T = 4, 3, 2, 5


def _unit_local_columns(params, k):
    """Bool ``(p,)``: LNGRU parameters that write one unit only (update gate and norm)."""
    flags = {name: jax.tree.map(lambda a, local=(name in ("iz", "hz", "ln")): np.full(np.shape(a), local), leaf)
             for name, leaf in params.items()}
    return np.asarray(ravel_pytree(flags)[0], bool)


def _owner_unit(params, k):
    """``(p,)``: the unit each parameter writes (its kernel column / bias or scale index)."""
    owner = jax.tree.map(lambda a: np.broadcast_to(np.arange(k), np.shape(a)).astype(float), params)
    return np.asarray(ravel_pytree(owner)[0]).astype(int)


def test_layernorm_gru_snap1_state_is_the_pattern_and_equals_jacfwd_recursion(x64):
    module = LNGRU(K)
    params, carry, xs, ys = _data(module, K, seed=3, steps=T)
    rec = sj.as_recurrent(module)
    method = dense_method(rec, params, n=1, input_size=N_IN)
    assert method.storage == "pattern" and "storage='pattern'" in repr(method)
    assert method.layout[0].colors is None  # densely stored columns: I is taken whole

    # M_1 by hand: update-gate and norm parameters reach their own unit, the others (through
    # the layer norm's mean and variance) every unit.
    theta, unravel = ravel_pytree(params)
    p = theta.size
    local, owner = _unit_local_columns(params, K), _owner_unit(params, K)
    M = np.ones((K, p), bool)
    M[:, local] = np.arange(K)[:, None] == owner[None, local]
    np.testing.assert_array_equal(method.pattern(N_IN), M)
    # the state holds exactly the pattern's entries: one per unit-local parameter, k per other
    assert method.num_stored() == int(local.sum()) + K * int((~local).sum()) == int(M.sum())
    state = method.init(B, F64)
    assert sum(a.size for a in state.influence) == B * method.num_stored()

    def f(th, h, x):  # one example
        return rec.apply(unravel(th), h[None], x[None])[0]

    J_ref = np.zeros((B, K, p))
    c = carry
    step = jax.jit(method.step)
    for t in range(T):
        for b in range(B):
            D = np.asarray(jax.jacfwd(f, argnums=1)(theta, c[b], xs[t, b]))
            I_ = np.asarray(jax.jacfwd(f, argnums=0)(theta, c[b], xs[t, b]))
            J_ref[b] = (D @ J_ref[b] + I_) * M
        c_new, state, _ = step(params, c, state, xs[t])
        c = c_new
        np.testing.assert_allclose(np.asarray(method.to_dense(state)), J_ref, rtol=1e-12, atol=1e-14)
        cot = ys[t] * jnp.cos(c)
        g, state = method.gradient(params, state, cot)
        np.testing.assert_allclose(ravel_pytree(g)[0], np.einsum("bk,bkp->p", np.asarray(cot), J_ref),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [1, 2])
def test_pattern_storage_equals_dense_storage_flax_gru_with_masks(x64, n):
    """A flax GRU forced onto the generic path, sparse: SnAp-2's columns reach 1..k units, so
    several widths (and a dense group) are stored; the gradients of every step equal the dense
    masked storage and the compressed engine."""
    module = nn.GRUCell(6, param_dtype=F64)
    params, carry, xs, ys = _data(module, 6, seed=4, steps=T)
    masks = sj.random_masks(2, params, 0.2)
    rec = sj.as_recurrent(module, generic=True)
    pat = sj.online_method(f"snap{n}", rec, params, masks=masks, input_size=N_IN)
    den = sj.online_method(f"snap{n}", rec, params, masks=masks, input_size=N_IN, layout="dense")
    assert (pat.storage, den.storage) == ("pattern", "dense")
    assert pat.num_stored() < den.num_stored() and pat.num_stored() >= pat.pattern_count(N_IN)
    # SnAp-1: every parameter writes one unit, so one product gives all of I (row colouring);
    # SnAp-2 here has densely stored columns and takes I whole
    assert pat.layout[0].num_colors == {1: 1, 2: 6}[n]
    if n == 2:
        widths = {g.width for g in pat.layout[0].groups}
        assert widths == {2, 3} and len(pat.layout[0].dense_cols) > 0
    cmp = sj.online_method(f"snap{n}", module, params, masks=masks)
    outs = []
    for method in (pat, den, cmp):
        def body(c, inp, method=method):
            carry, st = c
            carry, st, _ = method.step(params, carry, st, inp[0])
            g, st = method.gradient(params, st, inp[1] * jnp.cos(carry))
            return (carry, st), g
        outs.append(jax.jit(lambda c0, method=method, body=body: jax.lax.scan(
            body, (c0, method.init(B, F64)), (xs, ys))[1])(carry))
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_layout_buckets_widths_and_drops_unreached_columns():
    k = 16
    widths = [1, 2, 3, 5, 8, 9, 16, 0]
    pattern = np.zeros((k, len(widths)), bool)
    for j, w in enumerate(widths):
        pattern[(np.arange(w) * 3 + j) % k, j] = True
    layout = pattern_layout(pattern)
    assert [(g.cols.tolist(), g.width) for g in layout.groups] == [([0], 1), ([1], 2), ([2], 3), ([3, 4], 8)]
    assert layout.dense_cols.tolist() == [5, 6] and layout.dense_mask is not None  # 9 and 16 of 16
    assert layout.num_stored() == 1 + 2 + 3 + 2 * 8 + 2 * 16
    assert layout.shapes(3) == ((3, 16, 2), (3, 1, 1), (3, 2, 1), (3, 3, 1), (3, 8, 2))
    # ones on every gathered slot, padding included; the dense group holds its mask
    stored = (jnp.asarray(layout.dense_mask, float)[None],) + tuple(jnp.ones(s) for s in layout.shapes(1)[1:])
    dense = np.asarray(layout.to_dense(stored))[0]
    assert np.array_equal(dense != 0, pattern)  # padding is never scattered back
    with pytest.raises(ValueError, match=r"\(k, p\) bool array"):
        pattern_layout(np.ones(4, bool))
    with pytest.raises(ValueError, match="ipattern must be a bool array of shape"):
        pattern_layout(pattern, ~pattern)


def test_row_colouring_of_the_immediate_jacobian(x64):
    """Rows of P_I sharing a column get different colours; one colour sum per colour then
    recovers I on P_I exactly (checked on a random I with that pattern)."""
    k, p = 6, 9
    pattern = np.zeros((k, p), bool)
    ipat = np.zeros((k, p), bool)
    for j, rows in enumerate([[0], [1], [2, 3], [3], [4, 5], [5], [0, 2], [1], [4]]):
        ipat[rows, j] = True
        pattern[rows, j] = True
        pattern[(rows[0] + 1) % k, j] = True  # M wider than P_I
    layout = pattern_layout(pattern, ipat)
    c = layout.colors
    assert layout.num_colors < k and c is not None
    for rows in ([2, 3], [4, 5], [0, 2]):
        assert c[rows[0]] != c[rows[1]]
    rng = np.random.default_rng(0)
    I = np.where(ipat, rng.normal(size=(k, p)), 0.0)[None]  # (1, k, p)
    V = np.einsum("ck,bkp->bcp", layout.color_cotangents(np.float64), I)
    zero = tuple(jnp.zeros(s, F64) for s in layout.shapes(1))
    d = jnp.zeros((1, k, k), F64)
    by_colour = layout.to_dense(layout.step(d, jnp.asarray(V), zero))
    whole = pattern_layout(pattern)  # no colouring: I taken whole
    np.testing.assert_array_equal(by_colour, whole.to_dense(whole.step(d, jnp.asarray(I), zero)))
    np.testing.assert_array_equal(np.asarray(by_colour)[0], I[0])


def test_storage_choice_and_arguments():
    module = LNGRU(3, jnp.float32)
    params = module.init(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 2)))["params"]
    rec = sj.as_recurrent(module)
    assert dense_method(rec, params, n=1).storage == "dense"  # input size unknown: dense, as before
    assert dense_method(rec, params, n=1, input_size=2).storage == "pattern"
    assert dense_method(rec, params, input_size=2).storage == "dense"  # RTRL
    assert dense_method(rec, params, n=2, input_size=2).storage == "dense"  # M_2 is full here
    forced = dense_method(rec, params, n=2, input_size=2, storage="pattern")
    assert forced.storage == "pattern" and forced.num_stored() == 3 * forced.p
    with pytest.raises(ValueError, match="storage='pattern' needs input_size"):
        dense_method(rec, params, n=1, storage="pattern")
    with pytest.raises(ValueError, match="storage must be None, 'pattern' or 'dense'"):
        dense_method(rec, params, n=1, storage="table")
    method = dense_method(rec, params, n=1, input_size=2)
    state = method.init(2)
    with pytest.raises(ValueError, match="pattern storage was built for x of shape"):
        method.step(params, jnp.zeros((2, 3)), state, jnp.zeros((2, 4)))
