"""Subprocess worker for test_sharding: needs XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax is imported.

``python _sharding_worker.py CASE[:LAYOUT]...`` with CASE a key of ``CASES`` and LAYOUT one of
``LAYOUTS`` (default ``batch``): the learner on an Explicit and an Auto mesh of 8 devices equals
the single-device learner to 1e-10 (float64), with every leaf split as declared:

* ``batch``: a 1-D mesh ``("batch",)`` of 8, examples split (``batch_axis``);
* ``param``: a 1-D mesh ``("model",)`` of 8, the influence split along its parameter axis
  (``param_axis``), each device holding exactly 1/8 of the influence bytes;
* ``both``: a 2-D mesh ``("batch", "model")`` of 2 × 4.

``lowlevel[/M1,M2...]:LAYOUT`` runs :func:`snapjax.online_gradient` instead (``run_lowlevel``).
Prints ``OK <case>:<layout> <worst relative difference>`` per case.
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
from snapjax.parallel.sharding import state_specs  # noqa: E402

B, N_IN, T, UNITS, D = 16, 3, 6, 8, 8

# layout: (mesh shape, mesh axis names, batch_axis, param_axis)
LAYOUTS = {
    "batch": ((D,), ("batch",), "batch", None),
    "param": ((D,), ("model",), None, "model"),
    "both": ((2, D // 2), ("batch", "model"), "batch", "model"),
}

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


def learners(case: str, layout: str = "batch"):
    _, _, batch_axis, param_axis = LAYOUTS[layout]
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
    return sj.OnlineLearner(layers, **kw), sj.OnlineLearner(layers, batch_axis=batch_axis, param_axis=param_axis, **kw)


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


def check_placement(learner, state, outs, mesh_shape: dict):
    """Every leaf split over the mesh axes at its declared axes (batch and parameter), the rest
    replicated; with a parameter axis, each device holds exactly 1/D of the influence bytes."""
    specs = state_specs(learner, state)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree.leaves(state)
    assert len(flat_specs) == len(leaves)
    split = 0
    for spec, leaf in zip(flat_specs, leaves):
        if leaf.size == 0:  # e.g. a GRU's empty unit-parameter buffers: nothing to place
            continue
        local = list(leaf.sharding.shard_shape(leaf.shape))
        expect = list(leaf.shape)
        for axis, name in enumerate(tuple(spec)):
            if name is not None:
                expect[axis] = leaf.shape[axis] // mesh_shape[name]
                split += 1
        assert local == expect, (spec, leaf.shape, local, leaf.sharding)
        assert len(leaf.sharding.device_set) == D
    methods = learner.methods(state.params)
    if learner.batch_axis is not None or any(m.param_axes() is not None for m in methods):
        assert split >= 2, split  # at least the carry and one method-state leaf (or two influence leaves)
    if learner.param_axis is not None:  # the influence: 1/D of its bytes on every device
        for m, ms in zip(methods, state.method_state):
            split_leaves = [leaf for leaf, s in zip(jax.tree.leaves(ms), jax.tree.leaves(
                sj.method_specs(m, ms, param_axis="model"), is_leaf=lambda x: isinstance(x, P))) if s != P()]
            if m.param_axes() is not None:
                assert split_leaves, m.name
            total = sum(leaf.nbytes for leaf in split_leaves)
            for device in range(D):
                on_device = sum(leaf.addressable_shards[device].data.nbytes for leaf in split_leaves)
                assert on_device * D == total, (m.name, device, on_device, total)
    batch_split = B // mesh_shape["batch"] if learner.batch_axis is not None else B
    assert list(outs.sharding.shard_shape(outs.shape))[:2] == [T, batch_split], outs.sharding


def run_case(spec: str) -> None:
    case, _, layout = spec.partition(":")
    layout = layout or "batch"
    shape, names, _, _ = LAYOUTS[layout]
    ref_learner, learner = learners(case, layout)
    state = ref_learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    xs, ys, masks = data()
    ref = jax.jit(ref_learner.run)(jax.device_put(state, jax.devices()[0]), xs, ys, masks)
    assert int(ref[2]["resets"][-1]) >= 1 and int(ref[2]["excluded"][-1]) >= 1, ref[2]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((ref[0], ref[2]["loss"])) if not sj.methods.base.is_key(a))

    results = {}
    explicit = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
    with jax.set_mesh(explicit):  # the context mesh; run_jit donates its (fresh) state
        results["explicit"] = learner.run_jit(sj.shard_state(learner, jax.tree.map(jnp.copy, state), explicit),
                                              xs, ys, masks)
    auto = Mesh(np.array(jax.devices()).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))
    run = jax.jit(learner.run_sharded, static_argnames="mesh")  # the mesh passed; data placed by shard_map
    results["auto"] = run(sj.shard_state(learner, state, auto), xs, ys, masks, mesh=auto)

    worst = 0.0
    for name, (st, outs, met) in results.items():
        check_placement(learner, st, outs, dict(zip(names, shape)))
        met = {k: v for k, v in met.items() if k != "aux"}
        ref_met = {k: v for k, v in ref[2].items() if k != "aux"}
        diff = worst_difference((st, outs, met), (ref[0], ref[1], ref_met))
        assert diff < 1e-10, (name, diff)
        worst = max(worst, diff)
    print("OK", spec, worst, flush=True)


LOWLEVEL = ("rtrl", "snap1", "snap2", "uoro", "tbptt")


def run_lowlevel(spec: str) -> None:
    """``lowlevel[/M1,M2...]:LAYOUT``: :func:`snapjax.online_gradient` with ``batch_axis`` /
    ``param_axis`` on the context mesh (Explicit and Auto) equals the one-device gradient for
    rtrl, snap1, sparse snap2, uoro and tbptt (or the methods listed), with the final method
    state split as declared."""
    head, _, layout = spec.partition(":")
    chosen = head.partition("/")[2].split(",") if "/" in head else list(LOWLEVEL)
    assert set(chosen) <= set(LOWLEVEL), chosen
    shape, names, batch_axis, param_axis = LAYOUTS[layout]
    cell = sj.GRUCell(UNITS, param_dtype=jnp.float64)
    params = cell.init(jax.random.key(3), jnp.zeros((1, UNITS)), jnp.zeros((1, N_IN)))["params"]
    masks = sj.random_masks(0, params, 0.5, spec=cell)
    rng = np.random.default_rng(2)
    xs, ys = rng.standard_normal((T, B, N_IN)), rng.standard_normal((T, B, UNITS))

    def loss(y, t):
        return jnp.sum((y - t) ** 2)

    worst = 0.0
    options = {"rtrl": {}, "snap1": {}, "snap2": {"masks": masks}, "uoro": {}, "tbptt": {"window": 3}}
    for name in chosen:
        kw = options[name]
        method = sj.online_method(name, cell, params, **kw)
        state = method.init(B, jnp.float64, key=jax.random.key(1))
        ref = jax.jit(lambda p, s: sj.online_gradient(method, p, None, xs, ys, loss, s))(params, state)
        specs = sj.method_specs(method, state, batch_axis=batch_axis, param_axis=param_axis)
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
            with jax.set_mesh(mesh):
                placed = sj.put_sharded((state, xs, ys), mesh, (specs, P(None, batch_axis), P(None, batch_axis)))
                got = jax.jit(lambda p, s, x, y: sj.online_gradient(method, p, None, x, y, loss, s, batch_axis=batch_axis,
                                                                    param_axis=param_axis))(params, *placed)
            diff = worst_difference(got, ref)
            assert diff < 1e-10, (name, axis_type, diff)
            worst = max(worst, diff)
            for leaf, leaf_spec in zip(jax.tree.leaves(got.final_method_state),
                                       jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
                expect = [n // dict(zip(names, shape))[a] if a is not None else n
                          for n, a in zip(leaf.shape, tuple(leaf_spec) + (None,) * leaf.ndim)]
                assert list(leaf.sharding.shard_shape(leaf.shape)) == expect, (name, leaf_spec, leaf.sharding)
    print("OK", spec, worst, flush=True)


if __name__ == "__main__":
    assert len(jax.devices()) == D, jax.devices()
    for c in sys.argv[1:]:
        t0 = time.perf_counter()
        (run_lowlevel if c.startswith("lowlevel") else run_case)(c)
        print(f"time {c} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
