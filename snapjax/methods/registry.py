"""The method registry: every online method by name, and :func:`online_method`, the one builder.

Each method's own file registers it with :func:`register_method`: its name (and aliases), the
keyword options of :func:`online_method` it takes, a one-line summary, and ``build(cell,
params, **options) -> OnlineMethod``.  :func:`online_method` looks the name up, converts the
cell once (:func:`snapjax.as_recurrent`) and passes the method exactly the options it declared;
nothing here knows any method by name.  Users register their own methods the same way, and the
learner then drives them like the built-in ones.

Names are case-insensitive and ignore ``-`` and ``_`` (``"SnAp-1"`` is ``"snap1"``).  A method
registered with ``ordered=True`` takes an order ``n``, given as a suffix (``"snap2"``) or as
``n=2``.

Example (a user method: SnAp-1 under a name of one's own, trained like any other)::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> def build(cell, params, *, masks=None, precision=None):
    ...     return sj.online_method("snap1", cell, params, masks=masks, precision=precision)
    >>> sj.register_method("my_diag", build, options=("masks", "precision"),
    ...                    summary="SnAp-1 under another name")
    >>> "my_diag" in sj.registered_methods()
    True
    >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
    >>> sj.online_method("my-diag", nn.GRUCell(4), params).name
    'snap1'
    >>> sj.unregister_method("my_diag")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from snapjax.cells.recurrent import as_recurrent
from snapjax.methods.base import OnlineMethod
from snapjax.methods.generic_support import check_precision

PyTree = Any

__all__ = [
    "MethodEntry", "register_method", "unregister_method", "registered_methods", "lookup_method",
    "online_method", "check_options", "uses_window", "parse_method_name", "OPTIONS",
]

#: Every keyword option :func:`online_method` accepts, with what it means.  A method declares
#: the subset it takes; ``build`` receives those (``None`` where the caller gave none).
OPTIONS: Mapping[str, str] = {
    "n": "order of an ordered method (SnAp-n)",
    "masks": "static 0/1 kernel masks per projection name (parameter sparsity)",
    "precision": "matmul precision of the method's own products ('highest': full float32 on GPUs)",
    "window": "window length in steps (truncated BPTT)",
    "chunk": "K > 1: run chunk-wise (forward-backward hybrid; parameters fixed within a chunk)",
    "layout": "SnAp-n storage override ('table' or 'dense')",
    "block": "units per block (activity-sparse RTRL)",
    "eps": "stabiliser of a norm ratio (UORO)",
    "decay": "trace decay factor in [0, 1) (ES-D-RTRL; e-prop's filter κ)",
    "rank": "number of Kronecker terms kept (OK)",
    "input_size": "the cell's input size where params do not tell it (generic cells)",
    "verify": "check a user CellSpec against autodiff before use",
    "batch_axis": "mesh axis the batch is split over inside jax.shard_map (per-device random streams)",
}


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes:
      name: canonical name (as registered; looked up case- and ``-``/``_``-insensitively).
      build: ``build(cell: Recurrent, params, **options) -> OnlineMethod``.
      options: the keyword options of :func:`online_method` it takes (keys of :data:`OPTIONS`).
      summary: one line for tables and error messages.
      aliases: other names for it.
      ordered: takes an order ``n`` (``"snapN"`` / ``n=N``).

    Example::

        >>> import snapjax as sj
        >>> entry = sj.registered_methods()["tbptt"]
        >>> isinstance(entry, sj.MethodEntry), entry.ordered, sorted(entry.options)
        (True, False, ['input_size', 'masks', 'precision', 'window'])
    """

    name: str
    build: Callable[..., OnlineMethod]
    options: frozenset
    summary: str = ""
    aliases: tuple[str, ...] = ()
    ordered: bool = False


_REGISTRY: dict[str, MethodEntry] = {}  # canonical name -> entry
_KEYS: dict[str, str] = {}  # normalised name or alias -> canonical name


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_method(
    name: str,
    build: Callable[..., OnlineMethod],
    *,
    options: Iterable[str] = (),
    summary: str = "",
    aliases: Iterable[str] = (),
    ordered: bool = False,
    replace: bool = False,
) -> None:
    """Register an online method so :func:`online_method` and :class:`snapjax.OnlineLearner`
    build it by name.

    Args:
      name: the method's name (letters, digits, ``-``/``_``; an ordered method's name must not
        end in a digit).
      build: ``build(cell, params, **options) -> OnlineMethod``; ``cell`` is the
        :class:`snapjax.Recurrent` view, ``params`` the cell's parameters (shapes and dtypes
        are what a builder should read), ``options`` the declared options.
      options: which keyword options of :func:`online_method` the method takes (see
        :data:`OPTIONS`); others given to :func:`online_method` are refused (``window``,
        ``chunk``) or ignored (the rest, so a stack can share one set of options).  A method
        that declares ``chunk`` also receives ``chunk_policy``.
      summary: one line for tables and error messages.
      aliases: other names.
      ordered: the method takes an order ``n`` (``"nameN"`` or ``n=N``); ``n`` is then passed
        to ``build``.
      replace: allow replacing an existing registration of the same name.

    Raises:
      ValueError: a bad name, an unknown option, or a name already taken (without ``replace``).

    Example (exact RTRL under a second name; the learner builds it like any other)::

        >>> import flax.linen as nn, jax, optax, snapjax as sj
        >>> sj.register_method("exact", lambda cell, params, masks=None: sj.online_method("rtrl", cell, params,
        ...                    masks=masks), options=("masks",), summary="exact RTRL, another name")
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="exact", optimizer=optax.sgd(0.1))
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> learner.methods(state.params)[0].name
        'rtrl'
        >>> sj.register_method("exact", lambda cell, params: None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: method 'exact' is already registered; pass replace=True to replace it
        >>> sj.unregister_method("exact")
    """
    if not isinstance(name, str) or not name or not _key(name).isalnum():
        raise ValueError(f"method name must be a non-empty string of letters, digits, '-' and '_', got {name!r}")
    if not callable(build):
        raise ValueError(f"build must be callable (cell, params, **options) -> OnlineMethod, got {type(build).__name__}")
    opts = frozenset(options)
    unknown = opts - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name!r}; options are {sorted(OPTIONS)}")
    if ordered and _key(name)[-1].isdigit():
        raise ValueError(f"an ordered method's name must not end in a digit (it takes the order), got {name!r}")
    entry = MethodEntry(name, build, opts | ({"n"} if ordered else set()), summary, tuple(aliases), ordered)
    keys = [_key(name)] + [_key(a) for a in entry.aliases]
    for k in keys:
        owner = _KEYS.get(k)
        if owner is not None and owner != name and not replace:
            raise ValueError(f"method name {k!r} is already registered (by {owner!r}); pass replace=True")
    if name in _REGISTRY:
        if not replace:
            raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it")
        unregister_method(name)
    _REGISTRY[name] = entry
    for k in keys:
        _KEYS[k] = name


def unregister_method(name: str) -> None:
    """Remove a registered method (``KeyError`` if there is none of that name).

    Example::

        >>> import snapjax as sj
        >>> sj.register_method("tmp", lambda cell, params: sj.online_method("snap1", cell, params))
        >>> sj.unregister_method("tmp")
        >>> "tmp" in sj.registered_methods()
        False
    """
    entry = _REGISTRY.pop(name)
    for k in [_key(entry.name)] + [_key(a) for a in entry.aliases]:
        if _KEYS.get(k) == name:
            del _KEYS[k]


def registered_methods() -> dict[str, MethodEntry]:
    """The registered methods, canonical name -> :class:`MethodEntry`, in registration order.

    Example::

        >>> import snapjax as sj
        >>> list(sj.registered_methods())[:7]
        ['rtrl', 'snap', 'drtrl', 'ostl', 'uoro', 'tbptt', 'activity']
        >>> sj.registered_methods()["snap"].ordered
        True
    """
    return dict(_REGISTRY)


def _known() -> str:
    names = [f"'{e.name}N'" if e.ordered else f"'{e.name}'" for e in _REGISTRY.values()]
    return ", ".join(names)


def lookup_method(name: str, n: int | None = None) -> tuple[MethodEntry, int | None]:
    """The entry and order for ``name`` (``"snap2"`` -> the ``"snap"`` entry with ``n = 2``).

    Raises:
      ValueError: not a string, an unknown name (the message lists the registered ones), an
        order given to a method that takes none, or a missing / invalid / conflicting order.
    """
    if not isinstance(name, str):
        raise ValueError(f"method must be a string such as 'snap1', got {type(name).__name__}")
    key = _key(name)
    entry, suffix = None, None
    if key in _KEYS:
        entry = _REGISTRY[_KEYS[key]]
    else:
        for e in _REGISTRY.values():
            base = _key(e.name)
            if e.ordered and key.startswith(base) and key[len(base):].isdigit():
                entry, suffix = e, int(key[len(base):])
                break
    if entry is None:
        raise ValueError(f"unknown method {name!r}; known methods: {_known()}")
    if not entry.ordered:
        if n is not None:
            raise ValueError(f"method {name!r} takes no n")
        return entry, None
    if suffix is not None:
        if n is not None and n != suffix:
            raise ValueError(f"method {name!r} conflicts with n={n}")
        n = suffix
    if n is None:
        raise ValueError(f"method {name!r} needs n (e.g. method='{entry.name}', n=1, or '{entry.name}1')")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{entry.name}-n needs an integer n >= 1, got n={n!r}")
    return entry, int(n)


def parse_method_name(name: str, n: int | None = None) -> tuple[str, int | None]:
    """``(canonical name, n)`` of a method name: ``"SnAp-2"`` -> ``("snap", 2)``."""
    entry, n = lookup_method(name, n)
    return entry.name, n


def uses_window(name: str) -> bool:
    """Whether the method ``name`` takes a ``window`` (truncated BPTT)."""
    return "window" in lookup_method(name)[0].options


def check_options(
    name: str, n: int | None = None, window: int | None = None, *, strict: bool = True
) -> tuple[str, int | None]:
    """Validate a method name with its order and window (no cell needed); ``(name, n)``.

    ``strict=False`` lets a ``window`` pass for methods that take none (it is then ignored: a
    model mixing truncated BPTT with other methods shares one ``window`` option).

    Raises:
      ValueError: unknown name, an ``n`` that does not fit, ``window`` missing for a method that
        needs one or (``strict``) given to one that takes none.
    """
    entry, n = _checked(name, n, window, strict)
    return entry.name, n


def _checked(name: str, n: int | None, window: int | None, strict: bool) -> tuple[MethodEntry, int | None]:
    """:func:`check_options`, returning the entry itself."""
    entry, n = lookup_method(name, n)
    if "window" in entry.options and window is None:
        raise ValueError(f"method {entry.name!r} needs window=W, W >= 1 (OnlineLearner: tbptt_window=W)")
    if "window" not in entry.options and window is not None and strict:
        takers = [e.name for e in _REGISTRY.values() if "window" in e.options]
        raise ValueError(f"window= (OnlineLearner: tbptt_window=) is only for methods with a window "
                         f"({', '.join(map(repr, takers))}), not {name!r}")
    return entry, n


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
    layout: str | None = None,
    block: int | float | None = None,
    eps: float | None = None,
    decay: float | None = None,
    rank: int | None = None,
    input_size: int | None = None,
    verify: bool = True,
    strict_options: bool = True,
    batch_axis: str | None = None,
) -> OnlineMethod:
    """Build the registered online method ``name`` for ``cell`` with parameters shaped like ``params``.

    Args:
      name: a registered name (:func:`registered_methods`; the built-in ones are listed in
        :mod:`snapjax.methods`).
      cell: a snapjax cell, a flax.linen cell, a :class:`snapjax.CellSpec`, a
        :class:`snapjax.Recurrent`, or any flax.linen module ``(carry, x) -> (carry, y)``.
      params: the cell's parameters (``variables['params']``); only shapes and dtypes are read.
      n: order of an ordered method (``name="snap"``).
      masks: static 0/1 kernel masks per projection name (parameter sparsity).
      precision: matmul precision of the method's products (``"highest"``: full float32 on GPUs).
      window: window length in steps (truncated BPTT).
      layout: SnAp-n storage override (``"table"`` or ``"dense"``).
      block: units per block (activity-sparse RTRL).
      eps: UORO's stabiliser (default ``1e-7``).
      decay: a trace's decay factor in ``[0, 1)`` (ES-D-RTRL).
      rank: Kronecker terms kept per factor pair (OK).
      input_size: the cell's input size where ``params`` do not tell it (generic cells).
      verify: check a user :class:`snapjax.CellSpec` against ``jax.jvp`` before use.
      batch_axis: the mesh axis the batch is split over inside ``jax.shard_map`` (the learner's
        ``batch_axis``); only random streams depend on it.
      chunk: ``K > 1`` runs a method chunk-wise (exact RTRL, SnAp-1): the gradient is complete
        every ``K`` steps (``period == K``) and parameters must be held fixed within a chunk.
      chunk_policy: ``"require"`` (a method that takes no ``chunk`` raises) or ``"prefer"``
        (such a method is built per step; the learner uses this when ``update_every > 1``).
      strict_options: ``False`` ignores a ``window`` given to a method that takes none.

    Each option reaches only the methods that declare it (:attr:`MethodEntry.options`); the
    others ignore it, except ``window`` and ``chunk`` (see above).

    Raises:
      ValueError: unknown method (the message lists the registered ones), an option that does
        not apply, an unsupported cell, a user cell whose compressed Jacobians disagree with
        autodiff.

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
        ValueError: unknown method 'bptt'; known methods: 'rtrl', 'snapN', ...
    """
    entry, n = _checked(name, n, window, strict_options)
    if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(masks)):
        raise ValueError("masks must be static (NumPy) arrays, not traced values: build the method outside jit")
    if chunk_policy not in ("require", "prefer"):
        raise ValueError(f"chunk_policy must be 'require' or 'prefer', got {chunk_policy!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (steps per chunk), got {chunk!r}")
    if isinstance(precision, (tuple, list)) and len(precision) == 2:
        for p in precision:
            check_precision(p)
    else:
        check_precision(precision)
    if chunk is not None and "chunk" not in entry.options:
        if chunk_policy == "require":
            raise ValueError(f"chunk= is only for methods with a chunked form ('rtrl', 'snap1'), not {name!r}")
        chunk = None  # "prefer": this method has no chunked form; run it per step
    given = dict(n=n, masks=masks, precision=precision, window=window, chunk=chunk, layout=layout, block=block,
                 eps=eps, decay=decay, rank=rank, input_size=input_size, verify=verify, batch_axis=batch_axis)
    kwargs = {k: v for k, v in given.items() if k in entry.options}
    if "chunk" in entry.options:  # a method with a chunked form for some orders decides with the policy
        kwargs["chunk_policy"] = chunk_policy
    return entry.build(as_recurrent(cell), params, **kwargs)
