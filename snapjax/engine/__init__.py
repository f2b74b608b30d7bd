"""The exact engine: per-step Jacobians in compressed form and the influence they propagate.

* :mod:`~snapjax.engine.jacobians`: ``D_t`` and ``I_t`` of a :class:`snapjax.CellSpec` step in
  compressed form (unit-wise partials, outer products, never a ``k × p`` matrix);
* :mod:`~snapjax.engine.verify`: the check of a spec's compressed Jacobians against autodiff;
* :mod:`~snapjax.engine.patterns`: SnAp-n patterns and the compressed storage layouts;
* :mod:`~snapjax.engine.sparsity`: static parameter masks and size reports;
* :mod:`~snapjax.engine.influence`: the masked influence pytree and its propagation
  ``J_t = (D_t J_{t-1} + I_t) ⊙ M_n``;
* :mod:`~snapjax.engine.native`: a CPU kernel (XLA FFI) that updates SnAp-1's diagonal influence
  and forms the step's gradient in one pass.

Imports only :mod:`snapjax.cells`.
"""
