"""The environment of a subprocess that runs jax on ``N`` forced CPU host devices (they must be
set before jax starts, so the sharding and multi-process tests run their cases in workers)."""

import os
import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def worker_env(devices: int) -> dict:
    """``os.environ`` with JAX on the CPU, ``devices`` forced host devices (any device count
    already in ``XLA_FLAGS`` replaced; 1: none forced), XLA:CPU's cheapest compilation
    (``--xla_backend_optimization_level=0`` and no expensive LLVM passes: shorter compiles, the
    same results), and the repository on ``PYTHONPATH``."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    cheap = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    env["XLA_FLAGS"] = " ".join(flags + [f for f in cheap if f.split("=")[0] not in " ".join(flags)])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
