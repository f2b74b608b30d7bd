"""The cost preview (``learner.describe``) and the checks at ``learner.init``: the figures
against the real state and against XLA's own memory analysis, the slow-path warnings and the
refusal of a state that cannot fit."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.training import init_checks

B, N_IN = 3, 5


def _learner(method="snap1", cell=None, **kw):
    return sj.OnlineLearner(cell or nn.GRUCell(4), readout_size=2, method=method, optimizer=optax.sgd(0.1), **kw)


def _nbytes(tree):
    return sum(int(a.nbytes) for a in jax.tree.leaves(tree))


CONFIGS = {
    "snap1": dict(method="snap1"),
    "rtrl": dict(method="rtrl"),
    "rtrl-chunk4": dict(method="rtrl", update_every=4),
    "snap1-chunk4": dict(method="snap1", update_every=4),
    "uoro": dict(method="uoro"),
    "tbptt": dict(method="tbptt", tbptt_window=3),
    "generic-rtrl": dict(method="rtrl", cell=sj.as_recurrent(nn.GRUCell(4), generic=True)),
    "lstm-snap2": dict(method="snap2", cell=nn.LSTMCell(4)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_bytes_equal_the_real_state(name):
    learner = _learner(**CONFIGS[name])
    cost = learner.describe(batch_size=B, input_size=N_IN, compiled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sj.SlowPathWarning)
        state = learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    rows = [r for r in cost.layers if r.path != "feed-forward"]
    assert len(rows) == len(state.method_state) == 1
    for row, ms, carry in zip(rows, state.method_state, state.carry):
        assert _nbytes(ms) == B * row.state_bytes + row.shared_bytes
        assert _nbytes(carry) == B * row.carry_bytes
        assert row.params == sum(np.size(a) for a in jax.tree.leaves(state.params["layers_0"]))
    assert cost.state_bytes == _nbytes(state)
    assert cost.layers[-1].params == sum(np.size(a) for a in jax.tree.leaves(state.params["layers_1"]))


def test_uoro_key_is_shared_not_per_example():
    cost = _learner("uoro").describe(batch_size=B, input_size=N_IN, compiled=False)
    assert cost.layers[0].shared_bytes == 8  # the method's PRNG key (two uint32)


def test_paths_of_the_methods():
    paths = {name: _learner(**kw).describe(batch_size=2, input_size=N_IN, compiled=False).layers[0]
             for name, kw in CONFIGS.items()}
    got = {name: (row.method, row.path) for name, row in paths.items()}
    assert got == {
        "snap1": ("snap1", "compressed/diag"), "rtrl": ("rtrl", "compressed/dense"),
        "rtrl-chunk4": ("rtrl-chunk4", "chunked/dense"), "snap1-chunk4": ("snap1-chunk4", "chunked/diag"),
        "uoro": ("uoro", "rank-one"), "tbptt": ("tbptt3", "window"), "generic-rtrl": ("rtrl", "generic/dense"),
        "lstm-snap2": ("snap2", "compressed/dense"),
    }


def test_flops_follow_the_documented_formulas():
    # GRU, 4 units, 5 inputs: p = 3·(5·4 + 4·4) + 4·4 = 124 (flax: biases on the i* and hn projections)
    snap1 = _learner("snap1").describe(batch_size=2, input_size=N_IN, compiled=False).layers
    rtrl = _learner("rtrl").describe(batch_size=2, input_size=N_IN, compiled=False).layers
    chunk = _learner("rtrl", update_every=4).describe(batch_size=2, input_size=N_IN, compiled=False).layers
    p, k = snap1[0].params, 4
    assert p == 124
    S1 = snap1[0].state_bytes / 4  # one float per parameter
    assert S1 == p and snap1[0].flops == 2 * p + 4 * S1 and snap1[0].traffic_bytes == 2 * S1 * 4
    S = rtrl[0].state_bytes / 4  # k·p floats, stored with W = k units per parameter, m = 1
    assert S == k * p and rtrl[0].flops == 2 * p + 2 * k * S + 2 * S
    assert chunk[0].flops == 6 * p + 2 * k**3 + 2 * S + 2 * k * S / 4 and chunk[0].traffic_bytes == 2 * S / 4 * 4
    assert snap1[1].flops == 6 * snap1[1].params  # the head: forward and backward


def test_compiled_memory_is_xla_memory_analysis():
    learner = _learner("rtrl", update_every=2)
    cost = learner.describe(batch_size=B, input_size=N_IN)
    abstract = jax.eval_shape(lambda: learner.init(jax.random.key(0), batch_size=B, input_size=N_IN))
    xs = jax.ShapeDtypeStruct((2, B, N_IN), jnp.float32)
    ys = jax.ShapeDtypeStruct((2, B), jnp.int32)
    stats = learner.run_jit.lower(abstract, xs, ys).compile().memory_analysis()
    mem = cost.compiled
    assert mem.steps == cost.period == 2
    assert (mem.argument_bytes, mem.output_bytes, mem.alias_bytes, mem.temp_bytes) == (
        stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
        stats.temp_size_in_bytes)
    assert mem.alias_bytes > 0  # the state is donated
    text = str(cost)
    assert "chunked/dense" in text and "XLA, compiled run of 2 steps" in text


def test_describe_prints_nothing_and_allocates_no_state(capsys):
    learner = _learner("rtrl")
    cost = learner.describe(batch_size=1000, input_size=N_IN, compiled=False)  # a 2 MB state, never built
    assert capsys.readouterr().out == ""
    assert cost.state_bytes > 1000 * cost.layers[0].state_bytes
    lines = str(cost).splitlines()
    assert lines[0].startswith("OnlineLearner cost preview: batch 1000, input size 5, float32")
    assert lines[1].split() == ["layer", "cell", "method", "path", "state/example", "params", "FLOPs/step/example",
                                "state", "traffic/step"]


# ------------------------------------------------------------------------- warnings
def _init(learner, batch=2):
    return learner.init(jax.random.key(0), batch_size=batch, input_size=N_IN)


def test_per_step_rtrl_with_period_updates_warns():
    with pytest.warns(sj.SlowPathWarning, match=r"layers_0: 'rtrl' runs per step while the parameters change only "
                                                 r"every 4 steps.*pass chunked=True"):
        _init(_learner("rtrl", update_every=4, chunked=False))


def test_per_step_snap1_under_a_truncated_bptt_period_warns():
    learner = sj.OnlineLearner([nn.GRUCell(4), nn.GRUCell(4)], readout_size=2, method=["snap1", "tbptt"],
                               tbptt_window=4)
    with pytest.warns(sj.SlowPathWarning, match=r"layers_0: 'snap1' runs per step .* every 4 steps.*update_every=4"):
        _init(learner)
    # the fix the message gives: chunked SnAp-1, no warning
    fixed = sj.OnlineLearner([nn.GRUCell(4), nn.GRUCell(4)], readout_size=2, method=["snap1", "tbptt"],
                             tbptt_window=4, update_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sj.SlowPathWarning)
        _init(fixed)
    assert fixed.describe(batch_size=2, input_size=N_IN, compiled=False).layers[0].path == "chunked/diag"


def test_generic_snap1_held_to_the_full_influence_warns():
    generic = sj.as_recurrent(nn.GRUCell(4), generic=True)
    forced = _learner("snap1", cell=generic, method_options={"layout": "dense"})
    with pytest.warns(sj.SlowPathWarning, match=r"layers_0: 'snap1' on the generic path stores the full influence "
                                                 r"\(496 floats per example\) while its pattern has 124 entries.*drop "
                                                 r"layout='dense'.*method='rtrl'"):
        _init(forced)
    rows = [forced.describe(batch_size=2, input_size=N_IN, compiled=False).layers[0],
            _learner("snap1", cell=generic).describe(batch_size=2, input_size=N_IN, compiled=False).layers[0]]
    assert [(r.path, r.state_bytes) for r in rows] == [("generic/dense", 4 * 4 * 124), ("generic/pattern", 4 * 124)]
    # D·J: k² per stored column on the dense storage, one multiply-add per entry on SnAp-1's pattern (width 1)
    assert rows[0].flops - rows[1].flops == 2 * 4 * (4 * 124) - 2 * 124 + 2 * (4 * 124 - 124)
    with warnings.catch_warnings():  # the default storage: nothing to warn about
        warnings.simplefilter("error", sj.SlowPathWarning)
        _init(_learner("snap1", cell=generic))


@pytest.mark.parametrize("kw", [dict(method="snap1"), dict(method="rtrl", update_every=4),
                                dict(method="snap1", update_every=8), dict(method="uoro"),
                                dict(method="rtrl", cell=sj.as_recurrent(nn.GRUCell(4), generic=True)),
                                dict(method="snap2", cell=sj.as_recurrent(nn.GRUCell(4), generic=True),
                                     method_options={"layout": "dense"})],
                         ids=["snap1", "chunked-rtrl", "chunked-snap1", "uoro", "generic-rtrl", "generic-dense-snap2"])
def test_fast_configurations_do_not_warn(kw):
    learner = _learner(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sj.SlowPathWarning)
        _init(learner)
    assert learner.describe(batch_size=2, input_size=N_IN, compiled=False).notes == ()


# --------------------------------------------------------------------------- refusal
def test_init_refuses_a_state_over_the_device_limit(monkeypatch):
    learner = _learner("rtrl", update_every=4)
    cost = learner.describe(batch_size=64, input_size=N_IN, compiled=False)
    limit = cost.estimate_bytes - 1
    monkeypatch.setattr(init_checks, "device_memory_limit", lambda device=None: (limit, "test limit"))
    expected = sj.training.describe_text.fmt_bytes(cost.estimate_bytes)
    with pytest.raises(sj.MemoryLimitError, match=rf"batch 64 needs at least {expected} .* more than the "
                                                  rf".* of this device \(test limit\)\. The largest layer is layers_0 "
                                                  r"\(gru, 'rtrl-chunk4' on the chunked/dense path\).*smaller "
                                                  r"batch_size \(about 6\d fit\).*snap1"):
        _init(learner, batch=64)
    monkeypatch.setattr(init_checks, "device_memory_limit", lambda device=None: (cost.estimate_bytes, "test limit"))
    state = _init(learner, batch=64)  # exactly at the limit: accepted
    assert int(state.step) == 0


def test_refusal_is_not_checked_inside_describe(monkeypatch):
    monkeypatch.setattr(init_checks, "device_memory_limit", lambda device=None: (10, "test limit"))
    cost = _learner("rtrl").describe(batch_size=4, input_size=N_IN, compiled=False)
    assert cost.limit_bytes == 10 and "learner.init refuses it" in str(cost)


def test_memory_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("SNAPJAX_MEMORY_LIMIT", "1000")
    assert init_checks.device_memory_limit() == (1000, "SNAPJAX_MEMORY_LIMIT")
    with pytest.raises(sj.MemoryLimitError, match=r"more than the 1000 B of this device \(SNAPJAX_MEMORY_LIMIT\)"):
        _init(_learner())
    monkeypatch.setenv("SNAPJAX_MEMORY_LIMIT", "off")
    assert init_checks.device_memory_limit() == (None, "SNAPJAX_MEMORY_LIMIT=off")
    _init(_learner())
    monkeypatch.setenv("SNAPJAX_MEMORY_LIMIT", "lots")
    with pytest.raises(sj.MemoryLimitError, match=r"SNAPJAX_MEMORY_LIMIT must be a number of bytes or 'off', "
                                                  r"got 'lots'"):
        _init(_learner())


def test_default_limit_is_positive_on_this_machine(monkeypatch):
    monkeypatch.delenv("SNAPJAX_MEMORY_LIMIT", raising=False)
    limit, source = init_checks.device_memory_limit()
    assert limit is None or limit > 0
    assert source in ("host memory available", f"{jax.devices()[0].platform} bytes_limit")
