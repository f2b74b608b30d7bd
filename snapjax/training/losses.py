"""Per-example losses with their input checks.

A loss is ``loss(outputs (B, out), targets) -> (B,)`` per-example values.  The learner weights
them by the loss mask and averages over the scored examples.  Built-in losses also say which
targets are *valid* at run time (:class:`Loss`); invalid targets (a label outside
``[0, classes)``, a non-finite regression target) are excluded from the loss and the gradient
and counted, never trained on.  Shapes and dtypes are checked at trace time with a message that
says what was expected and what was given.

Example::

    >>> import jax.numpy as jnp
    >>> loss = get_loss("softmax_xent")
    >>> logits = jnp.zeros((2, 3))
    >>> loss.check(logits, jnp.array([0, 2]))
    >>> [bool(v) for v in loss.valid(logits, jnp.array([1, 3]))]
    [True, False]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

__all__ = ["Loss", "softmax_xent_loss", "mse_loss", "get_loss"]


def softmax_xent_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy (nats) with integer labels ``(B,)``; returns ``(B,)``:
    ``ℓ_b = logsumexp(logits_b) − logits_b[labels_b]``.

    Example (uniform logits over 3 classes: ``log 3``)::

        >>> import jax.numpy as jnp
        >>> from snapjax.training.losses import softmax_xent_loss
        >>> [round(float(v), 4) for v in softmax_xent_loss(jnp.zeros((2, 3)), jnp.array([0, 2]))]
        [1.0986, 1.0986]
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mse_loss(pred: Array, target: Array) -> Array:
    """Mean squared error over the feature axis: ``(B, out), (B, out) -> (B,)``,
    ``ℓ_b = mean_j (pred_bj − target_bj)²``.

    Example::

        >>> import jax.numpy as jnp
        >>> from snapjax.training.losses import mse_loss
        >>> mse_loss(jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.zeros((2, 2))).tolist()
        [2.5, 0.0]
    """
    return jnp.mean((pred - target) ** 2, axis=-1)


def _check_labels(logits: Array, labels: Any) -> None:
    batch = jnp.shape(logits)[0]
    shape, dtype = jnp.shape(labels), jnp.result_type(labels)
    if not jnp.issubdtype(dtype, jnp.integer):
        hint = " (one-hot targets? pass integer class labels, e.g. targets.argmax(-1))" if len(shape) == 2 else ""
        raise ValueError(f"softmax_xent targets must be integer labels of shape ({batch},), got {dtype} {shape}{hint}")
    if shape != (batch,):
        raise ValueError(
            f"softmax_xent targets must have shape ({batch},) per step, i.e. (T, {batch}) for a chunk "
            f"(inputs are time-major (T, B, ...)), got {shape}"
        )


def _valid_labels(logits: Array, labels: Array) -> Array:
    return (labels >= 0) & (labels < jnp.shape(logits)[-1])


def _check_regression(pred: Array, target: Any) -> None:
    shape, dtype = jnp.shape(target), jnp.result_type(target)
    if shape != jnp.shape(pred):
        raise ValueError(
            f"mse targets must have the output's shape {jnp.shape(pred)} per step "
            f"(time-major chunks: (T, *{jnp.shape(pred)})), got {shape}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"mse targets must be floating point, got {dtype}")


def _valid_regression(pred: Array, target: Array) -> Array:
    return jnp.all(jnp.isfinite(target).reshape(target.shape[0], -1), axis=1)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss with its checks.

    Attributes:
      fn: ``fn(outputs (B, out), targets) -> (B,)``.
      check: trace-time check ``check(outputs, targets)`` raising ``ValueError``.
      valid: run-time validity ``valid(outputs, targets) -> (B,) bool`` (invalid examples are
        excluded and counted); ``None``: valid where the loss value is finite.
      name: for messages.

    Example (a custom per-example L1 loss)::

        >>> import jax.numpy as jnp
        >>> from snapjax.training.losses import Loss
        >>> l1 = Loss(lambda out, t: jnp.abs(out - t).sum(-1), name="l1")
        >>> l1(jnp.ones((2, 3)), jnp.zeros((2, 3))).tolist()
        [3.0, 3.0]
    """

    fn: Callable[[Array, Any], Array]
    check: Callable[[Any, Any], None] = lambda outputs, targets: None  # outputs: an array or its ShapeDtypeStruct
    valid: Callable[[Array, Any], Array] | None = None
    name: str = "loss"

    def __call__(self, outputs: Array, targets: Any) -> Array:
        return self.fn(outputs, targets)


_BUILTIN = {
    "softmax_xent": Loss(
        lambda lo, y: softmax_xent_loss(lo, jnp.clip(y, 0, lo.shape[-1] - 1)), _check_labels, _valid_labels,
        "softmax_xent",
    ),
    "mse": Loss(lambda p, t: mse_loss(p, jnp.where(jnp.isfinite(t), t, 0)), _check_regression, _valid_regression, "mse"),
}
_BUILTIN["xent"] = _BUILTIN["softmax_xent"]


def get_loss(loss: str | Callable | Loss) -> Loss:
    """A :class:`Loss` from a name (``"softmax_xent"``, ``"mse"``), a :class:`Loss`, or a callable
    ``loss(outputs, targets) -> (B,)`` (checked to return one value per example).

    Raises:
      ValueError: unknown name or not callable.

    Example (a callable must return one value per example; the check runs at trace time)::

        >>> import jax.numpy as jnp
        >>> from snapjax.training.losses import get_loss
        >>> get_loss("mse").name, get_loss("xent") is get_loss("softmax_xent")
        ('mse', True)
        >>> get_loss(lambda out, t: jnp.sum(out - t)).check(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
        Traceback (most recent call last):
            ...
        ValueError: the loss must return one value per example, shape (2,), got ()
        >>> get_loss("hinge")
        Traceback (most recent call last):
            ...
        ValueError: unknown loss 'hinge': expected one of ['mse', 'softmax_xent', 'xent'] or a callable
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in _BUILTIN:
            raise ValueError(f"unknown loss {loss!r}: expected one of {sorted(_BUILTIN)} or a callable")
        return _BUILTIN[loss]
    if not callable(loss):
        raise ValueError(f"loss must be a name or a callable (outputs, targets) -> (B,), got {type(loss).__name__}")

    def check(outputs, targets):
        out = jax.eval_shape(loss, outputs, targets)
        if jnp.shape(out) != (jnp.shape(outputs)[0],):
            raise ValueError(
                f"the loss must return one value per example, shape ({jnp.shape(outputs)[0]},), got {jnp.shape(out)}"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"the loss must return floating-point values (it is differentiated), got {out.dtype}")

    return Loss(loss, check, None, getattr(loss, "__name__", "loss"))
