"""SnAp-n storage scales with parameter density (static sizes only; timings are in
benchmarks/step_cost.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
from snapjax.engine.influence import influence_tracker
from snapjax.engine.sparsity import density_report, random_masks, snap_pattern_size

K = 64
N_IN = 64


@pytest.fixture(scope="module")
def gru():
    cell = sj.GRUCell(K)
    params = cell.init(jax.random.key(0), jnp.zeros((1, K)), jnp.zeros((1, N_IN)))["params"]
    return cell, params


def test_snap2_storage_scales_with_density(gru):
    cell, params = gru
    rtrl_dense = snap_pattern_size(cell, params, None, None)
    p = sum(np.size(x) for x in jax.tree.leaves(params))
    assert rtrl_dense == p * K
    sizes = {}
    for d in (0.5, 0.25, 0.1):
        masks = random_masks(0, params, d, spec=cell)
        tr = influence_tracker(cell, params, "snap", 2, masks=masks, layout="table")
        assert tr.layout == "table"
        sizes[d] = tr.num_stored()
        # stored = (nonzero params) x (table width K): the width is 1 + the largest out-degree
        # of the union of the 3 recurrent masks, so storage ~ d * (1 - (1 - d)^3) * p * k.
        assert sizes[d] == density_report(params, masks)["nonzero_params"] * tr.width
    assert sizes[0.1] < 0.05 * rtrl_dense
    assert sizes[0.1] < sizes[0.25] < sizes[0.5] < rtrl_dense


def test_snap1_storage_is_nonzero_params(gru):
    cell, params = gru
    for d in (1.0, 0.25, 0.1):
        masks = None if d == 1.0 else random_masks(1, params, d, spec=cell)
        assert snap_pattern_size(cell, params, masks, 1) == density_report(params, masks)["nonzero_params"]


def test_rtrl_masked_storage_scales_linearly(gru):
    cell, params = gru
    dense = snap_pattern_size(cell, params, None, None)
    masks = random_masks(2, params, 0.1, spec=cell)
    # exact RTRL with masks stores only unmasked parameters, each with all k state entries
    assert snap_pattern_size(cell, params, masks, None) == density_report(params, masks)["nonzero_params"] * K
    assert snap_pattern_size(cell, params, masks, None) < 0.15 * dense


def test_snap_order_monotone(gru):
    cell, params = gru
    masks = random_masks(3, params, 0.1, spec=cell)
    s = [snap_pattern_size(cell, params, masks, n) for n in (1, 2, 3)]
    assert s[0] < s[1] <= s[2] <= snap_pattern_size(cell, params, masks, None)
