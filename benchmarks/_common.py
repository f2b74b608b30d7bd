"""Shared pieces of the copy-task and char-LM benchmarks.

* ``METHODS``: method keys and their display labels.
* ``make_masks``: static random sparsity masks at a given parameter density.
* ``ChunkedLearner``: a thin driver around :class:`snapjax.OnlineLearner` (GRU cell + dense
  read-out + optax; RTRL / SnAp-n, UORO and truncated BPTT).  All the online maths (cell step,
  influence, gradient, optimiser update) is ``OnlineLearner.step``; the driver adds the
  benchmarks' initialisation (read-out ``N(0, 1/units)``, zero bias; UORO's sign key as in the
  published runs), fixed-size *chunks* of time steps in one jitted ``lax.scan`` so that a
  benchmark compiles once per method whatever the sequence length (padded steps are skipped
  with ``lax.cond`` for the online methods and run with a zero loss mask for TBPTT, whose
  windows thereby stay aligned with the sequence start), an optimiser-step counter and a
  forward-only evaluation.  ``run_sequence`` feeds one time-major batch through it.
* ``plot_curves`` / ``write_json`` / ``markdown_table``: output helpers.

Update rule (all online methods; ``OnlineLearner(..., skip_unscored_updates=True)``): after
every time step ``t`` whose loss mask is non-zero for at least one example, the parameters take
one optimiser step with the gradient of the masked mean ``L_t = Σ_b mask_tb · CE_tb / Σ_b
mask_tb`` estimated by the method (exact for the read-out); in both benchmarks a step's mask is
all ones or all zeros, so this is ``Σ_b mask_tb · CE_tb / B``.  Steps with no scored example
(e.g. the copy task's presentation phase) make no optimiser call (parameters and Adam state
unchanged) and only propagate the state and the influence.  Truncated BPTT instead takes one
step per window of ``tbptt_window`` steps with the exact gradient of the window's summed loss
(state carried across windows without gradient), skipped if the window has no scored example.
The library's robustness applies too: a non-finite gradient skips the update, and an example
whose state or influence becomes non-finite is reset.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` without an install
    sys.path.insert(0, str(REPO_ROOT))

from snapjax.cells import GRUCell, cell_step
from snapjax.online import OnlineLearner, OnlineState

PyTree = Any

METHODS: dict[str, str] = {
    "snap1": "SnAp-1",
    "snap2": "SnAp-2",
    "snap3": "SnAp-3",
    "rtrl": "RTRL",
    "uoro": "UORO",
    "tbptt": "TBPTT",
}

LN2 = math.log(2.0)


def method_label(method: str, tbptt_window: int | None = None) -> str:
    label = METHODS.get(method, method)
    if method == "tbptt" and tbptt_window:
        label = f"{label}-{tbptt_window}"
    return label


# --------------------------------------------------------------------------- sparsity
def make_masks(seed: int, params: PyTree, density: float, spec) -> dict | None:
    """Random static 0/1 masks for every kernel of ``params`` at ``density`` (None if 1).

    Uses :func:`snapjax.sparsity.random_masks` (every kernel, input and recurrent; each
    unit keeps exactly ``max(1, round(density * n_in))`` incoming weights per kernel) when
    that module is available; otherwise draws, for each kernel independently, exactly
    ``round(density * size)`` kept entries uniformly at random.
    """
    if density >= 1.0:
        return None
    try:  # prefer the library implementation when it exists
        from snapjax.sparsity import random_masks  # type: ignore

        masks = random_masks(int(seed), params, density, spec=spec)
        return {k: np.asarray(v, bool) for k, v in masks.items() if v is not None}
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    masks = {}
    for p in spec.projections:
        shape = np.shape(params[p.name]["kernel"])
        size = int(np.prod(shape))
        keep = max(1, int(round(density * size)))
        flat = np.zeros(size, bool)
        flat[rng.choice(size, keep, replace=False)] = True
        masks[p.name] = flat.reshape(shape)
    return masks


# --------------------------------------------------------------------------- learner
class TrainState(NamedTuple):
    """State of a :class:`ChunkedLearner` run (a pytree)."""

    online: OnlineState  # the snapjax.OnlineLearner state (params, optimiser, carry, influence, ...)
    updates: jax.Array  # number of optimiser steps taken

    @property
    def params(self) -> PyTree:
        """``{'cell': ..., 'readout': {'kernel', 'bias'}}``."""
        return self.online.params


class ChunkedLearner:
    """Benchmark driver around :class:`snapjax.OnlineLearner` (static; close over it in jitted code).

    A GRU cell (inputs: int tokens, one-hot encoded inside) with a dense read-out, trained by
    ``OnlineLearner(..., skip_unscored_updates=True)``: every time step goes through
    :meth:`snapjax.OnlineLearner.step`.  This class only adds what the benchmarks need around
    it: the benchmarks' initialisation, fixed-size jitted chunks with padded steps,
    an update counter and a forward-only evaluation.

    Args:
      units: GRU units.  n_in: input vocabulary size.  n_out: read-out classes.
      method: key of ``METHODS``.  optimizer: an optax transformation.
      masks: static kernel masks or None.
      tbptt_window: window (and chunk length) for ``"tbptt"``.
      chunk: steps per jitted call for the online methods.
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
        tbptt_window: int = 8,
        chunk: int = 16,
        precision: Any = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        self.cell = GRUCell(features=units)
        self.spec = self.cell.spec
        self.units, self.n_in, self.n_out = units, n_in, n_out
        self.method, self.masks = method, masks
        self.tbptt_window = int(tbptt_window)
        self.chunk = self.tbptt_window if method == "tbptt" else int(chunk)
        self.learner = OnlineLearner(
            self.cell,
            n_out,
            method=method,
            optimizer=optimizer,
            masks=masks,
            precision=precision,
            tbptt_window=self.tbptt_window if method == "tbptt" else None,
            skip_unscored_updates=True,
        )
        self.tracker = None
        self.run_chunk = jax.jit(self._run_chunk)
        self.reset = jax.jit(self._reset)
        self.evaluate = jax.jit(self._evaluate)

    # ------------------------------------------------------------------ init
    def init_params(self, key: jax.Array) -> PyTree:
        """Cell parameters from ``cell.init`` and a read-out ``N(0, 1/units)`` with zero bias
        (unmasked: ``OnlineLearner.init`` applies the masks)."""
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, self.n_in), jnp.float32)
        cp = dict(self.cell.init(k1, jnp.zeros((1, self.units)), x)["params"])
        rk = jax.random.normal(k2, (self.units, self.n_out)) / math.sqrt(self.units)
        return {"cell": cp, "readout": {"kernel": rk, "bias": jnp.zeros((self.n_out,))}}

    def init(self, key: jax.Array, batch_size: int) -> TrainState:
        kp, kr = jax.random.split(key)
        params = self.init_params(kp)
        state = self.learner.init(kr, params, batch_size, self.n_in)
        self.tracker = self.learner.tracker(state.params["cell"])
        if self.method == "uoro":
            # UORO's random signs come from this key (the benchmarks' seeding since the first
            # published results): the running key then continues across sequence resets.
            ku = jax.random.split(kr)[1]
            state = state._replace(method_state=self.tracker.init(batch_size, key=ku))
        return TrainState(state, jnp.zeros((), jnp.int32))

    def influence_floats(self, batch_size: int = 1) -> int:
        """Floats of method state per example (influence / UORO vectors), 0 for TBPTT."""
        return 0 if self.tracker is None else self.tracker.num_stored()

    # ------------------------------------------------------------------ pieces
    def _reset(self, ts: TrainState) -> TrainState:
        """Zero the hidden state and the method state (start of an independent sequence)."""
        return ts._replace(online=self.learner.reset_carry(ts.online))

    def _run_chunk(self, ts: TrainState, tokens, targets, mask, valid):
        """Process ``C`` steps: tokens/targets int ``(C, B)``, mask float ``(C, B)``, valid bool ``(C,)``.

        Every valid step is one :meth:`snapjax.OnlineLearner.step`.  Invalid (padding) steps
        are skipped with ``lax.cond`` for the online methods; for TBPTT they are run with a
        zero loss mask so that windows stay aligned with the sequence start.
        Returns ``(ts, ce)`` with per-step cross-entropy (nats) ``(C, B)`` (0 on invalid steps).
        """
        learner = self.learner
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)

        def live(st, x, y, m):
            st, logits, metrics = learner.step(st, x, y, m)
            return st, learner.loss_fn(logits, y), metrics["updated"]

        def pad(st, x, y, m):
            return st, jnp.zeros(y.shape, jnp.float32), jnp.asarray(False)

        def body(carry, inp):
            st, n = carry
            x, y, m, v = inp
            if self.method == "tbptt":
                st, ce, upd = live(st, x, y, m * v)
                ce = jnp.where(v, ce, 0.0)
            else:
                st, ce, upd = lax.cond(v, live, pad, st, x, y, m)
            return (st, n + upd.astype(jnp.int32)), ce

        (st, n), ce = lax.scan(body, (ts.online, ts.updates), (xs, targets, mask, valid))
        return TrainState(st, n), ce

    def _evaluate(self, params, tokens, targets):
        """Forward-only cross-entropy (nats) ``(T, B)`` from a zero state (no learning)."""
        learner, spec = self.learner, self.spec
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)

        def body(s, inp):
            x, y = inp
            s = cell_step(spec, params["cell"], s, x, learner.tracker_masks, learner.precision)
            logits = learner.readout.apply({"params": params["readout"]}, spec.output(s))
            return s, learner.loss_fn(logits, y)

        return lax.scan(body, spec.zero_state(tokens.shape[1]), (xs, targets))[1]


def run_sequence(trainer: ChunkedLearner, ts: TrainState, tokens, targets, mask):
    """Feed one time-major batch ``(T, B)`` through ``trainer`` in chunks (padding the tail).

    Returns ``(ts, ce (T, B) numpy)``.
    """
    T = tokens.shape[0]
    C = trainer.chunk
    n = -(-T // C)
    pad = n * C - T
    tokens = np.pad(np.asarray(tokens, np.int32), ((0, pad), (0, 0)), constant_values=0)
    targets = np.pad(np.asarray(targets, np.int32), ((0, pad), (0, 0)))
    mask = np.pad(np.asarray(mask, np.float32), ((0, pad), (0, 0)))
    valid = np.arange(n * C) < T
    ces = []
    for i in range(n):
        sl = slice(i * C, (i + 1) * C)
        ts, ce = trainer.run_chunk(ts, tokens[sl], targets[sl], mask[sl], valid[sl])
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
        if isinstance(o, np.ndarray):
            return o.tolist()
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


_COLORS = {
    "snap1": "tab:blue",
    "snap2": "tab:orange",
    "snap3": "tab:red",
    "rtrl": "black",
    "uoro": "tab:green",
    "tbptt": "tab:purple",
}


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
    """One panel per density; one colour per method; one line per seed.

    Each run is a dict with ``method``, ``label``, ``density``, ``seed`` and ``history``
    (a dict of equal-length lists including ``x_key`` and ``y_key``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({r["density"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(5.2 * len(densities), 4), squeeze=False)
    for ax, d in zip(axes[0], densities):
        seen = set()
        for r in runs:
            if r["density"] != d:
                continue
            x, y = r["history"][x_key], r["history"][y_key]
            lab = r["label"] if r["label"] not in seen else None
            seen.add(r["label"])
            kw = dict(color=_COLORS.get(r["method"]), label=lab, alpha=0.85, lw=1.4)
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
