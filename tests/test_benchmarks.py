"""Tiny end-to-end runs of the copy-task and char-LM benchmarks (seconds, CPU, no network).

Every run is fixed in work (a token / character / batch budget), never cut by wall-clock time:
the benchmarks' time caps are set out of reach (``NO_TIME_CAP``), so a loaded machine is
slower but runs the same steps and checks the same results."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("_common")
copy_task = importlib.import_module("copy_task")
char_lm = importlib.import_module("char_lm")
activity = importlib.import_module("activity")
roofline = importlib.import_module("roofline")
pair_storage = importlib.import_module("pair_storage")
cell_step_cost = importlib.import_module("cell_step_cost")

from snapjax.data.copy_task import NUM_TOKENS, copy_task_batch  # noqa: E402
from snapjax.data.text import char_batches, corpus_from_texts  # noqa: E402

NO_TIME_CAP = 1e9  # seconds: the token / character budgets end every run, never the clock


def test_common_docstring_example():
    """The module example of benchmarks/_common.py runs (TBPTT: chunk rounded up to the window,
    one optimiser step for the scored window of a 3-step sequence)."""
    import doctest

    result = doctest.testmod(common, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_make_masks_density():
    params = common.cell_params(jax.random.key(0), 8, NUM_TOKENS)
    assert common.make_masks(0, 8, NUM_TOKENS, 1.0) is None
    masks = common.make_masks(0, 8, NUM_TOKENS, 0.25)
    assert set(masks) == {p.name for p in sj.GRUCell(8).spec.projections}
    for name, m in masks.items():
        assert m.shape == np.shape(params[name]["kernel"]) and m.dtype == bool
        assert 0 < m.mean() <= 0.5
    again = common.make_masks(0, 8, NUM_TOKENS, 0.25)
    assert all((masks[k] == again[k]).all() for k in masks)  # a function of the seed only


def test_display_name():
    names = ["snap1", "snap3", "rtrl", "uoro", "tbptt8", "activity", "rtrl-chunk32"]
    assert [common.display_name(n) for n in names] == [
        "SnAp-1", "SnAp-3", "RTRL", "UORO", "TBPTT-8", "ACTIVITY", "RTRL-chunk32"]


def test_driver_reads_period_and_label_from_the_methods():
    """The driver asks the built methods (no switch on the name): label, optimiser period, chunk
    rounded up to a multiple of the period, state floats = ``num_stored``."""
    cases = [("snap1", {}, 1, "SnAp-1"), ("uoro", {}, 1, "UORO"), ("tbptt", {"tbptt_window": 4}, 4, "TBPTT-4")]
    for name, options, period, label in cases:
        tr = common.ChunkedLearner(6, NUM_TOKENS, 2, name, optax.adam(1e-2), chunk=5, **options)
        assert (tr.label, tr.period, tr.chunk) == (label, period, period * -(-5 // period))
        (m,) = tr.methods
        assert tr.influence_floats() == m.num_stored() > 0
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        common.ChunkedLearner(6, NUM_TOKENS, 2, "snap1", optax.adam(1e-2), chunk=0)
    with pytest.raises(ValueError, match="tbptt_window"):
        common.ChunkedLearner(6, NUM_TOKENS, 2, "tbptt", optax.adam(1e-2))
    with pytest.raises(ValueError, match="known methods"):
        common.check_methods(["snap1", "bogus"])


def test_chunking_is_invisible():
    """Processing a sequence in chunks of 3 or 16 steps (the tail padded with a zero loss mask)
    gives the same losses and parameters: padding must not change what is learned."""
    key = jax.random.key(1)
    batch = copy_task_batch(key, 4, 5)
    inputs, targets, mask = (np.asarray(a) for a in batch)
    out = []
    for chunk in (3, 16):
        tr = common.ChunkedLearner(6, NUM_TOKENS, 2, "snap1", optax.adam(1e-2), chunk=chunk)
        ts = tr.init(jax.random.key(0), 4)
        ts, ce = common.run_sequence(tr, ts, inputs, targets, mask)
        ts, ce2 = common.run_sequence(tr, tr.reset(ts), inputs, targets, mask)
        assert ce.shape == inputs.shape
        out.append((ce2, ts.params, int(ts.updates)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    assert out[0][2] == out[1][2] == 2 * 5  # one update per scored step
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tbptt_windows_align_with_each_sequence(x64):
    """A sequence padded to whole windows: after a reset, truncated BPTT with window = chunk =
    the padded length takes one step per sequence whose gradient is the BPTT gradient of the
    sequence's masked loss (the same update as OnlineLearner fed the unpadded sequence as one
    window), so every sequence starts its own window."""
    batch = copy_task_batch(jax.random.key(2), 3, 2)  # T = 5
    inputs, targets, mask = (np.asarray(a)[:5] for a in batch)
    tr = common.ChunkedLearner(5, NUM_TOKENS, 2, "tbptt", optax.sgd(0.5), chunk=4, tbptt_window=8)
    assert tr.chunk == 8
    ts = tr.init(jax.random.key(3), 3)
    p0 = ts.params
    for _ in range(2):
        ts, ce = common.run_sequence(tr, tr.reset(ts), inputs, targets, mask)
    assert int(ts.updates) == 2 and int(ts.online.step) == 16

    # reference: BPTT of Σ_t masked mean CE_t over the 5 real steps, one SGD step per sequence
    learner = tr.learner

    def seq_loss(params):
        xs = jax.nn.one_hot(inputs, NUM_TOKENS, dtype=jnp.float64)
        per = learner.evaluate(params, xs, targets, mask)["per_step"]
        return jnp.sum(per)

    p = p0
    for _ in range(2):
        g = jax.grad(seq_loss)(p)
        p = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
    for a, b in zip(jax.tree.leaves(ts.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


COPY_LABELS = {"snap2": "SnAp-2", "uoro": "UORO", "tbptt": "TBPTT-4"}


# One method is the fast check of the driver end to end; the three-method run (one table, one
# figure for all) is slow.
@pytest.mark.parametrize("methods", [("snap2",), pytest.param(("snap2", "uoro", "tbptt"), marks=pytest.mark.slow)],
                         ids=["snap2", "three_methods"])
def test_copy_task_tiny_end_to_end(tmp_path, methods):
    cfg = copy_task.CopyConfig(
        methods=methods, densities=(0.25,), seeds=(0,), units=6,
        batch_size=4, lr=1e-2, token_budget=400, time_budget_s=NO_TIME_CAP, max_length=8, window=2,
        tbptt_window=4, chunk=8, log_every=2, mode="test",
    )
    res = copy_task.main([], cfg=cfg, out_dir=tmp_path, progress=False)
    for suffix in ("json", "png", "md"):
        assert (tmp_path / f"copy_task_test.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "copy_task_test.json").read_text())
    assert [r["method"] for r in data["runs"]] == list(cfg.methods)
    for r in data["runs"]:
        assert r["final_L"] >= 1 and r["tokens"] >= cfg.token_budget
        h = r["history"]
        assert len(h["tokens"]) == len(h["L"]) == len(h["loss_bits"]) >= 2
        assert all(L >= 1 for L in h["L"]) and h["tokens"] == sorted(h["tokens"])
        losses = np.asarray(h["loss_bits"][1:], float)
        assert np.all(np.isfinite(losses)) and np.all(losses >= 0) and np.all(losses < 5)
        assert r["updates"] > 0
    md = (tmp_path / "copy_task_test.md").read_text()
    assert all(COPY_LABELS[m] in md for m in methods) and "png" in md
    assert res["png"].name == "copy_task_test.png"


def _tiny_corpus():
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    texts = {f"work{i:02d}": " ".join(rng.choice(words, 400)) + "\n" for i in range(4)}
    return corpus_from_texts(texts, validation_every=4)


def test_char_batches_for_lm():
    corpus = _tiny_corpus()
    b = char_batches(corpus.train, 4, 16)
    assert b.inputs.shape[1:] == (16, 4)
    np.testing.assert_array_equal(b.inputs[0, 1:], b.targets[0, :-1])
    np.testing.assert_array_equal(b.inputs[1, 0], b.targets[0, -1])  # windows continue


@pytest.mark.parametrize("methods", [("snap1",), pytest.param(("snap1", "tbptt"), marks=pytest.mark.slow)],
                         ids=["snap1", "two_methods"])
def test_char_lm_tiny_end_to_end(tmp_path, methods):
    corpus = _tiny_corpus()
    cfg = char_lm.CharConfig(
        methods=methods, densities=(0.5,), seeds=(0,), units=8, batch_size=4, window=8,
        lr=1e-2, char_budget=1_000, time_budget_s=NO_TIME_CAP, eval_every=320, val_chars=200, val_batch=2,
        mode="test",
    )
    char_lm.main([], cfg=cfg, corpus=corpus, out_dir=tmp_path, progress=False)
    for suffix in ("json", "png", "md"):
        assert (tmp_path / f"char_lm_test.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "char_lm_test.json").read_text())
    assert data["vocab_size"] == corpus.vocab_size
    assert [r["method"] for r in data["runs"]] == list(methods)
    for r in data["runs"]:
        h = r["history"]
        assert r["chars"] >= cfg.char_budget and len(h["chars"]) == len(h["val_bpc"]) >= 3
        vb = np.asarray(h["val_bpc"], float)
        assert np.all(np.isfinite(vb)) and np.all(vb > 0)
        assert vb[0] < math.log2(corpus.vocab_size) + 3  # untrained model: about uniform
        assert vb[-1] < vb[0]  # learns something (letter frequencies) within 1,000 chars


def _activity_rows(tmp_path, densities: list[str]) -> list[dict]:
    """benchmarks/activity.py at the given densities: trains, times the three exact trackers and
    writes its JSON; per row, the three give the same update (float32) and the reported alpha /
    capacities / timings / sizes are sane."""
    out = tmp_path / "activity.json"
    activity.main([
        "--units", "8", "--densities", *densities, "--thresholds", "0.3:0.6", "--train-batches", "3",
        "--time-batches", "1", "--repeats", "1", "--block", "3", "--no-progress", "--out", str(out),
    ])
    rows = json.loads(out.read_text())["results"]
    assert [r["density"] for r in rows] == [float(d) for d in densities]
    for r in rows:
        assert 0.0 <= r["alpha_train_mean"] <= 1.0 and 0.0 <= r["alpha_timed_mean"] <= 1.0
        assert r["block"] == 3 and 0 <= r["capacity_timed_mean"] <= 9
        assert all(v < 1e-4 for v in r["max_abs_param_diff_vs_dense_after_update"].values())
        assert set(r["ms_per_step"]) == {"sparse", "ignored", "dense"} and min(r["ms_per_step"].values()) > 0
        assert r["influence_bytes"] > 0 and r["scratch_bytes"] > 0 and 0.0 <= r["test_acc"] <= 1.0
    return rows


def test_activity_tiny_end_to_end_one_density(tmp_path):
    """The fast check: one sparse configuration (the two-density run below is slow)."""
    (row,) = _activity_rows(tmp_path, ["0.5"])
    assert 0.0 < row["param_density"] < 1.0


@pytest.mark.slow
def test_activity_tiny_end_to_end(tmp_path):
    """Dense and sparse weights in one run: one row each, the sparse one with fewer parameters."""
    rows = _activity_rows(tmp_path, ["1.0", "0.5"])
    assert rows[1]["param_density"] < rows[0]["param_density"] == 1.0


def test_pair_storage_tiny_end_to_end(tmp_path):
    """The three storages of a two-component influence give the same update (the script's own
    check, which sets its exit code), and every storage and the stream pass are timed."""
    out = tmp_path / "pairs.json"
    assert pair_storage.main(["--batch", "2", "--size", "3", "--steps", "4", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["storages_agree"] is True
    assert [r["storage"] for r in res["rows"]] == ["interleaved", "split", "complex", "stream"]
    assert all(r["us_per_step"] > 0 for r in res["rows"])


def test_cell_step_cost_times_the_cells_side_by_side(tmp_path):
    """Every cell of one (k, B) in one round-robin: per-round per-float ratios to the first cell
    (1 for the first itself), stored floats from the methods (LSTM: 2 components, 4 gates)."""
    out = tmp_path / "cells.json"
    cell_step_cost.main(["--cells", "gru,lstm", "--units", "3", "--inputs", "2", "--batch", "2", "--steps", "2",
                         "--repeats", "2", "--out", str(out)])
    rows = {r["cell"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["gru"]["per_float_vs_first"] == 1.0 and rows["lstm"]["per_float_vs_first"] > 0
    assert rows["gru"]["stored_floats"] == 3 * 3 * (2 + 3) + 4 * 3  # 3 gates' kernels, flax GRU's 4 biases
    assert rows["lstm"]["stored_floats"] == 2 * (4 * 3 * (2 + 3) + 4 * 3)  # two components per entry
    assert len(rows["lstm"]["times_us"]["snap1"]) == 2


def test_roofline_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--cells", "gru,ctrnn (user CellSpec)", "--ks", "4", "--batches", "2", "--steps", "2",
                          "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["command"].startswith("python benchmarks/roofline.py --cells")
    assert res["ceilings"]["stream"]["GBps"] > 0 and res["ceilings"]["matmul"]["GFLOPs"] > 0
    rows = {(r["cell"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {(c, m) for c in ("gru", "ctrnn (user CellSpec)") for m in ("bptt", "snap1", "rtrl")}
    gru_p = rows[("gru", "bptt")]["params"]
    assert rows[("gru", "snap1")]["stored_per_example"] == gru_p            # SnAp-1: one float per parameter
    assert rows[("gru", "rtrl")]["stored_per_example"] == 4 * gru_p         # RTRL: k floats per parameter
    assert rows[("gru", "bptt")]["x_bptt"] == 1.0
    assert all(r["us_per_step"] > 0 and r["xla_flops_per_step"] > 0 for r in res["rows"] if r["method"] != "bptt")
    # the bound of each row is its own stream, timed beside it: the fraction is traffic over it
    snap1 = rows[("gru", "snap1")]
    assert snap1["stream_GBps"] > 0
    assert snap1["frac_bandwidth"] == pytest.approx(snap1["traffic_GBps"] / snap1["stream_GBps"])
    with pytest.raises(SystemExit, match="2"):
        roofline.main(["--cells", "nope"])
    assert "unknown cells ['nope']" in capsys.readouterr().err
