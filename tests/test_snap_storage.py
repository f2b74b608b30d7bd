"""SnAp-n's storage choice: its pattern's entries ("pattern") or RTRL's dense kernel masked to
the pattern ("dense"), decided once from the pattern's width; both give the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_rel_err

import snapjax as sj
from snapjax.engine.influence import influence_tracker
from snapjax.engine.patterns import DENSE_FRACTION, stores_dense
from snapjax.engine.propagation import SCATTER_ZEROS, apply_pattern
from snapjax.methods.compressed import CompressedInfluence

F64 = jnp.float64


def _circulant(units: int, width: int) -> np.ndarray:
    """``mask[v, u]`` when ``(u - v) mod units < width``: unit ``v`` feeds itself and the next
    ``width - 1`` units, so SnAp-2 reaches exactly ``width`` units per parameter."""
    v, u = np.meshgrid(np.arange(units), np.arange(units), indexing="ij")
    return (u - v) % units < width


def _gru(units, n_in, batch, T, seed):
    cell = sj.GRUCell(units, param_dtype=F64)
    keys = jax.random.split(jax.random.key(seed), 4)
    carry0 = 0.5 * jax.random.normal(keys[3], (batch, units), F64)
    xs = jax.random.normal(keys[1], (T, batch, n_in), F64)
    ys = jax.random.normal(keys[2], (T, batch, units), F64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    return cell, params, carry0, xs, ys


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def test_threshold_rule():
    assert DENSE_FRACTION == 0.5
    assert [stores_dense(w, 8) for w in (1, 3, 4, 5, 8)] == [False, False, False, True, True]
    assert stores_dense(33, 64) and not stores_dense(32, 64)


@pytest.mark.parametrize("width,storage", [(4, "pattern"), (5, "dense")])
def test_choice_at_the_threshold(width, storage):
    """GRU-8 with circulant recurrent masks: SnAp-2's neighbour table is exactly ``width`` wide;
    half the state (4) is still gathered, one more is stored densely.  SnAp-1 is always its
    diagonal pattern, RTRL always dense."""
    cell = sj.GRUCell(8)
    params = sj.as_recurrent(cell).init_params(jax.random.key(0), 3)
    masks = {name: _circulant(8, width) for name in ("hr", "hz", "hn")}
    snap2 = sj.online_method("snap2", cell, params, masks=masks)
    assert snap2.tracker.table.width == width and snap2.storage == storage
    assert snap2.tracker.layout == {"pattern": "table", "dense": "dense"}[storage]
    assert f"storage={storage!r}" in repr(snap2) and f"stored={snap2.num_stored()}" in repr(snap2)
    assert sj.online_method("snap1", cell, params, masks=masks).storage == "pattern"
    assert sj.online_method("rtrl", cell, params, masks=masks).storage == "dense"
    rtrl_stored = sj.online_method("rtrl", cell, params, masks=masks).num_stored()
    assert (snap2.num_stored() == rtrl_stored) == (storage == "dense")


# 3 of 8: gathered by default; 6 of 8: dense, the pattern multiplied in; 9 of 10: dense, the
# pattern (90 % full) applied by zeroing its few outside entries in place
@pytest.mark.parametrize("units,width", [(8, 3), (8, 6), (10, 9)])
def test_both_storages_give_the_same_gradients(x64, units, width):
    cell, params, carry0, xs, ys = _gru(units, 3, 2, 6, seed=width)
    masks = {name: _circulant(units, width) for name in ("hr", "hz", "hn")}
    masks["ir"] = np.arange(3 * units).reshape(3, units) % 3 != 1  # a masked input kernel too
    auto = sj.online_method("snap2", cell, params, masks=masks)
    assert auto.storage == ("pattern" if width == 3 else "dense")
    if width == 9:
        assert all(np.mean(~p) <= SCATTER_ZEROS for p in auto.tracker.patterns.values())
    out = {}
    for layout in ("table", "dense"):
        tracker = influence_tracker(cell, params, "snap", 2, masks=masks, layout=layout)
        method = CompressedInfluence(sj.as_recurrent(cell), tracker, "snap2")
        out[layout] = sj.online_gradient(method, params, carry0, xs, ys, _loss)
        assert method.pattern_count() == auto.pattern_count()
    assert tree_rel_err(out["table"].grads, out["dense"].grads) < 1e-12
    # the pattern truncates here (SnAp-2 is not RTRL), so the agreement is not trivial
    rtrl = sj.online_gradient(sj.online_method("rtrl", cell, params, masks=masks), params, carry0, xs, ys, _loss)
    assert tree_rel_err(out["dense"].grads, rtrl.grads) > 1e-6


def test_apply_pattern_scatter_and_multiply_agree():
    """Nearly full patterns zero their few outside entries in place, sparser ones multiply: the
    same values either way (and entries outside the pattern are exactly 0)."""
    assert SCATTER_ZEROS == 0.1
    rng = np.random.default_rng(0)
    J = jnp.asarray(rng.normal(size=(2, 3, 10, 10, 2)))
    for frac in (0.05, 0.1, 0.5):
        M = rng.random((10, 10, 2)) >= frac
        out = np.asarray(apply_pattern(J, M))
        np.testing.assert_array_equal(out, np.asarray(J) * M)
        assert np.all(out[:, :, ~M] == 0)
    full = np.ones((10, 10, 2), bool)
    assert apply_pattern(J, full) is J


@pytest.mark.parametrize("cell_cls,units,n_in,batch", [(sj.GRUCell, 6, 4, 3), (sj.LSTMCell, 5, 3, 40), (sj.LRUCell, 4, 5, 17)])
def test_diagonal_gradient_equals_the_dense_contraction(x64, cell_cls, units, n_in, batch):
    """The diagonal layout's gradient (:func:`snapjax.engine.propagation.diag_batch_sum`: per-example
    products unrolled in groups of 16 examples; B = 40 takes two groups and a remainder, B = 17 one
    unrolled sum) and the m = 2 shifted block update equal ``Σ_b c_b J_b`` on the expanded
    influence after two steps."""
    cell = cell_cls(units, param_dtype=F64)
    rec = sj.as_recurrent(cell)
    params = rec.init_params(jax.random.key(0), n_in)
    tracker = sj.online_method("snap1", cell, params).tracker
    assert tracker.layout == "diag"
    keys = jax.random.split(jax.random.key(1), 4)
    m = tracker.spec.state_dim
    s = 0.5 * jax.random.normal(keys[0], (batch, units, m), F64)
    J = tracker.init(batch, F64)
    step = jax.jit(tracker.step)  # one compiled program per function (op by op: dozens)
    for t in range(2):
        s, J = step(params, s, J, jax.random.normal(keys[1 + t], (batch, n_in), F64))
    c = jax.random.normal(keys[3], (batch, units, m), F64)
    got = jax.jit(tracker.gradient)(J, c)
    dense = jax.jit(tracker.to_dense)(J)
    want = jax.tree.map(lambda d: jnp.einsum("b...ua,bua->...", d, c), dense)
    assert tree_rel_err(got, want) < 1e-12
