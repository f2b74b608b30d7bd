"""SnAp-n stores exactly the n-step pattern; sizes; compile-once."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import snapjax as sj
from conftest import random_masks
from snapjax.cells.egru import egru_spec
from snapjax.engine.influence import influence_tracker
from snapjax.engine.patterns import recurrent_adjacency


def _jacfwd_step(spec, unravel, masks):
    """Batched (over examples) ``jax.jacfwd`` of the masked step w.r.t. the flat state and the
    flat parameters, and the step itself: ``(jac_s, jac_p, step)``, each ``(theta, s, x)``."""

    def f(theta, s_flat, x):
        s = s_flat.reshape(1, spec.units, spec.state_dim)
        return sj.cell_step(spec, unravel(theta), s, x[None], masks).reshape(-1)

    batched = lambda g: jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))  # noqa: E731
    return batched(jax.jacfwd(f, argnums=1)), batched(jax.jacfwd(f, argnums=0)), batched(f)


def _dense_reference(cell, params, masks, carry0, xs, n):
    """SnAp-n from first principles: dense per-example D and I by jax.jacfwd, the boolean
    recursion M_1 = pattern(I), M_{j+1} = M_j ∪ pattern(D) M_j, and J = (D J + I) ⊙ M_n."""
    spec = cell.spec
    flat, unravel = ravel_pytree(params)
    s0 = spec.to_internal(carry0)
    k = spec.state_size

    jac_s, jac_p, step = _jacfwd_step(spec, unravel, masks)
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
    tracker = influence_tracker(cell, params, "snap", n, masks=masks, layout=layout)
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
        J = influence_tracker(cell, params, "snap1").init(batch)
        # floats stored: a two-component cell's entries are complex pairs (two floats each)
        assert sum(x.nbytes for x in jax.tree.leaves(J)) == 4 * batch * p * m
        # each leaf is the parameter's shape per example (plus K=1, m; pairs: K=1, 1 complex)
        for leaf, par in zip(jax.tree.leaves(J), jax.tree.leaves(params)):
            assert leaf.shape == (batch,) + par.shape + (1, 1 if m == 2 else m)
            assert leaf.dtype == (jnp.complex64 if m == 2 else jnp.float32)


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
        tracker = influence_tracker(cell, params, "snap", n, masks=masks)
        assert tracker.width == n
        assert tracker.num_stored() == tracker.pattern_count() == p_stored * n
        J = tracker.init(batch)
        assert sum(x.size for x in jax.tree.leaves(J)) == batch * p_stored * n


def test_rtrl_memory_is_k_times_p():
    cell = sj.GRUCell(6)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 6)), jnp.zeros((2, 3)))["params"]
    p = sum(x.size for x in jax.tree.leaves(params))
    tracker = influence_tracker(cell, params, "rtrl")
    assert tracker.num_stored() == tracker.pattern_count() == p * 6


@pytest.mark.parametrize("method,n", [("snap", 1), ("snap", 2), ("rtrl", None)])
def test_jitted_step_compiles_once(method, n):
    cell = sj.GRUCell(8)
    params = cell.init(jax.random.key(0), jnp.zeros((4, 8)), jnp.zeros((4, 3)))["params"]
    masks = random_masks(np.random.default_rng(0), cell.spec, params, 0.3)
    tracker = influence_tracker(cell, params, method, n, masks=masks)

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


# --------------------------------------------------------------------------------------------
# Structurally zero pre-activations (issue #13, item 4): a projection whose kernel column u is
# fully masked and that has no bias has a_{p,u} ≡ 0, so every product with it vanishes.  The
# stored SnAp-n pattern must be exactly M_n, not a superset built from unmasked kernel entries.


def _bias_free_gru(units):
    """flax-style GRU with no biases at all (``hn`` included): r ⊙ (h W_hn) is a pure product."""
    base = sj.gru_spec(units)
    return dataclasses.replace(
        base, name="gru_nobias", projections=tuple(dataclasses.replace(p, use_bias=False) for p in base.projections)
    )


def _random_params(spec, n_in, key, scale=0.5):
    ks = iter(jax.random.split(key, 2 * len(spec.projections) + len(spec.unit_params)))
    params = {}
    for p in spec.projections:
        rows = n_in if p.source == "input" else spec.units
        leaf = {"kernel": scale * jax.random.normal(next(ks), (rows, spec.units), jnp.float64)}
        if p.use_bias:
            leaf["bias"] = 0.3 * jax.random.normal(next(ks), (spec.units,), jnp.float64)
        params[p.name] = leaf
    for q in spec.unit_params:
        params[q] = jax.random.uniform(next(ks), (spec.units,), jnp.float64, 0.1, 0.6)
    return params


def _jacfwd_reference(spec, params, masks, s0, xs, points=256, seed=0):
    """Independent per-step Jacobians from ``jax.jacfwd`` of the masked step: their structural
    patterns (union of nonzeros at ``points`` random (state, input) points) and the dense
    ``D_t (B, k, k)``, ``I_t (B, k, p)`` along the trajectory from ``s0`` (internal layout)
    driven by ``xs``.  Returns ``(pattern(D) (k, k), pattern(I) (k, p), [(D_t, I_t)])``."""
    flat, unravel = ravel_pytree(params)
    k = spec.state_size

    jac_s, jac_p, step = _jacfwd_step(spec, unravel, masks)
    ks, kx = jax.random.split(jax.random.key(seed))
    s_pts = jax.random.normal(ks, (points, k), jnp.float64)
    x_pts = 1.5 * jax.random.normal(kx, (points, xs.shape[-1]), jnp.float64)
    pat_d = np.any(np.asarray(jac_s(flat, s_pts, x_pts)) != 0, axis=0)
    pat_i = np.any(np.asarray(jac_p(flat, s_pts, x_pts)) != 0, axis=0)
    s = s0.reshape(s0.shape[0], -1)
    steps = []
    for x in xs:
        steps.append((np.asarray(jac_s(flat, s, x)), np.asarray(jac_p(flat, s, x))))
        s = step(flat, s, x)
    return pat_d, pat_i, steps


def _snap_n_reference(pat_d, pat_i, steps, n):
    """M_1 = pattern(I), M_{j+1} = M_j ∪ pattern(D) M_j; J_t = (D_t J_{t-1} + I_t) ⊙ M_n."""
    M = pat_i
    for _ in range(n - 1):
        M = M | ((pat_d.astype(float) @ M.astype(float)) > 0)
    J = np.zeros_like(steps[0][1])
    for D, I in steps:
        J = (np.einsum("buv,bvp->bup", D, J) + I) * M
    return J, M


def _ours_internal(tracker, params, s0, xs):
    spec = tracker.spec
    J = tracker.init(s0.shape[0], s0.dtype)
    step = jax.jit(tracker.step)
    s = s0
    for x in xs:
        s, J = step(params, s, J, x)
    batch = s0.shape[0]
    cols = [np.asarray(leaf).reshape(batch, -1, spec.state_size) for leaf in jax.tree.leaves(tracker.to_dense(J))]
    return np.concatenate(cols, axis=1).transpose(0, 2, 1)


def _zero_column_case(kind):
    units, n_in = 8, 3
    rng = np.random.default_rng(5)
    if kind == "gru_nobias":
        spec = _bias_free_gru(units)
        masks = {p.name: rng.random((units if p.source == "state" else n_in, units)) < 0.3 for p in spec.projections}
        masks["hn"][:, [2, 5]] = False  # candidate recurrent columns of units 2 and 5: a_hn ≡ 0 there
        masks["in"][:, 5] = False  # and unit 5's candidate input too (no bias: a_in ≡ 0)
        masks["hr"][:, [2, 5]] = True  # so the (dead) reset-gate edges into 2 and 5 are unmasked
    else:
        spec = egru_spec(units, epsilon=0.5)
        masks = {p.name: rng.random((units if p.source == "state" else n_in, units)) < 0.2 for p in spec.projections}
        masks["hz"][:, 3] = False  # gate column of unit 3: r ⊙ (h W_hz) ≡ 0, W_hr[:, 3] is dead
        masks["hr"][:, 3] = True
    params = _random_params(spec, n_in, jax.random.key(11))
    return spec, params, masks, n_in


@pytest.mark.parametrize("kind", ["gru_nobias", "egru"])
def test_snap_n_pattern_exact_with_structurally_zero_preactivation(x64, kind):
    spec, params, masks, n_in = _zero_column_case(kind)
    batch, T = 3, 6
    ks, kx = jax.random.split(jax.random.key(2))
    s0 = 0.7 * jax.random.normal(ks, (batch, spec.units, spec.state_dim), jnp.float64)
    xs = 1.5 * jax.random.normal(kx, (T, batch, n_in), jnp.float64)
    pat_d, pat_i, steps = _jacfwd_reference(spec, params, masks, s0, xs)
    for n, layout in [(1, None), (2, "table"), (2, "dense"), (3, None)]:
        tracker = influence_tracker(spec, params, "snap", n, masks=masks, layout=layout)
        assert layout is None or tracker.layout == layout  # both SnAp-2 storages are exercised
        J_ref, M = _snap_n_reference(pat_d, pat_i, steps, n)
        J = _ours_internal(tracker, params, s0, xs)
        rel = np.abs(J - J_ref).max() / np.abs(J_ref).max()
        assert rel <= 1e-10, f"SnAp-{n} ({tracker.layout}) differs from the masked jacfwd reference by {rel:.3g}"
        assert np.all(J[:, ~M] == 0)
        # the stored pattern is exactly |M_n|, not a superset
        assert tracker.pattern_count() == int(M.sum()), (n, tracker.layout, tracker.pattern_count(), int(M.sum()))


@pytest.mark.parametrize("kind", ["gru_nobias", "egru"])
def test_recurrent_adjacency_drops_dead_edges(x64, kind):
    spec, params, masks, _ = _zero_column_case(kind)
    adj = recurrent_adjacency(spec, masks)
    dead = [2, 5] if kind == "gru_nobias" else [3]
    naive = np.zeros_like(adj)
    for p in spec.projections:
        if p.source == "state":
            naive |= masks[p.name]
    live = {"gru_nobias": ("hz",), "egru": ("hu",)}[kind]  # the gate that still reads h at u
    want = naive.copy()
    want[:, dead] = np.any([masks[g][:, dead] for g in live], axis=0)
    np.testing.assert_array_equal(adj, want)
    assert (naive & ~adj).any()  # the fixture really has dead edges
