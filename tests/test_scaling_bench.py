"""End-to-end run of ``benchmarks/scaling.py --quick`` (exact RTRL with the influence split over
forced host devices): a subprocess, because the script forces 8 host devices before jax is
imported.  Checks the recorded rows, not timings: every (k, D) row ran, each device holds
``1/D`` of the influence, the compiled per-device buffers shrink with ``D`` and the results
equal the plain single-device learner's."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    out = tmp_path / "scaling.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=env, cwd=ROOT,
                         check=False, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert "not speed" in result["note"] and "--quick" in result["command"]
    assert "--xla_force_host_platform_device_count=8" in result["machine"]["xla_flags"]
    rows = {(r["units"], r["devices"]): r for r in result["rows"]}
    assert sorted(rows) == [(16, 1), (16, 2), (32, 1), (32, 2)]
    for (k, D), r in rows.items():
        assert r["status"] == "ok", r
        assert r["T"] == 2 and r["batch"] == 1
        # influence: k·p floats (float32), one D-th on each device
        assert r["influence_bytes_total"] == 4 * k * r["params"]
        assert r["influence_bytes_per_device"] * D == r["influence_bytes_total"]
        assert r["per_device_is_total_over_D"] and r["specs_kept"] and r["matches_reference"]
        for name in ("params", "grad_trace", "outputs", "influence"):  # vs the plain single-device learner
            assert r[f"rel_diff_{name}"] <= 1e-5, (name, r)
        assert r["step_s_median"] > 0 and len(r["step_s_all"]) == 2
        # the compiled program's buffers on one device: the influence (argument) halves with D
        mem, mem1 = r["memory"], rows[(k, 1)]["memory"]
        assert mem["argument_bytes"] >= r["influence_bytes_per_device"]
        if D == 2:
            assert mem["argument_bytes"] < 0.6 * mem1["argument_bytes"]
            assert mem["temp_bytes"] < 0.6 * mem1["temp_bytes"]
            assert r["temp_bytes_x_D_over_1_device"] < 1.2
            # collectives: parameter-sized at most, never the influence
            assert 0 < r["largest_collective_bytes"] < r["influence_bytes_per_device"]
        else:
            assert r["collectives"] == {}
    md = out.with_suffix(".md").read_text()
    assert "python benchmarks/scaling.py --quick" in md and "not speed" in md
    # --render rewrites the same .md from the JSON alone
    out.with_suffix(".md").unlink()
    res = subprocess.run([sys.executable, str(SCRIPT), "--render", "--out", str(out)], env=env, cwd=ROOT,
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.with_suffix(".md").read_text() == md
