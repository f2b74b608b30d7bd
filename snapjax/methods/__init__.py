"""Online gradient methods behind one interface (:class:`OnlineMethod`), built by name.

==================  ========================================================================
name                method
==================  ========================================================================
``"rtrl"``          exact RTRL (compressed Jacobians; dense per-example Jacobians for
                    generic cells); with ``chunk=K`` the exact forward-backward hybrid
``"snap1"`` ...     SnAp-n (``"snapN"``, or ``"snap"`` with ``n=N``); ``n >= k`` is RTRL;
                    ``"snap1"`` with ``chunk=K`` is chunked SnAp-1
``"uoro"``          UORO, rank-one unbiased estimate (any cell)
``"tbptt"``         truncated BPTT over windows of ``window`` steps (any cell)
``"activity"``      exact RTRL that skips silent units (activity-sparse cells such as EGRU)
==================  ========================================================================

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.LSTMCell(3)
    >>> params = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(1), (1, 2)),
    ...                    jnp.zeros((1, 2)))["params"]
    >>> options = {"tbptt": {"window": 4}}
    >>> [sj.online_method(m, cell, params, **options.get(m, {})).period for m in ("rtrl", "snap2", "uoro", "tbptt")]
    [1, 1, 1, 4]
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import jax
import numpy as np

from snapjax.methods.base import OnlineMethod, StepResult, select_examples
from snapjax.recurrent import Recurrent, as_recurrent

PyTree = Any

__all__ = ["OnlineMethod", "StepResult", "online_method", "parse_method_name", "check_options", "uses_window", "select_examples"]


def parse_method_name(name: str, n: int | None = None) -> tuple[str, int | None]:
    """Normalise a method name to ``(kind, n)``: ``("rtrl", None)``, ``("snap", n)``,
    ``("uoro", None)``, ``("tbptt", None)`` or ``("activity", None)``.

    Raises:
      ValueError: unknown name, or an ``n`` that does not fit it.
    """
    if not isinstance(name, str):
        raise ValueError(f"method must be a string such as 'snap1', got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("uoro", "tbptt", "activity", "activityrtrl"):
        if n is not None:
            raise ValueError(f"method {name!r} takes no n")
        return ("activity" if key.startswith("activity") else key), None
    from snapjax.influence import parse_method

    try:
        return parse_method(name, n)
    except ValueError as err:
        raise ValueError(
            f"{err}; known methods: 'rtrl', 'snap1', 'snap2', 'snapN', 'uoro', 'tbptt', 'activity'"
        ) from None


def uses_window(name: str) -> bool:
    """Whether the method ``name`` takes a ``window`` (truncated BPTT)."""
    return parse_method_name(name)[0] == "tbptt"


def check_options(
    name: str, n: int | None = None, window: int | None = None, *, strict: bool = True
) -> tuple[str, int | None]:
    """Validate a method name with its options (no cell needed); returns ``(kind, n)``.

    ``strict=False`` lets a ``window`` pass for methods that take none (it is then ignored; a
    model mixing truncated BPTT with other methods shares one ``window`` option).

    Raises:
      ValueError: unknown name, ``n`` that does not fit, ``window`` missing for ``"tbptt"`` or
        (``strict``) given for another method.
    """
    kind, n = parse_method_name(name, n)
    if kind == "tbptt" and window is None:
        raise ValueError("method 'tbptt' needs window=W, W >= 1 (OnlineLearner: tbptt_window=W)")
    if kind != "tbptt" and window is not None and strict:
        raise ValueError(f"window= (OnlineLearner: tbptt_window=) is only for 'tbptt', not {name!r}")
    return kind, n


def _shapes(params: PyTree) -> PyTree:
    with jax.ensure_compile_time_eval():
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)), params)


def online_method(
    name: str,
    cell: Any,
    params: PyTree,
    *,
    n: int | None = None,
    masks: Mapping[str, Any] | None = None,
    precision: Any = None,
    window: int | None = None,
    chunk: int | None = None,
    chunk_policy: str = "require",
    layout: Literal["diag", "table", "dense"] | None = None,
    block: int | float | None = None,
    eps: float = 1e-7,
    input_size: int | None = None,
    verify: bool = True,
    strict_options: bool = True,
    batch_axis: str | None = None,
) -> OnlineMethod:
    """Build the online method ``name`` for ``cell`` with parameters shaped like ``params``.

    Args:
      name: see the module table (``"rtrl"``, ``"snap1"``, ``"snapN"``, ``"uoro"``, ``"tbptt"``,
        ``"activity"``).
      cell: a snapjax cell, a flax.linen cell, a :class:`snapjax.CellSpec`, a
        :class:`snapjax.Recurrent`, or any flax.linen module ``(carry, x) -> (carry, y)``.
      params: the cell's parameters (``variables['params']``); only shapes and dtypes are read.
      n: SnAp order with ``name="snap"``.
      masks: static 0/1 masks per projection name (parameter sparsity).
      precision: matmul precision of the propagation (``"highest"`` for full float32 on GPUs).
      window: truncated BPTT window (``"tbptt"`` only).
      chunk: ``K > 1`` runs exact RTRL / SnAp-1 chunk-wise (forward-backward hybrid): the
        gradient is complete every ``K`` steps (``period == K``), and parameters must be held
        fixed within a chunk (update every ``K`` steps).
      chunk_policy: ``"require"`` (a method without a chunked form raises) or ``"prefer"``
        (such a method is built per step; the learner uses this when ``update_every > 1``).
      layout: SnAp-n storage override (``"table"`` or ``"dense"``).
      block: units per block of the activity-sparse method.
      eps: UORO's stabiliser.
      input_size: ``n_in`` for truncated BPTT on a generic cell (read from ``params`` otherwise).
      strict_options: ``False`` ignores a ``window`` given to a method that takes none.
      verify: check a user :class:`snapjax.CellSpec` against ``jax.jvp`` of its step before use.
      batch_axis: the mesh axis the batch is split over inside ``jax.shard_map`` (the
        learner's ``batch_axis``); only UORO's random signs depend on it.

    Raises:
      ValueError: unknown method, option that does not apply, unsupported cell, a user cell
        whose compressed Jacobians disagree with autodiff.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> [sj.online_method(m, cell, params).name for m in ("rtrl", "snap1", "snap2", "uoro")]
        ['rtrl', 'snap1', 'snap2', 'uoro']
        >>> [sj.online_method(m, cell, params, **kw).period
        ...  for m, kw in [("tbptt", {"window": 8}), ("rtrl", {"chunk": 4}), ("snap1", {})]]
        [8, 4, 1]
        >>> sj.online_method("bptt", cell, params)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: unknown method 'bptt': ...; known methods: 'rtrl', 'snap1', 'snap2', 'snapN', 'uoro', 'tbptt', 'activity'
    """
    kind, n = check_options(name, n, window, strict=strict_options)
    if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(masks)):
        raise ValueError("masks must be static (NumPy) arrays, not traced values: build the method outside jit")
    rec = as_recurrent(cell)
    if chunk_policy not in ("require", "prefer"):
        raise ValueError(f"chunk_policy must be 'require' or 'prefer', got {chunk_policy!r}")
    if chunk is not None and not (kind == "rtrl" or (kind == "snap" and n == 1)):
        if chunk_policy == "require":
            raise ValueError(f"chunk= is only for 'rtrl' and 'snap1', not {name!r}")
        chunk = None  # "prefer": this method has no chunked form; run it per step
    if kind == "tbptt":
        from snapjax.methods.tbptt import TBPTT

        return TBPTT.build(rec, params, window=window, masks=masks, precision=precision, input_size=input_size)  # type: ignore[arg-type]  # check_options: not None
    if kind == "uoro":
        from snapjax.uoro import uoro_method

        return uoro_method(rec, params, masks=masks, eps=eps, precision=precision, batch_axis=batch_axis)
    if rec.spec is None:
        if kind == "activity" or (chunk is not None and chunk_policy == "require"):
            raise ValueError(f"{rec.name}: {name!r} needs a cell with a compressed form (CellSpec)")
        from snapjax.methods.generic import dense_method

        return dense_method(rec, params, n=n, masks=masks, precision=precision)
    if verify:
        from snapjax.cells import verify_spec

        verify_spec(rec.spec, params, masks)
    if kind == "activity":
        from snapjax.activity import activity_method

        return activity_method(rec, params, masks=masks, block=block, precision=precision)
    if chunk is not None and int(chunk) > 1:
        from snapjax.methods.chunked import chunked_method

        return chunked_method(rec, params, n=n, chunk=int(chunk), masks=masks, precision=precision)
    from snapjax.influence import influence_tracker
    from snapjax.methods.compressed import CompressedInfluence

    tracker = influence_tracker(rec.spec, _shapes(params), kind, n, masks=masks, precision=precision, layout=layout)
    return CompressedInfluence(rec, tracker, "rtrl" if kind == "rtrl" else f"snap{n}")
