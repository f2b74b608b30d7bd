"""Checks and masks shared by the online methods for generic cells (dense RTRL / SnAp-n, UORO,
the immediate rule, sliding-window TBPTT).

Owns parameter checks (:func:`check_params`), static 0/1 parameter masks aligned with the
parameter leaves (:func:`param_masks`, :class:`ParamMasks`), the matmul precision of a cell step
(:func:`matmul_precision`, :func:`check_precision`), the carry/input shape checks of a
generic cell (:class:`CarryCheck`) and the input size of a cell (:func:`input_size_of`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.cells.recurrent import Recurrent

Array = jax.Array
PyTree = Any

__all__ = ["check_params", "ParamMasks", "param_masks", "matmul_precision", "check_precision", "CarryCheck",
           "input_size_of"]


def check_params(name: str, params: PyTree) -> list:
    """The leaves of ``params``; ``ValueError`` unless a non-empty tree of floating arrays."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name}: params has no leaves; expected the cell's parameter dict")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{name}: parameters must be floating point, got a leaf of dtype {jnp.result_type(leaf)}")
    return leaves


def _mask_array(m: Any, shape: tuple, where: str) -> np.ndarray:
    if isinstance(m, jax.core.Tracer):
        raise ValueError(f"mask {where} must be a static (NumPy) array, not a traced value")
    if isinstance(m, Mapping):
        raise ValueError(f"mask {where} must be an array of shape {shape}, got a dict")
    m = np.asarray(m)
    if m.shape != shape:
        raise ValueError(f"mask {where} has shape {m.shape}, the parameter has shape {shape}")
    if not (m.dtype == bool or np.isin(m, (0, 1)).all()):
        raise ValueError(f"mask {where} must hold only 0/1 (or bool) values")
    return m.astype(bool)


def _expand(mask: Any, node: Any, where: str) -> list:
    """Mask leaves (array or None) aligned with ``jax.tree.leaves(node)``."""
    if mask is None:
        return [None] * len(jax.tree.leaves(node))
    if isinstance(node, Mapping):
        if not isinstance(mask, Mapping):
            raise ValueError(f"mask {where} must be a dict like the parameters, got {type(mask).__name__}")
        unknown = sorted(set(mask) - set(node))
        if unknown:
            raise ValueError(f"mask for unknown parameter(s) {unknown} under {where}; keys are {sorted(node)}")
        # jax flattens dicts in sorted key order
        return [m for key in sorted(node) for m in _expand(mask.get(key), node[key], f"{where}[{key!r}]")]
    if isinstance(node, (tuple, list)):
        if not isinstance(mask, (tuple, list)) or len(mask) != len(node):
            raise ValueError(f"mask {where} must be a sequence of {len(node)} like the parameters")
        return [m for i, (a, b) in enumerate(zip(mask, node)) for m in _expand(a, b, f"{where}[{i}]")]
    return [_mask_array(mask, tuple(np.shape(node)), where)]


@dataclasses.dataclass(frozen=True, eq=False)
class ParamMasks:
    """Static 0/1 masks aligned with the parameter leaves (``None``: leaf not masked).

    ``apply(tree)`` zeroes the masked entries of a params-shaped tree (``jnp.where``, so the
    result is exactly zero even for non-finite values); leaves may carry leading axes (a
    batch), the mask broadcasts over them.
    """

    leaves: tuple

    @property
    def any(self) -> bool:
        return any(m is not None for m in self.leaves)

    def apply(self, tree: PyTree) -> PyTree:
        if not self.any:
            return tree
        flat, treedef = jax.tree.flatten(tree)
        out = [x if m is None else jnp.where(m, x, jnp.zeros((), jnp.result_type(x))) for x, m in zip(flat, self.leaves)]
        return jax.tree.unflatten(treedef, out)

    def flat(self, params: PyTree) -> np.ndarray:
        """The mask of ``ravel_pytree(params)`` as a bool vector ``(p,)``."""
        return np.concatenate([np.ones(np.size(x), bool) if m is None else m.ravel()
                               for x, m in zip(jax.tree.leaves(params), self.leaves)])


def param_masks(params: PyTree, masks: Any) -> ParamMasks:
    """Check ``masks`` against ``params`` and align them with its leaves.

    Args:
      params: the cell's parameter tree (shapes only).
      masks: ``None``; ``{name: (n_in, units) 0/1 array or None}`` applied to
        ``params[name]['kernel']`` (the compressed engine's format); or a tree shaped like
        ``params`` (any subtree may be ``None``: not masked).
    Raises:
      ValueError: unknown names, wrong shapes, non-0/1 values, traced masks.
    """
    if masks is None:
        return ParamMasks((None,) * len(jax.tree.leaves(params)))
    if not isinstance(masks, Mapping) or not isinstance(params, Mapping):
        raise ValueError(f"masks must be a dict (projection name -> (n_in, units) array, or params-shaped), "
                         f"got {type(masks).__name__}")
    projection_format = all(
        not isinstance(m, Mapping) and isinstance(params.get(k), Mapping) and "kernel" in params[k]
        for k, m in masks.items()
    )
    if projection_format:
        masks = {k: None if m is None else {"kernel": m} for k, m in masks.items()}
    return ParamMasks(tuple(_expand(masks, params, "params")))


def matmul_precision(precision: Any):
    """A context manager running the cell's matmuls at ``precision`` (``None``: unchanged).

    Accepts the strings of ``jax.default_matmul_precision`` (``"highest"``, ``"float32"``, ...)
    and ``jax.lax.Precision`` values.
    """
    if precision is None:
        return contextlib.nullcontext()
    if isinstance(precision, jax.lax.Precision):
        precision = precision.name.lower()
    return jax.default_matmul_precision(precision)


def check_precision(precision: Any) -> None:
    """``ValueError`` unless :func:`matmul_precision` accepts ``precision``."""
    try:
        with matmul_precision(precision):
            pass
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"precision must be None, a jax.lax.Precision or a string such as 'highest', "
                         f"got {precision!r} ({err})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class CarryCheck:
    """Shape of one example's carry (from ``cell.init_carry(1)``) and input checks."""

    name: str
    treedef: Any
    shapes: tuple  # per leaf, without the batch axis

    @classmethod
    def of(cls, cell: Recurrent) -> "CarryCheck":
        tmpl = jax.eval_shape(lambda: cell.init_carry(1))
        leaves, treedef = jax.tree.flatten(tmpl)
        return cls(cell.name, treedef, tuple(tuple(a.shape[1:]) for a in leaves))

    @property
    def size(self) -> int:
        """``k``: floats of carry per example."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def like(self, tree: PyTree, what: str) -> int:
        """Check ``tree`` has the carry's structure with a common batch axis; return ``B``."""
        leaves, treedef = jax.tree.flatten(tree)
        shapes = [tuple(jnp.shape(a)) for a in leaves]
        batch = shapes[0][0] if shapes and shapes[0] else None
        if treedef != self.treedef or any(g != (batch,) + s for g, s in zip(shapes, self.shapes)):
            want = jax.tree.unflatten(self.treedef, [("B",) + s for s in self.shapes])
            raise ValueError(f"{self.name}: {what} must be shaped like the carry {want}, "
                             f"got {jax.tree.map(jnp.shape, tree)}")
        return int(batch)  # type: ignore[arg-type]  # not None: the shapes matched

    def step_args(self, carry: PyTree, x: Array) -> int:
        batch = self.like(carry, "carry")
        if jnp.ndim(x) != 2 or jnp.shape(x)[0] != batch:
            raise ValueError(f"{self.name}: x must have shape ({batch}, n_in), got {jnp.shape(x)}")
        return batch


def input_size_of(cell: Recurrent, params: PyTree, input_size: Any, what: str) -> int:
    """``n_in`` of ``cell``: ``input_size`` if given, else read from ``params`` (compressed cells).

    Args:
      cell: the :class:`snapjax.Recurrent`.  params: its parameters (shapes only).
      input_size: the caller's ``input_size`` option, or ``None``.  what: the method's name
      (for messages).
    Raises:
      ValueError: a generic cell without ``input_size``, or one that is not a positive int.
    """
    n_in = cell.input_size(params) if input_size is None else input_size
    if n_in is None:
        raise ValueError(f"{cell.name}: {what} of a generic cell needs input_size=n_in (the state stores inputs)")
    if isinstance(n_in, bool) or not isinstance(n_in, (int, np.integer)) or n_in < 1:
        raise ValueError(f"{what}: input_size must be a positive int, got {n_in!r}")
    return int(n_in)
