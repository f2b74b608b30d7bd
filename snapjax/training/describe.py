"""The cost preview of a learner, before it runs: :meth:`snapjax.OnlineLearner.describe`.

``describe(learner, batch_size=B, input_size=n)`` builds nothing of size: the state's shapes come
from ``jax.eval_shape`` of ``learner.init`` (only the parameters are made, to build the methods)
and it returns a :class:`LearnerCost`, whose ``str`` is a table.  Per layer
(:class:`~snapjax.training.cost_model.LayerCost`): the cell, the method, the path that serves it,
the method state per example (bytes; leaves shared by the batch, such as a PRNG key, apart), the
parameters, the estimated FLOPs per example and step and the method-state bytes read and written
per example and step (paths and formulas: :mod:`snapjax.training.cost_model`); then the whole
state, the lower bound of memory ``init`` checks, the device's limit
(:mod:`snapjax.training.init_checks`) and the slow-path warnings.

``compiled=True`` (the default) also compiles the jitted run of ``steps`` steps (default: the
optimizer period) for abstract inputs and reports XLA's ``memory_analysis()``
(:class:`CompiledMemory`: argument, output, aliased (donated), temporary and peak bytes) with the
compile time; nothing is allocated, but compiling takes seconds for a small model and can take
minutes for a large one (``compiled=False`` skips it).  Measured on a 2-core CPU (jax 0.10.2): a
GRU with 8 units 4 s, a GRU-256 at batch 64 4 s (SnAp-1), 7 s (exact RTRL) and 13 s (chunked
RTRL, 32 steps).  The table leaves ``peak_bytes`` (XLA's ``peak_memory_in_bytes``) out: XLA:CPU
reported it below the temporaries.

Example::

    >>> import flax.linen as nn, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(8), readout_size=3, method="snap1")
    >>> cost = learner.describe(batch_size=4, input_size=5, compiled=False)
    >>> row = cost.layers[0]
    >>> row.layer, row.method, row.path, row.params, row.state_bytes    # SnAp-1: one float per parameter
    ('layers_0', 'snap1', 'compressed/diag', 344, 1376)
    >>> "compressed/diag" in str(cost)
    True
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.training import init_checks
from snapjax.training.cost_model import layer_rows, memory_lower_bound, tree_bytes
from snapjax.training.describe_text import table

PyTree = Any

__all__ = ["CompiledMemory", "LearnerCost", "describe"]


class CompiledMemory(NamedTuple):
    """XLA's ``memory_analysis()`` of the compiled run (bytes), its steps and compile seconds.

    Example::

        >>> import flax.linen as nn, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
        >>> mem = learner.describe(batch_size=2, input_size=3).compiled
        >>> mem.steps, mem.temp_bytes > 0
        (1, True)
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int | None
    steps: int
    compile_seconds: float


class LearnerCost(NamedTuple):
    """What :meth:`snapjax.OnlineLearner.describe` returns; ``str()`` is the table.

    Attributes:
      batch_size, input_size, dtype, period: the configuration described.
      layers: one :class:`LayerCost` per layer.
      state_bytes: the whole :class:`snapjax.OnlineState` (parameters, optimizer, carries,
        method states).  estimate_bytes: the lower bound checked at ``init``.
      limit_bytes, limit_source: :func:`device_memory_limit` (``None``: unknown).
      compiled: :class:`CompiledMemory` or ``None``.  notes: the slow-path warnings' texts.

    Example::

        >>> import flax.linen as nn, snapjax as sj
        >>> cost = sj.OnlineLearner(nn.GRUCell(4), readout_size=2).describe(batch_size=2, input_size=3, compiled=False)
        >>> [r.path for r in cost.layers], cost.notes
        (['compressed/diag', 'feed-forward'], ())
    """

    batch_size: int
    input_size: int
    dtype: str
    period: int
    layers: tuple
    state_bytes: int
    estimate_bytes: int
    limit_bytes: int | None
    limit_source: str
    compiled: CompiledMemory | None
    notes: tuple

    def __str__(self) -> str:
        return table(self)


def describe(learner: Any, *, batch_size: int, input_size: int, params: PyTree | None = None,
             compiled: bool = True, steps: int | None = None, targets: Any = None) -> LearnerCost:
    """The cost preview of ``learner`` (module docstring); see :meth:`snapjax.OnlineLearner.describe`."""
    key = jax.random.key(0)
    init = functools.partial(learner.init, batch_size=batch_size, input_size=input_size)
    with init_checks.unchecked():
        abstract = jax.eval_shape(lambda k, p: init(k, p), key, params)
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.params)
    methods = learner.methods(concrete, input_size)
    dtype = jnp.result_type(*jax.tree.leaves(concrete))
    rows = layer_rows(learner, methods, concrete, batch_size, dtype)
    total = tree_bytes(abstract)
    limit, source = init_checks.device_memory_limit()  # looked up here: a test may replace it
    period = learner.period(concrete)
    mem = None
    if compiled:
        T = int(steps) if steps is not None else period
        xs = jax.ShapeDtypeStruct((T, batch_size, input_size), dtype)
        if targets is None:
            out = jax.eval_shape(lambda s, x: learner.predict(s, x)[0], abstract, xs)
            targets = (jax.ShapeDtypeStruct((T, batch_size), jnp.int32) if learner.loss == "softmax_xent"
                       else jax.ShapeDtypeStruct(out.shape, out.dtype))
        t0 = time.perf_counter()
        stats = learner.run_jit.lower(abstract, xs, targets).compile().memory_analysis()
        mem = CompiledMemory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                             int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                             getattr(stats, "peak_memory_in_bytes", None), T, time.perf_counter() - t0)
    notes = tuple(n for _, n in init_checks.slow_path_notes(learner, methods, concrete, input_size))
    return LearnerCost(int(batch_size), int(input_size), np.dtype(dtype).name, period, tuple(rows), total,
                       memory_lower_bound(learner, methods, concrete, rows, batch_size, dtype), limit, source, mem,
                       notes)
