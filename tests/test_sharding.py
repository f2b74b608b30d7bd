"""Batch-parallel learning (``OnlineLearner(batch_axis=...)``, :mod:`snapjax.sharding`) on 8
forced host devices gives the single-device results (float64, 1e-10; only the order of the
batch sums differs), on an Explicit and an Auto 1-D mesh, with the per-example state sharded.

The devices must be forced before jax starts, so one subprocess (``_sharding_worker.py``) runs
all cases; the data include a non-finite example and an invalid label, so the guard's
cross-device flags and counts are exercised.  ``--xla_backend_optimization_level=0`` only
shortens XLA:CPU compilation (both runs use it).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import snapjax as sj
from snapjax.sharding import batch_specs

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
ROOT = WORKER.parent.parent


def _worker(*cases: str) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, str(WORKER), *cases], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    for case in cases:
        assert f"OK {case} " in res.stdout, res.stdout + res.stderr
    return res.stdout


def test_batch_parallel_equals_single_device():
    # stack: per-step SnAp-1, RTRL and sparse SnAp-2 layers; tbptt: windows (batch axis 1);
    # UORO draws the same signs on every device (see snapjax.sharding), so it is only run
    _worker("stack", "tbptt", "uoro")


@pytest.mark.slow
def test_batch_parallel_each_method():
    _worker("chunked", "rtrl", "snap1", "snap2")


def _learner(**kw):
    return sj.OnlineLearner(sj.GRUCell(3), readout_size=2, **kw)


def test_batch_specs_follow_declared_axes():
    learner = _learner(method="tbptt", tbptt_window=2, batch_axis="data")
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    specs = batch_specs(learner, state)
    P = jax.sharding.PartitionSpec
    assert specs.carry[0] == P("data")
    ms = specs.method_state[0]
    assert (ms.start, ms.xs, ms.zero_in, ms.pending, ms.pos) == (P("data"), P(None, "data"), P(None, "data"),
                                                                  P("data"), P())
    assert all(s == P() for s in jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)))


def test_batch_axis_checks():
    with pytest.raises(ValueError, match="batch_axis must be a mesh axis name"):
        _learner(batch_axis=3)
    learner = _learner()
    state = learner.init(jax.random.key(0), batch_size=3, input_size=2)
    xs, ys = jnp.ones((2, 3, 2)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"run_sharded needs a mesh axis"):
        learner.run_sharded(state, xs, ys)
    with pytest.raises(ValueError, match="a mesh axis name is needed"):
        batch_specs(learner, state)
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"the mesh has no axis 'data'; its axes are \('batch',\)"):
        sj.shard_batch(learner, state, mesh, "data")
    sharded = _learner(batch_axis="batch")
    with pytest.raises(ValueError, match=r"needs a mesh: pass mesh=, or run under `with jax.set_mesh"):
        sharded.run(state, xs, ys)
    with pytest.raises(ValueError, match=r"xs must be time-major \(T, 3, n_in\)"):
        sharded.run_sharded(state, jnp.ones((3, 2, 2)), ys, mesh=mesh)
