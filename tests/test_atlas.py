"""The atlas (benchmarks/atlas.py) end to end on its tiny preset: bounded by work (fixed steps,
tokens and characters; the time caps are out of reach), a restricted list of rules, a synthetic
corpus (no download)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

atlas = importlib.import_module("atlas")
rules_mod = importlib.import_module("_atlas_rules")

# k = 4 units: SnAp-4 keeps the whole influence (n >= k), so it must equal RTRL
METHODS = "rtrl,snap4,uoro,tbptt"


def test_tiny_preset_is_bounded_by_work():
    p = rules_mod.preset("tiny")
    assert p.copy_time_s >= 1e9 and p.char_time_s >= 1e9 and p.synthetic_corpus
    assert p.quality_ks == (4,)


def _run_tiny(tmp_path, sections):
    data = atlas.run(["--tiny", "--methods", METHODS, "--sections", sections, "--out", str(tmp_path), "--quiet"])
    saved = json.loads((tmp_path / "atlas_tiny.json").read_text())
    assert saved["command"].startswith("python benchmarks/atlas.py --tiny")
    assert {"preset", "machine", "rules", "claims", "wall_s"} | set(sections.split(",")) <= set(saved)
    assert saved["command"] in (tmp_path / "atlas_tiny.md").read_text()
    assert [r["status"] for r in saved["rules"]] == ["run"] * 4
    return data, saved


def _check_quality(saved):
    q = {r["rule"]: r for r in saved["quality"] if r["density"] == 1.0}  # k = 4, dense
    assert abs(q["rtrl"]["cos"] - 1.0) <= 1e-6 and q["rtrl"]["err"] <= 1e-6 and q["rtrl"]["kind"] == "exact"
    assert q["snap4"]["cos"] >= 1.0 - 1e-6 and q["snap4"]["kind"] == "exact"
    assert not q["rtrl"]["stochastic"] and not q["tbptt"]["stochastic"] and q["tbptt"]["period"] == 4
    u = q["uoro"]
    assert u["stochastic"] and u["seeds"] == 16 and u["kind"] == "unbiased"
    assert u["bias"] <= 2.0 * u["noise_floor"] and u["cos_mean"] > u["cos"]  # averaging seeds helps
    assert q["tbptt"]["cos"] < 1.0 - 1e-3 and q["tbptt"]["kind"] == "biased"  # truncation drops the far past
    sparse = [r for r in saved["quality"] if r["density"] < 1.0]
    assert sparse and all(r["rule"] in rules_mod.preset("tiny").sparse_rules for r in sparse)
    return q


def _check_cost(saved):
    cost = {r["method"]: r for r in saved["cost"]["rows"]}  # BPTT and every rule, bytes per example
    assert cost["bptt"]["x_bptt"] == pytest.approx(1.0)
    assert cost["rtrl"]["bytes_per_example"] == 4 * cost["rtrl"]["stored_per_example"] > 0
    assert set(cost) >= {"bptt", "rtrl", "snap4", "uoro", "tbptt"}


def test_atlas_tiny_gradient_quality(tmp_path):
    """The default suite's run: the gradient-quality section (cost and learning are the slow test
    below; the timing they reuse, roofline.measure, and their training drivers have tiny runs
    in test_benchmarks.py)."""
    _, saved = _run_tiny(tmp_path, "quality")
    assert {"atlas_tiny.json", "atlas_tiny.md", "atlas_tiny_quality.png"} <= {f.name for f in tmp_path.iterdir()}
    assert not (tmp_path / "atlas_tiny.partial.json").exists()  # removed once the run is complete
    _check_quality(saved)


def test_atlas_resume_reuses_saved_sections(tmp_path, monkeypatch):
    """``--resume`` takes a section from the partial file instead of rerunning it, and refuses a
    partial file written with other rules."""
    quality = importlib.import_module("_atlas_quality")
    args = ["--tiny", "--methods", "rtrl", "--sections", "quality", "--out", str(tmp_path), "--quiet"]
    first = atlas.run(args)
    partial = tmp_path / "atlas_tiny.partial.json"
    partial.write_text((tmp_path / "atlas_tiny.json").read_text())  # as if interrupted after quality

    def must_not_run(*a, **k):
        raise AssertionError("a saved section was rerun")

    monkeypatch.setattr(quality, "run_quality", must_not_run)
    again = atlas.run(args + ["--resume"])
    assert json.loads(json.dumps(again["quality"])) == json.loads(json.dumps(first["quality"]))
    assert again["section_sources"]["quality"]["command"] == first["command"]  # where it was measured
    assert f"Section **quality** comes from an earlier run: `{first['command']}`" in (tmp_path / "atlas_tiny.md").read_text()
    assert not partial.exists()
    partial.write_text((tmp_path / "atlas_tiny.json").read_text())
    with pytest.raises(ValueError, match="another preset or other rules"):
        atlas.run(["--tiny", "--methods", "rtrl,uoro", "--sections", "quality", "--out", str(tmp_path), "--resume"])


@pytest.mark.slow
def test_atlas_tiny_end_to_end(tmp_path):
    data, saved = _run_tiny(tmp_path, "quality,cost,learning")
    names = {"atlas_tiny.json", "atlas_tiny.md", "atlas_tiny_quality.png", "atlas_tiny_learning.png"}
    assert names <= {f.name for f in tmp_path.iterdir()}
    q = _check_quality(saved)
    _check_cost(saved)
    # learning: fixed budgets reached, every rule and seed
    learn = saved["learning"]
    assert all("error" not in r and not r["hit_time_cap"] for r in learn["copy"] + learn["char"])
    assert {r["method"] for r in learn["char"]} == {"rtrl", "snap4", "uoro", "tbptt"}
    assert {(r["method"], r["density"]) for r in learn["copy"]} >= {("tbptt", 0.25), ("tbptt", 1.0)}
    # claims: each decided or said inconclusive, with the numbers
    assert set(saved["claims"]) == {"a", "b", "c"}
    for c in saved["claims"].values():
        assert c["verdict"].split(" ")[0] in ("held", "not", "inconclusive")
    assert data["claims"]["a"]["cos"]["uoro"] == q["uoro"]["cos"]


def test_atlas_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        atlas.run(["--preset", "huge", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        atlas.run(["--tiny", "--methods", "snap1,bogus", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown section"):
        atlas.run(["--tiny", "--sections", "quality,speed", "--out", str(tmp_path)])


def test_rules_come_from_the_registry():
    p = rules_mod.preset("medium")
    names = rules_mod.expand_rules(p.orders)
    assert names[:4] == ["rtrl", "snap1", "snap2", "snap3"] and "uoro" in names and "sliding_tbptt" in names
    recs = {r["rule"]: r for r in rules_mod.classify_rules(names, p, 4, 4)}
    assert recs["drtrl"]["status"] == "same" and recs["drtrl"]["same_as"] == "snap1"
    assert recs["ostl"]["status"] == "same" and recs["ostl"]["same_as"] == "rtrl"
    assert recs["tbptt"]["period"] == p.window and recs["snap2"]["status"] == "run"


def _copy_run(method, density, seed, L, tokens=1000):
    return {"method": method, "density": density, "seed": seed, "final_L": L, "tokens": tokens,
            "history": {"tokens": [0, tokens // 2, tokens], "L": [1, max(1, L - 1), L]}}


def test_claims_from_data():
    """The verdicts follow the intervals: a clear gap is held, a reversed one not held, noise
    inconclusive; an order already exact counts as approaching RTRL."""
    report = importlib.import_module("_atlas_report")
    p = rules_mod.preset("tiny")
    copy = [_copy_run("snap1", 1.0, s, 8 + s % 2) for s in range(3)]
    copy += [_copy_run("uoro", 1.0, s, 2 + s % 2) for s in range(3)]
    copy += [_copy_run("snap2", 0.25, s, 3 + s % 2, tokens=1000 + s) for s in range(3)]
    copy += [_copy_run("tbptt", 0.25, s, 6 + s % 2) for s in range(3)]
    char = [{"method": m, "density": 1.0, "seed": s, "final_val_bpc": b + 0.01 * s}
            for m, b in (("snap1", 2.2), ("uoro", 2.2)) for s in range(3)]
    quality = [{"rule": f"snap{n}", "built": f"snap{n}", "k": 4, "density": 1.0, "cos": c, "err": 1 - c,
                "cos_blocks": [c - 0.01, c, c + 0.01] if c < 1 else [1.0, 1.0, 1.0]}
               for n, c in ((1, 0.9), (2, 0.95), (3, 1.0), (4, 1.0))]
    c = report.claims({"quality": quality, "learning": {"copy": copy, "char": char}}, p)
    assert c["a"]["verdict"] == "held" and c["a"]["copy_final_L_diff"]["low"] > 0  # copy clear, char a tie
    assert c["b"]["verdict"] == "not held" and c["b"]["comparisons"][0]["tokens"] == 1000
    assert c["c"]["verdict"] == "held" and [x["to"] for x in c["c"]["comparisons"]] == [2, 3, 4]
    assert report.claims({}, p)["a"]["verdict"] == "inconclusive (no data)"


@pytest.mark.parametrize("module", ["atlas", "_atlas_rules", "_atlas_quality", "_atlas_learning", "_atlas_report"])
def test_module_examples(module):
    import doctest

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
