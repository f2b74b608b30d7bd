"""Checkpoint and resume of the full online state (bit-exact, integrity-checked, atomic).

``save_state(path, state)`` writes any pytree of arrays (e.g. a learner's state: parameters,
optimizer state, method states, carries, counters and the PRNG key).  Array bytes are stored
verbatim (``flax.serialization`` msgpack), so a run stopped, saved, restored and continued is
bit-identical to an uninterrupted run.  ``restore_state(path, like_state)`` needs a template
with the same structure: a real state (e.g. ``learner.init(...)`` with the same configuration)
or an abstract one from ``jax.eval_shape`` (leaves :class:`jax.ShapeDtypeStruct`, nothing is
computed).  The template must have exactly the checkpoint's leaves (a template lacking one, or
with one more, e.g. an nnx GRU without the linen GRU's ``hn`` bias, is refused with a
``ValueError`` naming the ``jax.tree_util.keystr`` paths on both sides), and each leaf's shape
and dtype (a mismatch names the leaf's path).

File format (version 1): a 52-byte header followed by the msgpack payload::

    offset  size  field
    0       8     magic  b"SNAPJXCK"
    8       4     format version (uint32, little endian) = 1
    12      8     payload length in bytes (uint64, little endian)
    20      32    SHA-256 of the payload
    52      ...   payload

On restore the length and the SHA-256 are checked before anything is decoded: a short file
raises ``ValueError("... truncated ...")``, any flipped bit ``ValueError("... corrupted ...")``
(both name the path).  Writes are atomic: a temporary file in the same directory is written,
``fsync``-ed and renamed over ``path`` (``os.replace``), so a crash leaves either the old or the
new checkpoint, never a partial one; the final file gets the mode ``0o666 & ~umask`` like any
file the process creates.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and re-wrapped with
the template's key implementation (read from the key dtype, so abstract templates work too).
Sharded states are gathered to the host on save; restore places each leaf with the template
leaf's sharding when it has one.  A state spread over several processes (``jax.distributed``)
raises ``ValueError`` on save: use :mod:`snapjax.parallel.sharded_checkpoint` for those.

Example::

    >>> import tempfile, os, jax, jax.numpy as jnp
    >>> from snapjax.checkpoint import save_state, restore_state
    >>> state = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.bin")
    >>> save_state(path, state)
    >>> back = restore_state(path, jax.eval_shape(lambda: state))
    >>> bool((back["w"] == state["w"]).all()), back["key"].dtype == state["key"].dtype
    (True, True)
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

PyTree = Any

__all__ = ["save_state", "restore_state", "state_to_bytes", "state_from_bytes"]

MAGIC = b"SNAPJXCK"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256(payload)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(dtype) -> Any:
    """The PRNG implementation of a key dtype (public API only: ``key_impl`` of a traced key)."""
    found = []

    def probe(k):
        found.append(jax.random.key_impl(k))
        return k

    jax.eval_shape(probe, jax.ShapeDtypeStruct((), dtype))
    return found[0]


def _to_host(tree: PyTree) -> PyTree:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError(
                f"leaf {jax.tree_util.keystr(path) or '<root>'} (shape {x.shape}, {x.dtype}) is spread over several "
                f"processes (not fully addressable; {len(x.sharding.device_set)} devices, "
                f"{jax.process_count()} processes): this process cannot write it to one file; checkpoint "
                "multi-process states with snapjax.parallel.sharded_checkpoint.save_sharded (orbax)"
            )

    def conv(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(conv, tree)


def _raw_spec(like) -> jax.ShapeDtypeStruct:
    """Shape and dtype as stored: a key leaf is stored as its ``key_data`` (uint32)."""
    if _is_key(like):
        return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(like.shape, like.dtype))
    if not hasattr(like, "shape") or not hasattr(like, "dtype"):
        like = np.asarray(like)
    return jax.ShapeDtypeStruct(tuple(like.shape), np.dtype(like.dtype))


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def _unframe(data: bytes, source: str) -> bytes:
    """Check the header, length and SHA-256 of a checkpoint; return the payload."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        if MAGIC.startswith(data[: len(MAGIC)]):
            raise ValueError(
                f"checkpoint {source} is truncated: {len(data)} bytes, shorter than the "
                f"{_HEADER.size}-byte header"
            )
        raise ValueError(f"{source} is not a snapjax checkpoint (no {MAGIC!r} header); corrupted or another file")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(
            f"{source} is not a snapjax checkpoint: header starts with {magic!r}, expected {MAGIC!r} "
            "(corrupted, another file, or a checkpoint written before format version 1)"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {source} has format version {version}; this snapjax reads version {FORMAT_VERSION} "
            "(corrupted header or a newer snapjax)"
        )
    payload = data[_HEADER.size :]
    if len(payload) < length:
        raise ValueError(
            f"checkpoint {source} is truncated: the header announces {length} payload bytes, "
            f"only {len(payload)} are present"
        )
    if len(payload) > length:
        raise ValueError(
            f"checkpoint {source} is corrupted: {len(payload) - length} bytes follow the "
            f"{length}-byte payload announced by the header"
        )
    got = hashlib.sha256(payload).digest()
    if got != digest:
        raise ValueError(
            f"checkpoint {source} is corrupted: SHA-256 of the payload is {got.hex()}, "
            f"the header records {digest.hex()}"
        )
    return payload


def state_to_bytes(state: PyTree) -> bytes:
    """Serialize ``state``: header (magic, version, length, SHA-256) + msgpack of the exact
    array bytes.  Typed keys are stored as ``key_data``.

    Example (exact round trip, typed PRNG keys included)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> state = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
        >>> data = sj.state_to_bytes(state)
        >>> type(data).__name__
        'bytes'
        >>> back = sj.state_from_bytes(data, state)
        >>> bool(jnp.array_equal(back["w"], state["w"])), bool(jnp.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(state["key"])))
        (True, True)
    """
    payload = serialization.msgpack_serialize(serialization.to_state_dict(_to_host(state)))
    return _frame(payload)


def state_from_bytes(data: bytes, like_state: PyTree, *, source: str = "<bytes>") -> PyTree:
    """Inverse of :func:`state_to_bytes` given a template ``like_state`` of the same structure.

    Args:
      data: bytes from :func:`state_to_bytes` (the content of a checkpoint file).
      like_state: a state of the same structure, or its ``jax.eval_shape`` (abstract leaves);
        gives shapes, dtypes, key implementations and shardings.
      source: name used in error messages (the path, for :func:`restore_state`).

    Raises:
      ValueError: truncated or corrupted data, or a checkpoint that does not match the
        template's structure (leaves on either side only: their paths are named), shapes or
        dtypes (the leaf's path is named).

    Example (the template may be abstract; damaged data is refused)::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> state = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
        >>> data = sj.state_to_bytes(state)
        >>> back = sj.state_from_bytes(data, jax.eval_shape(lambda: state))
        >>> back["w"].tolist()
        [0.0, 1.0, 2.0]
        >>> sj.state_from_bytes(data[:-1], state)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: checkpoint <bytes> ...
        >>> sj.state_from_bytes(data, {"w": jnp.zeros(4), "key": jax.random.key(0)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: checkpoint <bytes>: leaf ... the template expects (4,)/float32
    """
    payload = _unframe(data, source)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(like_state)
    like_leaves = [x for _, x in with_paths]
    names = [jax.tree_util.keystr(p) or "<root>" for p, _ in with_paths]
    raw_specs = [_raw_spec(x) for x in like_leaves]
    template = jax.tree.unflatten(treedef, raw_specs)
    try:
        raw = serialization.msgpack_restore(payload)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"checkpoint {source} cannot be decoded: {e}") from e
    _check_leaf_paths(raw, with_paths, treedef, source)
    try:
        restored = serialization.from_state_dict(template, raw)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"checkpoint {source} does not match the template's structure: {e}") from e
    r_leaves = jax.tree.leaves(restored)
    if len(r_leaves) != len(raw_specs):
        raise ValueError(
            f"checkpoint {source} does not match the template's structure: "
            f"{len(r_leaves)} leaves stored, template has {len(raw_specs)}"
        )
    out = []
    for name, r, spec, like in zip(names, r_leaves, raw_specs, like_leaves):
        r = np.asarray(r)
        if r.shape != spec.shape or r.dtype != spec.dtype:
            raise ValueError(
                f"checkpoint {source}: leaf {name} is {r.shape}/{r.dtype}, the template expects {spec.shape}/{spec.dtype}"
            )
        sharding = getattr(like, "sharding", None)
        if _is_key(like):
            arr = jax.random.wrap_key_data(jnp.asarray(r), impl=_key_impl(like.dtype))
        else:
            arr = jnp.asarray(r)
        if sharding is not None:
            arr = jax.device_put(arr, sharding)
        out.append(arr)
    return jax.tree.unflatten(treedef, out)


class _Index:
    """A template leaf's position, carried through ``to_state_dict`` to find its stored path."""

    def __init__(self, i: int):
        self.i = i


def _key_name(k: Any) -> str:
    """A state-dict key (a str) from a pytree path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _stored_paths(tree: PyTree) -> dict[tuple, Any]:
    """``{state-dict path (tuple of str): leaf}`` of a nested state dict."""
    return {tuple(_key_name(k) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_leaf_paths(raw: PyTree, with_paths: list, treedef: Any, source: str) -> None:
    """``ValueError`` naming the leaves (``jax.tree_util.keystr`` paths in the template's terms)
    that the checkpoint has and the template lacks, and the other way round: a state is never
    restored into a template with other leaves (e.g. a linen GRU's ``b_hn`` dropped)."""
    stored = set(_stored_paths(raw))
    marked = serialization.to_state_dict(jax.tree.unflatten(treedef, [_Index(i) for i in range(len(with_paths))]))
    expected = {p: with_paths[m.i][0] for p, m in _stored_paths(marked).items()}
    if stored == set(expected):
        return
    prefix: dict[tuple, str] = {}  # state-dict path prefix -> the template's keystr of it
    for sd, kp in expected.items():
        if len(sd) == len(kp):
            prefix.update({sd[:i]: jax.tree_util.keystr(tuple(kp[:i])) for i in range(len(sd) + 1)})

    def name(sd: tuple) -> str:
        if sd in expected:
            return jax.tree_util.keystr(tuple(expected[sd])) or "<root>"
        i = max(i for i in range(len(sd) + 1) if sd[:i] in prefix or i == 0)
        return prefix.get(sd[:i], "") + "".join(f"[{k!r}]" for k in sd[i:])

    def listing(paths: set) -> str:
        shown = sorted(name(p) for p in paths)
        return ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "") if shown else "none"

    raise ValueError(
        f"checkpoint {source} does not match the template's structure: leaves in the checkpoint but not in the "
        f"template: {listing(stored - set(expected))}; leaves in the template but not in the checkpoint: "
        f"{listing(set(expected) - stored)} (restore into a state built with the saved run's model and options)"
    )


def _umask() -> int:
    """The process umask (read from /proc on Linux; else set and restore it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_state(path: str | os.PathLike, state: PyTree) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, ``fsync``,
    ``os.replace``); the file gets mode ``0o666 & ~umask``.  Parent directories are created.
    A state spread over several processes raises ``ValueError`` (use
    :func:`snapjax.save_sharded`).

    Example::

        >>> import os, tempfile, jax.numpy as jnp, snapjax as sj
        >>> state = {"w": jnp.arange(3.0), "step": jnp.int32(7)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "run", "state.ckpt")          # parent directories are created
        ...     sj.save_state(path, state)
        ...     back = sj.restore_state(path, state)
        >>> back["w"].tolist(), int(back["step"])
        ([0.0, 1.0, 2.0], 7)
    """
    path = os.fspath(path)
    data = state_to_bytes(state)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".snapjax-ckpt-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp creates 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable (best effort: not every platform can fsync a directory)
        dfd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def restore_state(path: str | os.PathLike, like_state: PyTree) -> PyTree:
    """Read a state written by :func:`save_state`.

    ``like_state`` (a state or its ``jax.eval_shape``) gives structure, dtypes, key
    implementations and shardings.  Raises ``ValueError`` naming ``path`` if the file is
    truncated, corrupted or does not match the template; ``FileNotFoundError`` if it is absent.

    Example (the template may be abstract, e.g. ``jax.eval_shape`` of ``learner.init``)::

        >>> import os, tempfile, jax, jax.numpy as jnp, snapjax as sj
        >>> make = lambda: {"w": jnp.arange(3.0), "key": jax.random.key(0)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     sj.save_state(os.path.join(d, "state.ckpt"), make())
        ...     back = sj.restore_state(os.path.join(d, "state.ckpt"), jax.eval_shape(make))
        ...     missing = os.path.join(d, "absent.ckpt")
        >>> back["w"].tolist(), bool(jnp.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(make()["key"])))
        ([0.0, 1.0, 2.0], True)
        >>> sj.restore_state(missing, make())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        FileNotFoundError: ...
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return state_from_bytes(data, like_state, source=path)
