"""The method registry: built-in names, a user's own method trained through OnlineLearner, and
the registry's checks."""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.methods.registry import lookup_method


def test_builtin_methods_are_registered_in_order():
    assert list(sj.registered_methods())[:10] == ["rtrl", "snap", "drtrl", "ostl", "uoro", "tbptt", "activity",
                                                  "immediate", "sliding_tbptt", "esdrtrl"]
    entry, n = lookup_method("SnAp-3")
    assert (entry.name, n, entry.ordered) == ("snap", 3, True)
    assert lookup_method("activity_rtrl")[0].name == "activity"
    assert "window" in sj.registered_methods()["tbptt"].options


class _ImmediateState(NamedTuple):
    prev_carry: Any
    x: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class _Immediate(sj.OnlineMethod):
    """SnAp-0 written by a user: the gradient of one step with the previous state held fixed."""

    cell: sj.Recurrent
    n_in: int
    name: str = "user_immediate"

    def init(self, batch_size, dtype=jnp.float32, *, key=None):
        return _ImmediateState(self.cell.init_carry(batch_size, dtype), jnp.zeros((batch_size, self.n_in), dtype))

    def batch_axes(self):
        return _ImmediateState(0, 0)

    def step(self, params, carry, state, x):
        return sj.StepResult(self.cell.apply(params, carry, x), _ImmediateState(carry, x), {})

    def gradient(self, params, state, dloss_dcarry):
        _, pull = jax.vjp(lambda p: self.cell.apply(p, state.prev_carry, state.x), params)
        return pull(dloss_dcarry)[0], state


@pytest.fixture
def user_methods():
    seen = {}

    def immediate(cell, params, *, input_size=None, masks=None):
        seen["options"] = {"input_size": input_size, "masks": masks}
        return _Immediate(cell, input_size)

    def renamed_snap1(cell, params, *, masks=None, precision=None):
        return sj.online_method("snap1", cell, params, masks=masks, precision=precision)

    sj.register_method("user_immediate", immediate, options=("input_size", "masks"), summary="SnAp-0 by a user")
    sj.register_method("user-diag", renamed_snap1, options=("masks", "precision"), aliases=("user_d_rtrl",))
    yield seen
    sj.unregister_method("user_immediate")
    sj.unregister_method("user-diag")


def _memory_task(T=60, B=8, seed=0, lag=2):
    """Recall the sign of the input ``lag`` steps back."""
    xs = jax.random.normal(jax.random.key(seed), (T, B, 1))
    ys = jnp.concatenate([jnp.zeros((lag, B), jnp.int32), (xs[: T - lag, :, 0] > 0).astype(jnp.int32)])
    return xs, ys


def test_user_method_trains_through_the_learner(user_methods):
    xs, ys = _memory_task(lag=0)  # the immediate gradient has no memory: the sign of x_t itself
    learner = sj.OnlineLearner([nn.Dense(8), nn.GRUCell(16), nn.Dense(2)], method="user_immediate",
                               optimizer=optax.adam(3e-2))
    state = learner.init(jax.random.key(0), batch_size=8, input_size=1)
    assert isinstance(learner.methods(state.params)[0], _Immediate)
    assert user_methods["options"] == {"input_size": 8, "masks": None}  # only the declared options
    losses = []
    for _ in range(6):
        state, _, metrics = learner.run(state, xs, ys)
        losses.append(float(metrics["loss"].mean()))
    assert losses[-1] < 0.5 * losses[0], losses  # ln 2 = 0.69 at chance


def test_user_method_is_the_method_it_wraps(user_methods, x64):
    xs, ys = _memory_task(T=12, B=4)
    xs = xs.astype(jnp.float64)
    runs = {}
    for name in ("snap1", "user_diag", "USER-D-RTRL"):
        learner = sj.OnlineLearner(nn.GRUCell(6, param_dtype=jnp.float64), readout_size=2, method=name,
                                   optimizer=optax.sgd(0.1))
        state = learner.init(jax.random.key(1), batch_size=4, input_size=1)
        state, _, _ = learner.run(state, xs, ys)
        runs[name] = state.params
    for name in ("user_diag", "USER-D-RTRL"):
        for a, b in zip(jax.tree.leaves(runs[name]), jax.tree.leaves(runs["snap1"])):
            np.testing.assert_array_equal(a, b)


def test_unknown_name_lists_user_methods(user_methods):
    params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    with pytest.raises(ValueError, match=r"unknown method 'user_imediate'; known methods: .*'user_immediate'"):
        sj.online_method("user_imediate", nn.GRUCell(4), params)
    with pytest.raises(ValueError, match=r"known methods: 'rtrl', 'snapN', 'drtrl', 'ostl', 'uoro', 'tbptt', "
                       r"'activity', 'immediate', 'sliding_tbptt', 'esdrtrl'.*'user-diag'"):
        sj.OnlineLearner(nn.GRUCell(4), method="nope")


def test_options_a_method_does_not_take(user_methods):
    params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    with pytest.raises(ValueError, match="window= .* is only for methods with a window \\('tbptt', 'sliding_tbptt'\\), not 'user_immediate'"):
        sj.online_method("user_immediate", nn.GRUCell(4), params, window=3)
    with pytest.raises(ValueError, match="chunk= is only for methods with a chunked form"):
        sj.online_method("user_immediate", nn.GRUCell(4), params, chunk=4)
    # "prefer": a method without a chunked form is built per step; ignored options are not passed
    m = sj.online_method("user_immediate", nn.GRUCell(4), params, chunk=4, chunk_policy="prefer", block=3,
                         input_size=3)
    assert m.period == 1 and user_methods["options"]["input_size"] == 3
    with pytest.raises(ValueError, match="method 'user_immediate' takes no n"):
        sj.online_method("user_immediate", nn.GRUCell(4), params, n=2)


def test_registration_is_checked(user_methods):
    def build(cell, params):
        return sj.online_method("rtrl", cell, params)

    with pytest.raises(ValueError, match="'user_immediate' is already registered"):
        sj.register_method("user_immediate", build)
    with pytest.raises(ValueError, match=r"method name 'userdiag' is already registered \(by 'user-diag'\)"):
        sj.register_method("other", build, aliases=("user_diag",))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\]"):
        sj.register_method("other", build, options=("windw",))
    with pytest.raises(ValueError, match="must not end in a digit"):
        sj.register_method("order2", build, ordered=True)
    with pytest.raises(ValueError, match="non-empty string of letters"):
        sj.register_method("bad name", build)
    with pytest.raises(ValueError, match="build must be callable"):
        sj.register_method("other", None)
    assert "other" not in sj.registered_methods()
    sj.register_method("user_immediate", build, replace=True)
    assert sj.registered_methods()["user_immediate"].build is build


def test_ordered_user_method():
    def build(cell, params, *, n):
        return sj.online_method("snap", cell, params, n=n)

    sj.register_method("mysnap", build, ordered=True)
    try:
        params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        assert sj.online_method("mysnap2", nn.GRUCell(4), params).name == "snap2"
        assert sj.online_method("mysnap", nn.GRUCell(4), params, n=3).name == "snap3"
        with pytest.raises(ValueError, match="method 'mysnap' needs n"):
            sj.online_method("mysnap", nn.GRUCell(4), params)
        with pytest.raises(ValueError, match="conflicts with n=3"):
            sj.online_method("mysnap2", nn.GRUCell(4), params, n=3)
    finally:
        sj.unregister_method("mysnap")
    with pytest.raises(KeyError, match="mysnap"):
        sj.unregister_method("mysnap")


def test_learner_method_options_reach_the_methods_that_take_them():
    learner = sj.OnlineLearner([nn.GRUCell(4), nn.GRUCell(4)], readout_size=2, method=["esdrtrl", "uoro"],
                               method_options={"decay": 0.5, "eps": 1e-5})
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    esd, uoro = learner.methods(state.params)
    assert (esd.decay, uoro.eps) == (0.5, 1e-5)
    with pytest.raises(ValueError, match=r"method_options\['window'\]: set it with the learner's tbptt_window"):
        sj.OnlineLearner(nn.GRUCell(4), method_options={"window": 3})
    with pytest.raises(ValueError, match="method_options has an unknown option 'decy'"):
        sj.OnlineLearner(nn.GRUCell(4), method_options={"decy": 0.5})
    with pytest.raises(ValueError, match="method_options must be a dict"):
        sj.OnlineLearner(nn.GRUCell(4), method_options=0.5)
