"""What counts as a recurrent layer: a plain ``flax.linen`` module ``(carry, x) -> (carry, y)``
that defines ``initialize_carry`` is recurrent (no ``nn.RNNCellBase`` needed); one without it is
made recurrent by ``snapjax.as_recurrent(module, init_carry=...)``.  Both train on the generic
path, where exact RTRL equals BPTT (``jax.grad`` through ``lax.scan`` of the module, float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.training.model import is_recurrent

N_IN, H, T, B = 3, 4, 5, 2


class Bare(nn.Module):
    """h' = tanh(LayerNorm(x W + h U)): mixes the units, so no compressed form exists."""

    features: int

    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(nn.LayerNorm(param_dtype=jnp.float64)(
            nn.Dense(self.features, param_dtype=jnp.float64)(x)
            + nn.Dense(self.features, use_bias=False, param_dtype=jnp.float64)(h)))
        return h, h


class Plain(Bare):
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(input_shape[:-1] + (self.features,))


def _zeros(batch_size, dtype):
    return jnp.zeros((batch_size, H), dtype)


def _data():
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (T, B, H), jnp.float64)
    return xs, ys


def _loss(y, t):
    return jnp.sum((y - t) ** 2)


def _bptt(module, params, xs, ys):
    def total(p):
        def body(h, xy):
            h, y = module.apply({"params": p}, h, xy[0])
            return h, _loss(y, xy[1])

        return jnp.sum(jax.lax.scan(body, jnp.zeros((B, H), jnp.float64), (xs, ys))[1])

    return jax.grad(total)(params)


def test_a_module_with_initialize_carry_is_recurrent():
    assert not isinstance(Plain(H), nn.RNNCellBase)
    assert is_recurrent(Plain(H)) and not is_recurrent(Bare(H))
    assert sj.OnlineModel([nn.Dense(N_IN), Plain(H), nn.Dense(2)]).recurrent_flags == (False, True, False)
    assert sj.OnlineModel([sj.as_recurrent(Bare(H), init_carry=_zeros), nn.Dense(2)]).recurrent_flags == (True, False)
    with pytest.raises(ValueError, match=r"at least one recurrent layer; .*initialize_carry.* \[layers_0: Bare, "
                                         r"layers_1: Dense\], all feed-forward"):
        sj.OnlineModel([Bare(H), nn.Dense(2)])


@pytest.mark.parametrize("marked", [False, True])
def test_rtrl_equals_bptt_on_a_plain_module(x64, marked):
    module = sj.as_recurrent(Bare(H), init_carry=_zeros) if marked else Plain(H)
    rec = sj.as_recurrent(module)
    assert rec.spec is None
    params = rec.init_params(jax.random.key(0), N_IN)
    xs, ys = _data()
    got = sj.online_gradient(sj.online_method("rtrl", rec, params), params, None, xs, ys, _loss).grads
    want = _bptt(Plain(H), params, xs, ys)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_a_plain_module_trains_in_a_learner(x64):
    learner = sj.OnlineLearner([Plain(H), nn.Dense(2, param_dtype=jnp.float64)], method="rtrl", loss="mse",
                               optimizer=optax.sgd(0.1))
    state = learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    before = state.params["layers_0"]["Dense_0"]["kernel"].copy()
    assert type(learner.methods(state.params)[0]).__name__ == "DenseInfluence"
    xs, ys = _data()
    state, outputs, _ = learner.run(state, xs, ys[..., :2])
    assert outputs.shape == (T, B, 2) and np.all(np.isfinite(outputs))
    assert np.abs(state.params["layers_0"]["Dense_0"]["kernel"] - before).max() > 0
