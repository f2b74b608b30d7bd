"""Checkpoint and resume of the full online state (bit-exact).

``save_state(path, state)`` writes any pytree of arrays (an :class:`snapjax.online.OnlineState`:
parameters, optimizer state, influence, hidden state, accumulators, counters and the PRNG key)
with ``flax.serialization`` msgpack: array bytes are stored verbatim, so a run stopped, saved,
restored and continued is bit-identical to an uninterrupted run.  ``restore_state(path,
like_state)`` needs a template with the same structure (e.g. ``learner.init(...)`` with the
same configuration); shapes and dtypes are checked.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and re-wrapped with
the template's key implementation.  Sharded states are gathered to the host on save; restore
places each leaf with the template leaf's sharding.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

PyTree = Any

__all__ = ["save_state", "restore_state", "state_to_bytes", "state_from_bytes"]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(tree: PyTree) -> PyTree:
    def conv(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(conv, tree)


def state_to_bytes(state: PyTree) -> bytes:
    """Serialize ``state`` (msgpack; exact array bytes)."""
    return serialization.msgpack_serialize(serialization.to_state_dict(_to_host(state)))


def state_from_bytes(data: bytes, like_state: PyTree) -> PyTree:
    """Inverse of :func:`state_to_bytes` given a template ``like_state`` of the same structure."""
    template = _to_host(like_state)
    raw = serialization.msgpack_restore(data)
    restored = serialization.from_state_dict(template, raw)
    t_leaves, treedef = jax.tree.flatten(template)
    r_leaves = jax.tree.leaves(restored)
    like_leaves = jax.tree.leaves(like_state)
    if len(r_leaves) != len(t_leaves):
        raise ValueError("checkpoint does not match the template's structure")
    out = []
    for r, t, like in zip(r_leaves, t_leaves, like_leaves):
        r = np.asarray(r)
        if r.shape != t.shape or r.dtype != t.dtype:
            raise ValueError(f"checkpoint leaf {r.shape}/{r.dtype} does not match template {t.shape}/{t.dtype}")
        sharding = getattr(like, "sharding", None)
        arr = jax.device_put(r, sharding) if sharding is not None and not _is_key(like) else jnp.asarray(r)
        if _is_key(like):
            arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(like))
            if sharding is not None:
                arr = jax.device_put(arr, sharding)
        out.append(arr)
    return jax.tree.unflatten(treedef, out)


def save_state(path: str | os.PathLike, state: PyTree) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + rename)."""
    path = os.fspath(path)
    data = state_to_bytes(state)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".snapjax-ckpt-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore_state(path: str | os.PathLike, like_state: PyTree) -> PyTree:
    """Read a state written by :func:`save_state`; ``like_state`` gives structure, dtypes,
    key implementations and shardings."""
    with open(os.fspath(path), "rb") as f:
        return state_from_bytes(f.read(), like_state)
