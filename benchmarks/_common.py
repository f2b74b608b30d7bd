"""Shared pieces of the copy-task and char-LM benchmarks.

* ``ChunkedLearner``: a thin driver over :class:`snapjax.OnlineLearner` (GRU cell + dense
  read-out + optax; any method :func:`snapjax.online_method` builds by name).  All the online
  maths (cell step, method state, gradient, optimiser update, per-example fault containment)
  is ``OnlineLearner.run``; the driver only adds the benchmarks' initialisation (read-out
  ``N(0, 1/units)``, zero bias), one-hot inputs, fixed-size *chunks* of time steps so that a
  benchmark compiles ``OnlineLearner.run`` once per method whatever the sequence length, an
  optimiser-step counter and forward-only evaluation (``OnlineLearner.evaluate``).
  ``run_sequence`` feeds one time-major batch through it.
* ``make_masks``: static random sparsity masks at a given parameter density.
* ``display_name``: a method's display label from the name of the built method
  (``"snap2"`` → ``"SnAp-2"``, ``"tbptt8"`` → ``"TBPTT-8"``).
* ``plot_curves`` / ``write_json`` / ``markdown_table``: output helpers.

Chunks and padding.  The chunk length ``C`` is the requested ``chunk`` rounded up to a multiple
of the learner's optimiser period ``K`` (``OnlineLearner.period``: 1 for RTRL / SnAp / UORO, the
window for truncated BPTT).  A sequence of ``T`` steps runs as ``⌈T / C⌉`` chunks; the padded
steps of the last chunk carry a zero loss mask.  So every sequence starts a new optimiser
period (windows stay aligned with the sequence start), and a padded step trains nothing: with
``skip_unscored_updates=True`` a period without a scored example makes no optimiser call, and a
zero cotangent adds nothing to a window's gradient.  Padded steps do advance the hidden state
and the method state after the sequence's last step; the copy task resets both at every
sequence start, and the char-LM windows are exactly one chunk (no padding).

Update rule (``OnlineLearner(..., skip_unscored_updates=True)``): at the end of every optimiser
period with at least one scored example, the parameters take one optimiser step with the
method's estimate of the gradient of the period's summed masked mean losses ``L_t = Σ_b
mask_tb · CE_tb / Σ_b mask_tb`` (exact for the read-out).  For RTRL / SnAp / UORO the period is
one step; in both benchmarks a step's mask is all ones or all zeros, so ``L_t = Σ_b mask_tb ·
CE_tb / B`` and the copy task's presentation phase makes no optimiser call (parameters and Adam
state unchanged; only the state and the method state propagate).  Truncated BPTT takes one step
per window with the exact gradient of the window's summed loss (state carried across windows
without gradient).  The library's robustness applies too: a non-finite gradient skips the
update, and an example whose state or method state becomes non-finite is reset.

Example::

    >>> import jax, numpy as np, optax
    >>> tr = ChunkedLearner(8, 4, 2, "tbptt", optax.adam(1e-2), chunk=5, tbptt_window=4)
    >>> tr.label, tr.period, tr.chunk
    ('TBPTT-4', 4, 8)
    >>> ts = tr.init(jax.random.key(0), batch_size=2)
    >>> ts, ce = run_sequence(tr, ts, np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 2)))
    >>> ce.shape, int(ts.updates)
    ((3, 2), 1)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` without an install
    sys.path.insert(0, str(REPO_ROOT))

from snapjax import GRUCell, OnlineLearner, OnlineState  # noqa: E402
from snapjax.methods import parse_method_name  # noqa: E402
from snapjax.engine.sparsity import random_masks  # noqa: E402

PyTree = Any

LN2 = math.log(2.0)

# Display spelling of a method name's alphabetic prefix (the others are upper-cased).
_SPELLING = {"snap": "SnAp"}


def display_name(name: str) -> str:
    """Display label of a built method's ``name``: ``"snap2"`` → ``"SnAp-2"``, ``"rtrl"`` →
    ``"RTRL"``, ``"tbptt8"`` → ``"TBPTT-8"``, ``"rtrl-chunk32"`` → ``"RTRL-chunk32"``."""
    m = re.fullmatch(r"([A-Za-z]+)(\d*)(.*)", name)
    if m is None:
        return name
    prefix, digits, rest = m.groups()
    return _SPELLING.get(prefix.lower(), prefix.upper()) + (f"-{digits}" if digits else "") + rest


def check_methods(names: Sequence[str]) -> None:
    """``ValueError`` (the library's message) for a name :func:`snapjax.online_method` rejects."""
    for name in names:
        parse_method_name(name)


# --------------------------------------------------------------------------- sparsity
def cell_params(key: jax.Array, units: int, n_in: int) -> PyTree:
    """GRU cell parameters (``GRUCell(units).init``), for inputs of size ``n_in``."""
    return dict(GRUCell(features=units).init(key, jnp.zeros((1, units)), jnp.zeros((1, n_in)))["params"])


def make_masks(seed: int, units: int, n_in: int, density: float) -> dict | None:
    """Random static 0/1 masks for every kernel of a ``GRUCell(units)`` with ``n_in`` inputs at
    ``density`` (None if 1): ``{projection name: bool (fan_in, units)}``.

    :func:`snapjax.engine.sparsity.random_masks` (only the kernel shapes are read): every kernel, input
    and recurrent; each unit keeps exactly ``max(1, round(density * fan_in))`` incoming weights
    per kernel, drawn from ``seed``.
    """
    if density >= 1.0:
        return None
    cell = GRUCell(features=units)
    masks = random_masks(int(seed), cell_params(jax.random.key(0), units, n_in), density, spec=cell)
    return {k: np.asarray(v, bool) for k, v in masks.items() if v is not None}


# --------------------------------------------------------------------------- learner
class TrainState(NamedTuple):
    """State of a :class:`ChunkedLearner` run (a pytree)."""

    online: OnlineState  # the snapjax.OnlineLearner state (params, optimiser, carry, method state, ...)
    updates: jax.Array  # number of optimiser steps taken

    @property
    def params(self) -> PyTree:
        """``{'layers_0': GRU params, 'layers_1': read-out {'kernel', 'bias'}}``."""
        return self.online.params


class ChunkedLearner:
    """Benchmark driver over :class:`snapjax.OnlineLearner` (static; close over it in jitted code).

    A GRU cell (inputs: int tokens, one-hot encoded inside) with a dense read-out, trained by
    ``OnlineLearner(GRUCell(units), n_out, method=method, skip_unscored_updates=True)``: every
    chunk is one ``OnlineLearner.run`` (see the module docstring for chunks and padding).

    Args:
      units: GRU units.  n_in: input vocabulary size.  n_out: read-out classes.
      method: a method name for :func:`snapjax.online_method` (``"snap1"``, ``"rtrl"``,
        ``"uoro"``, ``"tbptt"``...).  optimizer: an optax transformation.
      masks: static kernel masks (``make_masks``) or None.
      chunk: steps per jitted call (rounded up to a multiple of the optimiser period).
      precision: matmul precision of the method.
      options: further ``OnlineLearner`` keyword arguments for this method (e.g.
        ``tbptt_window=8`` for ``"tbptt"``).

    Attributes:
      learner: the ``OnlineLearner``.  methods: its built online methods (one per recurrent
      layer).  label: display label (``display_name`` of the methods' names).  period: the
      optimiser period ``K``.  chunk: the chunk length ``C`` (a multiple of ``K``).
    """

    def __init__(
        self,
        units: int,
        n_in: int,
        n_out: int,
        method: str,
        optimizer: optax.GradientTransformation,
        *,
        masks: dict | None = None,
        chunk: int = 16,
        precision: Any = None,
        **options: Any,
    ):
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.cell = GRUCell(features=units)
        self.units, self.n_in, self.n_out = int(units), int(n_in), int(n_out)
        self.method, self.masks = method, masks
        self.learner = OnlineLearner(
            self.cell, self.n_out, method=method, optimizer=optimizer, masks=masks, precision=precision,
            skip_unscored_updates=True, **options,
        )
        shapes = self.init_params(jax.random.key(0))
        self.methods = self.learner.methods(shapes, self.n_in)
        self.label = "+".join(display_name(m.name) for m in self.methods)
        self.period = self.learner.period(shapes)
        self.chunk = self.period * -(-int(chunk) // self.period)
        self.run_chunk = jax.jit(self._run_chunk)
        self.reset = jax.jit(self._reset)
        self.evaluate = jax.jit(self._evaluate)

    # ------------------------------------------------------------------ init
    def init_params(self, key: jax.Array) -> PyTree:
        """Cell parameters from ``cell.init`` and a read-out ``N(0, 1/units)`` with zero bias
        (unmasked: ``OnlineLearner.init`` applies the masks)."""
        k1, k2 = jax.random.split(key)
        rk = jax.random.normal(k2, (self.units, self.n_out)) / math.sqrt(self.units)
        return {"layers_0": cell_params(k1, self.units, self.n_in),
                "layers_1": {"kernel": rk, "bias": jnp.zeros((self.n_out,))}}

    def init(self, key: jax.Array, batch_size: int) -> TrainState:
        """Parameters (``init_params``), zero carries, fresh method states (``key`` seeds the
        methods that draw random numbers, e.g. UORO's signs) and optimiser state."""
        kp, kr = jax.random.split(key)
        state = self.learner.init(kr, self.init_params(kp), batch_size=batch_size, input_size=self.n_in)
        return TrainState(state, jnp.zeros((), jnp.int32))

    def influence_floats(self) -> int:
        """Floats of method state per example (``num_stored`` of the methods: influence, UORO
        vectors, the truncated-BPTT window buffer)."""
        return int(sum(m.num_stored() or 0 for m in self.methods))

    # ------------------------------------------------------------------ pieces
    def _reset(self, ts: TrainState) -> TrainState:
        """Zero the hidden state and re-initialise the method state (start of an independent
        sequence; shared leaves such as UORO's running key continue)."""
        return ts._replace(online=self.learner.reset_carry(ts.online))

    def _run_chunk(self, ts: TrainState, tokens, targets, mask):
        """One ``OnlineLearner.run`` over ``C`` steps: tokens / targets int ``(C, B)``, mask float
        ``(C, B)``.  Returns ``(ts, ce)`` with the per-step cross-entropy (nats) ``(C, B)`` of the
        predictions made while learning."""
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)
        online, logits, metrics = self.learner.run(ts.online, xs, targets, mask)
        ce = jax.vmap(self.learner.loss_fn)(logits, targets)
        return TrainState(online, ts.updates + jnp.sum(metrics["updated"], dtype=jnp.int32)), ce

    def _evaluate(self, params: PyTree, tokens, targets) -> jax.Array:
        """Forward-only mean cross-entropy (nats) over ``(T, B)`` from a zero state
        (``OnlineLearner.evaluate``; no learning)."""
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)
        return self.learner.evaluate(params, xs, targets)["loss"]


def run_sequence(trainer: ChunkedLearner, ts: TrainState, tokens, targets, mask):
    """Feed one time-major batch ``(T, B)`` through ``trainer`` in chunks of ``trainer.chunk``
    steps (the tail padded with a zero loss mask, see the module docstring).

    Returns ``(ts, ce (T, B) numpy)``.
    """
    T = int(np.shape(tokens)[0])
    C = trainer.chunk
    n = -(-T // C)
    pad = n * C - T
    tokens = np.pad(np.asarray(tokens, np.int32), ((0, pad), (0, 0)))
    targets = np.pad(np.asarray(targets, np.int32), ((0, pad), (0, 0)))
    mask = np.pad(np.asarray(mask, np.float32), ((0, pad), (0, 0)))
    ces = []
    for i in range(n):
        sl = slice(i * C, (i + 1) * C)
        ts, ce = trainer.run_chunk(ts, tokens[sl], targets[sl], mask[sl])
        ces.append(ce)
    ce = np.concatenate([np.asarray(c) for c in ces])[:T]
    return ts, ce


# --------------------------------------------------------------------------- outputs
def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, (np.ndarray, jax.Array)):  # a 0-d array becomes its scalar
            return np.asarray(o).tolist()
        raise TypeError(type(o))

    path.write_text(json.dumps(obj, indent=1, default=default))
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> str:
    v = np.asarray(values, float)
    if v.size == 1:
        return f"{v[0]:.3g}"
    return f"{v.mean():.3g} ± {v.std():.2g}"




def plot_curves(
    path: str | os.PathLike,
    runs: Sequence[dict],
    x_key: str,
    y_key: str,
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    step: bool = False,
) -> Path:
    """One panel per density; one colour per method (in order of first appearance); one line
    per seed.

    Each run is a dict with ``method``, ``label``, ``density``, ``seed`` and ``history``
    (a dict of equal-length lists including ``x_key`` and ``y_key``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({r["density"] for r in runs}, reverse=True)
    colors = {}
    for r in runs:
        colors.setdefault(r["label"], f"C{len(colors) % 10}")
    fig, axes = plt.subplots(1, len(densities), figsize=(5.2 * len(densities), 4), squeeze=False)
    for ax, d in zip(axes[0], densities):
        seen = set()
        for r in runs:
            if r["density"] != d:
                continue
            x, y = r["history"][x_key], r["history"][y_key]
            lab = r["label"] if r["label"] not in seen else None
            seen.add(r["label"])
            kw = dict(color=colors[r["label"]], label=lab, alpha=0.85, lw=1.4)
            (ax.step(x, y, where="post", **kw) if step else ax.plot(x, y, **kw))
        ax.set_title(f"{title} — density {d:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_list(text: str, cast: Callable = str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]
