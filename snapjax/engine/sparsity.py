"""Static parameter sparsity: random masks, applying them, and size reports.

Masks are NumPy bool arrays of a kernel's shape ``(n_in, units)`` keyed by projection name
(the format every snapjax tracker takes as ``masks=``).  They are static: the compressed
influence layouts are built from them once.  Biases and per-unit parameters are never masked.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.builtin import as_cell_spec
from snapjax.engine.influence import influence_tracker

Array = jax.Array
PyTree = Any

__all__ = ["random_masks", "apply_masks", "mask_updates", "density_report", "snap_pattern_size"]


def _rng(key_or_seed: Any) -> np.random.Generator:
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    try:  # a JAX PRNG key (typed or raw uint32)
        seed = int(jax.random.randint(key_or_seed, (), 0, np.iinfo(np.int32).max))
    except Exception as e:  # pragma: no cover - error path
        raise ValueError(f"key_or_seed must be an int, a numpy Generator or a jax PRNG key, got {key_or_seed!r}") from e
    return np.random.default_rng(seed)


def _kernel_sources(params: PyTree, spec: Any) -> dict[str, str]:
    """projection name -> "input" | "state"."""
    if spec is not None:
        spec = as_cell_spec(spec)
        return {p.name: p.source for p in spec.projections}
    # Without a spec: every sub-dict with a 2-D 'kernel'; flax.linen naming (GRU/LSTM/Simple
    # cells): recurrent projections start with 'h', input projections with 'i'.
    out = {}
    for name, leaf in params.items():
        if isinstance(leaf, Mapping) and "kernel" in leaf and np.ndim(leaf["kernel"]) == 2:
            out[name] = "state" if name.startswith("h") else "input"
    if not out:
        raise ValueError("params has no projection with a 2-D 'kernel'")
    return out


def random_masks(
    key_or_seed: Any,
    params: PyTree,
    density: float,
    *,
    spec: Any = None,
    include_input: bool = True,
    fan_in: bool = True,
) -> dict[str, np.ndarray]:
    """Static random masks at ``density`` for every weight matrix.

    Args:
      key_or_seed: int seed, ``np.random.Generator`` or JAX PRNG key.
      params: the cell's parameter dict (only kernel shapes are used).
      density: fraction of kept weights, in ``(0, 1]``.
      spec: optional cell / :class:`CellSpec` to tell input from recurrent projections
        (otherwise the flax naming convention is used: recurrent names start with ``'h'``).
      include_input: also mask the input kernels (else only the recurrent ones).
      fan_in: if True, every column (one unit's fan-in) keeps exactly
        ``max(1, round(density * n_in))`` weights, so the compressed kernel layout
        (``snapjax.engine.patterns.kernel_layout``) has no padding; else exactly
        ``max(1, round(density * n_in * units))`` weights are kept anywhere in the matrix.

    Returns:
      ``{projection name: bool array (n_in, units)}`` (each matrix drawn independently).

    Example (GRU with 8 units and 4 inputs, density 1/4)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.engine.sparsity import random_masks
        >>> params = nn.GRUCell(8).init(jax.random.key(0), jnp.zeros((1, 8)), jnp.zeros((1, 4)))["params"]
        >>> masks = random_masks(0, params, 0.25)
        >>> sorted(masks), masks["hn"].shape
        (['hn', 'hr', 'hz', 'in', 'ir', 'iz'], (8, 8))
        >>> masks["hn"].sum(axis=0).tolist()          # fan_in: 2 of 8 inputs kept per unit
        [2, 2, 2, 2, 2, 2, 2, 2]
        >>> sorted(random_masks(0, params, 0.25, include_input=False))
        ['hn', 'hr', 'hz']
    """
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = _rng(key_or_seed)
    masks = {}
    for name, source in _kernel_sources(params, spec).items():
        if source == "input" and not include_input:
            continue
        n_in, units = np.shape(params[name]["kernel"])
        if fan_in:
            nnz = max(1, int(round(density * n_in)))
            # argsort of iid uniforms per column = a uniform random nnz-subset per column.
            order = np.argsort(rng.random((n_in, units)), axis=0)
            m = np.zeros((n_in, units), bool)
            np.put_along_axis(m, order[:nnz], True, axis=0)
        else:
            nnz = max(1, int(round(density * n_in * units)))
            flat = np.zeros(n_in * units, bool)
            flat[rng.choice(n_in * units, nnz, replace=False)] = True
            m = flat.reshape(n_in, units)
        masks[name] = m
    return masks


def apply_masks(params: PyTree, masks: Mapping[str, Any] | None) -> PyTree:
    """Zero the masked kernel entries (jittable; masks are static NumPy arrays):
    ``params[name]['kernel'] ⊙ masks[name]``; biases and other leaves are unchanged.

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from snapjax.engine.sparsity import apply_masks
        >>> params = nn.GRUCell(4).init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> masked = apply_masks(params, {"hn": np.eye(4, dtype=bool)})
        >>> int(jnp.count_nonzero(masked["hn"]["kernel"])), bool(jnp.array_equal(masked["hn"]["bias"], params["hn"]["bias"]))
        (4, True)
    """
    if masks is None:
        return params
    out = dict(params)
    for name, m in masks.items():
        if m is None:
            continue
        leaf = dict(params[name])
        k = leaf["kernel"]
        leaf["kernel"] = k * jnp.asarray(m, k.dtype)
        out[name] = leaf
    return out


def mask_updates(updates: PyTree, masks: Mapping[str, Any] | None) -> PyTree:
    """Zero the masked entries of an update/gradient pytree (e.g. optax updates) so that
    masked weights stay exactly zero: ``params = optax.apply_updates(params,
    mask_updates(updates, masks))``.  Same as :func:`apply_masks` on the update tree.

    Example (a pruned weight stays exactly zero after an optimizer step)::

        >>> import jax, jax.numpy as jnp, numpy as np, optax
        >>> from snapjax.engine.sparsity import apply_masks, mask_updates
        >>> masks = {"h": np.array([[True, False], [False, True]])}
        >>> params = apply_masks({"h": {"kernel": jnp.ones((2, 2))}}, masks)
        >>> grads = {"h": {"kernel": jnp.ones((2, 2))}}
        >>> updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))
        >>> params = optax.apply_updates(params, mask_updates(updates, masks))
        >>> [[round(float(w), 2) for w in row] for row in params["h"]["kernel"]]
        [[0.9, 0.0], [0.0, 0.9]]
    """
    return apply_masks(updates, masks)


def density_report(params: PyTree, masks: Mapping[str, Any] | None) -> dict:
    """Density of each kernel and overall.

    Returns ``{"kernels": {name: {"nonzero", "size", "density"}}, "kernel_density",
    "nonzero_params", "total_params", "overall_density"}``; ``kernel_density`` counts only
    kernels, ``overall_density`` all parameters (biases/unit parameters count as dense).

    Example (GRU with 8 units and 4 inputs at density 1/4: 320 parameters, 32 of them biases)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from snapjax.engine.sparsity import density_report, random_masks
        >>> params = nn.GRUCell(8).init(jax.random.key(0), jnp.zeros((1, 8)), jnp.zeros((1, 4)))["params"]
        >>> report = density_report(params, random_masks(0, params, 0.25))
        >>> report["kernels"]["hn"]
        {'nonzero': 16, 'size': 64, 'density': 0.25}
        >>> report["kernel_density"], report["nonzero_params"], report["total_params"], report["overall_density"]
        (0.25, 104, 320, 0.325)
    """
    masks = masks or {}
    kernels = {}
    k_nz = k_size = 0
    for name, leaf in params.items():
        if isinstance(leaf, Mapping) and "kernel" in leaf:
            size = int(np.size(leaf["kernel"]))
            m = masks.get(name)
            nz = size if m is None else int(np.count_nonzero(np.asarray(m)))
            kernels[name] = {"nonzero": nz, "size": size, "density": nz / size}
            k_nz += nz
            k_size += size
    total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    nonzero = total - (k_size - k_nz)
    return {
        "kernels": kernels,
        "kernel_density": k_nz / k_size if k_size else 1.0,
        "nonzero_params": nonzero,
        "total_params": total,
        "overall_density": nonzero / total if total else 1.0,
    }


def snap_pattern_size(cell: Any, params: PyTree, masks: Mapping[str, Any] | None, n: int | None) -> int:
    """Entries of the SnAp-``n`` pattern ``M_n`` per example (``n=None``: exact RTRL).

    This is ``influence_tracker(...).pattern_count()``: for each unmasked parameter, the number
    of state entries it can influence within ``n`` steps (at most ``m`` per unit for SnAp-1, all
    ``k`` for RTRL).  Entries whose derivative is structurally zero are not counted: e.g. in a
    cell without biases, a fully masked column ``u`` of ``W_hn`` makes ``a_hn[u] ≡ 0``, so the
    reset-gate parameters of unit ``u`` influence nothing (see :mod:`snapjax.engine.patterns`).  The memory actually stored, padding included, is
    ``influence_tracker(...).num_stored()`` (≥ this; equal for SnAp-1 with
    ``random_masks(..., fan_in=True)``).  Multiply by the dtype size and the batch for bytes.

    Example (GRU with ``k = 4`` units and ``p = 100`` parameters: SnAp-1 keeps one entry per
    parameter, RTRL all ``k·p``; a mask shrinks both)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
        >>> from snapjax.engine.sparsity import snap_pattern_size
        >>> cell = nn.GRUCell(4)
        >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)))["params"]
        >>> [snap_pattern_size(cell, params, None, n) for n in (1, 2, None)]
        [100, 400, 400]
        >>> snap_pattern_size(cell, params, {"hn": np.eye(4, dtype=bool)}, 1)     # 12 of W_hn's 16 masked
        88
    """
    if n is None:
        tr = influence_tracker(cell, params, "rtrl", masks=masks)
    else:
        tr = influence_tracker(cell, params, "snap", n, masks=masks)
    return tr.pattern_count()
