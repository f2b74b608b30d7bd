"""The whole-model learner: exactness against independent references, the stack approximation,
learning, compile-once, forward-only evaluation, optimizer arguments."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import snapjax as sj
from conftest import tree_rel_err


def capture():
    """An optimizer that applies nothing and keeps the last gradient it was given."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def data(T, B, n_in, classes, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    xs = jax.random.normal(k1, (T, B, n_in), jnp.float64)
    ys = jax.random.randint(k2, (T, B), 0, classes)
    masks = (jax.random.uniform(k3, (T, B)) < 0.7).astype(jnp.float64)
    return xs, ys, masks


def xent_mean(logits, y, m):
    per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1)


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def window_grads(learner, params, xs, ys, masks):
    """The summed online gradient of one window (parameters frozen: update_every = T)."""
    state = learner.init(jax.random.key(0), params, batch_size=xs.shape[1], input_size=xs.shape[2])
    state, _, _ = jax.jit(learner.run)(state, xs, ys, masks)
    return learner.optimizer_state(state)


def scan_reference(layers, params, xs, ys, masks, sg=()):
    """Σ_t masked-mean xent through lax.scan of the plain flax modules (independent of snapjax);
    ``sg``: names whose *incoming* carry is stop-gradiented at every step, plus the special
    entries 'in:<name>' (stop-gradient on that layer's input)."""
    names = [f"layers_{i}" for i in range(len(layers))]
    rec = [isinstance(m, nn.RNNCellBase) for m in layers]

    def loss(p):
        carries0 = {n: jax.tree.map(lambda a: jnp.zeros(a.shape, xs.dtype),
                                    m.initialize_carry(jax.random.key(0), xs.shape[1:]))
                    for n, m, r in zip(names, layers, rec) if r}

        def body(cs, inp):
            x, y, m = inp
            h, new = x, {}
            for n, mod, r in zip(names, layers, rec):
                if f"in:{n}" in sg:
                    h = lax.stop_gradient(h)
                if r:
                    c = lax.stop_gradient(cs[n]) if n in sg else cs[n]
                    new[n], h = mod.apply({"params": p[n]}, c, h)
                else:
                    h = mod.apply({"params": p[n]}, h)
            return new, xent_mean(h, y, m)

        return lax.scan(body, carries0, (xs, ys, masks))[1].sum()

    return jax.jit(jax.grad(loss))(params)  # one compiled program (eager: dozens of small ones)


CELLS = {"vanilla": lambda k: nn.SimpleCell(k), "gru": lambda k: nn.GRUCell(k), "lstm": lambda k: nn.LSTMCell(k)}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("method,kw", [("rtrl", {}), ("snap", {"n": 5}), ("tbptt", {"tbptt_window": 7})])
def test_single_layer_equals_bptt(x64, cell, method, kw):
    T, B, n_in, k, C = 7, 3, 2, 5, 3
    layers = [CELLS[cell](k), nn.Dense(C)]
    learner = sj.OnlineLearner(layers, method=method, optimizer=capture(), update_every=T, **kw)
    params = f64(learner.online_model.init(jax.random.key(1), n_in))
    xs, ys, masks = data(T, B, n_in, C)
    got = window_grads(learner, params, xs, ys, masks)
    ref = scan_reference(layers, params, xs, ys, masks)
    assert tree_rel_err(got, ref) < 1e-10


def test_combined_stack_rtrl_equals_bptt(x64):
    """Exact RTRL on the combined state of encoder + 2 LSTM/GRU layers == BPTT."""
    T, B, n_in, C = 6, 2, 3, 2
    layers = [nn.Dense(4), nn.GRUCell(3), nn.LSTMCell(3), nn.Dense(C)]
    learner = sj.OnlineLearner(layers, method="rtrl", stack="combined", encoder="exact",
                               optimizer=capture(), update_every=T)
    params = f64(learner.online_model.init(jax.random.key(2), n_in))
    xs, ys, masks = data(T, B, n_in, C, seed=1)
    got = window_grads(learner, params, xs, ys, masks)
    assert tree_rel_err(got, scan_reference(layers, params, xs, ys, masks)) < 1e-10


def test_layerwise_stack_equals_reference_of_the_approximation(x64):
    """Per-layer exact RTRL on Dense + GRU + GRU + Dense equals the stated approximation:
    layer l's error at step t comes from the layers above at step t only."""
    T, B, n_in, C = 6, 3, 2, 3
    layers = [nn.Dense(4), nn.GRUCell(5), nn.GRUCell(4), nn.Dense(C)]
    learner = sj.OnlineLearner(layers, method="rtrl", optimizer=capture(), update_every=T)
    params = f64(learner.online_model.init(jax.random.key(3), n_in))
    xs, ys, masks = data(T, B, n_in, C, seed=2)
    got = window_grads(learner, params, xs, ys, masks)
    ref = {
        "layers_3": scan_reference(layers, params, xs, ys, masks)["layers_3"],
        # layer 2: its own temporal path, its input taken as given
        "layers_2": scan_reference(layers, params, xs, ys, masks, sg=("in:layers_2",))["layers_2"],
        # layer 1: its own temporal path; the layer above only at the same step
        "layers_1": scan_reference(layers, params, xs, ys, masks, sg=("layers_2", "in:layers_1"))["layers_1"],
        # encoder (step mode): backprop within the step only
        "layers_0": scan_reference(layers, params, xs, ys, masks, sg=("layers_1", "layers_2"))["layers_0"],
    }
    for name in ref:
        assert tree_rel_err(got[name], ref[name]) < 1e-10, name
    # and it is an approximation: the exact (combined) gradient of layer 1 differs
    exact = scan_reference(layers, params, xs, ys, masks)
    assert tree_rel_err(got["layers_1"], exact["layers_1"]) > 1e-3


def test_exact_encoder_mode_equals_bptt_for_one_layer(x64):
    T, B, n_in, C = 5, 2, 3, 2
    layers = [nn.Dense(4), nn.GRUCell(3), nn.Dense(C)]
    learner = sj.OnlineLearner(layers, method="rtrl", encoder="exact", optimizer=capture(), update_every=T)
    params = f64(learner.online_model.init(jax.random.key(4), n_in))
    xs, ys, masks = data(T, B, n_in, C, seed=3)
    got = window_grads(learner, params, xs, ys, masks)
    assert tree_rel_err(got, scan_reference(layers, params, xs, ys, masks)) < 1e-10


def delayed_bit_task(key, T, B, delay=2):
    bits = jax.random.bernoulli(key, 0.5, (T + delay, B)).astype(jnp.int32)
    return bits[delay:, :, None].astype(jnp.float32), bits[:-delay]


# RTRL and truncated BPTT are slow here: their gradients are checked exactly, fast, by
# test_single_layer_equals_bptt (one layer, both) and
# test_layerwise_stack_equals_reference_of_the_approximation (a stack, RTRL), and truncated BPTT
# runs in a stack (with updates) in test_a_stack_can_mix_truncated_bptt_with_other_methods; the
# approximate methods (SnAp-1, SnAp-2, UORO) learn here fast.
@pytest.mark.parametrize("method", ["snap1", "snap2", pytest.param("rtrl", marks=pytest.mark.slow), "uoro",
                                    pytest.param("tbptt", marks=pytest.mark.slow)])
def test_stacked_model_learns_a_memory_task(method):
    """Dense encoder + 2 stacked GRUs + MLP head learns to output the previous bit."""
    kw = {"tbptt_window": 4} if method == "tbptt" else {}
    masks = None
    if method == "snap2":  # sparse recurrent weights: SnAp-2 keeps a strict subset of RTRL
        params = sj.OnlineModel([nn.Dense(8), nn.GRUCell(12), nn.GRUCell(12)]).init(jax.random.key(0), 1)
        masks = {f"layers_{i}": sj.random_masks(i, params[f"layers_{i}"], 0.5, spec=nn.GRUCell(12)) for i in (1, 2)}
    head = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
    learner = sj.OnlineLearner([nn.Dense(8), nn.GRUCell(12), nn.GRUCell(12), head], method=method,
                               optimizer=optax.adam(3e-3 if method == "uoro" else 1e-2), masks=masks, **kw)
    state = learner.init(jax.random.key(1), batch_size=16, input_size=1)
    run = jax.jit(learner.run)
    key, losses = jax.random.key(2), []
    for _ in range(6):
        key, k = jax.random.split(key)
        xs, ys = delayed_bit_task(k, 100, 16, delay=1)
        state, _, metrics = run(state, xs, ys)
        losses.append(float(metrics["loss"].mean()))
    assert losses[-1] < 0.25 * np.log(2), losses  # chance is ln 2 nats


def test_run_compiles_once_and_predict_evaluate():
    learner = sj.OnlineLearner([nn.GRUCell(6), nn.Dense(3)], method="snap1", optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(0), batch_size=4, input_size=2)
    run = jax.jit(chex.assert_max_traces(learner.run, n=1))
    xs, ys, masks = data(5, 4, 2, 3)
    xs = xs.astype(jnp.float32)
    for _ in range(3):
        state, outs, _ = run(state, xs, ys, masks.astype(jnp.float32))
    p0 = state.params
    outs, carry = learner.predict(state, xs)
    assert outs.shape == (5, 4, 3) and carry[0].shape == (4, 6)
    ev = learner.evaluate(state, xs, ys, masks)
    per = optax.softmax_cross_entropy_with_integer_labels(outs, ys)
    np.testing.assert_allclose(ev["loss"], (per * masks).sum() / masks.sum(), rtol=1e-5)
    chex.assert_trees_all_equal(state.params, p0)  # forward only


def test_optimizer_extra_args_and_state_accessor():
    opt = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=2, factor=0.5))
    learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="snap1", optimizer=opt, update_every=5)
    state = learner.init(jax.random.key(0), batch_size=4, input_size=1)
    xs, ys = delayed_bit_task(jax.random.key(1), 50, 4, delay=1)
    state, _, metrics = jax.jit(learner.run)(state, xs, ys)
    inner = learner.optimizer_state(state)
    assert jax.tree.structure(inner) == jax.tree.structure(opt.init(state.params))
    plateau = inner[1]
    # it received value = the mean loss of each 5-step period
    period_means = np.asarray(metrics["loss"]).reshape(10, 5).mean(1)
    np.testing.assert_allclose(float(plateau.best_value), period_means.min(), rtol=1e-5)
    # user-supplied extra arguments are forwarded (and override the default value=loss)
    state2, _, _ = jax.jit(lambda s: learner.run(s, xs, ys, value=jnp.asarray(7.0)))(
        learner.init(jax.random.key(0), batch_size=4, input_size=1))
    assert float(learner.optimizer_state(state2)[1].best_value) == 7.0


def test_stage_methods_built_once_and_named():
    learner = sj.OnlineLearner([nn.GRUCell(4), nn.LSTMCell(3), nn.Dense(2)], method=["snap1", "uoro"])
    state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    m = learner.methods(state.params)
    assert [x.name for x in m] == ["snap1", "uoro"] and m is learner.methods(state.params)
    assert all(isinstance(x, sj.OnlineMethod) for x in m)


def test_reset_carry_only_touches_selected_examples():
    learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl")
    state = learner.init(jax.random.key(0), batch_size=3, input_size=1)
    xs, ys = delayed_bit_task(jax.random.key(1), 5, 3, delay=1)
    state, _, _ = jax.jit(learner.run)(state, xs, ys)
    reset = learner.reset_carry(state, jnp.array([True, False, True]))
    assert np.all(np.asarray(reset.carry[0])[[0, 2]] == 0)
    np.testing.assert_array_equal(reset.carry[0][1], state.carry[0][1])
    for a, b in zip(jax.tree.leaves(reset.method_state), jax.tree.leaves(state.method_state)):
        assert np.all(np.asarray(a)[[0, 2]] == 0)
        np.testing.assert_array_equal(a[1], b[1])


def test_nnx_cell_trains_online_and_parameters_land_in_the_module():
    """An nnx LSTM trained online equals its linen twin from the same initial weights, and the
    trained parameters are written back into the nnx module."""
    from flax import nnx

    cell = nnx.LSTMCell(2, 4, rngs=nnx.Rngs(0))
    _, p_cell = sj.from_nnx(cell)
    head = nn.Dense(2)
    p_head = head.init(jax.random.key(1), jnp.zeros((1, 4)))["params"]
    xs, ys = delayed_bit_task(jax.random.key(2), 30, 4, delay=1)
    xs = jnp.concatenate([xs, -xs], axis=-1)
    runs = []
    for first in (cell, nn.LSTMCell(4)):
        learner = sj.OnlineLearner([first, head], method="snap1", optimizer=optax.adam(1e-2))
        state = learner.init(jax.random.key(0), {"layers_0": p_cell, "layers_1": p_head}, batch_size=4, input_size=2)
        runs.append(jax.jit(learner.run)(state, xs, ys)[0])
    chex.assert_trees_all_close(runs[0].params, runs[1].params, rtol=1e-6, atol=1e-7)
    assert not np.allclose(runs[0].params["layers_0"]["hi"]["kernel"], p_cell["hi"]["kernel"])
    sj.to_nnx(cell, runs[0].params["layers_0"])
    _, back = sj.from_nnx(cell)
    chex.assert_trees_all_close(back, runs[0].params["layers_0"], rtol=0, atol=0)


def test_no_code_switches_on_the_method_kind():
    """Above the constructor, code never asks which method it has (issue #12)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](rtrl|snap\d*|uoro|tbptt|activity)["']""")
    allowed = {root / "snapjax" / "engine" / "influence.py"}
    hits = []
    for path in list((root / "snapjax").rglob("*.py")) + list((root / "benchmarks").rglob("*.py")):
        if path in allowed:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith((">>>", "...")):  # docstring examples list names; they do not switch
                continue
            if pattern.search(line):
                hits.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# One combination is fast (the learner's chunked path is the same for every cell and for RTRL /
# SnAp-1); the chunked methods themselves are checked for GRU and LSTM, RTRL and SnAp-1, fast in
# tests/test_chunked.py. The other combinations are slow.
@pytest.mark.parametrize("method,cell", [
    ("snap1", "gru"),
    pytest.param("snap1", "lstm", marks=pytest.mark.slow),
    pytest.param("rtrl", "gru", marks=pytest.mark.slow),
    pytest.param("rtrl", "lstm", marks=pytest.mark.slow),
])
def test_chunked_learner_equals_per_step_learner(x64, cell, method):
    """update_every = K > 1 runs RTRL / SnAp-1 chunk-wise; the parameters after several updates
    equal those of the per-step method (float64, 1e-10), with a ragged stream of chunks."""
    T, B, n_in, C, K = 11, 2, 2, 3, 3
    layers = [CELLS[cell](4), nn.Dense(C)]
    params = f64(sj.OnlineModel(layers).init(jax.random.key(5), n_in))
    xs, ys, masks = data(T, B, n_in, C, seed=4)
    finals = []
    for chunked in (True, False):
        learner = sj.OnlineLearner(layers, method=method, optimizer=optax.sgd(0.1), update_every=K, chunked=chunked)
        state = learner.init(jax.random.key(0), params, batch_size=B, input_size=n_in)
        assert learner.methods(state.params)[0].period == (K if chunked else 1)
        run = jax.jit(learner.run)
        state, _, _ = run(state, xs[:5], ys[:5], masks[:5])      # chunk boundaries mid-stream
        state, _, metrics = run(state, xs[5:], ys[5:], masks[5:])
        finals.append(state.params)
    assert int(metrics["updated"].sum()) == 2  # steps 6 and 9 of the second call
    assert tree_rel_err(finals[0], finals[1]) < 1e-10
    assert tree_rel_err(finals[0], params) > 1e-3  # the updates did something


def test_a_stack_can_mix_truncated_bptt_with_other_methods():
    learner = sj.OnlineLearner([nn.GRUCell(4), nn.GRUCell(4), nn.Dense(2)], method=["snap1", "tbptt"],
                               tbptt_window=3, optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(0), batch_size=2, input_size=1)
    assert [m.name for m in learner.methods(state.params)] == ["snap1", "tbptt3"]
    assert learner.period(state.params) == 3
    xs, ys = delayed_bit_task(jax.random.key(1), 6, 2, delay=1)
    state, _, metrics = jax.jit(learner.run)(state, xs, ys)
    assert int(metrics["updated"].sum()) == 2
    with pytest.raises(ValueError, match="tbptt_window is only used"):
        sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="snap1", tbptt_window=3)
