"""Shared fixtures and helpers of the test suite.

Compile time dominates this suite (hundreds of small XLA programs, each a few steps on a few
units), so the tests ask XLA's CPU backend for its cheapest code generation: optimisation level
0 and no expensive LLVM passes. That cuts the compile time by about a third and changes no
result the tests check (the same program, less optimised machine code). It is
set before jax's backend starts (the first array op); flags already in ``XLA_FLAGS`` win.
"""

import os
import shutil
import tempfile

_FAST_COMPILE = {"--xla_backend_optimization_level": "0", "--xla_llvm_disable_expensive_passes": "true"}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f"{k}={v}" for k, v in _FAST_COMPILE.items() if k not in _flags]
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test in float64 (restores the previous setting afterwards)."""
    with jax.enable_x64(True):
        yield


def tree_rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| over all leaves of two pytrees."""
    fa = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
    fb = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(b)])
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def random_masks(rng: np.random.Generator, spec, params, density: float) -> dict:
    """Bernoulli(density) masks on every kernel (test helper, independent of snapjax.engine.sparsity)."""
    return {
        p.name: rng.random(np.shape(params[p.name]["kernel"])) < density for p in spec.projections
    }


# Tests that run their work in subprocesses (forced host devices, several processes) are the
# suite's longest single items. Under ``pytest -n 2`` they are handed out first, so each xdist
# worker starts on one of them instead of one worker finishing a 30-second item alone at the end.
SUBPROCESS_MODULES = ("test_sharding.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SUBPROCESS_MODULES)  # stable: False first


# One compilation cache for the run, shared by its xdist workers: many tests compile the same
# program (the same method on the same small cell), and each worker otherwise compiles it again.
# The cache is keyed by the program and the compiler's options (jax's persistent compilation
# cache), lives in a fresh directory made by the controlling process and is removed at the end,
# so no run reuses another's programs.  A directory in ``SNAPJAX_TEST_XLA_CACHE`` is used as it is.
_CACHE_ENV = "SNAPJAX_TEST_XLA_CACHE"
_MADE_CACHE: list[str] = []


def pytest_configure(config):
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        _MADE_CACHE.append(tempfile.mkdtemp(prefix="snapjax-tests-xla-"))
        os.environ[_CACHE_ENV] = _MADE_CACHE[0]
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _MADE_CACHE:
        shutil.rmtree(_MADE_CACHE.pop(), ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)
