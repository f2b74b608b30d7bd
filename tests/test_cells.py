"""verify_spec (compressed Jacobians == jax.jvp), flax.linen MGUCell / OptimizedLSTMCell /
residual SimpleCell specs, CellSpec.emit / layer_output, and the cells module's doctests."""

import dataclasses
import doctest
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj
import snapjax.cells as cells
import snapjax.cells.spec as cell_spec_module
from snapjax.cells import CellSpec, cell_step, mgu_spec
from snapjax.engine.verify import verify_spec
from snapjax.cells.egru import EGRUCell, _egru_phi, egru_spec
from snapjax.cells.lru import LRUCell

N_IN = 3


def _init(cell, units=5, n_in=N_IN, dtype=jnp.float32, seed=0):
    carry = cell.initialize_carry(jax.random.key(seed + 1), (2, n_in))
    carry = jax.tree.map(lambda c: 0.5 * jax.random.normal(jax.random.key(seed + 2), c.shape, dtype), carry)
    x = jax.random.normal(jax.random.key(seed + 3), (2, n_in), dtype)
    params = cell.init(jax.random.key(seed), carry, x)["params"]
    return params, carry, x


def _ln_phi(pre, unit, s):
    """tanh(LayerNorm(a)): normalises over the units axis, so it mixes units."""
    del unit, s
    a = pre["i"] + pre["h"]
    a = (a - a.mean(-1, keepdims=True)) / jnp.sqrt(a.var(-1, keepdims=True) + 1e-5)
    return jnp.tanh(a)[..., None]


def _batchnorm_phi(pre, unit, s):
    """Normalises over the batch axis: unit-wise in the units, but mixes examples."""
    del unit, s
    a = pre["i"] + pre["h"]
    return jnp.tanh(a - a.mean(0, keepdims=True))[..., None]


def _vanilla_params(units=5):
    return _init(sj.VanillaCell(units))[0]


# --------------------------------------------------------------------------- verify_spec
def test_layer_norm_cell_is_rejected():
    spec = dataclasses.replace(sj.vanilla_spec(5), name="ln_rnn", phi=_ln_phi)
    with pytest.raises(ValueError, match="unit") as err:
        verify_spec(spec, _vanilla_params())
    msg = str(err.value)
    assert "the update mixes units (phi is not unit-wise)" in msg
    assert "relative error" in msg and "as_recurrent(module, generic=True)" in msg


def test_layer_norm_cell_is_rejected_in_float64(x64):
    spec = dataclasses.replace(sj.vanilla_spec(5), name="ln_rnn", phi=_ln_phi)
    params = _init(sj.VanillaCell(5, param_dtype=jnp.float64), dtype=jnp.float64)[0]
    with pytest.raises(ValueError, match="mixes units"):
        verify_spec(spec, params)


def test_online_method_refuses_a_layer_norm_cell():
    spec = dataclasses.replace(sj.vanilla_spec(5), name="ln_rnn", phi=_ln_phi)
    with pytest.raises(ValueError, match="phi is not unit-wise"):
        sj.online_method("snap1", spec, _vanilla_params())


def test_batch_mixing_cell_is_rejected():
    spec = dataclasses.replace(sj.vanilla_spec(5), name="bn_rnn", phi=_batchnorm_phi)
    with pytest.raises(ValueError, match="mixes units"):
        verify_spec(spec, _vanilla_params())


@dataclasses.dataclass(frozen=True)
class _SumReadout(CellSpec):
    """A spec whose state projections read c + h while it declares the read-out h alone."""

    def output(self, s):
        return s[..., 0] + s[..., 1]


def test_projection_mismatch_is_rejected():
    base = sj.lstm_spec(5)
    spec = _SumReadout(**{f.name: getattr(base, f.name) for f in dataclasses.fields(CellSpec)})
    params = _init(sj.LSTMCell(5))[0]
    with pytest.raises(ValueError, match="projections disagree with the parameters") as err:
        verify_spec(spec, params)
    assert "relative error" in str(err.value) and "generic=True" in str(err.value)


def test_pseudo_derivative_is_checked():
    """EGRU's Heaviside has a custom_jvp (pseudo-derivative); the check sees it: a pseudo-
    derivative that leaks into the neighbouring unit is refused, the proper one passes."""

    @jax.custom_jvp
    def leaky_step(x):
        return (x > 0).astype(x.dtype)

    @leaky_step.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return leaky_step(x), 0.5 * jnp.maximum(0.0, 1.0 - jnp.abs(x) / 0.3) * jnp.roll(t, 1, axis=-1)

    params = _init(EGRUCell(6))[0]
    bad = dataclasses.replace(egru_spec(6), phi=functools.partial(_egru_phi, leaky_step, True))
    with pytest.raises(ValueError, match="unit"):
        verify_spec(bad, params)
    verify_spec(egru_spec(6), params)


BUILTINS = [
    sj.VanillaCell(5),
    sj.GRUCell(5),
    sj.LSTMCell(5),
    EGRUCell(5),
    EGRUCell(5, pseudo_derivative="rectangle", threshold_init=(0.2, 0.6)),
    EGRUCell(5, pseudo_derivative="fast_sigmoid", learn_threshold=False),
    nn.GRUCell(5),
    nn.LSTMCell(5),
    nn.OptimizedLSTMCell(5),
    nn.SimpleCell(5),
    nn.SimpleCell(5, residual=True),
    nn.MGUCell(5),
    nn.MGUCell(5, reset_gate=False),
    LRUCell(5),
    LRUCell(5, learn_gamma=False),
]


@pytest.mark.parametrize("cell", BUILTINS, ids=lambda c: type(c).__name__)
def test_builtin_cells_pass(cell):
    params = _init(cell)[0]
    verify_spec(sj.as_cell_spec(cell), params)


@pytest.mark.parametrize("cell", [sj.GRUCell(5), EGRUCell(5), LRUCell(5), nn.MGUCell(5)], ids=lambda c: type(c).__name__)
def test_builtin_cells_pass_in_float64(x64, cell):
    params = _init(cell.clone(param_dtype=jnp.float64), dtype=jnp.float64)[0]
    verify_spec(sj.as_cell_spec(cell), params)


def test_tolerance_is_not_loose():
    """The errors of a correct cell are at rounding level, far below the tolerance (1e-4 in
    float32): a phi mixing in 1% of the neighbour's pre-activation is caught."""

    def slightly_mixed(pre, unit, s):
        a = pre["i"] + pre["h"]
        return jnp.tanh(a + 0.01 * jnp.roll(a, 1, axis=-1))[..., None]

    spec = dataclasses.replace(sj.vanilla_spec(5), phi=slightly_mixed)
    with pytest.raises(ValueError, match="mixes units"):
        verify_spec(spec, _vanilla_params())


def test_masks_and_shape_only_params():
    cell = sj.GRUCell(6)
    params = _init(cell, units=6)[0]
    rng = np.random.default_rng(0)
    masks = {p.name: rng.random(np.shape(params[p.name]["kernel"])) < 0.5 for p in cell.spec.projections}
    verify_spec(cell.spec, params, masks)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    verify_spec(cell.spec, shapes, masks, seed=3)
    spec = dataclasses.replace(sj.vanilla_spec(6), phi=_ln_phi)
    with pytest.raises(ValueError, match="unit"):  # masks do not hide the mixing
        verify_spec(spec, _vanilla_params(6), {"h": np.eye(6, dtype=bool)})


def test_bad_inputs():
    params = _init(sj.GRUCell(5))[0]
    with pytest.raises(ValueError, match="needs a CellSpec"):
        verify_spec(sj.GRUCell(5), params)
    with pytest.raises(ValueError, match="params keys"):
        verify_spec(sj.lstm_spec(5), params)
    with pytest.raises(ValueError, match="unknown projection"):
        verify_spec(sj.gru_spec(5), params, {"xx": np.ones((5, 5))})
    with pytest.raises(ValueError, match=r"mask 'hr' must be a 0/1 array of shape \(5, 5\)"):
        verify_spec(sj.gru_spec(5), params, {"hr": np.ones((4, 5))})

    def wrong_shape(pre, unit, s):
        return jnp.tanh(pre["i"] + pre["h"])  # (B, units): the state axis is missing

    with pytest.raises(ValueError, match=r"phi must return shape \(B, units, state_dim\)"):
        verify_spec(dataclasses.replace(sj.vanilla_spec(5), phi=wrong_shape), _vanilla_params())


def test_non_finite_point_is_reported():
    """A unit parameter with a restricted domain and no values (shapes only) gets random
    values; NaNs are reported rather than silently passing."""

    def sqrt_phi(pre, unit, s):
        return jnp.tanh(pre["i"] + pre["h"] * jnp.sqrt(unit["scale"]))[..., None]

    spec = dataclasses.replace(sj.vanilla_spec(5), phi=sqrt_phi, unit_params=("scale",))
    params = {**_vanilla_params(), "scale": jnp.ones((5,))}
    verify_spec(spec, params)  # concrete values are used as given
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(ValueError, match="non-finite"):
        verify_spec(spec, shapes)


# ------------------------------------------------------------------ flax.linen cells
FLAX_CELLS = [
    nn.MGUCell(6),
    nn.MGUCell(6, reset_gate=False),
    nn.MGUCell(6, gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.gelu),
    nn.OptimizedLSTMCell(6),
    nn.OptimizedLSTMCell(6, activation_fn=jax.nn.soft_sign),
    nn.SimpleCell(6, residual=True),
]


@pytest.mark.parametrize("cell", FLAX_CELLS, ids=lambda c: f"{type(c).__name__}")
def test_flax_cell_spec_matches_module(x64, cell):
    cell = cell.clone(param_dtype=jnp.float64)
    params, carry, x = _init(cell, units=6, dtype=jnp.float64)
    spec = sj.as_cell_spec(cell)
    spec.check_params(params)  # the module's own parameters, unchanged
    new_carry, y = cell.apply({"params": params}, carry, x)
    ours = spec.from_internal(cell_step(spec, params, spec.to_internal(carry), x))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(new_carry)):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 1e-14
    np.testing.assert_allclose(spec.layer_output(spec.to_internal(ours)), y, rtol=0, atol=1e-14)


def test_mgu_spec_layout():
    assert [p.name for p in mgu_spec(4).projections] == ["if", "in", "hf", "hn"]
    assert mgu_spec(4).projection("hn").use_bias and not mgu_spec(4, reset_gate=False).projection("hn").use_bias
    assert sj.as_cell_spec(nn.MGUCell(4)) is mgu_spec(4)
    assert sj.as_cell_spec(nn.OptimizedLSTMCell(4)) is sj.lstm_spec(4)
    with pytest.raises(ValueError, match="unsupported cell ConvLSTMCell"):
        sj.as_cell_spec(nn.ConvLSTMCell(4, kernel_size=(3,)))


def test_layer_output_defaults_to_readout():
    s = jnp.arange(12.0).reshape(1, 3, 4)
    spec = dataclasses.replace(sj.lstm_spec(3), state_dim=4, readout=2)
    np.testing.assert_array_equal(spec.layer_output(s), s[..., 2])
    spec = dataclasses.replace(spec, emit=lambda s: s.reshape(s.shape[0], -1))
    np.testing.assert_array_equal(spec.layer_output(s), s.reshape(1, 12))
    np.testing.assert_array_equal(spec.output(s), s[..., 2])


def test_module_docstring_examples_run():
    result = doctest.testmod(cell_spec_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10
    assert result.failed == 0
