"""Checkpoints of sharded (and multi-process) states through orbax-checkpoint.

:func:`snapjax.save_state` gathers a state to one host; it cannot hold an array spread over
several processes (``jax.distributed``).  :func:`save_sharded` writes every leaf from the shards
each process owns (orbax, tensorstore), and :func:`restore_sharded` reads each leaf straight
into the shards its template says: ``restore_sharded(d, like)`` with ``like`` a pytree of the
same structure whose leaves (arrays, or ``jax.ShapeDtypeStruct`` with ``.sharding``) give shape,
dtype and placement, e.g. ``sj.shard_state(learner, learner.init(...), mesh)``.  Every process
calls both functions with the same arguments; orbax synchronises them.  Needs the optional
dependency ``pip install snapjax[checkpoint]``.

Layout: one orbax composite checkpoint, item ``arrays`` (leaf ``i`` of ``jax.tree.leaves(state)``
under the name ``leaf_i``; bytes stored verbatim, so a restored state is bit-identical) and item
``snapjax`` (JSON: per leaf its tree path, shape, dtype and PRNG implementation).  Typed PRNG
keys (``jax.random.key``) are stored as their ``key_data`` (``uint32 (*shape, words)``) and
re-wrapped with the template's implementation; ``None`` nodes are no leaves (kept by the
template's structure).  Before any byte is read, the tree paths, shapes, dtypes and key
implementations of the checkpoint are compared with the template's (``ValueError`` naming the
first difference), so orbax never casts silently.

In a training loop (every process runs the same lines; ``mesh`` spans all processes)::

    with jax.set_mesh(mesh):
        state = sj.shard_state(learner, learner.init(jax.random.key(0), batch_size=B, input_size=n), mesh)
        state, outs, metrics = learner.run_jit(state, xs, ys, masks)  # xs = sj.put_sharded(...)
        save_sharded(f"{ckpt_dir}/step_{T}", state)       # before run_jit donates the state
        # ... later, in a new run: a fresh template gives structure and placement
        like = sj.shard_state(learner, learner.init(jax.random.key(0), batch_size=B, input_size=n), mesh)
        state = restore_sharded(f"{ckpt_dir}/step_{T}", like)

Example (one process; with ``jax.distributed`` every process runs the same lines)::

    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from snapjax.parallel.sharded_checkpoint import save_sharded, restore_sharded
    >>> mesh = jax.make_mesh((1,), ("batch",))
    >>> put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    >>> state = {"h": put(jnp.ones((4, 3)), P("batch")), "key": put(jax.random.key(0), P()), "b": None}
    >>> d = os.path.join(tempfile.mkdtemp(), "step_10")
    >>> save_sharded(d, state)
    >>> back = restore_sharded(d, jax.eval_shape(lambda s: s, state), mesh=mesh)  # nothing computed
    >>> bool((back["h"] == state["h"]).all()), back["h"].sharding.is_equivalent_to(state["h"].sharding, 2)
    (True, True)
    >>> bool((jax.random.key_data(back["key"]) == jax.random.key_data(state["key"])).all())
    True
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, SingleDeviceSharding

from snapjax.checkpoint import _is_key, _key_impl

PyTree = Any

__all__ = ["restore_sharded", "save_sharded"]

FORMAT = "snapjax.parallel.sharded_checkpoint/1"


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "snapjax.parallel.sharded_checkpoint needs orbax-checkpoint: pip install snapjax[checkpoint]"
        ) from e
    return ocp


def _checkpointer(ocp):
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _describe(path, leaf) -> dict:
    """``{"path", "shape", "dtype", "key_impl"}`` of one leaf (array or ShapeDtypeStruct)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    key = _is_key(leaf)
    return {"path": jax.tree_util.keystr(path), "shape": [int(s) for s in leaf.shape],
            "dtype": str(leaf.dtype), "key_impl": str(_key_impl(leaf.dtype)) if key else None}


def _fmt(d: dict) -> str:
    impl = f" ({d['key_impl']})" if d["key_impl"] else ""
    return f"{d['path'] or '<root>'}: shape {tuple(d['shape'])}, dtype {d['dtype']}{impl}"


def save_sharded(directory: str | os.PathLike, state: PyTree, *, overwrite: bool = False) -> None:
    """Write ``state`` (a pytree of arrays, possibly sharded over many processes) to the new
    directory ``directory``; every process calls it with its view of the same global arrays.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      ImportError: orbax-checkpoint is not installed.

    Example::

        >>> import os, tempfile, jax.numpy as jnp
        >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save_sharded(d, {"w": jnp.arange(3.0), "opt": None})
        >>> save_sharded(d, {"w": jnp.zeros(3)})
        Traceback (most recent call last):
        FileExistsError: save_sharded: ... already exists; choose a new directory (e.g. one per step) or pass overwrite=True to replace it
    """
    ocp = _orbax()
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(
            f"save_sharded: {directory} already exists; choose a new directory (e.g. one per step) "
            "or pass overwrite=True to replace it"
        )
    with_paths, _ = jax.tree_util.tree_flatten_with_path(state)
    arrays: dict[str, Any] = {}
    described = []
    for i, (path, leaf) in enumerate(with_paths):
        if _is_key(leaf):
            arrays[f"leaf_{i}"] = jax.random.key_data(leaf)
        else:
            arrays[f"leaf_{i}"] = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        described.append(_describe(path, leaf))
    meta = {"format": FORMAT, "leaves": described}
    _checkpointer(ocp).save(
        directory,
        ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), snapjax=ocp.args.JsonSave(meta)),
        force=overwrite,
    )


def _target(like, d: dict, path: str, mesh) -> jax.ShapeDtypeStruct:
    """The abstract array orbax restores leaf ``like`` into (key data for a key leaf)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, AbstractMesh):  # e.g. jax.eval_shape
        if mesh.empty or mesh.abstract_mesh != sharding.mesh:
            raise ValueError(f"restore_sharded: template leaf {path} is sharded over an abstract mesh "
                             f"{sharding.mesh} (e.g. from jax.eval_shape); pass mesh= (the concrete mesh) or "
                             f"run under `with jax.set_mesh(mesh):`" + ("" if mesh.empty else f" (given {mesh})"))
        sharding = NamedSharding(mesh, sharding.spec)
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError(f"restore_sharded: template leaf {path} has no sharding; with several processes "
                             "every leaf needs one (an array or a jax.ShapeDtypeStruct with sharding=)")
        sharding = SingleDeviceSharding(jax.devices()[0])
    if not d["key_impl"]:
        return jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"]), sharding=sharding)
    if not isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
        raise ValueError(f"restore_sharded: key leaf {path} has a {type(sharding).__name__}; "  # noqa: TRY004
                         "key leaves need a NamedSharding or SingleDeviceSharding")
    raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(tuple(d["shape"]), like.dtype))
    return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=sharding)  # the key words: replicated


def restore_sharded(directory: str | os.PathLike, like: PyTree, *, mesh: Mesh | None = None) -> PyTree:
    """Read a state written by :func:`save_sharded` into the structure and shardings of ``like``.

    Args:
      directory: the checkpoint directory.
      like: a pytree of the saved structure whose leaves (arrays or ``jax.ShapeDtypeStruct``)
        have the saved shapes and dtypes; each restored leaf gets the template leaf's
        ``.sharding`` (one process: a leaf without one goes to ``jax.devices()[0]``).
      mesh: the concrete mesh for template shardings over an abstract mesh (``jax.eval_shape``
        of a sharded state); default: the mesh set with ``jax.set_mesh``.
    Returns:
      the state, bit-identical to the saved one, placed as ``like``.
    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      ValueError: not a snapjax sharded checkpoint, or its tree paths, shapes, dtypes or key
        implementations differ from the template's (the message names both), a template
        sharding over an abstract mesh without a matching ``mesh``, or (several processes) a
        template leaf without a sharding.
      ImportError: orbax-checkpoint is not installed.

    Example::

        >>> import os, tempfile, jax, jax.numpy as jnp
        >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save_sharded(d, {"w": jnp.arange(3.0), "key": jax.random.key(1)})
        >>> back = restore_sharded(d, {"w": jnp.zeros(3), "key": jax.random.key(0)})
        >>> back["w"], jax.random.key_data(back["key"]).tolist()
        (Array([0., 1., 2.], dtype=float32), [0, 1])
        >>> restore_sharded(d, {"w": jnp.zeros(4), "key": jax.random.key(0)})
        Traceback (most recent call last):
        ValueError: restore_sharded: ... the template expects ['w']: shape (4,), dtype float32; the checkpoint has ['w']: shape (3,), dtype float32
    """
    ocp = _orbax()
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"restore_sharded: no checkpoint directory {directory}")
    ckptr = _checkpointer(ocp)
    try:
        meta = ckptr.restore(directory, ocp.args.Composite(snapjax=ocp.args.JsonRestore()))["snapjax"]
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ValueError(f"restore_sharded: {directory} is not a checkpoint written by save_sharded ({e})") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"restore_sharded: {directory} has format {fmt!r}, expected {FORMAT!r}")
    found = meta["leaves"]
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    expected = [_describe(p, x) for p, x in with_paths]
    for want, have in zip(expected, found):
        if want != have:
            raise ValueError(f"restore_sharded: {directory} does not match the template: the template expects "
                             f"{_fmt(want)}; the checkpoint has {_fmt(have)}")
    if len(expected) != len(found):
        more, n = (expected, "template") if len(expected) > len(found) else (found, "checkpoint")
        raise ValueError(f"restore_sharded: {directory} does not match the template: the template has "
                         f"{len(expected)} leaves, the checkpoint {len(found)}; the first extra leaf "
                         f"(in the {n}) is {_fmt(more[min(len(expected), len(found))])}")
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    targets = {f"leaf_{i}": _target(x, d, d["path"], mesh) for i, ((_, x), d) in enumerate(zip(with_paths, expected))}
    raw = ckptr.restore(directory, ocp.args.Composite(arrays=ocp.args.StandardRestore(targets)))["arrays"]
    out = []
    for i, ((_, x), d) in enumerate(zip(with_paths, expected)):
        r = raw[f"leaf_{i}"]
        out.append(jax.random.wrap_key_data(r, impl=d["key_impl"]) if d["key_impl"] else r)
    return jax.tree_util.tree_unflatten(treedef, out)
