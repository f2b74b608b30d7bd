"""snapjax.engine.sparsity: random masks, applying/masking updates, reports, SnAp pattern sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.engine.influence import influence_tracker
from snapjax.engine.patterns import kernel_layout
from snapjax.engine.sparsity import apply_masks, density_report, mask_updates, random_masks, snap_pattern_size


def _gru(units=16, n_in=10):
    cell = sj.GRUCell(units)
    params = cell.init(jax.random.key(0), jnp.zeros((1, units)), jnp.zeros((1, n_in)))["params"]
    return cell, params


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_fan_in_masks_exact_per_column(density):
    cell, params = _gru()
    masks = random_masks(0, params, density, spec=cell)
    assert set(masks) == {p.name for p in cell.spec.projections}
    for name, m in masks.items():
        n_in, units = np.shape(params[name]["kernel"])
        assert m.dtype == bool and m.shape == (n_in, units)
        want = max(1, round(density * n_in))
        np.testing.assert_array_equal(m.sum(axis=0), want)
        # no padding in the compressed layout: every column has the same number of rows
        lay = kernel_layout(m, n_in)
        assert lay.num_rows == want and lay.valid.all()


def test_total_count_masks_and_reproducibility():
    cell, params = _gru(12, 7)
    masks = random_masks(3, params, 0.3, spec=cell, fan_in=False)
    for name, m in masks.items():
        assert m.sum() == max(1, round(0.3 * m.size))
    again = random_masks(3, params, 0.3, spec=cell, fan_in=False)
    assert all(np.array_equal(masks[n], again[n]) for n in masks)
    other = random_masks(4, params, 0.3, spec=cell, fan_in=False)
    assert any(not np.array_equal(masks[n], other[n]) for n in masks)
    # jax keys and numpy generators work too
    assert set(random_masks(jax.random.key(1), params, 0.5)) == set(masks)
    assert set(random_masks(np.random.default_rng(1), params, 0.5)) == set(masks)


def test_include_input_false_and_name_inference():
    cell, params = _gru()
    rec_only = random_masks(0, params, 0.25, spec=cell, include_input=False)
    assert set(rec_only) == {"hr", "hz", "hn"}
    # without a spec, flax names decide (recurrent projections start with 'h')
    assert set(random_masks(0, params, 0.25, include_input=False)) == {"hr", "hz", "hn"}
    lstm = sj.LSTMCell(5)
    lp = lstm.init(jax.random.key(0), (jnp.zeros((1, 5)), jnp.zeros((1, 5))), jnp.zeros((1, 3)))["params"]
    assert set(random_masks(0, lp, 0.5, spec=lstm, include_input=False)) == {"hi", "hf", "hg", "ho"}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_bad_density(density):
    _, params = _gru()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        random_masks(0, params, density)


def test_apply_masks_jittable_and_report():
    cell, params = _gru(8, 4)
    masks = random_masks(1, params, 0.25, spec=cell)
    mp = jax.jit(lambda p: apply_masks(p, masks))(params)
    for name, m in masks.items():
        k = np.asarray(mp[name]["kernel"])
        assert np.all(k[~m] == 0)
        np.testing.assert_array_equal(k[m], np.asarray(params[name]["kernel"])[m])
    assert "bias" in mp["hn"] and np.array_equal(mp["hn"]["bias"], params["hn"]["bias"])
    rep = density_report(params, masks)
    for name, m in masks.items():
        assert rep["kernels"][name]["density"] == m.sum() / m.size
    assert rep["kernels"]["hr"]["density"] == 0.25
    n_bias = sum(np.size(params[p]["bias"]) for p in ("ir", "iz", "in", "hn"))
    total = sum(np.size(x) for x in jax.tree.leaves(params))
    assert rep["total_params"] == total
    assert rep["nonzero_params"] == sum(m.sum() for m in masks.values()) + n_bias
    assert rep["overall_density"] == rep["nonzero_params"] / total
    assert rep["kernel_density"] == 0.25
    dense = density_report(params, None)
    assert dense["overall_density"] == 1.0 and dense["kernel_density"] == 1.0


def test_masked_weights_stay_zero_through_optax():
    cell, params = _gru(8, 4)
    masks = random_masks(2, params, 0.5, spec=cell)
    params = apply_masks(params, masks)
    opt = optax.adam(1e-1)
    state = opt.init(params)
    xs = jax.random.normal(jax.random.key(1), (6, 2, 4))
    carry = jnp.zeros((2, 8))

    @jax.jit
    def update(params, state):
        # gradient w.r.t. the raw kernel (no mask in the model) is dense; mask the updates
        g = sj.bptt_gradient(cell, params, carry, xs, xs[..., :1], lambda h, y: jnp.sum(h * y)).grads
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, mask_updates(upd, masks)), state

    for _ in range(5):
        new, state = update(params, state)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))
        params = new
    for name, m in masks.items():
        assert np.all(np.asarray(params[name]["kernel"])[~m] == 0)


def test_snap_pattern_size():
    units, n_in = 16, 10
    cell, params = _gru(units, n_in)
    p = sum(np.size(x) for x in jax.tree.leaves(params))
    # Dense: SnAp-1 stores one number per parameter; SnAp-2 is already full RTRL (k per parameter).
    assert snap_pattern_size(cell, params, None, 1) == p
    assert snap_pattern_size(cell, params, None, 2) == p * units == snap_pattern_size(cell, params, None, None)
    masks = random_masks(0, params, 0.25, spec=cell)
    rep = density_report(params, masks)
    # SnAp-1 with fan-in masks: exactly the nonzero parameters (no padding).
    assert snap_pattern_size(cell, params, masks, 1) == rep["nonzero_params"]
    tr = influence_tracker(cell, params, "snap", 2, masks=masks, layout="table")
    assert snap_pattern_size(cell, params, masks, 2) == tr.pattern_count()
    assert tr.pattern_count() <= tr.num_stored() == rep["nonzero_params"] * tr.width
    assert snap_pattern_size(cell, params, masks, 2) < snap_pattern_size(cell, params, masks, None)
