"""Many devices (:mod:`snapjax.parallel.sharding`) on 8 forced host devices give the single-device results
(float64, 1e-10; only the order of the batch sums differs), on Explicit and Auto meshes, with
the examples split (``batch_axis``), the influence split along its parameter axis
(``param_axis``, each device holding exactly 1/8 of the influence bytes), and both (a 2 × 4
mesh), every leaf placed as declared.

The devices must be forced before jax starts, so one subprocess (``_sharding_worker.py``) runs
all cases; the data include a non-finite example and an invalid label, so the guard's
cross-device flags and counts are exercised.  ``--xla_backend_optimization_level=0`` only
shortens XLA:CPU compilation (both runs use it).
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import snapjax as sj
from _forced_devices import worker_env
from snapjax.parallel.sharding import state_specs

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
D = 8  # forced host devices


def _worker(*cases: str) -> str:
    res = subprocess.run([sys.executable, str(WORKER), *cases], env=worker_env(D), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    for case in cases:
        assert f"OK {case} " in res.stdout, res.stdout + res.stderr
    return res.stdout


def test_batch_and_parameter_sharded_equal_single_device():
    # the 2-D mesh: the learner on a stack of per-step SnAp-1, RTRL and sparse SnAp-2 layers, and
    # the low-level online_gradient for the two methods the stack does not hold: UORO (signs
    # drawn the same on every device, see snapjax.parallel.sharding) and truncated BPTT
    # (windows: batch axis 1)
    _worker("stack:both", "lowlevel/uoro,tbptt:both")


@pytest.mark.slow
def test_each_layout_and_method():
    # the learner-level UORO and truncated BPTT and the low-level rtrl, snap1 and sparse snap2 on
    # the 2-D mesh, and every case on the 1-D meshes
    _worker("uoro:both", "tbptt:both", "lowlevel/rtrl,snap1,snap2:both",
            *(f"{case}:{layout}" for layout in ("batch", "param") for case in ("stack", "uoro", "tbptt")),
            *(f"{case}:{layout}" for layout in ("batch", "param", "both") for case in ("rtrl", "snap1", "snap2", "chunked")),
            "lowlevel:batch", "lowlevel:param")


def _learner(**kw):
    return sj.OnlineLearner(sj.GRUCell(3), readout_size=2, **kw)


def test_state_specs_follow_declared_axes():
    P = jax.sharding.PartitionSpec
    learner = _learner(method="tbptt", tbptt_window=2, batch_axis="data", param_axis="model")
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    specs = state_specs(learner, state)
    assert specs.carry[0] == P("data")
    ms = specs.method_state[0]  # truncated BPTT declares no parameter axis
    assert (ms.start, ms.xs, ms.zero_in, ms.pending, ms.pos) == (P("data"), P(None, "data"), P(None, "data"),
                                                                  P("data"), P())
    assert all(s == P() for s in jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)))
    # RTRL: J (B, rows, units, K, m) per kernel, (B, units, K, m) per bias; UORO: θ̃ (B, *param_shape)
    rtrl = _learner(method="rtrl", batch_axis="data", param_axis="model")
    specs = state_specs(rtrl, rtrl.init(jax.random.key(0), batch_size=4, input_size=2)).method_state[0]
    assert specs.influence["hn"] == {"kernel": P("data", None, "model"), "bias": P("data", "model")}
    assert state_specs(rtrl, rtrl.init(jax.random.key(0), batch_size=4, input_size=2), params=False).method_state[0] \
        .influence["in"]["kernel"] == P("data")
    uoro = _learner(method="uoro", param_axis="model")
    specs = state_specs(uoro, uoro.init(jax.random.key(0), batch_size=4, input_size=2)).method_state[0]
    assert specs.theta_tilde["iz"] == {"kernel": P(None, None, "model"), "bias": P(None, "model")}
    assert specs.s_tilde == P() and specs.key == P()


def test_axis_checks():
    with pytest.raises(ValueError, match="batch_axis must be a mesh axis name"):
        _learner(batch_axis=3)
    with pytest.raises(ValueError, match="param_axis must be a mesh axis name"):
        _learner(param_axis="")
    with pytest.raises(ValueError, match="batch_axis and param_axis must be different mesh axes, got 'x' for both"):
        _learner(batch_axis="x", param_axis="x")
    learner = _learner()
    state = learner.init(jax.random.key(0), batch_size=3, input_size=2)
    xs, ys = jnp.ones((2, 3, 2)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"run_sharded needs a mesh axis"):
        learner.run_sharded(state, xs, ys)
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"shard_state needs a mesh axis"):
        sj.shard_state(learner, state, mesh)
    with pytest.raises(ValueError, match=r"the mesh has no axis 'data'; its axes are \('batch',\)"):
        sj.shard_state(_learner(batch_axis="data"), state, mesh)
    sharded = _learner(batch_axis="batch")
    with pytest.raises(ValueError, match=r"need a mesh: pass mesh=, or run under `with jax.set_mesh"):
        sharded.run(state, xs, ys)
    with pytest.raises(ValueError, match=r"xs must be time-major \(T, 3, n_in\)"):
        sharded.run_sharded(state, jnp.ones((3, 2, 2)), ys, mesh=mesh)
    # a parameter axis of 2 devices cannot split 3 units; a batch of 3 cannot be split in 2
    rtrl = _learner(method="rtrl", param_axis="model")
    state = rtrl.init(jax.random.key(0), batch_size=3, input_size=2)
    two = jax.sharding.AbstractMesh((2,), ("model",))
    with pytest.raises(ValueError, match=r"rtrl state: a leaf of shape \(3, 3, 3, 1\) is split along its parameter axis 1 over mesh axis .model. of size 2, "
                                         r"which does not divide 3"):
        state_specs(rtrl, state, two)
    with pytest.raises(ValueError, match=r"batch size 3 is not divisible by mesh axis 'batch' of size 2"):
        state_specs(sharded, state, jax.sharding.AbstractMesh((2,), ("batch",)))
    method = rtrl.methods(state.params)[0]
    with pytest.raises(ValueError, match=r"declares batch axis 0, which must have the batch size 5"):
        sj.method_specs(method, state.method_state[0], batch_axis="batch", batch_size=5)
    with pytest.raises(ValueError, match=r"online_gradient\(batch_axis=..., param_axis=...\) runs on the context mesh"):
        sj.online_gradient(method, state.params["layers_0"], None, xs, ys, lambda y, t: jnp.sum(y), param_axis="model")
