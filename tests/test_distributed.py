"""Multi-process training (``jax.distributed``, 2 processes × 2 forced CPU devices) and sharded
checkpoints (:mod:`snapjax.parallel.sharded_checkpoint`, orbax).

A state trained ``T1`` steps on a 4-device mesh spanning both processes is saved, trained
``T2`` more steps (continued), restored into a fresh template and trained the same ``T2``
steps (resumed): continued and resumed are bit-identical, and both equal a single-process,
single-device run of the ``T1 + T2`` steps (float64, 1e-10 relative; only the order of the
batch sums differs).  Cases (``_distributed_worker.CASES``): RTRL on a (2, 2) mesh ("batch",
"model") with the influence split over "model"; RTRL and SnAp-1 batch-parallel on a (4,) mesh
(slow).  The checks of :func:`save_sharded` / :func:`restore_sharded` run in this process.  Devices and
processes must be set up before jax starts, so the work runs in subprocesses;
``--xla_backend_optimization_level=0`` only shortens XLA:CPU compilation (every run uses it).
"""

import contextlib
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import snapjax as sj

pytest.importorskip("orbax.checkpoint")
from snapjax.parallel.sharded_checkpoint import restore_sharded, save_sharded  # noqa: E402
from _forced_devices import worker_env  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("_distributed_worker.py")
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(groups: dict, out: pathlib.Path) -> dict:
    """Run ``{name: (argv, devices)}`` concurrently; if one fails, kill the others.  Returns
    ``{name: stdout}``; asserts every exit status is 0 (message: every process's output)."""
    procs = {}
    with contextlib.ExitStack() as files:
        try:
            for name, (argv, devices) in groups.items():
                so, se = (files.enter_context(open(out / f"{name}.{k}", "w")) for k in ("out", "err"))
                procs[name] = subprocess.Popen([sys.executable, str(WORKER), *argv], env=worker_env(devices),
                                               stdout=so, stderr=se, text=True)
            deadline = time.monotonic() + TIMEOUT
            while any(p.poll() is None for p in procs.values()):
                if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs.values()):
                    break
                time.sleep(0.1)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                p.wait()
    texts = {n: ((out / f"{n}.out").read_text(), (out / f"{n}.err").read_text()) for n in procs}
    report = "\n".join(f"--- {n} (exit {procs[n].returncode}) stdout:\n{so}\n--- {n} stderr (tail):\n{se[-6000:]}"
                       for n, (so, se) in texts.items())
    assert len(procs) == len(groups) and all(p.returncode == 0 for p in procs.values()), report
    return {n: so for n, (so, _) in texts.items()}


def _leaves(data, prefix: str) -> list:
    n = sum(1 for k in data.files if k.startswith(prefix + "_"))
    return [data[f"{prefix}_{i}"] for i in range(n)]


def _worst_relative(got: list, ref: list) -> float:
    assert len(got) == len(ref) > 0
    worst = 0.0
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        a, b = a.astype(np.float64), b.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / max(1.0, float(np.max(np.abs(b), initial=0.0))))
    return worst


def _two_processes(tmp_path, cases) -> None:
    port = _free_port()
    train = ["train", str(tmp_path), "2"]
    outs = _launch({"process0": ([*train, "0", str(port), *cases], 2),
                    "process1": ([*train, "1", str(port), *cases], 2),
                    "reference": (["reference", str(tmp_path), *cases], 1)}, tmp_path)
    for pid in (0, 1):
        assert f"OK save_state-refuses {pid}" in outs[f"process{pid}"], outs
    for case in cases:
        assert all(f"OK {case} {pid}" in outs[f"process{pid}"] for pid in (0, 1)), outs
        run, ref = np.load(tmp_path / f"train_{case}.npz"), np.load(tmp_path / f"reference_{case}.npz")
        # the restored state is the saved one, and resuming from it repeats the continued run
        for name_a, name_b in (("saved", "restored"), ("state", "resumed")):
            for a, b in zip(_leaves(run, name_a), _leaves(run, name_b), strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (case, name_a)
        for a in ("outs2", "loss2"):
            assert run[a].tobytes() == run[a + "r"].tobytes(), (case, a)
        # and both equal one device running T1 + T2 steps
        names = ("outs1", "outs2", "loss1", "loss2")
        worst = _worst_relative(_leaves(run, "state") + [run[k] for k in names],
                                _leaves(ref, "state") + [ref[k] for k in names])
        assert worst < 1e-10, (case, worst)
        assert not np.array_equal(_leaves(run, "saved")[0], _leaves(run, "state")[0]), case  # it did train


def test_two_processes_train_checkpoint_resume(tmp_path):
    # RTRL on a (2, 2) mesh spanning both processes: the examples split over "batch" and the
    # influence over "model" (the batch-only (4,) mesh is in the slow test below)
    _two_processes(tmp_path, ("rtrl-batch-model",))


@pytest.mark.slow
def test_two_processes_batch_only_and_snap1(tmp_path):
    # RTRL and SnAp-1 batch-parallel on a (4,) mesh
    _two_processes(tmp_path, ("rtrl-batch", "snap1-batch"))


def test_roundtrip_on_four_devices(tmp_path):
    out = _launch({"roundtrip": (["roundtrip", str(tmp_path)], 4)}, tmp_path)
    assert "OK roundtrip" in out["roundtrip"], out


class _State(NamedTuple):
    params: dict
    opt_state: Any
    carry: jax.Array
    grad_acc: Any
    loss_acc: jax.Array
    key: jax.Array
    excluded: jax.Array


def _state():
    """A small sharded state like an OnlineState (without a learner, whose init is slower):
    parameters, adam state, a per-example carry, a None node, a typed PRNG key."""
    mesh = jax.make_mesh((1,), ("batch",))
    params = {"layers_0": {"hn": {"bias": jnp.arange(4.0, dtype=jnp.float32)}, "kernel": jnp.ones((3, 4), jnp.float32)}}
    state = _State(params, optax.adam(1e-2).init(params), jnp.ones((2, 4), jnp.float32), None, jnp.float32(0.5),
                   jax.random.key(0), jnp.int32(3))
    specs = _State(P(), P(), P("batch"), None, P(), P(), P())
    return sj.put_sharded(state, mesh, specs), mesh


def _with_leaf(tree, i: int, leaf):
    """``tree`` with its leaf ``i`` replaced by ``leaf``."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, leaves[:i] + [leaf] + leaves[i + 1 :])


def test_sharded_checkpoint_checks(tmp_path):
    state, mesh = _state()
    d = tmp_path / "ckpt"
    save_sharded(d, state)
    with pytest.raises(FileExistsError, match=r"ckpt already exists; choose a new directory .* overwrite=True"):
        save_sharded(d, state)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        restore_sharded(tmp_path / "absent", state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a checkpoint written by save_sharded"):
        restore_sharded(tmp_path / "empty", state)
    abstract = jax.eval_shape(lambda s: s, state)
    bias = abstract.params["layers_0"]["hn"]["bias"]  # leaf 0
    assert bias.shape == (4,)
    with pytest.raises(ValueError, match=r"the template expects \.params\['layers_0'\]\['hn'\]\['bias'\]: shape \(5,\), "
                                         r"dtype float32; the checkpoint has .*bias'\]: shape \(4,\), dtype float32"):
        restore_sharded(d, _with_leaf(state, 0, jax.ShapeDtypeStruct((5,), bias.dtype, sharding=bias.sharding)))
    with pytest.raises(ValueError, match=r"bias'\]: shape \(4,\), dtype float64; the checkpoint has .* dtype float32"):
        restore_sharded(d, _with_leaf(state, 0, jax.ShapeDtypeStruct((4,), np.float64, sharding=bias.sharding)))
    with pytest.raises(ValueError, match=r"the template expects \.grad_acc: shape \(\), dtype float32; "
                                         r"the checkpoint has \.loss_acc: shape \(\), dtype float32"):
        restore_sharded(d, state._replace(grad_acc=state.loss_acc, loss_acc=None))
    n = len(jax.tree.leaves(state))
    with pytest.raises(ValueError, match=rf"template has {n - 1} leaves, the checkpoint {n}; the first extra leaf "
                                         r"\(in the checkpoint\) is \.excluded: shape \(\), dtype int32"):
        restore_sharded(d, state._replace(excluded=None))
    with pytest.raises(ValueError, match=r"\.key: shape \(\), dtype key<rbg> \(rbg\); the checkpoint has \.key: shape "
                                         r"\(\), dtype key<fry> \(threefry2x32\)"):
        restore_sharded(d, state._replace(key=jax.random.key(0, impl="rbg")))
    with pytest.raises(ValueError, match=r"sharded over an abstract mesh .*pass mesh="):
        restore_sharded(d, abstract)
    back = restore_sharded(d, abstract, mesh=mesh)  # also: overwrite=True replaces the checkpoint
    save_sharded(d, jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, back), overwrite=True)
    again = restore_sharded(d, state)
    assert np.array_equal(again.params["layers_0"]["hn"]["bias"], state.params["layers_0"]["hn"]["bias"] + 1)
    assert np.array_equal(jax.random.key_data(again.key), jax.random.key_data(state.key))
