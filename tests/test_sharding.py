"""The batch (and its per-example influence) sharded over 8 CPU devices gives the same results
as one device (float64, 1e-10; only the reduction order of the batch sums differs)."""

import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
ROOT = WORKER.parent.parent


@pytest.mark.parametrize("method", ["snap1", pytest.param("tbptt", marks=pytest.mark.slow)])
def test_sharded_equals_single_device(method):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run(
        [sys.executable, str(WORKER), method], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"OK {method}" in res.stdout, res.stdout
