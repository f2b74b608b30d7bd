"""The cost model of a learner's layers: the path serving each method, its state bytes per
example (from ``jax.eval_shape``: nothing is allocated), its FLOPs and state traffic per step, and
the lower bound of memory that ``learner.init`` checks (:mod:`snapjax.training.init_checks`).

The path is read from the method's class: ``compressed/diag`` (SnAp-1), ``compressed/table``
(sparse SnAp-n), ``compressed/dense`` (exact RTRL) on a cell's compressed Jacobians;
``chunked/dense`` and ``chunked/diag`` (``chunk=K``); ``generic/dense`` and ``generic/pattern``
(dense per-example Jacobians of any cell; the influence stored whole, or per column on its
SnAp-n pattern); ``activity``; ``rank-one`` (UORO); ``kronecker`` (KF-RTRL, OK); ``window``
(truncated BPTT); ``trace`` (immediate, e-prop, RFLO, ES-D-RTRL); ``feed-forward``.

FLOPs per example and step (a multiply-add counts 2; ``p`` the layer's parameters, ``k`` its
carry floats, ``S`` the stored influence floats, ``W`` the engine's stored units per parameter,
``m`` the state floats per unit, ``K`` the chunk or window, ``r`` OK's rank, ``w_g`` and ``S_g``
the width and stored floats of a gathered column group), and the method-state floats read and
written per example and step:

========================  ================================================  =============
path                      FLOPs                                             state traffic
========================  ================================================  =============
feed-forward              ``6p`` (forward and backward)                     --
compressed/diag           ``2p + 4S``                                       ``2S``
compressed/table, dense   ``2p + 2·W·m·S + 2S`` (``D·J`` and ``c·J``)       ``2S``
chunked/dense             ``6p + 2k³ + 2S + 2k·S/K``                        ``2S/K``
chunked/diag              ``6p + 2S + 2m·S/K``                              ``2S/K``
generic/dense             ``2p + 4k·p + 2k·S + 2S`` (``k`` VJPs, ``D·J``)   ``2S``
generic/pattern           ``2p + 4k·p + Σ_g 2w_g·S_g + 2S``                 ``2S``
activity                  at most ``2p + 2k·S + 2S`` (all units active)     ``2S``
rank-one                  ``10p`` (one JVP, one VJP)                        ``2S``
kronecker                 ``6p + 2(r+1)k³`` (KF-RTRL: ``r = 1``)            ``2S``
window                    ``6p`` (sliding: ``6p·K``)                        --
trace                     ``6p``                                            ``2S``
========================  ================================================  =============

They are estimates for choosing a configuration, not measurements: SnAp-1 is bound by the state
traffic (a chunked form moves the influence once per chunk), dense RTRL by ``D·J``.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> from snapjax.training.cost_model import method_path
    >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    >>> method_path(sj.online_method("snap2", nn.GRUCell(4), params))   # dense weights: the full table
    'compressed/dense'
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.methods.activity import ActivitySparseRTRL
from snapjax.methods.chunked import ChunkedInfluence
from snapjax.methods.compressed import CompressedInfluence
from snapjax.methods.dense import DenseInfluence

PyTree = Any

__all__ = ["LayerCost", "layer_rows", "memory_lower_bound", "method_path", "tree_bytes"]


class LayerCost(NamedTuple):
    """One row of :class:`LearnerCost` (bytes and FLOPs per example; see the module docstring).

    Example::

        >>> import flax.linen as nn, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl")
        >>> learner.describe(batch_size=2, input_size=3, compiled=False).layers[0].path
        'compressed/dense'
    """

    layer: str
    cell: str
    method: str
    path: str
    state_bytes: int  # method state per example
    shared_bytes: int  # method-state leaves shared by the batch (a PRNG key)
    carry_bytes: int  # carry per example
    params: int
    flops: float | None  # per example and step
    traffic_bytes: float | None  # method-state bytes read + written per example and step


def _nbytes(leaf: Any) -> int:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a pytree of arrays or ``ShapeDtypeStruct`` (typed keys: their ``key_data``)."""
    return sum(_nbytes(leaf) for leaf in jax.tree.leaves(tree))


def _per_example(make) -> tuple[int, int]:
    """``(bytes per example, shared bytes)`` of ``make(batch)`` from its shapes at B = 1 and 2."""
    one, two = (tree_bytes(jax.eval_shape(functools.partial(make, b))) for b in (1, 2))
    return two - one, 2 * one - two


def method_path(method: Any) -> str:
    """The path serving ``method`` (module docstring), read from its class and engine layout.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> from snapjax.training.cost_model import method_path
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> [method_path(sj.online_method(m, nn.GRUCell(4), params, **kw))
        ...  for m, kw in [("snap1", {}), ("rtrl", {"chunk": 4}), ("uoro", {})]]
        ['compressed/diag', 'chunked/dense', 'rank-one']
    """
    if isinstance(method, ChunkedInfluence):
        return f"chunked/{method.tracker.layout}"
    if isinstance(method, CompressedInfluence):
        return f"compressed/{method.tracker.layout}"
    if isinstance(method, DenseInfluence):
        return f"generic/{method.storage}"
    if isinstance(method, ActivitySparseRTRL):
        return "activity"
    return _PATHS.get(type(method).__name__, "other")


_PATHS = {"UORO": "rank-one", "KFRTRL": "kronecker", "OK": "kronecker", "TBPTT": "window",
          "SlidingTBPTT": "window", "Immediate": "trace", "EProp": "trace", "RFLO": "trace", "ESDRTRL": "trace"}


def _flops(method: Any, path: str, k: int, p: int, S: float) -> tuple[float | None, float | None]:
    """``(FLOPs, method-state floats moved)`` per example and step (module docstring)."""
    tracker = getattr(method, "tracker", None)
    m = tracker.spec.state_dim if tracker is not None else 1
    W = tracker.width if tracker is not None else k
    K = getattr(method, "chunk", None) or method.period
    if path == "compressed/diag":
        return 2 * p + 4 * S, 2 * S
    if path.startswith("compressed/"):
        return 2 * p + 2 * W * m * S + 2 * S, 2 * S
    if path == "chunked/dense":
        return 6 * p + 2 * k ** 3 + 2 * S + 2 * k * S / K, 2 * S / K
    if path == "chunked/diag":
        return 6 * p + 2 * S + 2 * m * S / K, 2 * S / K
    if path.startswith("generic/"):
        dj = 2 * k * S  # D·J on the dense storage; gathered groups: w_g MACs per stored entry
        if getattr(method, "layout", None) is not None:
            lay = method.layout[0]
            dj = 2 * k * k * len(lay.dense_cols) + sum(2 * g.width * g.width * len(g.cols) for g in lay.groups)
        return 2 * p + 4 * k * p + dj + 2 * S, 2 * S
    if isinstance(method, ActivitySparseRTRL):
        return 2 * p + 2 * k * S + 2 * S, 2 * S
    if path == "rank-one":
        return 10 * p, 2 * S
    if path == "kronecker":
        return 6 * p + 2 * (getattr(method, "rank", 1) + 1) * k ** 3, 2 * S
    if path == "window":
        return 6 * p * (K if type(method).__name__ == "SlidingTBPTT" else 1), None
    if path == "trace":
        return 6 * p, 2 * S
    return None, None


def layer_rows(learner: Any, methods: tuple, params: PyTree, batch: int, dtype: Any) -> list[LayerCost]:
    """One :class:`LayerCost` per layer (recurrent stages and feed-forward layers)."""
    rows, recurrent = [], iter(methods)
    for stage in learner.stages:
        p = sum(int(np.size(a)) for a in jax.tree.leaves(stage.params(params)))
        layer = "+".join(stage.names)
        if not stage.recurrent:
            rows.append(LayerCost(layer, type(stage.module).__name__, "-", "feed-forward", 0, 0, 0, p, 6.0 * p, None))
            continue
        method = next(recurrent)
        state, shared = _per_example(lambda b, m=method: m.init(b, dtype, key=jax.random.key(0)))
        carry, _ = _per_example(lambda b, m=method: m.init_carry(b, dtype))
        k = carry // np.dtype(dtype).itemsize
        path = method_path(method)
        tracker = getattr(method, "tracker", None)  # the influence alone (a chunked state also buffers K steps)
        stored = tracker.num_stored() if tracker is not None else state / np.dtype(dtype).itemsize
        flops, floats = _flops(method, path, k, p, stored)
        traffic = None if floats is None else floats * np.dtype(dtype).itemsize
        rows.append(LayerCost(layer, stage.module.name, method.name, path, state, shared, carry, p, flops, traffic))
    return rows


def memory_lower_bound(learner: Any, methods: tuple, params: PyTree, rows: list[LayerCost], batch: int,
                       dtype: Any) -> int:
    """The bytes checked at ``init`` (module docstring): parameters, optimizer state, gradient
    accumulator, carries and method states, plus one new copy of each method state and the
    generic path's per-example ``D (k, k)`` and ``I (k, p)``."""
    opt = jax.eval_shape(learner.transform(params).init, params)
    total = tree_bytes(params) * (1 if learner.period(params) == 1 else 2) + tree_bytes(opt)
    recurrent = [r for r in rows if r.path != "feed-forward"]
    for row, method in zip(recurrent, methods):
        total += batch * (2 * row.state_bytes + row.carry_bytes) + row.shared_bytes
        if isinstance(method, DenseInfluence):
            k = row.carry_bytes // np.dtype(dtype).itemsize
            total += batch * (k * k + k * row.params) * np.dtype(dtype).itemsize
    return total
