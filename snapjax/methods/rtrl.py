"""Exact RTRL and SnAp-n: which implementation serves a cell, registered as ``"rtrl"`` and ``"snapN"``.

Both follow the influence ``J_t = ds_t/dθ`` of the recursion ``J_t = D_t J_{t-1} + I_t``
(Williams & Zipser 1989); SnAp-n keeps only the entries of its n-step pattern,
``J_t = (D_t J_{t-1} + I_t) ⊙ M_n`` (Menick et al., ICLR 2021).  Three implementations, chosen
from the cell and the options:

* a cell with a compressed form (a :class:`snapjax.CellSpec`): the compressed engine,
  :class:`~snapjax.methods.compressed.CompressedInfluence`; the spec is first checked against
  ``jax.jvp`` (:func:`snapjax.verify_spec`, ``verify=False`` skips it);
* the same with ``chunk=K > 1`` (RTRL and SnAp-1): the exact forward-backward hybrid,
  :class:`~snapjax.methods.chunked.ChunkedInfluence`;
* any other cell: dense per-example Jacobians, :class:`~snapjax.methods.dense.DenseInfluence`.

=============  ==========================  ======================================================
method         per step and example        memory per example
=============  ==========================  ======================================================
``"rtrl"``     ``O(k² p)`` (compressed:    ``k·p`` floats (exact)
               ``O(k·p·m)`` per unit row)
``"snapN"``    ``O(|M_n|·K)`` for a table  ``|M_n|`` floats (SnAp-1: ``p·m``); biased for
               of ``K`` slots per unit     ``n < k``, exact for ``n >= k``
=============  ==========================  ======================================================

Two more names build the same methods: ``"drtrl"`` (alias ``"d_rtrl"``) is SnAp-1 — D-RTRL,
braintrace's name for SnAp-1 of a cell with one state per unit — and ``"ostl"`` is exact RTRL:
OSTL (Bohnstingl, Woźniak, Pantazi, Eleftheriou, "Online spatio-temporal learning in deep neural
networks", IEEE TNNLS 2022, doi:10.1109/TNNLS.2022.3153985) is exact RTRL within each layer with
the gradient passed between layers at the same step, which is what
:class:`snapjax.OnlineLearner` does for a stack with ``"rtrl"`` in every layer.

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    >>> [type(sj.online_method(m, nn.GRUCell(4), params, **kw)).__name__
    ...  for m, kw in [("rtrl", {}), ("snap1", {"chunk": 4}), ("rtrl", {"verify": False})]]
    ['CompressedInfluence', 'ChunkedInfluence', 'CompressedInfluence']
    >>> type(sj.online_method("snap1", sj.as_recurrent(nn.GRUCell(4), generic=True), params)).__name__
    'DenseInfluence'
    >>> [sj.online_method(m, nn.GRUCell(4), params).name for m in ("drtrl", "D-RTRL", "ostl")]
    ['snap1', 'snap1', 'rtrl']
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np

from snapjax.cells.recurrent import Recurrent
from snapjax.engine.influence import influence_tracker
from snapjax.engine.verify import verify_spec
from snapjax.methods.base import OnlineMethod
from snapjax.methods.chunked import chunked_method
from snapjax.methods.compressed import CompressedInfluence
from snapjax.methods.dense import dense_method
from snapjax.methods.registry import register_method

PyTree = Any

__all__ = ["build_influence_method"]


def _shapes(params: PyTree) -> PyTree:
    with jax.ensure_compile_time_eval():
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)), params)


def build_influence_method(
    cell: Recurrent,
    params: PyTree,
    *,
    n: int | None = None,
    masks: Any = None,
    precision: Any = None,
    chunk: int | None = None,
    chunk_policy: str = "require",
    layout: Literal["diag", "table", "dense"] | None = None,
    verify: bool = True,
    input_size: int | None = None,
) -> OnlineMethod:
    """Exact RTRL (``n=None``) or SnAp-n for ``cell``: the compressed, chunked or dense form.

    ``layout`` picks the compressed storage (``"dense"`` also forces the generic path's dense
    storage, the others its pattern storage); ``input_size`` is read only on the generic path,
    where it lets SnAp-n store just its pattern (:func:`snapjax.methods.dense.dense_method`).

    Raises:
      ValueError: ``chunk`` for a SnAp order other than 1, or for a cell without a compressed
        form (with ``chunk_policy="require"``); a user spec that disagrees with autodiff.
    """
    name = "rtrl" if n is None else f"snap{n}"
    if chunk is not None and n not in (None, 1):
        if chunk_policy == "require":
            raise ValueError(f"chunk= is only for 'rtrl' and 'snap1', not {name!r}")
        chunk = None  # "prefer": SnAp-n, n >= 2, has no chunked form; run it per step
    if cell.spec is None:
        if chunk is not None and chunk_policy == "require":
            raise ValueError(f"{cell.name}: {name!r} with chunk= needs a cell with a compressed form (CellSpec)")
        storage = None if layout is None else "dense" if layout == "dense" else "pattern"
        return dense_method(cell, params, n=n, masks=masks, precision=precision, input_size=input_size,
                            storage=storage)
    if verify:
        verify_spec(cell.spec, params, masks)
    if chunk is not None and int(chunk) > 1:
        return chunked_method(cell, params, n=n, chunk=int(chunk), masks=masks, precision=precision)
    kind = "rtrl" if n is None else "snap"
    tracker = influence_tracker(cell.spec, _shapes(params), kind, n, masks=masks, precision=precision, layout=layout)
    return CompressedInfluence(cell, tracker, name)


def _build_rtrl(cell: Recurrent, params: PyTree, **options: Any) -> OnlineMethod:
    return build_influence_method(cell, params, n=None, **options)


def _build_snap1(cell: Recurrent, params: PyTree, **options: Any) -> OnlineMethod:
    return build_influence_method(cell, params, n=1, **options)


_OPTIONS = ("masks", "precision", "chunk", "layout", "verify", "input_size")
register_method("rtrl", _build_rtrl, options=_OPTIONS,
                summary="exact RTRL: the full influence J_t = D_t J_{t-1} + I_t (chunk=K: forward-backward hybrid)")
register_method("snap", build_influence_method, options=_OPTIONS, ordered=True,
                summary="SnAp-n: the influence masked to its n-step pattern (n >= k: exact RTRL)")
# Other names for the same methods (what "snap1" / "rtrl" build, with the same options).
register_method("drtrl", _build_snap1, options=_OPTIONS, aliases=("d_rtrl",),
                summary="D-RTRL (braintrace): SnAp-1, one diagonal influence trace per parameter")
register_method("ostl", _build_rtrl, options=_OPTIONS,
                summary="OSTL (Bohnstingl et al. 2022): exact RTRL per layer (a stack: spatial backprop)")
