"""flax.nnx cells: from_nnx gives a spec whose step is the module's own call; to_nnx writes
parameters back (round trip exact, modified values land in the module)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import snapjax as sj
import snapjax.cells.nnx as sj_nnx
from snapjax.cells import cell_step
from snapjax.cells.nnx import from_nnx, to_nnx

N_IN, H = 3, 5


def _make(kind, dtype=jnp.float64, seed=0):
    rngs = nnx.Rngs(seed)
    kw = dict(param_dtype=dtype, rngs=rngs)
    return {
        "gru": lambda: nnx.GRUCell(N_IN, H, **kw),
        "lstm": lambda: nnx.LSTMCell(N_IN, H, **kw),
        "opt_lstm": lambda: nnx.OptimizedLSTMCell(N_IN, H, **kw),
        "simple": lambda: nnx.SimpleCell(N_IN, H, dtype=dtype, **kw),
        "simple_residual": lambda: nnx.SimpleCell(N_IN, H, dtype=dtype, residual=True, **kw),
        "gru_hard": lambda: nnx.GRUCell(N_IN, H, gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.gelu, **kw),
    }[kind]()


KINDS = ["gru", "lstm", "opt_lstm", "simple", "simple_residual", "gru_hard"]


def _randomize(cell, seed=1):
    """Non-zero biases everywhere (nnx initialises them to 0, which would hide a bias mix-up)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(cell):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            var.set_value(jnp.asarray(rng.normal(size=value.shape), value.dtype) * 0.5)


def _state(cell):
    return jax.tree.map(np.asarray, nnx.state(cell, nnx.Param))


def _carry(spec, seed=2):
    s = 0.5 * jax.random.normal(jax.random.key(seed), (2, spec.units, spec.state_dim), jnp.float64)
    return spec.from_internal(s)


@pytest.mark.parametrize("kind", KINDS)
def test_spec_step_equals_nnx_call(x64, kind):
    cell = _make(kind)
    _randomize(cell)
    spec, params = from_nnx(cell)
    carry = _carry(spec)
    x = jax.random.normal(jax.random.key(3), (2, N_IN), jnp.float64)
    new_carry, y = cell(carry, x)
    ours = spec.from_internal(cell_step(spec, params, spec.to_internal(carry), x))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(new_carry)):
        assert a.dtype == jnp.float64
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 1e-14
    np.testing.assert_allclose(spec.layer_output(spec.to_internal(ours)), y, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_leaves_module_unchanged(x64, kind):
    cell = _make(kind)
    _randomize(cell)
    before = _state(cell)
    to_nnx(cell, from_nnx(cell)[1])
    after = _state(cell)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_modified_params_land_in_module(x64, kind):
    cell = _make(kind)
    spec, params = from_nnx(cell)
    rng = np.random.default_rng(7)
    new = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    to_nnx(cell, new)
    back = from_nnx(cell)[1]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)
    # and the module's own call now computes with them
    carry, x = _carry(spec), jnp.ones((2, N_IN), jnp.float64)
    ours = spec.from_internal(cell_step(spec, new, spec.to_internal(carry), x))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(cell(carry, x)[0])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_fused_layouts_are_split_by_gate(x64):
    """OptimizedLSTMCell: dense_i/dense_h hold the gates i, f, g, o side by side; GRU: r, z, n."""
    cell = _make("opt_lstm")
    _randomize(cell)
    _, params = from_nnx(cell)
    for k, g in enumerate("ifgo"):
        np.testing.assert_array_equal(params["h" + g]["bias"], cell.dense_h.bias[...][k * H : (k + 1) * H])
        np.testing.assert_array_equal(params["i" + g]["kernel"], cell.dense_i.kernel[...][:, k * H : (k + 1) * H])
    cell = _make("gru")
    _randomize(cell)
    spec, params = from_nnx(cell)
    assert not spec.projection("hn").use_bias and set(params["hn"]) == {"kernel"}
    np.testing.assert_array_equal(params["in"]["bias"], cell.dense_i.bias[...][2 * H :])


def test_float32_module_keeps_its_dtype():
    cell = _make("lstm", dtype=jnp.float32)
    spec, params = from_nnx(cell)
    to_nnx(cell, jax.tree.map(lambda a: a.astype(jnp.float16) + 1, params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(_state(cell)))


def test_online_method_on_converted_cell():
    cell = _make("lstm", dtype=jnp.float32)
    spec, params = from_nnx(cell)
    method = sj.online_method("snap1", spec, params)  # runs verify_spec on the converted spec
    carry, state = method.init_carry(2), method.init(2)
    carry, state, _ = method.step(params, carry, state, jnp.ones((2, N_IN)))
    assert jax.tree.map(jnp.shape, carry) == ((2, H), (2, H))


def test_bad_inputs(x64):
    with pytest.raises(ValueError, match="unsupported nnx cell Linear"):
        from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expected a flax.nnx"):
        from_nnx("gru")
    cell = _make("gru")
    before = _state(cell)
    _, params = from_nnx(cell)
    with pytest.raises(ValueError, match="params keys"):
        to_nnx(cell, {k: v for k, v in params.items() if k != "hn"})
    wrong = {**params, **{k: {**params[k], "kernel": jnp.zeros((N_IN + 1, H))} for k in ("ir", "iz", "in")}}
    with pytest.raises(ValueError, match="input size"):
        to_nnx(cell, wrong)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_state(cell))):  # nothing written
        np.testing.assert_array_equal(a, b)


def test_module_docstring_example_runs():
    result = doctest.testmod(sj_nnx)
    assert result.attempted >= 8 and result.failed == 0
