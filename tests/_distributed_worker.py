"""Subprocess worker for test_distributed (float64, CPU; XLA_FLAGS and JAX_PLATFORMS are set by
the parent before jax is imported).

``python _distributed_worker.py reference OUT CASE...``: one process, one device, the plain
learner (no mesh) for ``T1 + T2`` steps; writes ``OUT/reference_<case>.npz``.

``python _distributed_worker.py train OUT NPROC PID PORT CASE...``: process ``PID`` of ``NPROC``
(``jax.distributed`` with its coordinator at ``localhost:PORT`` when ``NPROC > 1``), 4 devices
in all; per case a sharded learner runs ``T1`` steps, saves the state with
:func:`snapjax.parallel.sharded_checkpoint.save_sharded` into ``OUT/ckpt_<case>``, runs ``T2`` more
steps (continued), restores the checkpoint into a fresh template and runs the same ``T2`` steps
(resumed).  Process 0 writes ``OUT/train_<case>.npz`` with everything gathered to the host
(``process_allgather``); every process prints ``OK <case> <pid>``.  With several processes it
first checks that :func:`snapjax.save_state` refuses a state spread over processes
(``OK save_state-refuses <pid>``).

``python _distributed_worker.py roundtrip OUT``: one process with 4 devices: a state sharded on
a (2, 2) mesh ("batch", "model") saved and restored into a real and into an abstract template
(``jax.eval_shape``), bit-identical and placed as the template (``OK roundtrip``).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import snapjax as sj
from snapjax.methods.base import is_key
from snapjax.parallel.sharded_checkpoint import restore_sharded, save_sharded

B, N_IN, UNITS, CLASSES, T1, T2 = 4, 3, 4, 3, 3, 3

# case: (method, mesh shape, mesh axes, param_axis)
CASES = {
    "rtrl-batch": ("rtrl", (4,), ("batch",), None),
    "rtrl-batch-model": ("rtrl", (2, 2), ("batch", "model"), "model"),
    "snap1-batch": ("snap1", (4,), ("batch",), None),
}


def make_learner(case: str, sharded: bool) -> sj.OnlineLearner:
    method, _, _, param_axis = CASES[case]
    axes = {"batch_axis": "batch", "param_axis": param_axis} if sharded else {}
    return sj.OnlineLearner(sj.GRUCell(UNITS, param_dtype=jnp.float64), readout_size=CLASSES, method=method,
                            optimizer=optax.adam(1e-2), **axes)


def data():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((T1 + T2, B, N_IN))
    ys = rng.integers(0, CLASSES, (T1 + T2, B))
    masks = (rng.random((T1 + T2, B)) < 0.8).astype(np.float64)
    return xs, ys, masks


def flat(prefix: str, tree) -> dict:
    """``{prefix_i: numpy leaf}`` (key leaves as their key data), gathered to this host."""
    from jax.experimental import multihost_utils

    tree = jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree)
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)  # global values on every process
    return {f"{prefix}_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))}


def reference(out: str, cases) -> None:
    xs, ys, masks = data()
    for case in cases:
        learner = make_learner(case, sharded=False)
        run = jax.jit(learner.run)
        st = learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
        st, outs1, met1 = run(st, xs[:T1], ys[:T1], masks[:T1])
        st, outs2, met2 = run(st, xs[T1:], ys[T1:], masks[T1:])
        np.savez(os.path.join(out, f"reference_{case}.npz"), **flat("state", st), outs1=outs1, outs2=outs2,
                 loss1=met1["loss"], loss2=met2["loss"])
        print("OK reference", case, flush=True)


def check_save_state_refuses(out: str, mesh) -> None:
    x = sj.put_sharded(np.arange(8.0), mesh, P("batch"))
    assert not x.is_fully_addressable
    try:
        sj.save_state(os.path.join(out, f"refused_{jax.process_index()}.bin"), {"x": x})
    except ValueError as e:
        assert "snapjax.parallel.sharded_checkpoint.save_sharded" in str(e), e
        print("OK save_state-refuses", jax.process_index(), flush=True)
        return
    raise AssertionError("save_state accepted an array spread over several processes")


def train(out: str, cases) -> None:
    xs, ys, masks = data()
    for case in cases:
        _, shape, axes, _ = CASES[case]
        mesh = jax.make_mesh(shape, axes)
        learner = make_learner(case, sharded=True)
        first = [sj.put_sharded(a[:T1], mesh, P(None, "batch")) for a in (xs, ys, masks)]
        second = [sj.put_sharded(a[T1:], mesh, P(None, "batch")) for a in (xs, ys, masks)]
        ckpt = os.path.join(out, f"ckpt_{case}")
        with jax.set_mesh(mesh):
            st = sj.shard_state(learner, learner.init(jax.random.key(0), batch_size=B, input_size=N_IN), mesh)
            st, outs1, met1 = learner.run_jit(st, *first)
            save_sharded(ckpt, st)
            saved = flat("saved", st)
            cont, outs2, met2 = learner.run_jit(st, *second)  # st is donated
            fresh = sj.shard_state(learner, learner.init(jax.random.key(7), batch_size=B, input_size=N_IN), mesh)
            restored = restore_sharded(ckpt, fresh)
            for r, f in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh)):
                assert r.sharding.is_equivalent_to(f.sharding, r.ndim), (r.sharding, f.sharding)
            got = flat("restored", restored)
            res, outs2r, met2r = learner.run_jit(restored, *second)
        for tree in (fresh, cont, res):  # per-example leaves split over "batch", the influence over "model"
            specs = [tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(tree.method_state)]
            assert any("batch" in s for s in specs), specs
            assert any("model" in s for s in specs) == (learner.param_axis == "model"), specs
        named = {"outs1": outs1, "outs2": outs2, "outs2r": outs2r, "loss1": met1["loss"], "loss2": met2["loss"],
                 "loss2r": met2r["loss"]}
        gathered = flat("x", named)  # leaves in sorted-key order
        results = {**saved, **got, **flat("state", cont), **flat("resumed", res),
                   **{k: gathered[f"x_{i}"] for i, k in enumerate(sorted(named))}}
        if jax.process_index() == 0:
            np.savez(os.path.join(out, f"train_{case}.npz"), **results)
        print("OK", case, jax.process_index(), flush=True)


def roundtrip(out: str) -> None:
    case = "rtrl-batch-model"
    _, shape, axes, _ = CASES[case]
    mesh = jax.make_mesh(shape, axes)
    learner = make_learner(case, sharded=True)
    state = sj.shard_state(learner, learner.init(jax.random.key(0), batch_size=B, input_size=N_IN), mesh)
    assert any(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(state))
    d = os.path.join(out, "roundtrip")
    save_sharded(d, state)
    fresh = sj.shard_state(learner, learner.init(jax.random.key(5), batch_size=B, input_size=N_IN), mesh)
    for like in (fresh, jax.eval_shape(lambda s: s, fresh)):
        back = restore_sharded(d, like, mesh=mesh)
        assert jax.tree.structure(back) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
            assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
            if is_key(a):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (a, b)
    print("OK roundtrip", flush=True)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        assert len(jax.devices()) == 1, jax.devices()
        reference(out, sys.argv[3:])
    elif mode == "roundtrip":
        assert len(jax.devices()) == 4, jax.devices()
        roundtrip(out)
    elif mode == "train":
        nproc, pid, port = (int(a) for a in sys.argv[3:6])
        if nproc > 1:
            jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
        assert len(jax.devices()) == 4 and jax.process_count() == nproc, (jax.devices(), jax.process_count())
        if nproc > 1:
            check_save_state_refuses(out, jax.make_mesh((4,), ("batch",)))
        train(out, sys.argv[6:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
