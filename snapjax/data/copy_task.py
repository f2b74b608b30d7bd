"""Copy task with curriculum (Mujika et al. 2018, as used by Menick et al. 2020, SnAp).

A random binary string of ``L`` bits is shown one bit per step, then a delimiter, then the model
must reproduce the string while it receives a blank input. Loss counts only on the reproduction
steps and is reported in bits per bit. A curriculum starts at ``L = 1`` and increments ``L`` when
the average loss falls below 0.15 bits.

Token alphabet (inputs)::

    0, 1      the bits
    2         DELIMITER, shown once after the string
    3         PAD / blank, shown during reproduction and on padded steps

Layout of one sequence with ``L`` bits (time length ``T = 2 L + 1``)::

    t        : 0 .. L-1      L            L+1 .. 2L
    input    : b_0 .. b_{L-1} DELIMITER    PAD ... PAD
    target   : 0 ... 0        0            b_0 .. b_{L-1}
    loss_mask: 0 ... 0        0            1 ... 1

Targets are always in ``{0, 1}`` (0 where the mask is 0), so a 2-way readout can be scored
directly. With ``max_length`` every sequence is padded to ``T_max = 2 max_length + 1`` (PAD
input, target 0, mask 0) so a jitted training step compiles once for all curriculum lengths;
``length`` may then be a traced int32.

All arrays are time-major: ``(T, B)``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "DELIMITER",
    "PAD",
    "NUM_TOKENS",
    "CopyBatch",
    "copy_task_batch",
    "copy_task_length",
    "one_hot_inputs",
    "bits_per_bit",
    "Curriculum",
    "curriculum_init",
    "curriculum_update",
    "curriculum_average",
]

DELIMITER: int = 2
PAD: int = 3
NUM_TOKENS: int = 4


class CopyBatch(NamedTuple):
    """One batch of copy-task sequences, time-major.

    Attributes:
      inputs: int32 ``(T, B)`` tokens in ``{0, 1, DELIMITER, PAD}``.
      targets: int32 ``(T, B)`` bits in ``{0, 1}`` (0 wherever ``loss_mask`` is 0).
      loss_mask: float32 ``(T, B)``; 1 exactly on the ``L`` reproduction steps.
    """

    inputs: jax.Array
    targets: jax.Array
    loss_mask: jax.Array


def copy_task_length(length: int) -> int:
    """Time length ``T = 2 * length + 1`` of a copy-task sequence with ``length`` bits."""
    return 2 * int(length) + 1


def _draw_bits(key: jax.Array, num_positions: int, batch_size: int) -> jax.Array:
    """Bits of shape ``(num_positions, B)``; row ``i`` depends only on ``(key, i)``.

    Drawing each position from ``fold_in(key, i)`` makes the string a prefix-consistent function
    of the key: the same key gives the same first ``L`` bits whatever ``max_length`` is.
    """
    positions = jnp.arange(num_positions, dtype=jnp.uint32)

    def row(i: jax.Array) -> jax.Array:
        return jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, (batch_size,))

    return jax.vmap(row)(positions).astype(jnp.int32)


def copy_task_batch(
    key: jax.Array,
    batch_size: int,
    length: int | jax.Array,
    max_length: int | None = None,
) -> CopyBatch:
    """Sample a batch of copy-task sequences.

    Args:
      key: PRNG key.
      batch_size: ``B`` (static).
      length: number of bits ``L``. Without ``max_length`` it must be a concrete integer (it
        fixes the array shapes). With ``max_length`` it may be a traced int32 scalar; it is then
        clipped to ``[0, max_length]`` (a concrete value outside that range raises).
      max_length: if given (static), pad every sequence to ``T_max = 2 * max_length + 1``.

    Returns:
      ``CopyBatch`` with ``(T, B)`` arrays, ``T = 2 L + 1`` or ``T_max`` when padded.
      The bits are a function of ``(key, position)`` only, so for a fixed key the padded batch
      equals the unpadded one on its first ``2 L + 1`` steps.
    """
    if max_length is None:
        try:
            static_length = operator.index(length)
        except (TypeError, jax.errors.ConcretizationTypeError) as err:
            raise ValueError(
                "copy_task_batch: `length` must be a concrete int unless `max_length` is given "
                "(pass max_length to allow a traced length)."
            ) from err
        if static_length < 0:
            raise ValueError(f"length must be >= 0, got {static_length}")
        num_bits = static_length
    else:
        num_bits = operator.index(max_length)
        if num_bits < 0:
            raise ValueError(f"max_length must be >= 0, got {num_bits}")
        try:
            concrete = operator.index(length)
        except (TypeError, jax.errors.ConcretizationTypeError):
            concrete = None  # traced: clipped to [0, max_length] in _copy_task_arrays
        if concrete is not None and not 0 <= concrete <= num_bits:
            raise ValueError(f"length must be in [0, max_length={num_bits}], got {concrete}")

    return _copy_task_arrays(
        key, jnp.asarray(length, dtype=jnp.int32), batch_size=int(batch_size), num_bits=num_bits
    )


@functools.partial(jax.jit, static_argnames=("batch_size", "num_bits"))
def _copy_task_arrays(
    key: jax.Array, length: jax.Array, *, batch_size: int, num_bits: int
) -> CopyBatch:
    """Array part of ``copy_task_batch``: ``T = 2 * num_bits + 1`` steps, ``length`` traced."""
    total_steps = 2 * num_bits + 1
    L = jnp.clip(length, 0, num_bits)

    bits = _draw_bits(key, max(num_bits, 1), batch_size)  # (max(Lmax, 1), B)
    t = jnp.arange(total_steps, dtype=jnp.int32)[:, None]  # (T, 1)
    max_index = max(num_bits, 1) - 1

    shown_bits = bits[jnp.clip(t, 0, max_index)[:, 0]]  # (T, B): bit t
    recalled_bits = bits[jnp.clip(t - L - 1, 0, max_index)[:, 0]]  # (T, B): bit t-L-1

    is_input = t < L
    is_delim = t == L
    is_output = (t > L) & (t <= 2 * L)

    inputs = jnp.where(is_input, shown_bits, jnp.where(is_delim, DELIMITER, PAD))
    targets = jnp.where(is_output, recalled_bits, 0)
    loss_mask = jnp.broadcast_to(is_output, (total_steps, batch_size))
    return CopyBatch(
        inputs=inputs.astype(jnp.int32),
        targets=targets.astype(jnp.int32),
        loss_mask=loss_mask.astype(jnp.float32),
    )


def one_hot_inputs(tokens: jax.Array, num_tokens: int = NUM_TOKENS) -> jax.Array:
    """One-hot encode integer tokens: ``(...)`` int -> ``(..., num_tokens)`` float32."""
    return jax.nn.one_hot(tokens, num_tokens, dtype=jnp.float32)


@jax.jit
def bits_per_bit(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Masked mean cross-entropy in bits.

    Args:
      logits: ``(T, B, C)`` unnormalised log-probabilities (``C = 2`` for the copy task).
      targets: int ``(T, B)`` class indices in ``[0, C)``.
      loss_mask: ``(T, B)`` weights (1 on scored steps).

    Returns:
      Scalar float32: ``sum(mask * CE_bits) / max(sum(mask), 1)``. Uniform logits over 2
      classes give exactly 1 bit.
    """
    logits = jnp.asarray(logits, dtype=jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(
        log_probs, jnp.asarray(targets, dtype=jnp.int32)[..., None], axis=-1
    )[..., 0]
    bits = -target_log_probs / math.log(2.0)
    mask = jnp.asarray(loss_mask, dtype=jnp.float32)
    return jnp.sum(bits * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Curriculum(NamedTuple):
    """Copy-task curriculum state (a pytree; every field is an array).

    The average is over a FIXED WINDOW: the last ``window`` values passed to
    ``curriculum_update`` at the current length (a ring buffer). ``L`` is incremented when the
    window is full and its mean is strictly below ``threshold``; the window is then emptied, so
    every length needs ``window`` fresh updates before the next decision.

    Attributes:
      length: int32 scalar, current ``L``.
      losses: float32 ``(window,)`` ring buffer of recent losses (bits per bit).
      count: int32 scalar, number of losses recorded at the current length.
      threshold: float32 scalar, bits per bit below which ``L`` increases.
      max_length: int32 scalar, ``L`` never exceeds it.
    """

    length: jax.Array
    losses: jax.Array
    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
    threshold: jax.Array
    max_length: jax.Array


def curriculum_init(
    start_length: int = 1,
    threshold_bits: float = 0.15,
    window: int = 20,
    max_length: int | None = None,
) -> Curriculum:
    """Initial curriculum state.

    Args:
      start_length: initial ``L`` (the SnAp paper starts at 1).
      threshold_bits: increment ``L`` when the windowed mean loss is below this (0.15 bits).
      window: number of most recent ``curriculum_update`` calls averaged (static; it is the
        buffer size). One call is normally one batch-mean loss.
      max_length: optional cap on ``L`` (e.g. the ``max_length`` used for padding).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cap = jnp.iinfo(jnp.int32).max if max_length is None else int(max_length)
    return Curriculum(
        length=jnp.asarray(start_length, dtype=jnp.int32),
        losses=jnp.zeros((int(window),), dtype=jnp.float32),
        count=jnp.asarray(0, dtype=jnp.int32),
        threshold=jnp.asarray(threshold_bits, dtype=jnp.float32),
        max_length=jnp.asarray(cap, dtype=jnp.int32),
    )


@jax.jit
def curriculum_average(state: Curriculum) -> jax.Array:
    """Mean of the losses recorded at the current length (NaN if none yet)."""
    window = state.losses.shape[0]
    n = jnp.minimum(state.count, window)
    valid = jnp.arange(window) < n
    total = jnp.sum(jnp.where(valid, state.losses, 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)


@jax.jit
def curriculum_update(state: Curriculum, loss_bits: jax.Array) -> Curriculum:
    """Record one loss (bits per bit on the reproduction steps) and maybe increment ``L``.

    Pure and jittable. ``L`` increases by exactly 1 when, after recording, the window holds
    ``window`` losses whose mean is ``< threshold`` and ``L < max_length``; the window is then
    reset (emptied).
    """
    window = state.losses.shape[0]
    loss = jnp.asarray(loss_bits, dtype=jnp.float32)
    losses = state.losses.at[state.count % window].set(loss)
    count = state.count + 1
    full = count >= window
    mean = jnp.sum(losses) / window  # all entries valid once full
    advance = full & (mean < state.threshold) & (state.length < state.max_length)
    return Curriculum(
        length=state.length + advance.astype(jnp.int32),
        losses=jnp.where(advance, jnp.zeros_like(losses), losses),
        count=jnp.where(advance, 0, count).astype(jnp.int32),
        threshold=state.threshold,
        max_length=state.max_length,
    )
