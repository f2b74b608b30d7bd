"""Exact RTRL == BPTT (float64, 1e-10) for every supported flax cell, linen and nnx, through the
low-level interface and through the learner (two cells fast, every cell with ``-m slow``); the LRU
stack of Zucchet et al. trains online."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import snapjax as sj
from conftest import tree_rel_err

H, N_IN, B, T = 3, 2, 2, 5

LINEN = {
    "GRUCell": lambda: nn.GRUCell(H), "LSTMCell": lambda: nn.LSTMCell(H),
    "OptimizedLSTMCell": lambda: nn.OptimizedLSTMCell(H), "SimpleCell": lambda: nn.SimpleCell(H),
    "MGUCell": lambda: nn.MGUCell(H),
}
NNX = {
    "nnx.GRUCell": lambda: nnx.GRUCell(N_IN, H, rngs=nnx.Rngs(0)),
    "nnx.LSTMCell": lambda: nnx.LSTMCell(N_IN, H, rngs=nnx.Rngs(0)),
    "nnx.OptimizedLSTMCell": lambda: nnx.OptimizedLSTMCell(N_IN, H, rngs=nnx.Rngs(0)),
    "nnx.SimpleCell": lambda: nnx.SimpleCell(N_IN, H, rngs=nnx.Rngs(0)),
}


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def cell_and_params(name):
    if name in LINEN:
        cell = LINEN[name]()
        rec = sj.as_recurrent(cell)
        return cell, f64(rec.init_params(jax.random.key(0), N_IN))
    spec, params = sj.from_nnx(NNX[name]())
    return spec, f64(params)


@pytest.mark.parametrize("name", sorted(LINEN) + sorted(NNX))
def test_rtrl_equals_bptt_low_level(x64, name):
    cell, params = cell_and_params(name)
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (T, B, H), jnp.float64)
    loss = lambda h, y: jnp.sum((h - y) ** 2)
    online = sj.online_gradient(sj.online_method("rtrl", cell, params), params, None, xs, targets, loss)
    bptt = sj.bptt_gradient(cell, params, None, xs, targets, loss)
    assert tree_rel_err(online.grads, bptt.grads) < 1e-10


# The learner reaches every cell through the same interface that the low-level test above checks
# per cell, so two cells are fast here (a linen cell with an array carry, an nnx cell with a
# tuple carry) and the others are slow.
FAST_THROUGH_LEARNER = ("GRUCell", "nnx.LSTMCell")


@pytest.mark.parametrize("name", [n if n in FAST_THROUGH_LEARNER else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(LINEN) + sorted(NNX)])
def test_rtrl_equals_bptt_through_the_learner(x64, name):
    """Cell + Dense head, mse, parameters frozen over the window: the learner's summed gradient
    is the BPTT gradient."""
    cell, params = cell_and_params(name)
    xs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    grab = optax.GradientTransformation(lambda p: p, lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    learner = sj.OnlineLearner(cell, readout_size=2, method="rtrl", loss="mse", optimizer=grab, update_every=T)
    p_head = f64(nn.Dense(2).init(jax.random.key(3), jnp.zeros((1, H)))["params"])
    state = learner.init(jax.random.key(3), {"layers_0": params, "layers_1": p_head}, batch_size=B, input_size=N_IN)
    ys = jax.random.normal(jax.random.key(4), (T, B, 2), jnp.float64)
    state, _, _ = jax.jit(learner.run)(state, xs, ys)
    got = learner.optimizer_state(state)
    rec = sj.as_recurrent(cell)
    head = nn.Dense(2)

    def ref_loss(p):
        def body(c, inp):
            x, y = inp
            c = rec.apply(p["layers_0"], c, x)
            out = head.apply({"params": p["layers_1"]}, rec.output(c))
            return c, jnp.mean(jnp.mean((out - y) ** 2, -1))

        return lax.scan(body, rec.init_carry(B, jnp.float64), (xs, ys))[1].sum()

    assert tree_rel_err(got, jax.grad(ref_loss)(state.params)) < 1e-10


def test_lru_stack_with_mlps_trains_online():
    """Zucchet et al. 2023's setting: LRU layers with MLPs between them, each LRU trained with
    SnAp-1 (== exact RTRL for its diagonal recurrence), the MLPs within the step."""
    mlp = lambda: nn.Sequential([nn.Dense(16), nn.gelu, nn.Dense(8)])
    learner = sj.OnlineLearner([nn.Dense(8), sj.LRUCell(8), mlp(), sj.LRUCell(8), nn.Dense(2)], method="snap1",
                               optimizer=optax.adam(3e-3))
    state = learner.init(jax.random.key(0), batch_size=16, input_size=1)
    assert [m.tracker.layout for m in learner.methods(state.params)] == ["diag", "diag"]
    run, key, losses = jax.jit(learner.run), jax.random.key(1), []
    for _ in range(8):
        key, k = jax.random.split(key)
        bits = jax.random.bernoulli(k, 0.5, (101, 16)).astype(jnp.int32)
        state, _, metrics = run(state, bits[1:, :, None].astype(jnp.float32), bits[:-1])
        losses.append(float(metrics["loss"].mean()))
    assert losses[-1] < 0.5 * np.log(2), losses


def test_readme_attribution():
    """arXiv 2303.05641 has one author; the EGRU cell paper has five (issue #13, item 9)."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "Subramoney et al." not in text
    assert "Subramoney 2023, arXiv 2303.05641" in text and "Subramoney, Nazeer, Schöne, Mayr" in text
