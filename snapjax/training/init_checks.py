"""What :meth:`snapjax.OnlineLearner.init` checks before it allocates a state.

A :class:`SlowPathWarning` for each layer served by a slow
path where a faster one gives the same result (:func:`slow_path_notes`), and a
:class:`MemoryLimitError` when a lower bound of the memory (the state, one new copy of each
method state written per step, the generic path's per-example Jacobians) exceeds
:func:`device_memory_limit`: the accelerator's ``memory_stats()["bytes_limit"]``, on CPU the
host memory available (``/proc/meminfo`` and the cgroup limit); ``SNAPJAX_MEMORY_LIMIT`` (bytes,
or ``off``) overrides it.

Example (a limit given through the environment: a state of a few KiB does not fit in 1000 bytes)::

    >>> import os, flax.linen as nn, jax, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
    >>> os.environ["SNAPJAX_MEMORY_LIMIT"] = "1000"
    >>> try:
    ...     learner.init(jax.random.key(0), batch_size=2, input_size=3)
    ... except sj.MemoryLimitError as e:
    ...     print(str(e)[:40])
    ... finally:
    ...     del os.environ["SNAPJAX_MEMORY_LIMIT"]
    OnlineLearner.init: batch 2 needs at lea
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import jax

from snapjax.methods.compressed import CompressedInfluence
from snapjax.methods.dense import DenseInfluence
from snapjax.methods.generic_pattern import pattern_layout
from snapjax.training.cost_model import layer_rows, memory_lower_bound
from snapjax.training.describe_text import fmt_bytes
from snapjax.training.model import input_sizes

PyTree = Any

__all__ = ["MemoryLimitError", "SlowPathWarning", "check_init", "device_memory_limit", "slow_path_notes", "unchecked"]


class SlowPathWarning(UserWarning):
    """A layer runs on a slow path where a faster one gives the same gradients (see
    :func:`slow_path_notes`); the message names the layer and the change to make.

    Example::

        >>> import warnings, flax.linen as nn, jax, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl", update_every=4, chunked=False)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> [w.category.__name__ for w in caught]
        ['SlowPathWarning']
    """


class MemoryLimitError(ValueError):
    """The memory a learner needs at least exceeds the device's (raised by ``learner.init``; the
    message gives the estimate, the limit, the largest layer and what to change).

    Example::

        >>> import flax.linen as nn, jax, snapjax as sj
        >>> issubclass(sj.MemoryLimitError, ValueError)
        True
    """


def slow_path_notes(learner: Any, methods: tuple, params: PyTree, input_size: int) -> list[tuple[str, str]]:
    """``(layer, message)`` for every layer on a slow path that a faster one would serve:

    * exact RTRL or SnAp-1 stepped per step on a compressed cell while the optimizer steps
      every ``K > 1`` steps: the chunked form (``chunk=K``) gives the same gradients and moves
      the influence once per chunk (``O(k²p)/K`` instead of ``O(k²p)`` per step for RTRL);
    * SnAp-n on the generic path held to the dense storage (``layout='dense'``: the full ``k·p``
      influence, SnAp-1 of a unit-local cell needs ``p``) where the pattern storage would gather
      some columns (:mod:`snapjax.methods.generic_pattern`): exact RTRL costs the same there.

    Example::

        >>> import flax.linen as nn, jax, snapjax as sj
        >>> from snapjax.training.init_checks import slow_path_notes
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl", update_every=4, chunked=False)
        >>> cost = learner.describe(batch_size=2, input_size=3, compiled=False)
        >>> cost.notes[0][:60]
        "layers_0: 'rtrl' runs per step while the parameters change o"
    """
    K = learner.period(params)
    sizes = input_sizes(learner.stages, params, input_size)
    notes = []
    for stage, method in zip([s for s in learner.stages if s.recurrent], methods):
        layer = "+".join(stage.names)
        # exact RTRL (n None) or SnAp-1 stored diagonal or dense: the orders with a chunked form
        if (isinstance(method, CompressedInfluence) and K > 1 and method.tracker.n in (None, 1)
                and method.tracker.layout in ("diag", "dense")):
            fix = ("chunked=True" if not learner.chunked else
                   f"update_every={K}" if learner.update_every is None else f"chunk={K}")
            notes.append((layer, (
                f"{layer}: {method.name!r} runs per step while the parameters change only every {K} steps; its "
                f"chunked form gives the same gradients and reads and writes the influence once per {K} steps "
                f"instead of every step: pass {fix} to OnlineLearner (see docs/concepts/chunked.md)")))
        n_in = sizes.get(stage.index)
        if (isinstance(method, DenseInfluence) and method.n is not None and method.storage == "dense"
                and n_in is not None and (pat := method.pattern(n_in)) is not None and pattern_layout(pat).groups):
            stored, pattern = method.num_stored(), method.pattern_count(n_in)
            notes.append((layer, (
                f"{layer}: {method.name!r} on the generic path stores the full influence ({stored:,} floats per "
                f"example) while its pattern has {pattern:,} entries and some of its columns would be stored "
                f"gathered: it costs as much as exact RTRL; drop layout='dense' from method_options (the pattern "
                f"storage), or use method='rtrl' (the same storage, exact gradients)")))
    return notes


def _limit_from_env() -> tuple[int | None, str] | None:
    raw = os.environ.get("SNAPJAX_MEMORY_LIMIT")
    if raw is None or not raw.strip():
        return None
    if raw.strip().lower() in ("off", "none", "0"):
        return None, "SNAPJAX_MEMORY_LIMIT=off"
    try:
        return int(float(raw)), "SNAPJAX_MEMORY_LIMIT"
    except ValueError:
        raise MemoryLimitError(f"SNAPJAX_MEMORY_LIMIT must be a number of bytes or 'off', got {raw!r}") from None


def _host_available() -> int | None:
    """Host memory available to this process: ``MemAvailable`` capped by the cgroup's limit."""
    found = []
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/memory.max") as f, \
            open("/sys/fs/cgroup/memory.current") as g:
        cap = f.read().strip()
        if cap != "max":
            found.append(int(cap) - int(g.read().strip()))
    if not found:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def device_memory_limit(device: Any = None) -> tuple[int | None, str]:
    """``(bytes, where the figure comes from)`` the state may use on ``device`` (default: the
    first device): ``SNAPJAX_MEMORY_LIMIT`` if set (``off``: no limit), an accelerator's
    ``memory_stats()["bytes_limit"]``, else the host memory available; ``None`` if unknown.

    Example::

        >>> from snapjax.training.init_checks import device_memory_limit
        >>> limit, source = device_memory_limit()
        >>> limit is None or limit > 0
        True
    """
    env = _limit_from_env()
    if env is not None:
        return env
    device = device if device is not None else jax.devices()[0]
    stats = None
    with contextlib.suppress(Exception):  # not every backend has memory statistics
        stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} bytes_limit"
    return _host_available(), "host memory available"


_SKIP_CHECK: list[bool] = []


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Within it, :func:`check_init` checks nothing (describe's abstract ``init``)."""
    _SKIP_CHECK.append(True)
    try:
        yield
    finally:
        _SKIP_CHECK.pop()


def check_init(learner: Any, params: PyTree, methods: tuple, batch: int, input_size: int, dtype: Any) -> None:
    """What ``learner.init`` checks before allocating: warns (:class:`SlowPathWarning`) for each
    :func:`slow_path_notes` entry and raises :class:`MemoryLimitError` when the lower bound of
    the memory exceeds :func:`device_memory_limit` (not checked with a mesh axis: the state is
    split over devices)."""
    if _SKIP_CHECK:
        return
    for _, note in slow_path_notes(learner, methods, params, input_size):
        warnings.warn(note, SlowPathWarning, stacklevel=3)
    if learner.batch_axis is not None or learner.param_axis is not None:
        return
    limit, source = device_memory_limit()
    if limit is None:
        return
    rows = layer_rows(learner, methods, params, batch, dtype)
    total = memory_lower_bound(learner, methods, params, rows, batch, dtype)
    fixed = memory_lower_bound(learner, methods, params, [], batch, dtype)
    if total <= limit:
        return
    big = max(rows, key=lambda r: r.state_bytes)
    fit = max(0, (limit - fixed) * batch // max(total - fixed, 1))
    raise MemoryLimitError(
        f"OnlineLearner.init: batch {batch} needs at least {fmt_bytes(total)} (the state and one new copy of each "
        f"method state per step; XLA's temporaries come on top), more than the {fmt_bytes(limit)} of this device "
        f"({source}). The largest layer is {big.layer} ({big.cell}, {big.method!r} on the {big.path} path): "
        f"{fmt_bytes(big.state_bytes)} per example. Use a smaller batch_size (about {fit} fit), a cheaper method "
        f"(method='snap1': one float per parameter; chunk=K for exact RTRL; 'uoro' or 'tbptt'), or set "
        f"SNAPJAX_MEMORY_LIMIT (bytes, or 'off') if the limit is wrong; learner.describe(batch_size=..., "
        f"input_size=...) shows every layer's cost")
