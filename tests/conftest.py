import jax
import jax.numpy as jnp
import numpy as np
import pytest


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
    """Bernoulli(density) masks on every kernel (test helper, independent of snapjax.sparsity)."""
    return {
        p.name: rng.random(np.shape(params[p.name]["kernel"])) < density for p in spec.projections
    }
