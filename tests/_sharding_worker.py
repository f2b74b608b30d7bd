"""Subprocess worker for test_sharding: needs XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax is imported.

``python _sharding_worker.py CASE...`` with CASE a key of ``CASES`` (the batch-parallel learner
on an Explicit and an Auto 1-D mesh of 8 devices equals the single-device learner to 1e-10,
float64), or ``uoro-finite`` (runs on both meshes, stays finite and counts the same resets and
exclusions; for a UORO whose random signs are not split by device).  Prints
``OK <case> <worst relative difference>`` per case.
"""

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import snapjax as sj  # noqa: E402
from snapjax.sharding import batch_specs  # noqa: E402

B, N_IN, T, UNITS, D = 16, 3, 6, 5, 8

# per case: recurrent layers' methods and learner options.  "stack": three GRU layers with
# per-step SnAp-1, RTRL and sparse SnAp-2 (masks on layer 2), gradients summed over 2 steps;
# "chunked": RTRL run chunk-wise (buffers with batch axis 1).
CASES = {
    "stack": (("snap1", "rtrl", "snap2"), dict(update_every=2, chunked=False, sparse="layers_2")),
    "tbptt": (("tbptt",), dict(tbptt_window=3)),
    "uoro": (("uoro",), dict()),
    "chunked": (("rtrl",), dict(update_every=2)),
    "rtrl": (("rtrl",), dict()),
    "snap1": (("snap1",), dict()),
    "snap2": (("snap2",), dict(sparse="layers_0")),
}


def learners(case: str):
    methods, opts = CASES[case]
    opts = dict(opts)
    cells = [sj.GRUCell(UNITS, param_dtype=jnp.float64) for _ in methods]
    sparse = opts.pop("sparse", None)
    if sparse is not None:
        layer = int(sparse.split("_")[1])
        n_in = N_IN if layer == 0 else UNITS
        params = cells[layer].init(jax.random.key(3), jnp.zeros((1, UNITS)), jnp.zeros((1, n_in)))["params"]
        opts["masks"] = {sparse: sj.random_masks(0, params, 0.5, spec=cells[layer])}
    layers = cells + [nn.Dense(3, param_dtype=jnp.float64)]
    kw = dict(method=list(methods), optimizer=optax.adam(1e-2), **opts)
    return sj.OnlineLearner(layers, **kw), sj.OnlineLearner(layers, batch_axis="batch", **kw)


def data():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((T, B, N_IN))
    ys = rng.integers(0, 3, (T, B))
    masks = (rng.random((T, B)) < 0.8).astype(np.float64)
    xs[2, 5, 0] = np.nan  # example 5 (device 2) becomes non-finite: the guard resets it
    ys[1, 12], masks[1, 12] = 7, 1.0  # an invalid label on device 6: excluded and counted
    return xs, ys, masks


def plain(tree):
    return jax.tree.map(lambda a: jax.random.key_data(a) if sj.methods.base.is_key(a) else a, tree)


def worst_difference(got, ref) -> float:
    got, ref = plain(got), plain(ref)
    assert jax.tree.structure(got) == jax.tree.structure(ref), (jax.tree.structure(got), jax.tree.structure(ref))
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        assert np.array_equal(np.isfinite(a), np.isfinite(b))  # the non-finite example's outputs
        a, b = np.where(np.isfinite(b), a, 0), np.where(np.isfinite(b), b, 0)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / max(1.0, float(np.max(np.abs(b), initial=0.0))))
    return worst


def check_placement(learner, state, outs):
    """Per-example leaves split over the 8 devices at their declared axis, the rest replicated."""
    specs = batch_specs(learner, state)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree.leaves(state)
    assert len(flat_specs) == len(leaves)
    split = 0
    for spec, leaf in zip(flat_specs, leaves):
        if leaf.size == 0:  # e.g. a GRU's empty unit-parameter buffers: nothing to place
            continue
        local = list(leaf.sharding.shard_shape(leaf.shape))
        expect = list(leaf.shape)
        if "batch" in tuple(spec):
            axis = tuple(spec).index("batch")
            expect[axis] = leaf.shape[axis] // D
            split += 1
        assert local == expect, (spec, leaf.shape, local, leaf.sharding)
        assert len(leaf.sharding.device_set) == D
    assert split >= 2, split  # at least the carry and one method-state leaf
    assert list(outs.sharding.shard_shape(outs.shape)) == [T, B // D, 3], outs.sharding


def run_case(case: str) -> None:
    exact = not case.endswith("-finite")
    ref_learner, learner = learners(case.removesuffix("-finite"))
    state = ref_learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    xs, ys, masks = data()
    ref = jax.jit(ref_learner.run)(jax.device_put(state, jax.devices()[0]), xs, ys, masks)
    assert int(ref[2]["resets"][-1]) >= 1 and int(ref[2]["excluded"][-1]) >= 1, ref[2]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((ref[0], ref[2]["loss"])) if not sj.methods.base.is_key(a))

    results = {}
    explicit = jax.make_mesh((D,), ("batch",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):  # the context mesh; run_jit donates its (fresh) state
        results["explicit"] = learner.run_jit(sj.shard_batch(learner, jax.tree.map(jnp.copy, state), explicit),
                                              xs, ys, masks)
    auto = Mesh(np.array(jax.devices()), ("batch",), axis_types=(AxisType.Auto,))
    run = jax.jit(learner.run_sharded, static_argnames="mesh")  # the mesh passed; data placed by shard_map
    results["auto"] = run(sj.shard_batch(learner, state, auto), xs, ys, masks, mesh=auto)

    worst = 0.0
    for name, (st, outs, met) in results.items():
        check_placement(learner, st, outs)
        met = {k: v for k, v in met.items() if k != "aux"}
        ref_met = {k: v for k, v in ref[2].items() if k != "aux"}
        if exact:
            diff = worst_difference((st, outs, met), (ref[0], ref[1], ref_met))
            assert diff < 1e-10, (name, diff)
            worst = max(worst, diff)
        else:
            assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((st, met["loss"])) if not sj.methods.base.is_key(a)), name
            assert int(met["resets"][-1]) == int(ref[2]["resets"][-1]), name
            assert int(met["excluded"][-1]) == int(ref[2]["excluded"][-1]), name
    print("OK", case, worst, flush=True)


if __name__ == "__main__":
    assert len(jax.devices()) == D, jax.devices()
    for c in sys.argv[1:]:
        t0 = time.perf_counter()
        run_case(c)
        print(f"time {c} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
