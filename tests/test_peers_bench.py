"""benchmarks/peers.py: the snapjax side runs end to end (tiny sizes) and its references are right.

The peers (braintrace, jax_rtrl) are not installed in CI: the test that calls them is skipped
there (``pytest.importorskip``); ``benchmarks/PEERS.md`` says how to install them."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import snapjax as sj

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

peers = importlib.import_module("peers")


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def test_quick_run_snapjax_side(tmp_path):
    """--quick --peers none: every configuration runs our side, times it, and writes the JSON; the
    plain-JAX SnAp-1 written out in the benchmark equals ours (float32)."""
    out = tmp_path / "peers.json"
    args = ["--quick", "--peers", "none", "--rtrl", "4", "--uoro", "4", "--plain-jax", "--out", str(out)]
    res = peers.main(args)
    assert json.loads(out.read_text())["command"] == " ".join(["python", "benchmarks/peers.py"] + args)
    assert [(c["cell"].split()[0], c["units"], c["ours"]) for c in res["cases"]] == [
        ("gru", 8, "snapjax snap1"), ("ctrnn", 8, "snapjax snap1 (CTRNN CellSpec)"), ("gru", 4, "snapjax rtrl"),
        ("gru", 4, "snapjax uoro")]
    plain = "plain-JAX SnAp-1 (written out, not a peer)"
    assert res["cases"][0]["gradient_checks"][plain]["agree"] and plain in res["cases"][0]["ratios_peer_over_ours"]
    for c in res["cases"][1:]:
        assert c["gradient_checks"] == {} and c["ratios_peer_over_ours"] == {}
    for c in res["cases"]:
        assert len(c["times_us"][c["ours"]]) == 2 and c["us_per_step"][c["ours"]] > 0
    assert res["peers_missing"] == [] and "loadavg_before" in res


def test_ctrnn_spec_is_the_euler_step(x64):
    """ctrnn_spec's step equals h + dt (tanh(W [x, h, 1]) - h) / tau written on jax_rtrl's W layout,
    and the parameter and gradient maps are inverse to each other."""
    k, n, dt = 3, 2, 0.5
    keys = jax.random.split(jax.random.key(0), 4)
    W = jax.random.normal(keys[0], (k, n + k + 1), jnp.float64)
    tau = jax.random.uniform(keys[1], (k,), jnp.float64, 1.0, 4.0)
    h, x = jax.random.normal(keys[2], (2, k), jnp.float64), jax.random.normal(keys[3], (2, n), jnp.float64)
    params = peers.ctrnn_params_from_jax_rtrl(W, tau, n)
    spec = peers.ctrnn_spec(k, dt)
    got = spec.from_internal(sj.cell_step(spec, params, spec.to_internal(h), x))
    want = h + dt * (jnp.tanh(jnp.concatenate([x, h, jnp.ones((2, 1))], -1) @ W.T) - h) / tau
    assert jnp.allclose(got, want, atol=1e-12)
    back = peers.ctrnn_grads_to_jax_rtrl(params)
    assert jnp.array_equal(back["W"], W) and jnp.array_equal(back["tau"], tau)
    sj.verify_spec(spec, params)


def test_elementwise_d_reference(x64):
    """The written-out D-RTRL recursion (D = z only): one step from h = 0 is exact (equals BPTT),
    and over several steps it differs from SnAp-1 (which keeps the recurrent diagonal)."""
    k, n, B = 4, 3, 2
    rec = sj.as_recurrent(sj.GRUCell(k))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), rec.init_params(jax.random.key(1), n))
    xs, ys = (a.astype(jnp.float64) for a in peers.data(5, B, n, k))
    exact = sj.bptt_gradient(rec, params, rec.init_carry(B, jnp.float64), xs[:1], ys[:1], _loss).grads
    assert jnp.allclose(peers.elementwise_d_gradient(params, xs[:1], ys[:1]), exact["in"]["kernel"], atol=1e-12)
    method = sj.online_method("snap1", rec, params)
    snap1 = sj.online_gradient(method, params, rec.init_carry(B, jnp.float64), xs, ys, _loss).grads
    assert not jnp.allclose(peers.elementwise_d_gradient(params, xs, ys), snap1["in"]["kernel"], atol=1e-6)


def test_compare_flags_a_difference():
    ours = {"a": {"kernel": jnp.ones(3)}}
    assert peers.compare({"a": {"kernel": jnp.ones(3) * (1 + 1e-6)}}, ours)["agree"]
    res = peers.compare({"a": {"kernel": jnp.array([1.0, 1.0, 1.1])}}, ours)
    assert not res["agree"] and res["leaves"]["['a']['kernel']"]["max_abs_err"] == pytest.approx(0.1, rel=1e-5)


def test_peers_agree_where_expected(tmp_path):
    """With the peers installed: braintrace SnAp(n=1) and jax_rtrl's e-prop equal our SnAp-1, and
    braintrace's D_RTRL equals the written-out element-wise-D recursion."""
    pytest.importorskip("braintrace")
    pytest.importorskip("jax_rtrl")
    res = peers.main(["--quick", "--uoro", "4", "--out", str(tmp_path / "p.json")])
    checks = {n: c for case in res["cases"] for n, c in case["gradient_checks"].items()}
    assert "braintrace UORO (batch mode, one projection for the batch)" in res["cases"][-1]["us_per_step"]
    assert set(checks) == {"braintrace D_RTRL", "braintrace SnAp(n=1)", "jax_rtrl eprop (OnlineCTRNNCell murray)"}
    for name, c in checks.items():
        assert c["agree"] == c["expected_to_agree"], name
    assert checks["braintrace D_RTRL"]["vs_elementwise_d_recursion"]["agree"]
