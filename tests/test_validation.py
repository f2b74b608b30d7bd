"""Bad input gives a clear ValueError at trace time, never a silent wrong gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax as sj


@pytest.fixture(scope="module")
def gru():
    cell = sj.GRUCell(4)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    return cell, params


@pytest.mark.parametrize("method,n,match", [
    ("bogus", None, "unknown method"),
    ("snapx", None, "unknown method"),
    ("snap", None, "needs n"),
    ("snap", 0, "n >= 1"),
    ("snap", -2, "n >= 1"),
    ("snap", 1.5, "n >= 1"),
    ("snap2", 3, "conflicts"),
    ("rtrl", 2, "takes no n"),
    (3, None, "must be a string"),
])
def test_bad_method(gru, method, n, match):
    cell, params = gru
    with pytest.raises(ValueError, match=match):
        sj.online_method(method, cell, params, n=n)


def test_snap0_is_the_immediate_rule(gru):
    """"snap0" is SnAp-0, the immediate rule (not an invalid SnAp order: "snap" with n=0 is)."""
    cell, params = gru
    method = sj.online_method("snap0", cell, params)
    assert type(method).__name__ == "Immediate" and method.name == "immediate"
    with pytest.raises(ValueError, match="n >= 1"):
        sj.online_method("snap", cell, params, n=0)


def test_bad_layout(gru):
    cell, params = gru
    with pytest.raises(ValueError, match="unknown layout"):
        sj.online_method("snap2", cell, params, layout="sparse")
    with pytest.raises(ValueError, match="not available"):
        sj.online_method("snap1", cell, params, layout="table")
    with pytest.raises(ValueError, match="not available"):
        sj.online_method("rtrl", cell, params, layout="table")


def test_method_aliases(gru):
    cell, params = gru
    for name, expect in [("snap1", ("snap", 1)), ("SnAp-2", ("snap", 2)), ("snap_3", ("snap", 3)), ("RTRL", ("rtrl", None))]:
        t = sj.online_method(name, cell, params).tracker
        assert (t.method, t.n) == expect


@pytest.mark.parametrize("masks,match", [
    ({"hr": np.ones((3, 4), bool)}, "shape"),
    ({"zz": np.ones((4, 4), bool)}, "unknown projection"),
    ({"hr": np.full((4, 4), 0.5)}, "0/1"),
    ([np.ones((4, 4))], "must be a dict"),
])
def test_bad_masks(gru, masks, match):
    cell, params = gru
    with pytest.raises(ValueError, match=match):
        sj.online_method("snap1", cell, params, masks=masks)


def test_traced_masks_rejected(gru):
    cell, params = gru

    @jax.jit
    def build(m):
        sj.online_method("snap1", cell, params, masks={"hr": m})
        return m

    with pytest.raises(ValueError, match="static"):
        build(jnp.ones((4, 4)))


def test_bad_params(gru):
    cell, params = gru
    with pytest.raises(ValueError, match="keys"):
        sj.online_method("snap1", cell, {k: v for k, v in params.items() if k != "hr"})
    with pytest.raises(ValueError, match="inner dict"):
        sj.online_method("snap1", cell, {"params": params})
    int_params = jax.tree.map(lambda p: p.astype(jnp.int32), params)
    with pytest.raises(ValueError, match="floating point"):
        sj.online_method("snap1", cell, int_params)
    bad = dict(params, hr={"kernel": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="recurrent kernel"):
        sj.online_method("snap1", cell, bad)


def test_bad_step_shapes_fail_at_trace_time(gru):
    cell, params = gru
    method = sj.online_method("snap1", cell, params)
    carry, J = method.init_carry(2), method.init(2)
    step = jax.jit(method.step)
    with pytest.raises(ValueError, match="x must have shape"):
        step(params, carry, J, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="trailing dimension 4"):
        step(params, jnp.zeros((2, 5)), J, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="influence does not match"):
        step(params, jnp.zeros((3, 4)), J, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="floating point"):
        step(params, carry, J, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="trailing dimension 4"):
        method.gradient(params, J, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        method.init(0)
    with pytest.raises(ValueError, match="floating point"):
        method.init(2, jnp.int32)


def test_bad_sequence_and_carry(gru):
    cell, params = gru
    method = sj.online_method("snap1", cell, params)
    loss = lambda h, y: jnp.sum(h)
    with pytest.raises(ValueError, match="time-major"):
        sj.online_gradient(method, params, jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros((2,)), loss)
    with pytest.raises(ValueError, match="trailing dimension"):
        sj.online_gradient(method, params, jnp.zeros((2, 5)), jnp.zeros((6, 2, 3)), jnp.zeros((6,)), loss)
    lstm = sj.LSTMCell(4)
    with pytest.raises(ValueError, match="tuple"):
        lstm.spec.to_internal(jnp.zeros((2, 4)))


def test_unsupported_flax_cell():
    with pytest.raises(ValueError, match="unsupported cell"):
        sj.as_cell_spec(nn.ConvLSTMCell(4, kernel_size=(3,)))
    with pytest.raises(ValueError, match="unsupported cell"):
        sj.as_recurrent(object())


def test_bad_learner_configuration():
    with pytest.raises(ValueError, match="readout_size must be a positive int"):
        sj.OnlineLearner(nn.GRUCell(4), readout_size=0)
    with pytest.raises(ValueError, match="2 methods given for 1 recurrent stages"):
        sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method=["snap1", "rtrl"])
    with pytest.raises(ValueError, match="at least one recurrent layer"):
        sj.OnlineLearner([nn.Dense(3)])
    with pytest.raises(ValueError, match="update_every=3 is not a multiple"):
        learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="tbptt", tbptt_window=2, update_every=3)
        learner.init(jax.random.key(0), batch_size=2, input_size=1)
    with pytest.raises(ValueError, match="is only for methods with a window"):
        sj.online_method("snap1", nn.GRUCell(4), {}, window=3)
