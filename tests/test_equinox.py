"""Equinox modules as layers: the compressed GRU/LSTM forms compute the modules' own steps, RTRL
on them and on a custom step module equals BPTT (``jax.grad`` of the modules themselves through
``lax.scan``, float64), trained parameters come back as equinox modules, and what cannot be
supported is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
import snapjax.cells.equinox as sj_eqx
from snapjax.cells import cell_step

eqx = pytest.importorskip("equinox")

N_IN, H, T, B = 3, 4, 5, 2


def _randomize(module, seed=1):
    """Every array leaf drawn afresh (equinox's uniform init is fine, but keep biases honest)."""
    leaves, treedef = jax.tree.flatten(module, is_leaf=eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype) if eqx.is_inexact_array(a) else a for a in leaves]
    return jax.tree.unflatten(treedef, new)


def _cell(kind, use_bias=True):
    cls = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[kind]
    return _randomize(cls(N_IN, H, use_bias=use_bias, dtype=jnp.float64, key=jax.random.key(0)))


class Leaky(eqx.Module):
    """A custom step: h' = (1 - a) h + a tanh(W x + U h + b), with a learned per-unit rate."""

    w: jax.Array
    u: jax.Array
    b: jax.Array
    rate: jax.Array
    hidden_size: int = eqx.field(static=True)

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w = 0.5 * jax.random.normal(k1, (H, N_IN), jnp.float64)
        self.u = 0.5 * jax.random.normal(k2, (H, H), jnp.float64)
        self.b = 0.1 * jax.random.normal(k3, (H,), jnp.float64)
        self.rate = jnp.full((H,), 0.3, jnp.float64)
        self.hidden_size = H

    def __call__(self, x, h):
        a = jax.nn.sigmoid(self.rate)
        return (1 - a) * h + a * jnp.tanh(self.w @ x + self.u @ h + self.b)


def _data():
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (T, B, H), jnp.float64)
    return xs, ys


def _loss(y, t):
    return jnp.sum((y - t) ** 2)


def _bptt(module, xs, ys):
    """jax.grad of Σ_t loss through lax.scan of the equinox module's own step (its own carry)."""
    lstm = isinstance(module, eqx.nn.LSTMCell)

    def total(m):
        zero = jnp.zeros((B, H), jnp.float64)

        def body(carry, xy):
            x, y = xy
            carry = jax.vmap(m)(x, carry)
            return carry, _loss(carry[0] if lstm else carry, y)

        return jnp.sum(jax.lax.scan(body, (zero, zero) if lstm else zero, (xs, ys))[1])

    return eqx.filter_grad(total)(module)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_spec_step_is_the_module_step(x64, kind, use_bias):
    cell = _cell(kind, use_bias)
    spec, params = sj.from_equinox(cell)
    x = jax.random.normal(jax.random.key(3), (B, N_IN), jnp.float64)
    h = 0.5 * jax.random.normal(jax.random.key(4), (B, H), jnp.float64)
    c = 0.5 * jax.random.normal(jax.random.key(5), (B, H), jnp.float64)
    if kind == "gru":
        want = jax.vmap(cell)(x, h)
        got = spec.from_internal(cell_step(spec, params, spec.to_internal(h), x))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    else:
        h_want, c_want = jax.vmap(cell)(x, (h, c))
        c_got, h_got = spec.from_internal(cell_step(spec, params, spec.to_internal((c, h)), x))
        np.testing.assert_allclose(h_got, h_want, rtol=0, atol=1e-14)
        np.testing.assert_allclose(c_got, c_want, rtol=0, atol=1e-14)
    assert all("bias" not in p for p in params.values()) == (not use_bias)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_rtrl_on_an_equinox_cell_equals_bptt(x64, kind):
    cell = _cell(kind)
    rec = sj.as_recurrent(cell)
    assert rec.spec is not None  # the compressed path
    xs, ys = _data()
    params = rec.init_params(jax.random.key(0), N_IN)
    got = sj.online_gradient(sj.online_method("rtrl", rec, params), params, None, xs, ys, _loss).grads
    _, want = sj.from_equinox(_bptt(cell, xs, ys))  # the module-shaped gradient in the linen layout
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_rtrl_on_a_custom_equinox_step_equals_bptt(x64):
    step = Leaky(jax.random.key(0))
    rec = sj.as_recurrent(step)
    assert rec.spec is None and rec.name == "Leaky"  # the generic path
    xs, ys = _data()
    params = rec.init_params(jax.random.key(0), N_IN)
    assert sorted(params) == ["b", "rate", "u", "w"]
    got = sj.online_gradient(sj.online_method("rtrl", rec, params), params, None, xs, ys, _loss).grads
    g = _bptt(step, xs, ys)
    want = {"b": g.b, "rate": g.rate, "u": g.u, "w": g.w}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-10)


def test_to_equinox_round_trip_and_new_values(x64):
    for cell in (_cell("gru"), _cell("lstm"), _cell("gru", use_bias=False), Leaky(jax.random.key(0))):
        params = sj.as_recurrent(cell).init_params(jax.random.key(0), N_IN)
        back = sj.to_equinox(cell, params)
        assert type(back) is type(cell)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(cell)):
            np.testing.assert_array_equal(a, b)
        doubled = sj.to_equinox(cell, jax.tree.map(lambda a: 2 * a, params))
        for a, b in zip(jax.tree.leaves(doubled), jax.tree.leaves(cell)):
            np.testing.assert_array_equal(a, 2 * b)
    with pytest.raises(ValueError, match=r"Leaky: params u has shape \(3, 3\), the module's \(4, 4\)"):
        sj.to_equinox(Leaky(jax.random.key(0)), dict(params, u=jnp.zeros((3, 3))))


def test_a_learner_on_equinox_layers_and_back(x64):
    key = jax.random.key(0)
    layers = [eqx.nn.Linear(N_IN, N_IN, dtype=jnp.float64, key=key), _cell("gru"),
              eqx.nn.MLP(H, 2, 8, 1, dtype=jnp.float64, key=key)]
    learner = sj.OnlineLearner(layers, method="snap1", loss="mse", optimizer=optax.sgd(0.1))
    state = learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    assert sorted(state.params["layers_0"]) == ["bias", "weight"] and sorted(state.params["layers_2"]) == ["layers"]
    xs, ys = _data()
    state, outputs, _ = learner.run(state, xs, ys[..., :2])
    assert outputs.shape == (T, B, 2)
    trained = sj.to_equinox(layers, state.params)
    np.testing.assert_array_equal(trained[0].weight, state.params["layers_0"]["weight"])
    np.testing.assert_array_equal(trained[2].layers[1].bias, state.params["layers_2"]["layers"]["1"]["bias"])
    assert not np.array_equal(trained[1].weight_hh, layers[1].weight_hh)  # the GRU trained, back in eqx layout
    _, gru_params = sj.from_equinox(trained[1])
    for a, b in zip(jax.tree.leaves(gru_params), jax.tree.leaves(state.params["layers_1"])):
        np.testing.assert_array_equal(a, b)


def test_refusals():
    class MyGRU(eqx.nn.GRUCell):
        pass

    with pytest.raises(ValueError, match=r"unsupported equinox cell MyGRU: .*a subclass of GRUCell may change"):
        sj.as_recurrent(MyGRU(N_IN, H, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"GRUCell with weight_ih of dtype complex64: .*real floating"):
        sj.from_equinox(eqx.nn.GRUCell(N_IN, H, dtype=jnp.complex64, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"Linear: a recurrent equinox step needs an int attribute hidden_size"):
        sj.as_recurrent(eqx.nn.Linear(N_IN, H, key=jax.random.key(0)))


class Concat(eqx.Module):
    """A step without ``hidden_size``: recurrent only through as_recurrent(..., init_carry=...)."""

    w: jax.Array

    def __call__(self, x, h):
        return jnp.tanh(self.w @ jnp.concatenate([x, h]))


def test_a_step_without_hidden_size_is_marked_by_as_recurrent():
    step = Concat(jnp.ones((H, N_IN + H)))
    with pytest.raises(ValueError, match=r"Concat: a recurrent equinox step needs an int attribute hidden_size"):
        sj.as_recurrent(step)
    rec = sj.as_recurrent(step, init_carry=lambda b, dtype: jnp.zeros((b, H), dtype))
    params = rec.init_params(jax.random.key(0), N_IN)
    assert rec.output(rec.apply(params, rec.init_carry(2), jnp.ones((2, N_IN)))).shape == (2, H)
    model = sj.OnlineModel([rec, eqx.nn.Linear(H, 1, key=jax.random.key(0))])
    assert model.recurrent_flags == (True, False)


def test_without_equinox_installed(monkeypatch):
    monkeypatch.setattr(sj_eqx, "eqx", None)
    with pytest.raises(ImportError, match=r"pip install snapjax\[equinox\]"):
        sj.from_equinox(object())
    assert not sj_eqx.is_equinox(object())
