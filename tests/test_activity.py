"""Activity-sparse exact RTRL (``online_method("activity")``) == dense exact RTRL == BPTT
(incl. steps where every unit is active), driven through the OnlineMethod interface on flax
carries."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from conftest import random_masks, tree_rel_err
from snapjax.methods.activity import ActivityInfluence, activity_method
from snapjax.methods.activity_cost import step_cost
from snapjax.cells.egru import EGRUCell

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


def _online(method, params, carry0, xs, ys):
    """``(Σ_t L_t, Σ_t online gradient, aux stacked over t, final state)`` through the
    interface: ``step`` then ``gradient`` with ``dL_t/dcarry_t`` (flax layout), in a jitted scan."""

    @jax.jit
    def run(params, carry0, xs, ys):
        def body(c, inp):
            carry, state, g, total = c
            x, y = inp
            carry, state, aux = method.step(params, carry, state, x)
            loss, dl = jax.value_and_grad(lambda cr: _loss(method.cell.output(cr), y))(carry)
            g_t, state = method.gradient(params, state, dl)
            return (carry, state, jax.tree.map(jnp.add, g, g_t), total + loss), aux

        init = (carry0, method.init(xs.shape[1], xs.dtype), jax.tree.map(jnp.zeros_like, params), 0.0)
        (_, state, g, loss), aux = jax.lax.scan(body, init, (xs, ys))
        return loss, g, aux, state

    loss, g, aux, state = run(params, carry0, xs, ys)
    return loss, g, jax.tree.map(np.asarray, aux), state


def _bptt(cell, params, carry0, xs, ys):
    """Reference: ``jax.grad`` of ``Σ_t L_t`` through ``lax.scan`` of the cell's flax step."""
    rec = sj.as_recurrent(cell)

    def total(p):
        def body(c, inp):
            c = rec.apply(p, c, inp[0])
            return c, _loss(rec.output(c), inp[1])

        return jax.lax.scan(body, carry0, (xs, ys))[1].sum()

    return jax.jit(jax.value_and_grad(total))(params)


# (input scale, threshold init): low activity (sparse branches) / high activity (fallback)
CASES = {"low_alpha": (1.0, (0.6, 0.9)), "high_alpha": (3.0, (-2.0, -1.5))}


@pytest.mark.parametrize("density,case", [(None, "high_alpha"), (0.3, "low_alpha")])
def test_sparse_equals_dense_rtrl(x64, case, density):
    cell, params, carry0, xs, ys = _setup(*CASES[case], seed=1 if density is None else 2)
    masks = None if density is None else random_masks(np.random.default_rng(0), cell.spec, params, density)
    block = 3 if case == "high_alpha" else 1  # 16 units: 6 blocks of 3 (the last one padded) / 16 of 1
    sparse = sj.online_method("activity", cell, params, masks=masks, block=block)
    dense = sj.online_method("rtrl", cell, params, masks=masks)
    ref_loss, ref_grads, _, _ = _online(dense, params, carry0, xs, ys)
    loss, grads, stats, _ = _online(sparse, params, carry0, xs, ys)
    assert tree_rel_err(grads, ref_grads) < 1e-10
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
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
    method = sj.online_method("activity", cell, params)
    ref_loss, ref_grads = _bptt(cell, params, carry0, xs, ys)
    loss, grads, _, state = _online(method, params, carry0, xs, ys)
    assert tree_rel_err(grads, ref_grads) < 1e-10
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    J = method.init(3, jnp.float64, key=jax.random.key(0))
    assert isinstance(J, ActivityInfluence) and not bool(J.active.any())
    # every leaf has its batch axis first, as declared
    axes = method.batch_axes()
    assert isinstance(axes, ActivityInfluence) and set(axes) == {0}
    assert {jnp.shape(a)[0] for a in jax.tree.leaves(J)} == {3}
    assert method.num_stored() * 3 == sum(a.size for a in jax.tree.leaves(J) if a.dtype != bool)
    # reset: the chosen examples start afresh, the others are untouched
    where = jnp.array([True, False, True])
    fresh = method.reset(state, where)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state)):
        assert not np.asarray(a[0]).any() and np.array_equal(a[1], b[1]) and not np.asarray(a[2]).any()
    assert bool(state.active[0].any())  # the reset actually changed something
    with pytest.raises(ValueError, match="influence does not match"):
        method.step(params, carry0, method.init(2, jnp.float64), xs[0])
    with pytest.raises(ValueError, match=r"carry must be the flax carry of egru for batch 3"):
        method.step(params, jax.tree.map(lambda c: c[:2], carry0), J, xs[0])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4\)"):
        method.step(params, carry0, J, xs[0][:, :3])
    with pytest.raises(ValueError, match="dloss_dcarry must be the flax carry"):
        method.gradient(params, J, jnp.ones((3, UNITS)))
    with pytest.raises(ValueError, match="state must come from"):
        method.step(params, carry0, tuple(J), xs[0])


def test_aux_reports_the_active_fraction(x64):
    """``aux`` against a direct count: the units whose read-out influence row of dense exact
    RTRL is nonzero, before (``alpha``) and after (``alpha_next``) each step."""
    cell, params, carry0, xs, _ = _setup(*CASES["low_alpha"], seed=7, T=6)
    block = 3
    sparse = sj.online_method("activity", cell, params, block=block)
    dense = sj.online_method("rtrl", cell, params)
    r = cell.spec.readout
    step_s, step_d = jax.jit(sparse.step), jax.jit(dense.step)
    cs, cd, Js, Jd = carry0, carry0, sparse.init(3, jnp.float64), dense.init(3, jnp.float64)
    prev = np.zeros((3, UNITS), bool)
    for t in range(xs.shape[0]):
        cs, Js, aux = step_s(params, cs, Js, xs[t])
        cd, Jd, _ = step_d(params, cd, Jd, xs[t])
        # direct count: any nonzero entry of J_t[b, θ, u, r] over all parameters θ
        now = np.zeros((3, UNITS), bool)
        for leaf in jax.tree.leaves(dense.to_dense(Jd)):
            now |= np.asarray(leaf[..., r] != 0).reshape(3, -1, UNITS).any(axis=1)
        assert np.array_equal(np.asarray(Js.active), now)
        assert float(aux["alpha"]) == prev.mean() and float(aux["alpha_next"]) == now.mean()
        assert int(aux["max_active"]) == max(prev.sum(-1).max(), now.sum(-1).max())
        blocks = -(-prev.sum(-1).max() // block)
        assert int(aux["blocks"]) == blocks and int(aux["capacity"]) == max(blocks, 1) * block
        h = np.asarray(cell.spec.output(cell.spec.to_internal(cs)))
        assert np.all(now | (h == 0))  # every event is an active unit
        assert tree_rel_err(sparse.to_dense(Js), dense.to_dense(Jd)) < 1e-12
        prev = now
    assert 0 < prev.mean() < 1  # a sparse, nontrivial count


def test_compiles_once_and_cost(x64):
    cell, params, carry0, xs, _ = _setup(*CASES["high_alpha"], seed=4)
    xs = xs * jnp.linspace(0.0, 1.0, xs.shape[0])[:, None, None]  # activity ramps up: several branches
    method = sj.online_method("activity", cell, params, block=4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, c, J, x):
        return method.step(p, c, J, x)

    c, J = carry0, method.init(3, jnp.float64)
    caps = []
    for t in range(xs.shape[0]):
        c, J, st = step(params, c, J, xs[t])
        caps.append(int(st["capacity"]))
    assert len(set(caps)) >= 2  # different branches ran, one compilation
    cost = step_cost(method, 3, np.array(caps))
    assert np.all(cost["flops"][np.array(caps) < UNITS] < cost["flops_dense"])
    assert np.all(cost["flops"][np.array(caps) == UNITS] == cost["flops_dense_structured"])
    assert cost["flops_dense_structured"] < cost["flops_dense"]
    assert np.all(np.diff(step_cost(method, 3, np.array([2, 4, 8, 16]))["flops"]) > 0)  # cost grows with C
    rtrl = sj.online_method("rtrl", cell, params)
    assert cost["influence_bytes"] == rtrl.num_stored() * 3 * 4 and cost["density"] == 1.0
    assert cost["influence_bytes"] + cost["scratch_bytes"] == method.num_stored() * 3 * 4
    with pytest.raises(ValueError, match="step_cost needs an ActivitySparseRTRL"):
        step_cost(rtrl, 3, 4)


def test_rejects_non_dense_layout():
    cell = EGRUCell(4)
    params = cell.init(jax.random.key(0), cell.initialize_carry(None, (1, 2)), jnp.ones((1, 2)))["params"]
    with pytest.raises(ValueError, match="dense influence layout"):
        activity_method(sj.as_recurrent(cell), params, n=1)
    for bad in (1.5, 0, -2, "4", True):
        with pytest.raises(ValueError, match="block"):
            sj.online_method("activity", cell, params, block=bad)
    with pytest.raises(ValueError, match="compressed form"):
        activity_method(sj.as_recurrent(cell, generic=True), params)
    # the default block is 1/8 of the units (at least 1)
    assert sj.online_method("activity", cell, params).block == 1


def test_one_component_cell_gru_equals_dense_rtrl(x64):
    """A cell without an activity-sparse output (GRU, m = 1: every unit always active) takes
    all blocks every step and still equals dense RTRL."""
    cell = sj.GRUCell(6, param_dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(5), 3)
    carry0 = cell.initialize_carry(keys[0], (2, 3))
    xs = jax.random.normal(keys[1], (5, 2, 3), jnp.float64)
    ys = jax.random.normal(keys[2], (5, 2, 6), jnp.float64)
    params = cell.init(keys[0], carry0, xs[0])["params"]
    sparse = sj.online_method("activity", cell, params, block=4)
    _, ref, _, _ = _online(sj.online_method("rtrl", cell, params), params, carry0, xs, ys)
    _, out, stats, _ = _online(sparse, params, carry0, xs, ys)
    assert tree_rel_err(out, ref) < 1e-10
    assert np.all(stats["alpha_next"] == 1.0) and np.all(stats["blocks"][1:] == 2)


def test_dense_layout_snap2_with_pattern_equals_snap2(x64):
    """SnAp-2 on sparse weights uses the dense layout with a pattern mask here; the
    activity-sparse method applies the same pattern and gives the same (approximate) gradient."""
    cell, params, carry0, xs, ys = _setup(2.0, (0.2, 0.5), seed=6)
    masks = random_masks(np.random.default_rng(1), cell.spec, params, 0.2)
    base = sj.online_method("snap2", cell, params, masks=masks)
    assert base.tracker.layout == "dense" and base.tracker.patterns is not None
    sparse = activity_method(sj.as_recurrent(cell), params, n=2, masks=masks, block=2)
    assert sparse.name == "activity-snap2"
    _, ref, _, _ = _online(base, params, carry0, xs, ys)
    _, out, _, _ = _online(sparse, params, carry0, xs, ys)
    _, rtrl, _, _ = _online(sj.online_method("rtrl", cell, params, masks=masks), params, carry0, xs, ys)
    assert sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(ref)) > 0
    assert tree_rel_err(out, ref) < 1e-10
    assert tree_rel_err(ref, rtrl) > 1e-6  # the pattern matters: SnAp-2 is not RTRL here
