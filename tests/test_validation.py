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
    ("snap0", None, "n >= 1"),
    ("snap2", 3, "conflicts"),
    ("rtrl", 2, "takes no n"),
    (3, None, "must be a string"),
])
def test_bad_method(gru, method, n, match):
    cell, params = gru
    with pytest.raises(ValueError, match=match):
        sj.influence_tracker(cell, params, method, n)


def test_bad_layout(gru):
    cell, params = gru
    with pytest.raises(ValueError, match="unknown layout"):
        sj.influence_tracker(cell, params, "snap2", layout="sparse")
    with pytest.raises(ValueError, match="not available"):
        sj.influence_tracker(cell, params, "snap1", layout="table")
    with pytest.raises(ValueError, match="not available"):
        sj.influence_tracker(cell, params, "rtrl", layout="table")


def test_method_aliases(gru):
    cell, params = gru
    for name, expect in [("snap1", ("snap", 1)), ("SnAp-2", ("snap", 2)), ("snap_3", ("snap", 3)), ("RTRL", ("rtrl", None))]:
        t = sj.influence_tracker(cell, params, name)
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
        sj.influence_tracker(cell, params, "snap1", masks=masks)


def test_traced_masks_rejected(gru):
    cell, params = gru

    @jax.jit
    def build(m):
        sj.influence_tracker(cell, params, "snap1", masks={"hr": m})
        return m

    with pytest.raises(ValueError, match="static"):
        build(jnp.ones((4, 4)))


def test_bad_params(gru):
    cell, params = gru
    with pytest.raises(ValueError, match="keys"):
        sj.influence_tracker(cell, {k: v for k, v in params.items() if k != "hr"}, "snap1")
    with pytest.raises(ValueError, match="inner dict"):
        sj.influence_tracker(cell, {"params": params}, "snap1")
    int_params = jax.tree.map(lambda p: p.astype(jnp.int32), params)
    with pytest.raises(ValueError, match="floating point"):
        sj.influence_tracker(cell, int_params, "snap1")
    bad = dict(params, hr={"kernel": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="recurrent kernel"):
        sj.influence_tracker(cell, bad, "snap1")


def test_bad_step_shapes_fail_at_trace_time(gru):
    cell, params = gru
    tracker = sj.influence_tracker(cell, params, "snap1")
    s = jnp.zeros((2, 4, 1))
    J = tracker.init(2)
    step = jax.jit(tracker.step)
    with pytest.raises(ValueError, match="x must have shape"):
        step(params, s, J, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="state must have shape"):
        step(params, jnp.zeros((2, 4)), J, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="influence does not match"):
        step(params, jnp.zeros((3, 4, 1)), J, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="floating point"):
        step(params, s, J, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="dloss_dstate"):
        tracker.gradient(J, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="batch_size"):
        tracker.init(0)
    with pytest.raises(ValueError, match="floating point"):
        tracker.init(2, jnp.int32)


def test_bad_sequence_and_carry(gru):
    cell, params = gru
    tracker = sj.influence_tracker(cell, params, "snap1")
    loss = lambda h, y: jnp.sum(h)
    with pytest.raises(ValueError, match="time-major"):
        sj.online_gradient(tracker, params, jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros((2,)), loss)
    with pytest.raises(ValueError, match="trailing dimension"):
        sj.online_gradient(tracker, params, jnp.zeros((2, 5)), jnp.zeros((6, 2, 3)), jnp.zeros((6,)), loss)
    lstm = sj.LSTMCell(4)
    with pytest.raises(ValueError, match="tuple"):
        lstm.spec.to_internal(jnp.zeros((2, 4)))


def test_unsupported_flax_cell():
    with pytest.raises(ValueError, match="unsupported cell"):
        sj.as_cell_spec(nn.OptimizedLSTMCell(4))
    with pytest.raises(ValueError, match="residual"):
        sj.as_cell_spec(nn.SimpleCell(4, residual=True))
