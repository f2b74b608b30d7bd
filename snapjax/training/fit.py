"""A streaming driver: :func:`fit` runs an endless stream of chunks through a learner with a
progress bar, running metrics, user hooks and periodic atomic checkpoints, and resumes from the
latest checkpoint on restart.

Per chunk ``(xs, ys)`` or ``(xs, ys, masks)`` (time-major, as :meth:`snapjax.OnlineLearner.run`
takes them) it calls ``learner.run_jit`` (jitted, the state donated: compiled once per chunk
shape), updates the metrics, writes a checkpoint when due and calls each hook
``hook(step, metrics)``.  The metrics (a dict of Python numbers) are:

* ``chunk``: chunks consumed from the stream's start (a resumed run counts on from the checkpoint);
* ``step``: ``int(state.step)``, the learner's steps; ``tokens``: example-steps (``T·B`` per
  chunk) from the stream's start; ``tokens_per_s``: this call's example-steps per second
  (compilation included);
* ``loss``: the chunk's mean loss; ``loss_ema``: its exponential moving average,
  ``ema ← β·ema + (1 - β)·loss`` (``β = ema``, the first chunk's loss to start; non-finite losses
  are left out);
* ``skipped``, ``resets``, ``excluded``: the state's fault counters; ``state_bytes``: the bytes
  the state holds (flat over an endless stream); ``seconds``: this call's wall time;
  ``checkpoint``: the path written after this chunk, or ``None``.

Checkpoints (``checkpoint_dir``): after the chunk at which ``checkpoint_every`` steps have
passed since the last one, and after the last chunk, ``ckpt-<chunk>.snapjax`` holds the state,
the chunk count and the running metrics (:func:`snapjax.save_state`: written to a temporary file
and renamed, so a kill leaves the old or the new file, never half of one); only the newest
``keep`` remain.  ``fit`` called again with the same directory restores the newest one into the
given state's structure (the state passed is then only a template) and continues after the
chunks it had consumed, so a killed and restarted run ends bit-identical to an uninterrupted one.

The stream's contract: either an **iterable** that yields the same chunks from the start every
time it is iterated (a list, a generator function's fresh generator after a restart: a resumed
run draws and discards the chunks the checkpoint already consumed), or a **factory**
``stream(start_chunk) -> iterator`` that starts at chunk ``start_chunk`` (it can skip cheaply).

Example (60 steps of a stream of 6 chunks; a checkpoint every 20 steps, the last 2 kept)::

    >>> import os, tempfile, flax.linen as nn, jax, jax.numpy as jnp, optax, snapjax as sj
    >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, optimizer=optax.sgd(0.1))
    >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
    >>> def stream(start):                      # a factory: chunk i is a function of i
    ...     for i in range(start, 6):
    ...         x = jax.random.normal(jax.random.key(i), (10, 2, 3))
    ...         yield x, (x[..., 0] > 0).astype(jnp.int32)
    >>> seen = []
    >>> with tempfile.TemporaryDirectory() as d:
    ...     result = sj.fit(learner, state, stream, checkpoint_dir=d, checkpoint_every=20, keep=2, progress=False,
    ...                     hooks=[lambda step, m: seen.append(step)])
    ...     files = sorted(os.listdir(d))
    >>> seen, files, int(result.state.step), result.metrics["tokens"]
    ([10, 20, 30, 40, 50, 60], ['ckpt-000000004.snapjax', 'ckpt-000000006.snapjax'], 60, 120)
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import numpy as np
from tqdm.std import tqdm

from snapjax.checkpoint import restore_state, save_state
from snapjax.training.config import check_positive_int
from snapjax.training.online_state import OnlineState

__all__ = ["FitResult", "fit", "latest_checkpoint"]

_NAME = re.compile(r"^ckpt-(\d+)\.snapjax$")


class FitResult(NamedTuple):
    """What :func:`fit` returns: the final ``state``, the last ``metrics`` (module docstring)
    and ``losses``, the mean loss of every chunk run in this call (``(chunks,)`` array).

    Example::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> chunks = [(jnp.ones((5, 2, 3)), jnp.zeros((5, 2), jnp.int32))] * 3
        >>> result = sj.fit(learner, state, chunks, progress=False)
        >>> result.losses.shape, result.metrics["chunk"], result.metrics["step"]
        ((3,), 3, 15)
    """

    state: OnlineState
    metrics: dict
    losses: np.ndarray


def _checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(chunk, path)`` of the checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The path of the newest :func:`fit` checkpoint in ``directory`` (``None``: none there).

    Example::

        >>> import tempfile
        >>> from snapjax.training.fit import latest_checkpoint
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    found = _checkpoints(os.fspath(directory))
    return found[-1][1] if found else None


def _record(state: OnlineState, chunk: int, ema: float, ema_set: bool, tokens: int) -> dict:
    """What a checkpoint holds: the state and the driver's counters, stored as the raw bytes of
    ``int64 chunk, int64 tokens, float64 loss_ema, int64 ema_set`` (``(8,) uint32``: restored
    exactly whatever ``jax_enable_x64`` says)."""
    meta = np.concatenate([np.array([chunk, tokens], np.int64).view(np.uint32), np.array([ema]).view(np.uint32),
                           np.array([int(ema_set)], np.int64).view(np.uint32)])
    return {"state": state, "meta": meta}


def _unrecord(rec: dict) -> tuple[OnlineState, int, int, float, bool]:
    """``(state, chunk, tokens, loss_ema, ema_set)`` of a restored :func:`_record`."""
    meta = np.asarray(rec["meta"], np.uint32)
    chunk, tokens = (int(v) for v in meta[:4].view(np.int64))
    return rec["state"], chunk, tokens, float(meta[4:6].view(np.float64)[0]), bool(meta[6:].view(np.int64)[0])


def _check_args(state: Any, stream: Any, hooks: Any, checkpoint_dir: Any, checkpoint_every: Any, keep: Any,
                max_chunks: Any, ema: Any) -> list[Callable]:
    if not isinstance(state, OnlineState):
        raise ValueError(f"fit needs the learner's OnlineState (learner.init(...)), got {type(state).__name__}")
    if not (callable(stream) or isinstance(stream, Iterable)):
        raise ValueError(f"stream must be an iterable of (xs, ys[, masks]) chunks or a factory stream(start_chunk) "
                         f"-> iterator, got {type(stream).__name__}")
    hooks = [hooks] if callable(hooks) else list(hooks)
    bad = [type(h).__name__ for h in hooks if not callable(h)]
    if bad:
        raise ValueError(f"hooks must be callables hook(step, metrics), got {', '.join(bad)}")
    check_positive_int("keep", keep)
    check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir (the directory the checkpoints go to)")
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, (int, np.integer))
                                   or max_chunks < 0):
        raise ValueError(f"max_chunks must be an int >= 0 or None, got {max_chunks!r}")
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
        raise ValueError(f"ema must be a number in [0, 1) (the weight of the past), got {ema!r}")
    return hooks


def _chunk(item: Any, index: int) -> tuple:
    """``(xs, ys, masks or None)``; ``ValueError`` naming the chunk otherwise."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        what = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else \
            type(item).__name__
        raise ValueError(f"chunk {index} of the stream: expected (xs, ys) or (xs, ys, masks) with time-major "
                         f"xs (T, B, n_in), got {what}")
    return (item[0], item[1], item[2] if len(item) == 3 else None)


def fit(learner: Any, state: OnlineState, stream: Any, *, hooks: Callable | Sequence[Callable] = (),
        checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None, keep: int = 3,
        resume: bool = True, max_chunks: int | None = None, progress: bool = True, total: int | None = None,
        ema: float = 0.98, **opt_args: Any) -> FitResult:
    """Run ``stream`` through ``learner`` (module docstring).

    Args:
      learner: an :class:`snapjax.OnlineLearner`.  state: its state (with a checkpoint to resume
        from, only the template of its structure).
      stream: an iterable of chunks or a factory ``stream(start_chunk)`` (the module's contract).
      hooks: callables ``hook(step, metrics)`` called after every chunk.
      checkpoint_dir: where checkpoints go (``None``: none are written or read).
      checkpoint_every: steps between checkpoints (``None``: only after the last chunk).
      keep: checkpoints kept.  resume: restore the newest checkpoint of ``checkpoint_dir``.
      max_chunks: stop after this many chunks in this call (``None``: at the stream's end).
      progress: a tqdm progress bar (to stderr).  total: chunks in the stream, for the bar.
      ema: the loss average's weight of the past, in ``[0, 1)``.
      opt_args: extra arguments of the optimizer, passed to every ``run_jit`` call.
    Returns:
      :class:`FitResult`.
    Raises:
      ValueError: a bad argument, a malformed chunk (its index is named), a checkpoint that does
        not match the state's structure.

    Example (a list of chunks; a hook printing the loss average every second chunk)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2)
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=3)
        >>> chunks = [(jnp.ones((5, 2, 3)), jnp.zeros((5, 2), jnp.int32))] * 4
        >>> def show(step, metrics):
        ...     if metrics["chunk"] % 2 == 0:
        ...         print(step, metrics["tokens"], metrics["loss_ema"] > 0)
        >>> result = sj.fit(learner, state, chunks, hooks=show, progress=False)
        10 20 True
        20 40 True
    """
    hooks = _check_args(state, stream, hooks, checkpoint_dir, checkpoint_every, keep, max_chunks, ema)
    directory = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
    start, ema_value, ema_set, tokens = 0, 0.0, False, 0
    found = _checkpoints(directory) if directory is not None and resume else []
    if found:
        rec = restore_state(found[-1][1], _record(jax.eval_shape(lambda: state), 0, 0.0, False, 0))
        state, start, tokens, ema_value, ema_set = _unrecord(rec)
    if callable(stream) and not isinstance(stream, Iterable):
        chunks = iter(stream(start))
    else:
        chunks = itertools.islice(iter(stream), start, None)
    if max_chunks is not None:
        chunks = itertools.islice(chunks, max_chunks)
    if total is None and hasattr(stream, "__len__"):
        total = len(stream)
    bar = tqdm(total=total, initial=start, unit="chunk", disable=not progress, dynamic_ncols=True)
    losses: list[float] = []
    metrics: dict = {}
    chunk, last_saved, last_step = start, start, int(state.step)
    t0, run_tokens = time.perf_counter(), 0
    try:
        for item in chunks:
            xs, ys, masks = _chunk(item, chunk)
            state, _, out = learner.run_jit(state, xs, ys, masks, **opt_args)
            chunk += 1
            loss = float(np.mean(np.asarray(out["loss"])))
            if math.isfinite(loss):
                ema_value, ema_set = (ema * ema_value + (1 - ema) * loss, True) if ema_set else (loss, True)
            shape = np.shape(xs)
            run_tokens += int(shape[0] * shape[1])
            tokens += int(shape[0] * shape[1])
            seconds = time.perf_counter() - t0
            step = int(state.step)
            metrics = {"chunk": chunk, "step": step, "tokens": tokens, "tokens_per_s": run_tokens / max(seconds, 1e-9),
                       "loss": loss, "loss_ema": ema_value if ema_set else math.nan,
                       "skipped": int(state.skipped), "resets": int(state.resets), "excluded": int(state.excluded),
                       "state_bytes": sum(int(a.nbytes) for a in jax.tree.leaves(state)), "seconds": seconds,
                       "checkpoint": None}
            if directory is not None and checkpoint_every is not None and step - last_step >= checkpoint_every:
                metrics["checkpoint"] = _save(directory, state, chunk, ema_value, ema_set, tokens, keep)
                last_saved, last_step = chunk, step
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss_ema=f"{metrics['loss_ema']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            refresh=False)
            for hook in hooks:
                hook(step, dict(metrics))
    finally:
        bar.close()
    if directory is not None and chunk > last_saved:
        path = _save(directory, state, chunk, ema_value, ema_set, tokens, keep)
        if metrics:
            metrics["checkpoint"] = path
    return FitResult(state, metrics, np.asarray(losses, np.float64))


def _save(directory: str, state: OnlineState, chunk: int, ema: float, ema_set: bool, tokens: int, keep: int) -> str:
    """Write ``ckpt-<chunk>.snapjax`` atomically and delete all but the newest ``keep``."""
    path = os.path.join(directory, f"ckpt-{chunk:09d}.snapjax")
    save_state(path, _record(state, chunk, ema, ema_set, tokens))
    for _, old in _checkpoints(directory)[:-keep]:
        os.remove(old)
    return path
