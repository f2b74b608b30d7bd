"""Subprocess worker for test_sharding: needs XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax is imported.  Prints 'OK <max abs diff>' on success."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import snapjax as sj  # noqa: E402


def main(method: str) -> None:
    devices = jax.devices()
    assert len(devices) == 8, devices
    B, n_in, T = 16, 3, 6
    kw = {"tbptt_window": 3} if method == "tbptt" else {}
    learner = sj.OnlineLearner(
        sj.GRUCell(6, param_dtype=jnp.float64), 3, method=method, optimizer=optax.adam(1e-2), update_every=1 if kw else 2, **kw
    )
    state = learner.init(jax.random.key(0), None, batch_size=B, input_size=n_in)
    ks = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(ks[0], (T, B, n_in), jnp.float64)
    ys = jax.random.randint(ks[1], (T, B), 0, 3)
    masks = (jax.random.uniform(ks[2], (T, B)) < 0.8).astype(jnp.float64)

    run = jax.jit(learner.run)
    ref_state, ref_out, ref_met = run(jax.device_put(state, devices[0]), xs, ys, masks)

    mesh = Mesh(np.array(devices), ("batch",))
    sh_state = sj.shard_batch(learner, state, mesh, "batch")
    data = NamedSharding(mesh, P(None, "batch"))
    carry_sharding = sh_state.carry[0].sharding
    assert carry_sharding.spec == P("batch"), carry_sharding
    assert len(sh_state.carry[0].addressable_shards) == 8
    assert sh_state.carry[0].addressable_shards[0].data.shape[0] == B // 8
    out_state, out, met = run(sh_state, jax.device_put(xs, data), jax.device_put(ys, data), jax.device_put(masks, data))
    # the per-example state stays sharded over the batch
    for leaf in jax.tree.leaves((out_state.carry, out_state.method_state)):
        if leaf.ndim >= 1 and leaf.shape[0] == B:
            assert leaf.sharding.spec[0] == "batch", leaf.sharding
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves((out_state, out, met)), jax.tree.leaves((ref_state, ref_out, ref_met)))
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    ]
    worst = max(diffs)
    assert worst < 1e-10, worst
    print("OK", method, worst)


if __name__ == "__main__":
    for m in sys.argv[1:]:
        main(m)
