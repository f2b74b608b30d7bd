"""No silent wrong results, round two (issue #22): inputs that used to train on the wrong
objective without an error, or crash deep inside jax, now give the right result or a clear
snapjax error. Each test names the class it covers."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_rel_err
from flax import nnx
from jax import lax

import snapjax as sj


def _gru_params(units=4, n_in=3, dtype=jnp.float32, module=None):
    module = nn.GRUCell(units, param_dtype=dtype) if module is None else module
    return module.init(jax.random.key(0), jnp.zeros((1, units), dtype), jnp.zeros((1, n_in), dtype))["params"]


# -- subclasses of built-in cells take the generic path (their own maths) -------------------
class _ScaledGRU(nn.GRUCell):
    """A linen GRU subclass that changes the step: h' = 0.5 · GRU(h, x)."""

    @nn.compact
    def __call__(self, carry, inputs):
        h, _ = super().__call__(carry, inputs)
        return 0.5 * h, 0.5 * h


class _ScaledSnapGRU(sj.GRUCell):
    @nn.compact
    def __call__(self, carry, inputs):
        h, _ = super().__call__(carry, inputs)
        return 0.5 * h, 0.5 * h


@pytest.mark.parametrize("module", [_ScaledGRU(4, param_dtype=jnp.float64), _ScaledSnapGRU(4, param_dtype=jnp.float64)],
                         ids=["linen-subclass", "snapjax-subclass"])
def test_subclass_of_a_builtin_cell_is_trained_with_its_own_maths(module, x64):
    rec = sj.as_recurrent(module)
    assert rec.spec is None  # not taken for the built-in
    params = module.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (5, 2, 4), jnp.float64)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    online = sj.online_gradient(sj.online_method("rtrl", module, params), params, None, xs, ys, loss)

    def total(p):  # the module's own apply, unrolled
        def body(h, xy):
            h, y = module.apply({"params": p}, h, xy[0])
            return h, loss(y, xy[1])
        return lax.scan(body, jnp.zeros((2, 4)), (xs, ys))[1].sum()

    assert tree_rel_err(online.grads, jax.grad(total)(params)) < 1e-10


def test_nnx_subclass_with_an_extra_parameter_is_refused():
    class Biased(nnx.GRUCell):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.extra = nnx.Param(jnp.ones((4,)))

    with pytest.raises(ValueError, match="unsupported nnx cell Biased: .*exactly that class"):
        sj.from_nnx(Biased(3, 4, rngs=nnx.Rngs(0)))


def test_a_computation_dtype_is_honoured_by_the_generic_path():
    cell = nn.GRUCell(4, dtype=jnp.bfloat16)
    assert sj.as_recurrent(cell).spec is None
    with pytest.raises(ValueError, match=r"dtype=bfloat16: the compressed form computes in the parameters' dtype"):
        sj.as_cell_spec(cell)
    params = _gru_params(module=cell)
    method = sj.online_method("snap1", cell, params)
    carry, _, _ = method.step(params, method.init_carry(2), method.init(2), jnp.ones((2, 3)))
    ref, _ = cell.apply({"params": params}, jnp.zeros((2, 4)), jnp.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(carry, np.float32), np.asarray(ref, np.float32))


# -- truncated BPTT: a trailing partial window is flushed ------------------------------------
@pytest.mark.parametrize("window", [3, 10])
def test_tbptt_flushes_a_trailing_partial_window(window, x64):
    cell = nn.GRUCell(4, param_dtype=jnp.float64)
    params = _gru_params(dtype=jnp.float64, module=cell)
    T = 7
    xs = jax.random.normal(jax.random.key(1), (T, 2, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (T, 2, 4), jnp.float64)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    got = sj.online_gradient(sj.online_method("tbptt", cell, params, window=window), params, None, xs, ys, loss)

    def window_loss(p, h0, lo, hi):  # BPTT of the window [lo, hi), truncated at its start
        h, total = lax.stop_gradient(h0), 0.0
        for t in range(lo, hi):
            h = cell.apply({"params": p}, h, xs[t])[0]
            total = total + loss(h, ys[t])
        return total, h

    ref, h = jax.tree.map(jnp.zeros_like, params), jnp.zeros((2, 4))
    for lo in range(0, T, window):
        g, h = jax.grad(window_loss, has_aux=True)(params, h, lo, min(lo + window, T))
        ref = jax.tree.map(jnp.add, ref, g)
    assert tree_rel_err(got.grads, ref) < 1e-10
    if window >= T:  # one (partial) window: BPTT of the whole sequence
        full = sj.bptt_gradient(cell, params, None, xs, ys, loss)
        assert tree_rel_err(got.grads, full.grads) < 1e-10


# -- chunked RTRL on the LRU (no recurrent projection) ---------------------------------------
def test_lru_chunked_rtrl_equals_per_step(x64):
    kw = dict(readout_size=2, method="rtrl", update_every=2, optimizer=optax.sgd(0.1))
    xs = jax.random.normal(jax.random.key(1), (6, 2, 3), jnp.float64)
    ys = jnp.zeros((6, 2), jnp.int32)
    finals = []
    for chunked in (True, False):
        learner = sj.OnlineLearner(sj.LRUCell(4, param_dtype=jnp.float64), chunked=chunked, **kw)
        state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        assert learner.methods(state.params)[0].name == ("rtrl-chunk2" if chunked else "rtrl")
        finals.append(learner.run(state, xs, ys)[0].params)
    assert tree_rel_err(finals[0], finals[1]) < 1e-10


# -- masks ------------------------------------------------------------------------------------
def test_masks_for_feed_forward_or_unknown_layers_are_refused():
    layers = [nn.Dense(4), nn.GRUCell(4), nn.Dense(2)]
    with pytest.raises(ValueError, match="masks for 'layers_0', a feed-forward layer"):
        sj.OnlineLearner(layers, masks={"layers_0": {"kernel": np.zeros((3, 4))}})
    with pytest.raises(ValueError, match=r"masks for unknown layer 'layers_7'; the model's layers are"):
        sj.OnlineLearner(layers, masks={"layers_7": {"hn": np.eye(4)}})
    with pytest.raises(ValueError, match="masks must be a dict"):
        sj.OnlineLearner(layers, masks=np.eye(4))
    with pytest.raises(ValueError, match="masks mix layer names and other keys"):
        sj.OnlineLearner(layers, masks={"layers_1": {"hn": np.eye(4)}, "hn": np.eye(4)})


# -- loss masks are weights >= 0 ----------------------------------------------------------------
def _learner(**kw):
    return sj.OnlineLearner(nn.GRUCell(4), readout_size=2, optimizer=optax.sgd(0.1), **kw)


def test_negative_loss_weights_are_refused_or_excluded():
    learner = _learner()
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    xs, ys = jnp.ones((3, 2, 3)), jnp.zeros((3, 2), jnp.int32)
    bad = jnp.array([[1.0, -1.0]] * 3)
    with pytest.raises(ValueError, match="loss masks are weights >= 0"):
        learner.run(state, xs, ys, bad)
    with pytest.raises(ValueError, match="loss masks are weights >= 0"):
        learner.evaluate(state, xs, ys, bad)
    # under jit the value cannot be seen: the example is excluded and counted, not a weight
    _, _, m_bad = jax.jit(learner.run)(state, xs, ys, bad)
    _, _, m_one = jax.jit(learner.run)(state, xs, ys, jnp.array([[1.0, 0.0]] * 3))
    np.testing.assert_allclose(m_bad["loss"], m_one["loss"], rtol=1e-6)
    assert int(m_bad["excluded"][-1]) == 3 and int(m_one["excluded"][-1]) == 0


def test_evaluate_checks_the_mask_shape():
    learner = _learner()
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match=r"masks must have shape \(T, B\) = \(3, 2\), got \(3, 2, 1\)"):
        learner.evaluate(state, jnp.ones((3, 2, 3)), jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2, 1)))


# -- parameters, losses, options ---------------------------------------------------------------
def test_non_finite_initial_parameters_are_refused():
    learner = _learner()
    params = learner.init(jax.random.key(0), batch_size=2, input_size=3).params
    params["layers_0"]["hn"]["kernel"] = params["layers_0"]["hn"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"initial parameters must be finite; non-finite values in \['layers_0'\]\['hn'\]\['kernel'\]"):
        learner.init(jax.random.key(0), params, batch_size=2, input_size=3)


def test_a_loss_returning_integers_is_refused():
    learner = _learner(loss=lambda out, y: jnp.argmax(out, -1))
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match="the loss must return floating-point values .* got int32"):
        learner.run(state, jnp.ones((2, 2, 3)), jnp.zeros((2, 2), jnp.int32))


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_bad_chunk_lengths_are_refused(chunk):
    params = _gru_params()
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        sj.online_method("rtrl", nn.GRUCell(4), params, chunk=chunk)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        _learner(chunk=chunk)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be None, a jax.lax.Precision or a string"):
        sj.online_method("snap1", nn.GRUCell(4), _gru_params(), precision="bogus")
    assert sj.online_method("snap1", nn.GRUCell(4), _gru_params(), precision="highest").name == "snap1"


def test_an_uncalled_optimizer_is_refused():
    with pytest.raises(TypeError, match=r"optimizer must be an optax GradientTransformation, got function \(call it"):
        _learner().__class__(nn.GRUCell(4), readout_size=2, optimizer=optax.adam)


def test_cells_without_units_are_refused():
    with pytest.raises(ValueError, match="gru: units must be a positive int, got 0"):
        sj.GRUCell(0).init(jax.random.key(0), jnp.zeros((1, 0)), jnp.zeros((1, 3)))


def test_uoro_without_a_key_says_so():
    method = sj.online_method("uoro", nn.GRUCell(4), _gru_params())
    with pytest.warns(UserWarning, match="UORO.init without key= draws its random signs from jax.random.key"):
        method.init(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key: no warning; a reset keeps the running key, no warning
        state = method.init(2, key=jax.random.key(3))
        again = method.reset(state, jnp.array([True, False]))
    assert jnp.array_equal(jax.random.key_data(again.key), jax.random.key_data(state.key))


def test_a_cellspec_layer_initialises_and_a_layer_key_typo_is_named():
    spec = sj.gru_spec(4)
    learner = sj.OnlineLearner([nn.Dense(3), spec], readout_size=2)
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)  # was: "cannot initialise ... CellSpec"
    assert jax.tree.map(jnp.shape, state.params["layers_1"]) == jax.tree.map(jnp.shape, spec.init(jax.random.key(1), 3))
    sj.verify_spec(spec, state.params["layers_1"])
    with pytest.raises(ValueError, match=r"params keys \['layer_1'\]: a model's parameters are \{'layers_i'"):
        learner.init(jax.random.key(0), {"layer_1": state.params["layers_1"]}, batch_size=2, input_size=3)
    with pytest.raises(ValueError, match=r"unit_init for unknown unit parameter\(s\) \['tau'\]"):
        spec.init(jax.random.key(0), 3, unit_init={"tau": jnp.ones})


def test_a_wrong_input_feature_size_is_named_by_the_learner_and_uoro():
    learner = sj.OnlineLearner([nn.Dense(4), nn.GRUCell(4)], readout_size=2)
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match="the inputs have 5 features .* the model's first layer takes 3"):
        learner.run(state, jnp.ones((2, 2, 5)), jnp.zeros((2, 2), jnp.int32))
    params = _gru_params()
    method = sj.online_method("uoro", nn.GRUCell(4), params)
    with pytest.raises(ValueError, match="UORO: x has 5 features, the cell's input kernels take 3"):
        method.step(params, method.init_carry(2), method.init(2, key=jax.random.key(0)), jnp.ones((2, 5)))


class _EmitsProjection(nn.RNNCellBase):
    """(carry, x) -> (carry', W carry'): the emitted y is not the carry."""

    features: int

    @nn.compact
    def __call__(self, carry, x):
        h, _ = nn.GRUCell(self.features)(carry, x)
        return h, nn.Dense(self.features)(h)

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(input_shape[:-1] + (self.features,))

    @property
    def num_feature_axes(self):
        return 1


class _TupleCarry(_EmitsProjection):
    """carry (h, c), output h + c (neither element)."""

    @nn.compact
    def __call__(self, carry, x):
        h, c = carry
        h2, _ = nn.GRUCell(self.features)(h, x)
        return (h2, c + h2), h2 + c + h2

    def initialize_carry(self, rng, input_shape):
        z = jnp.zeros(input_shape[:-1] + (self.features,))
        return (z, z)


@pytest.mark.parametrize("module", [_EmitsProjection(4), _TupleCarry(4)], ids=["y=W.carry", "tuple-carry"])
def test_a_module_emitting_other_than_its_carry_is_refused(module):
    learner = sj.OnlineLearner([module, nn.Dense(2)], method="rtrl")
    with pytest.raises(ValueError, match="returns \\(carry, y\\) with y other than its carry"):
        learner.init(jax.random.key(0), batch_size=2, input_size=3)
    # given the read-out as output=fn(carry), the layer emits what the module returns
    ok = sj.OnlineLearner([sj.as_recurrent(_TupleCarry(4), output=lambda c: 2 * c[0] + c[1] - c[0]), nn.Dense(2)])
    ok.init(jax.random.key(0), batch_size=2, input_size=3)


def test_masks_on_unit_parameters_are_refused():
    learner = sj.OnlineLearner(sj.LRUCell(4), readout_size=2, masks={"nu_log": np.ones(4)})
    with pytest.raises(ValueError, match="mask for 'nu_log' of layers_0: masks apply to projection kernels"):
        learner.init(jax.random.key(0), batch_size=2, input_size=3)


def test_a_donated_state_reused_says_which_call_donated_it():
    learner = _learner()
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    xs, ys = jnp.ones((3, 2, 3)), jnp.zeros((3, 2), jnp.int32)
    new, _, _ = learner.run_jit(state, xs, ys)
    with pytest.raises(ValueError, match="run_jit: this state was donated to an earlier run_jit call"):
        learner.run_jit(state, xs, ys)
    learner.run_jit(new, xs, ys)  # the returned state runs on
    assert learner.run_jit.lower(new, xs, ys) is not None  # still the jitted function underneath


class _DropoutGRU(_EmitsProjection):
    @nn.compact
    def __call__(self, carry, x):
        h, _ = nn.GRUCell(self.features)(carry, nn.Dropout(0.5, deterministic=False)(x))
        return h, h


class _CountingGRU(_EmitsProjection):
    @nn.compact
    def __call__(self, carry, x):
        count = self.variable("counters", "n", lambda: jnp.zeros((), jnp.int32))
        count.value += 1
        h, _ = nn.GRUCell(self.features)(carry, x)
        return h, h


def test_recurrent_modules_needing_rngs_or_other_collections_are_refused():
    with pytest.raises(ValueError, match="_DropoutGRU: the generic path runs module.apply.*deterministic=True"):
        sj.OnlineLearner([_DropoutGRU(4), nn.Dense(2)]).init(jax.random.key(0), batch_size=2, input_size=3)
    with pytest.raises(ValueError, match=r"_CountingGRU has variable collections \['counters', 'params'\]"):
        sj.OnlineLearner([_CountingGRU(4), nn.Dense(2)]).init(jax.random.key(0), batch_size=2, input_size=3)


def test_an_nnx_cell_built_for_another_input_size_is_named():
    learner = sj.OnlineLearner(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), readout_size=2)
    with pytest.raises(ValueError, match=r"layers_0 \(gru\) takes 3 input features .* its inputs have 5"):
        learner.init(jax.random.key(0), batch_size=2, input_size=5)
    learner.init(jax.random.key(0), batch_size=2, input_size=3)
