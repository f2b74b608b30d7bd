"""SnAp-n stores exactly the n-step pattern; sizes; compile-once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import snapjax as sj
from conftest import random_masks


def _dense_reference(cell, params, masks, carry0, xs, n):
    """SnAp-n from first principles: dense per-example D and I by jax.jacfwd, the boolean
    recursion M_1 = pattern(I), M_{j+1} = M_j ∪ pattern(D) M_j, and J = (D J + I) ⊙ M_n."""
    spec = cell.spec
    flat, unravel = ravel_pytree(params)
    s0 = spec.to_internal(carry0)
    k = spec.state_size

    def f(theta, s_flat, x):
        s = s_flat.reshape(1, spec.units, spec.state_dim)
        return sj.cell_step(spec, unravel(theta), s, x[None], masks).reshape(-1)

    jac_s = jax.jit(jax.vmap(jax.jacfwd(f, argnums=1), in_axes=(None, 0, 0)))
    jac_p = jax.jit(jax.vmap(jax.jacfwd(f, argnums=0), in_axes=(None, 0, 0)))
    step = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))
    s = s0.reshape(s0.shape[0], -1)
    Ds, Is = [], []
    for x in xs:
        Ds.append(np.asarray(jac_s(flat, s, x)))
        Is.append(np.asarray(jac_p(flat, s, x)))
        s = step(flat, s, x)
    pat_d = np.any([np.abs(d) > 0 for d in Ds], axis=(0, 1))
    M = np.any([np.abs(i) > 0 for i in Is], axis=(0, 1))  # (k, p)
    for _ in range(n - 1):
        M = M | ((pat_d.astype(float) @ M.astype(float)) > 0)
    J = np.zeros((s0.shape[0], k, flat.size))
    for D, I in zip(Ds, Is):
        J = (np.einsum("buv,bvp->bup", D, J) + I) * M
    return J, M


def _ours_dense(tracker, params, carry0, xs):
    spec = tracker.spec
    s = spec.to_internal(carry0)
    J = tracker.init(s.shape[0], s.dtype)
    step = jax.jit(tracker.step)
    for x in xs:
        s, J = step(params, s, J, x)
    dense = tracker.to_dense(J)  # leaves (B, *param_shape, units, m)
    batch = s.shape[0]
    cols = [np.asarray(leaf).reshape(batch, -1, spec.state_size) for leaf in jax.tree.leaves(dense)]
    return np.concatenate(cols, axis=1).transpose(0, 2, 1)  # (B, k, p) in ravel_pytree order


@pytest.mark.parametrize("cell_cls", [sj.GRUCell, sj.LSTMCell])
@pytest.mark.parametrize("n,layout", [(1, None), (2, "table"), (2, "dense"), (3, "table")])
def test_snap_n_matches_dense_masked_reference(x64, cell_cls, n, layout):
    units, n_in, batch, T = 8, 3, 2, 5
    cell = cell_cls(units, param_dtype=jnp.float64)
    carry0 = jax.tree.map(
        lambda c: 0.5 * jax.random.normal(jax.random.key(7), c.shape, jnp.float64),
        cell.initialize_carry(None, (batch, n_in)),
    )
    xs = jax.random.normal(jax.random.key(1), (T, batch, n_in), jnp.float64)
    params = cell.init(jax.random.key(0), carry0, xs[0])["params"]
    # Random nonzero biases too: flax initialises them to 0, which makes some entries of I
    # vanish by value (not by structure) when a unit has no unmasked recurrent input.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    density = 0.25 if cell_cls is sj.GRUCell else 0.1  # LSTM has 4 recurrent masks
    masks = random_masks(np.random.default_rng(3), cell.spec, params, density)
    tracker = sj.influence_tracker(cell, params, "snap", n, masks=masks, layout=layout)
    if n == 2:  # both storages of SnAp-2 are exercised (the table is not full at this density)
        assert tracker.layout == layout
    J_ref, M = _dense_reference(cell, params, masks, carry0, xs, n)
    J = _ours_dense(tracker, params, carry0, xs)
    np.testing.assert_allclose(J, J_ref, rtol=1e-11, atol=1e-13)
    # The stored entries are exactly the pattern: same count, and nothing outside it is nonzero.
    assert tracker.pattern_count() == int(M.sum())
    assert np.all(J[:, ~M] == 0)
    assert (np.abs(J) > 0).sum(axis=0).astype(bool).sum() == int(M.sum())


def test_snap1_memory_is_batch_times_params():
    batch = 5
    for cell_cls, m in [(sj.VanillaCell, 1), (sj.GRUCell, 1), (sj.LSTMCell, 2)]:
        cell = cell_cls(16)
        carry = cell.initialize_carry(None, (batch, 7))
        params = cell.init(jax.random.key(0), carry, jnp.zeros((batch, 7)))["params"]
        p = sum(x.size for x in jax.tree.leaves(params))
        J = sj.influence_tracker(cell, params, "snap1").init(batch)
        assert sum(x.size for x in jax.tree.leaves(J)) == batch * p * m
        # each leaf is the parameter's shape per example (plus K=1, m)
        for leaf, par in zip(jax.tree.leaves(J), jax.tree.leaves(params)):
            assert leaf.shape == (batch,) + par.shape + (1, m)


def test_snap_n_size_matches_pattern_count_on_regular_graph():
    """Circulant recurrent masks (unit v feeds v and v+1): every unit reaches exactly n units
    in n-1 steps, so the table has no padding and storage == pattern count == formula."""
    units, n_in, batch = 12, 4, 3
    cell = sj.GRUCell(units)
    params = cell.init(jax.random.key(0), jnp.zeros((batch, units)), jnp.zeros((batch, n_in)))["params"]
    v, u = np.meshgrid(np.arange(units), np.arange(units), indexing="ij")
    ring = ((u - v) % units) <= 1
    masks = {"hr": ring, "hz": ring, "hn": ring}
    p = sum(x.size for x in jax.tree.leaves(params))
    p_stored = p - 3 * units * units + 3 * int(ring.sum())  # masked recurrent weights are not stored
    for n in (1, 2, 3, 4):
        tracker = sj.influence_tracker(cell, params, "snap", n, masks=masks)
        assert tracker.width == n
        assert tracker.num_stored() == tracker.pattern_count() == p_stored * n
        J = tracker.init(batch)
        assert sum(x.size for x in jax.tree.leaves(J)) == batch * p_stored * n


def test_rtrl_memory_is_k_times_p():
    cell = sj.GRUCell(6)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 6)), jnp.zeros((2, 3)))["params"]
    p = sum(x.size for x in jax.tree.leaves(params))
    tracker = sj.influence_tracker(cell, params, "rtrl")
    assert tracker.num_stored() == tracker.pattern_count() == p * 6


@pytest.mark.parametrize("method,n", [("snap", 1), ("snap", 2), ("rtrl", None)])
def test_jitted_step_compiles_once(method, n):
    cell = sj.GRUCell(8)
    params = cell.init(jax.random.key(0), jnp.zeros((4, 8)), jnp.zeros((4, 3)))["params"]
    masks = random_masks(np.random.default_rng(0), cell.spec, params, 0.3)
    tracker = sj.influence_tracker(cell, params, method, n, masks=masks)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, s, J, x):
        return tracker.step(params, s, J, x)

    s = jnp.zeros((4, 8, 1))
    J = tracker.init(4)
    for t in range(4):
        s, J = step(params, s, J, jnp.full((4, 3), float(t)))
    jax.block_until_ready(J)
    chex.clear_trace_counter()
