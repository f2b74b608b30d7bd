"""Activity-sparse exact RTRL == dense exact RTRL (incl. steps where every unit is active)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from conftest import random_masks, tree_rel_err
from snapjax.activity import ActivityInfluence, activity_sparse_tracker, step_cost
from snapjax.egru import EGRUCell

UNITS = 16


def _setup(input_scale, threshold_init, seed=0, batch=3, T=10, n_in=4):
    cell = EGRUCell(UNITS, param_dtype=jnp.float64, threshold_init=threshold_init, epsilon=0.2)
    keys = jax.random.split(jax.random.key(seed), 4)
    carry0 = cell.initialize_carry(keys[0], (batch, n_in))
    xs = input_scale * jax.random.normal(keys[1], (T, batch, n_in), jnp.float64)
    ys = jax.random.normal(keys[2], (T, batch, UNITS), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    return cell, params, carry0, xs, ys


def _loss(h, y):
    return jnp.sum(jnp.sin(h) * y) + 0.5 * jnp.sum(h**2)


def _run_stats(tracker, params, carry0, xs):
    s0 = tracker.spec.to_internal(carry0)

    @jax.jit
    def run(s, J, xs):
        def body(c, x):
            s, J, st = tracker.step_with_stats(params, *c, x)
            return (s, J), st

        return jax.lax.scan(body, (s, J), xs)

    _, stats = run(s0, tracker.init(s0.shape[0], s0.dtype), xs)
    return jax.tree.map(np.asarray, stats)


# (input scale, threshold init): low activity (sparse branches) / high activity (fallback)
CASES = {"low_alpha": (1.0, (0.6, 0.9)), "high_alpha": (3.0, (-2.0, -1.5))}


@pytest.mark.parametrize("density,case", [(None, "high_alpha"), (0.3, "low_alpha")])
def test_sparse_equals_dense_rtrl(x64, case, density):
    cell, params, carry0, xs, ys = _setup(*CASES[case], seed=1 if density is None else 2)
    masks = None if density is None else random_masks(np.random.default_rng(0), cell.spec, params, density)
    block = 3 if case == "high_alpha" else 1  # 16 units: 6 blocks of 3 (the last one padded) / 16 of 1
    sparse = activity_sparse_tracker(cell, params, masks=masks, block=block)
    dense = sj.influence_tracker(cell, params, "rtrl", masks=masks)
    ref = sj.online_gradient(dense, params, carry0, xs, ys, _loss)
    out = sj.online_gradient(sparse, params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-12)
    stats = _run_stats(sparse, params, carry0, xs)
    all_blocks = -(-UNITS // block)
    assert stats["max_active"].max() > 0  # some units are active: the sparse work is not trivial
    assert np.any((stats["blocks"] > 1))  # several blocks accumulate
    if case == "low_alpha":
        assert np.all(stats["blocks"] < all_blocks)  # never all units
        assert 0 < stats["alpha"].mean() < 0.35
    else:
        assert np.any(stats["blocks"] == all_blocks)  # every unit active (incl. the padded block)
        assert np.any((stats["blocks"] < all_blocks) & (stats["max_active"] > 0))  # and sparse steps too


def test_equals_bptt_and_online_learning_state(x64):
    cell, params, carry0, xs, ys = _setup(*CASES["low_alpha"], seed=3)
    tracker = activity_sparse_tracker(cell, params)
    ref = sj.bptt_gradient(cell, params, carry0, xs, ys, _loss)
    out = sj.online_gradient(tracker, params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10
    J = tracker.init(3, jnp.float64, key=jax.random.key(0))
    assert isinstance(J, ActivityInfluence) and not bool(J.active.any())
    with pytest.raises(ValueError, match="influence does not match"):
        tracker.step(params, tracker.spec.to_internal(carry0), tracker.init(2, jnp.float64), xs[0])


def test_compiles_once_and_cost(x64):
    cell, params, carry0, xs, _ = _setup(*CASES["high_alpha"], seed=4)
    xs = xs * jnp.linspace(0.0, 1.0, xs.shape[0])[:, None, None]  # activity ramps up: several branches
    tracker = activity_sparse_tracker(cell, params, block=4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, J, x):
        return tracker.step_with_stats(p, s, J, x)

    s, J = tracker.spec.to_internal(carry0), tracker.init(3, jnp.float64)
    caps = []
    for t in range(xs.shape[0]):
        s, J, st = step(params, s, J, xs[t])
        caps.append(int(st["capacity"]))
    assert len(set(caps)) >= 2  # different branches ran, one compilation
    cost = step_cost(tracker, 3, np.array(caps))
    assert np.all(cost["flops"][np.array(caps) < UNITS] < cost["flops_dense"])
    assert np.all(cost["flops"][np.array(caps) == UNITS] == cost["flops_dense_structured"])
    assert cost["flops_dense_structured"] < cost["flops_dense"]
    assert np.all(np.diff(step_cost(tracker, 3, np.array([2, 4, 8, 16]))["flops"]) > 0)  # cost grows with C
    assert cost["influence_bytes"] == tracker.num_stored() * 3 * 4 and cost["density"] == 1.0


def test_rejects_non_dense_layout():
    cell = EGRUCell(4)
    params = cell.init(jax.random.key(0), cell.initialize_carry(None, (1, 2)), jnp.ones((1, 2)))["params"]
    with pytest.raises(ValueError, match="dense influence layout"):
        activity_sparse_tracker(cell, params, "snap1")
    for bad in (1.5, 0, -2, "4", True):
        with pytest.raises(ValueError, match="block"):
            activity_sparse_tracker(cell, params, block=bad)


def test_one_component_cell_gru_equals_dense_rtrl(x64):
    """A cell without an activity-sparse output (GRU, m = 1: every unit always active) takes
    all blocks every step and still equals dense RTRL."""
    cell = sj.GRUCell(6, param_dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(5), 3)
    carry0 = cell.initialize_carry(keys[0], (2, 3))
    xs = jax.random.normal(keys[1], (5, 2, 3), jnp.float64)
    ys = jax.random.normal(keys[2], (5, 2, 6), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    sparse = activity_sparse_tracker(cell, params, block=4)
    ref = sj.online_gradient(sj.influence_tracker(cell, params, "rtrl"), params, carry0, xs, ys, _loss)
    out = sj.online_gradient(sparse, params, carry0, xs, ys, _loss)
    assert tree_rel_err(out.grads, ref.grads) < 1e-10


def test_dense_layout_snap2_with_pattern_equals_snap2(x64):
    """SnAp-2 on sparse weights uses the dense layout with a pattern mask here; the
    activity-sparse tracker applies the same pattern and gives the same (approximate) gradient."""
    cell, params, carry0, xs, ys = _setup(2.0, (0.2, 0.5), seed=6)
    masks = random_masks(np.random.default_rng(1), cell.spec, params, 0.2)
    base = sj.influence_tracker(cell, params, "snap", 2, masks=masks)
    assert base.layout == "dense" and base.patterns is not None
    sparse = activity_sparse_tracker(cell, params, "snap", 2, masks=masks, block=2)
    ref = sj.online_gradient(base, params, carry0, xs, ys, _loss)
    out = sj.online_gradient(sparse, params, carry0, xs, ys, _loss)
    rtrl = sj.online_gradient(sj.influence_tracker(cell, params, "rtrl", masks=masks), params, carry0, xs, ys, _loss)
    assert sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(ref.grads)) > 0
    assert tree_rel_err(out.grads, ref.grads) < 1e-10
    assert tree_rel_err(ref.grads, rtrl.grads) > 1e-6  # the pattern matters: SnAp-2 is not RTRL here
