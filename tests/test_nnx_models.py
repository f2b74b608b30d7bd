"""Whole flax.nnx models: feed-forward nnx modules as layers, a model declaring its layers, the
trained values written back in one call; refusals for what cannot run as a pure function.

The reference is the linen twin of each nnx model (same initial values, flax.linen modules and
the compressed spec of the nnx GRU): trained by the same learner, both must end with the same
parameters (float64, to rounding)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import snapjax as sj
from snapjax.cells.nnx import from_nnx, nnx_layers, to_nnx

N_IN, T, B = 3, 6, 2


def _randomize(module, seed=1):
    """Non-zero biases everywhere (nnx initialises them to 0, which would hide a bias mix-up)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            var.set_value(jnp.asarray(rng.normal(size=value.shape), value.dtype) * 0.5)


def _nnx_model():
    rngs, f64 = nnx.Rngs(0), dict(param_dtype=jnp.float64)
    model = [nnx.Linear(N_IN, 4, rngs=rngs, **f64),
             nnx.GRUCell(4, 5, rngs=rngs, **f64),
             nnx.Sequential(nnx.Linear(5, 6, rngs=rngs, **f64), nnx.tanh, nnx.Linear(6, 2, rngs=rngs, **f64))]
    for i, m in enumerate(model):
        _randomize(m, seed=i + 1)
    return model


def _linen_twin(model):
    """Linen modules with the nnx model's values ({"layers_i": ...} to give the learner)."""
    enc, gru, head = model
    spec, gru_params = from_nnx(gru)
    layer = lambda lin: {"kernel": lin.kernel[...], "bias": lin.bias[...]}
    twin = [nn.Dense(4, param_dtype=jnp.float64), spec,
            nn.Sequential([nn.Dense(6, param_dtype=jnp.float64), nn.tanh, nn.Dense(2, param_dtype=jnp.float64)])]
    params = {"layers_0": layer(enc), "layers_1": gru_params,
              "layers_2": {"layers_0": layer(head.layers[0]), "layers_2": layer(head.layers[2])}}
    return twin, params


def _data():
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (T, B, 2), jnp.float64)
    return xs, ys


def _train(model, method, params=None):
    learner = sj.OnlineLearner(model, method=method, loss="mse", optimizer=optax.sgd(0.1))
    state = learner.init(jax.random.key(0), params, batch_size=B, input_size=N_IN)
    state, _, _ = learner.run(state, *_data())
    return state


@pytest.mark.parametrize("method", ["snap1", "rtrl"])
def test_nnx_model_trains_like_its_linen_twin(x64, method):
    model = _nnx_model()
    twin, twin_params = _linen_twin(model)
    got = _train(model, method).params
    want = _train(twin, method, twin_params).params
    assert sorted(got["layers_2"]) == ["layers"] and sorted(got["layers_2"]["layers"]) == ["0", "2"]
    want["layers_2"] = {"layers": {"0": want["layers_2"]["layers_0"], "2": want["layers_2"]["layers_2"]}}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, twin_params | {
        "layers_2": {"layers": {"0": twin_params["layers_2"]["layers_0"], "2": twin_params["layers_2"]["layers_2"]}}})
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained


def test_write_back_puts_the_trained_values_into_the_nnx_modules(x64):
    model = _nnx_model()
    state = _train(model, "snap1")
    to_nnx(model, state.params)
    enc, gru, head = model
    np.testing.assert_array_equal(enc.kernel[...], state.params["layers_0"]["kernel"])
    np.testing.assert_array_equal(head.layers[2].bias[...], state.params["layers_2"]["layers"]["2"]["bias"])
    _, gru_params = from_nnx(gru)
    for a, b in zip(jax.tree.leaves(gru_params), jax.tree.leaves(state.params["layers_1"])):
        np.testing.assert_array_equal(a, b)
    # a fresh learner on the written-back model starts from the trained values
    again = sj.OnlineLearner(model, loss="mse").init(jax.random.key(0), batch_size=B, input_size=N_IN).params
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_write_back_checks_everything_before_writing(x64):
    model = _nnx_model()
    before = np.asarray(model[0].kernel[...])
    params = sj.OnlineModel(model).init(jax.random.key(0), N_IN)
    bad = dict(params, layers_2={"layers": {"0": params["layers_2"]["layers"]["0"]}})
    with pytest.raises(ValueError, match=r"Sequential: params have the leaves .* the module"):
        to_nnx(model, jax.tree.map(lambda a: a + 1, bad))
    np.testing.assert_array_equal(model[0].kernel[...], before)  # layers_0 was valid, still unwritten
    with pytest.raises(ValueError, match=r"params for unknown layers \['layers_3'\]"):
        to_nnx(model, dict(params, layers_3={}))


class Net(nnx.Module):
    online_layers = ("encoder", "rnn", "head")

    def __init__(self, rngs):
        self.encoder = nnx.Linear(N_IN, 4, rngs=rngs, param_dtype=jnp.float64)
        self.rnn = nnx.GRUCell(4, 5, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(5, 2, rngs=rngs, param_dtype=jnp.float64)


def test_a_whole_model_declaring_its_layers(x64):
    net = Net(nnx.Rngs(0))
    assert [type(m).__name__ for m in nnx_layers(net)] == ["Linear", "GRUCell", "Linear"]
    as_list = _train([net.encoder, net.rnn, net.head], "rtrl").params
    state = _train(net, "rtrl")  # the learner expands the declared layers itself
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(as_list)):
        np.testing.assert_array_equal(a, b)
    to_nnx(net, state.params)
    np.testing.assert_array_equal(net.head.kernel[...], state.params["layers_2"]["kernel"])
    with pytest.raises(ValueError, match="Net has no layer 'decoder'"):
        nnx_layers(net, ("encoder", "decoder"))


def test_params_survive_a_checkpoint(x64, tmp_path):
    model = _nnx_model()
    state = _train(model, "snap1")
    sj.save_state(tmp_path / "ckpt", state)
    back = sj.restore_state(tmp_path / "ckpt", jax.eval_shape(lambda: state))
    assert jax.tree.structure(back.params) == jax.tree.structure(state.params)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_dropout_with_rngs_and_batchnorm_are_refused():
    rngs = nnx.Rngs(0)
    cell = nnx.GRUCell(N_IN, 4, rngs=rngs)
    with pytest.raises(ValueError, match=r"layers_1: Sequential: .* draws random numbers at call time .*deterministic=True"):
        sj.OnlineModel([cell, nnx.Sequential(nnx.Dropout(0.5, rngs=rngs), nnx.Linear(4, 2, rngs=rngs))])
    with pytest.raises(ValueError, match=r"layers_0: BatchNorm: .* other mutable state \(mean \(BatchStat\)"):
        sj.OnlineModel([nnx.BatchNorm(N_IN, rngs=rngs), cell])
    # a Dropout without rngs that is not deterministic fails when the layer is first run, named
    learner = sj.OnlineLearner([cell, nnx.Dropout(0.5), nnx.Linear(4, 2, rngs=rngs)])
    with pytest.raises(ValueError, match=r"layers_1 \(Dropout\) fails on inputs of 4 features "
                                         r"\(layers_0 emits 4\): ValueError: .*rngs"):
        learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)


def test_in_features_mismatch_is_named_at_init():
    rngs = nnx.Rngs(0)
    learner = sj.OnlineLearner([nnx.GRUCell(N_IN, 4, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])
    with pytest.raises(ValueError, match=r"layers_1 \(Linear\) takes in_features=5, but layers_0 emits 4 features"):
        learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    model = sj.OnlineModel([nnx.Sequential(nnx.Linear(7, 4, rngs=rngs)), nnx.GRUCell(4, 4, rngs=rngs)])
    with pytest.raises(ValueError, match=r"layers_0 \(Sequential\) takes in_features=7, but the model's inputs have 3"):
        model.init(jax.random.key(0), N_IN)


def test_no_recurrent_layer_names_the_rule_and_the_layers():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"needs at least one recurrent layer; a layer is recurrent if .*"
                                         r"\[layers_0: Linear, layers_1: Dense\], all feed-forward"):
        sj.OnlineModel([nnx.Linear(3, 4, rngs=rngs), nn.Dense(2)])


class NormGRU(nnx.Module):
    """A GRU with a layer norm (mixes the units): no compressed form, the generic path."""

    def __init__(self, n_in, n, rngs):
        self.gru = nnx.GRUCell(n_in, n, rngs=rngs, param_dtype=jnp.float64)
        self.norm = nnx.LayerNorm(n, rngs=rngs, param_dtype=jnp.float64)
        self.in_features = n_in

    def __call__(self, h, x):
        h = self.norm(self.gru(h, x)[0])
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return self.gru.initialize_carry(input_shape, rngs)


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def test_rtrl_on_a_custom_nnx_cell_equals_bptt(x64):
    cell = NormGRU(N_IN, 4, nnx.Rngs(0))
    _randomize(cell)
    rec = sj.as_recurrent(cell)
    assert rec.spec is None and sj.OnlineModel([cell, nnx.Linear(4, 2, rngs=nnx.Rngs(1))]).recurrent_flags == (
        True, False)
    params = rec.init_params(jax.random.key(0), N_IN)
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (T, B, 4), jnp.float64)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    got = sj.online_gradient(sj.online_method("rtrl", rec, params), params, None, xs, ys, loss).grads

    def total(c):
        def body(h, xy):
            h, y = c(h, xy[0])
            return h, loss(y, xy[1])

        return jnp.sum(jax.lax.scan(body, jnp.zeros((B, 4), jnp.float64), (xs, ys))[1])

    want = _str_keys(nnx.grad(total)(cell).to_pure_dict())
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    to_nnx(cell, jax.tree.map(jnp.zeros_like, params))  # the generic cell's values written back
    assert float(jnp.abs(cell.gru.dense_h.kernel[...]).sum()) == 0.0


def test_an_nnx_cell_subclass_takes_the_generic_path(x64):
    class Scaled(nnx.GRUCell):
        def __call__(self, carry, x):
            h, _ = super().__call__(carry, 2 * x)
            return h, h

    rec = sj.as_recurrent(Scaled(N_IN, 4, rngs=nnx.Rngs(0)))
    assert rec.spec is None and rec.name == "Scaled"
    assert rec.init_carry(3).shape == (3, 4)

    class Readout(NormGRU):
        def __call__(self, h, x):
            h, _ = super().__call__(h, x)
            return h, 2 * h

    with pytest.raises(ValueError, match=r"Readout returns \(carry, y\) with y other than its carry"):
        sj.as_recurrent(Readout(N_IN, 4, nnx.Rngs(0)))
