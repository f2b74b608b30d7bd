"""Shared pieces of the copy-task and char-LM benchmarks.

* ``METHODS``: method keys and their display labels.
* ``make_masks``: static random sparsity masks at a given parameter density.
* ``OnlineTrainer``: a small, self-contained online learner (GRU cell + dense read-out +
  optax) for RTRL / SnAp-n (through :func:`snapjax.influence_tracker`), UORO and truncated
  BPTT.  It processes fixed-size *chunks* of time steps in one jitted ``lax.scan`` so that a
  benchmark compiles once per method, whatever the sequence length; padded steps are
  skipped with ``lax.cond`` (they cost almost nothing).
* ``plot_curves`` / ``write_json`` / ``markdown_table``: output helpers.

Update rule (all online methods): after every time step ``t`` whose loss mask is non-zero
for at least one example, the parameters take one optimiser step with the gradient of
``L_t = Σ_b mask_tb · CE_tb / B`` estimated by the method (exact for the read-out).  Steps
with no scored example (e.g. the copy task's presentation phase) only propagate the state
and the influence.  Truncated BPTT instead takes one step per window of ``tbptt_window``
steps with the exact gradient of the window's summed loss (state carried across windows
without gradient).
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
from snapjax.influence import influence_tracker
from snapjax.uoro import uoro_tracker

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


def apply_masks(params: PyTree, masks: dict | None) -> PyTree:
    """Zero the masked-out kernel entries (cosmetic: the cell multiplies by the mask)."""
    if not masks:
        return params
    out = dict(params)
    for name, m in masks.items():
        out[name] = {**params[name], "kernel": params[name]["kernel"] * jnp.asarray(m, params[name]["kernel"].dtype)}
    return out


# --------------------------------------------------------------------------- learner
class TrainState(NamedTuple):
    params: PyTree  # {'cell': ..., 'readout': {'kernel', 'bias'}}
    opt_state: PyTree
    s: jax.Array  # (B, units, m) internal cell state
    aux: PyTree  # influence (rtrl/snap), (s_tilde, theta_tilde) (uoro), () (tbptt)
    key: jax.Array
    updates: jax.Array  # number of optimiser steps taken


def _readout_loss(rp, h, y, m):
    logits = h @ rp["kernel"] + rp["bias"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return jnp.sum(m * ce) / h.shape[0], ce


class OnlineTrainer:
    """Online learner for one method (static; close over it in jitted code).

    Args:
      units: GRU units.  n_in: input vocabulary size (inputs are int tokens, one-hot encoded
      inside).  n_out: read-out classes.  method: key of ``METHODS``.
      optimizer: an optax transformation.  masks: static kernel masks or None.
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
        self.method, self.opt, self.masks = method, optimizer, masks
        self.precision = precision
        self.tbptt_window = int(tbptt_window)
        self.chunk = self.tbptt_window if method == "tbptt" else int(chunk)
        self.tracker = None
        self.run_chunk = jax.jit(self._run_chunk)
        self.reset = jax.jit(self._reset)
        self.evaluate = jax.jit(self._evaluate)

    # ------------------------------------------------------------------ init
    def init_params(self, key: jax.Array) -> PyTree:
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, self.n_in), jnp.float32)
        cp = self.cell.init(k1, jnp.zeros((1, self.units)), x)["params"]
        cp = jax.tree.map(lambda a: a, dict(cp))
        cp = apply_masks(cp, self.masks)
        rk = jax.random.normal(k2, (self.units, self.n_out)) / math.sqrt(self.units)
        return {"cell": cp, "readout": {"kernel": rk, "bias": jnp.zeros((self.n_out,))}}

    def init(self, key: jax.Array, batch_size: int) -> TrainState:
        kp, kr = jax.random.split(key)
        params = self.init_params(kp)
        cp = params["cell"]
        s = self.spec.zero_state(batch_size)
        if self.method in ("rtrl",) or self.method.startswith("snap"):
            self.tracker = influence_tracker(self.spec, cp, self.method, masks=self.masks, precision=self.precision)
            aux = self.tracker.init(batch_size)
        elif self.method == "uoro":
            kr, ku = jax.random.split(kr)
            self.tracker = uoro_tracker(self.spec, cp, masks=self.masks, precision=self.precision)
            aux = self.tracker.init(batch_size, key=ku)
        else:
            aux = ()
        return TrainState(params, self.opt.init(params), s, aux, kr, jnp.zeros((), jnp.int32))

    def influence_floats(self, batch_size: int = 1) -> int:
        """Floats of method state per example (influence / UORO vectors), 0 for TBPTT."""
        return 0 if self.tracker is None else self.tracker.num_stored()

    # ------------------------------------------------------------------ pieces
    def _reset(self, ts: TrainState) -> TrainState:
        """Zero the hidden state and the method state (start of an independent sequence)."""
        # Zero the floating leaves only: UORO's PRNG key keeps running across sequences.
        zero = lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return ts._replace(s=jnp.zeros_like(ts.s), aux=jax.tree.map(zero, ts.aux))

    def _apply(self, ts: TrainState, grads: PyTree, do: jax.Array) -> TrainState:
        updates, new_opt = self.opt.update(grads, ts.opt_state, ts.params)
        new_params = optax.apply_updates(ts.params, updates)
        sel = lambda a, b: jax.tree.map(lambda u, v: jnp.where(do, u, v), a, b)
        return ts._replace(
            params=sel(new_params, ts.params),
            opt_state=sel(new_opt, ts.opt_state),
            updates=ts.updates + do.astype(jnp.int32),
        )

    def _dlds(self, s, dldh):
        return jnp.zeros_like(s).at[..., self.spec.readout].set(dldh)

    def _online_step(self, ts: TrainState, x, y, m):
        spec, cp, rp = self.spec, ts.params["cell"], ts.params["readout"]
        s, aux = self.tracker.step(cp, ts.s, ts.aux, x)
        h = spec.output(s)
        (_, ce), (g_r, dldh) = jax.value_and_grad(_readout_loss, argnums=(0, 1), has_aux=True)(rp, h, y, m)
        g_c = self.tracker.gradient(aux, self._dlds(s, dldh))
        ts = ts._replace(s=s, aux=aux)
        ts = self._apply(ts, {"cell": g_c, "readout": g_r}, jnp.sum(m) > 0)
        return ts, ce

    def _run_chunk(self, ts: TrainState, tokens, targets, mask, valid):
        """Process ``C`` steps: tokens/targets int ``(C, B)``, mask float ``(C, B)``, valid bool ``(C,)``.

        Returns ``(ts, ce)`` with per-step cross-entropy (nats) ``(C, B)`` (0 on invalid steps).
        """
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)
        if self.method == "tbptt":
            return self._tbptt_chunk(ts, xs, targets, mask * valid[:, None])

        def body(ts, inp):
            x, y, m, v = inp
            return lax.cond(v, self._online_step, lambda t, *_: (t, jnp.zeros(y.shape, jnp.float32)), ts, x, y, m)

        return lax.scan(body, ts, (xs, targets, mask, valid))

    def _tbptt_chunk(self, ts: TrainState, xs, ys, ms):
        spec = self.spec

        def total(params, s0):
            def body(s, inp):
                x, y, m = inp
                s = cell_step(spec, params["cell"], s, x, self.masks, self.precision)
                loss, ce = _readout_loss(params["readout"], spec.output(s), y, m)
                return s, (loss, ce)

            s, (losses, ce) = lax.scan(body, s0, (xs, ys, ms))
            return losses.sum(), (s, ce)

        (_, (s, ce)), g = jax.value_and_grad(total, has_aux=True)(ts.params, ts.s)
        ts = ts._replace(s=s)
        return self._apply(ts, g, jnp.sum(ms) > 0), ce

    def _evaluate(self, params, tokens, targets):
        """Forward-only cross-entropy (nats) ``(T, B)`` from a zero state (no learning)."""
        spec = self.spec
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)
        ones = jnp.ones(targets.shape[1:], jnp.float32)

        def body(s, inp):
            x, y = inp
            s = cell_step(spec, params["cell"], s, x, self.masks, self.precision)
            return s, _readout_loss(params["readout"], spec.output(s), y, ones)[1]

        return lax.scan(body, spec.zero_state(tokens.shape[1]), (xs, targets))[1]


def run_sequence(trainer: OnlineTrainer, ts: TrainState, tokens, targets, mask):
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
