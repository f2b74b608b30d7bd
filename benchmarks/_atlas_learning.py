"""Atlas sections 2 and 3: every rule's cost (``roofline.measure``) and learning (the copy task of
``copy_task.train_copy`` and the Shakespeare character LM of ``char_lm.train_char``).

**Cost.**  ``roofline.measure("gru", k, B, ...)``: BPTT and every rule timed round-robin on the
same machine state (µs per step, ``× BPTT``), stored floats per example (``num_stored``; bytes =
4 × floats in float32), a rule whose state at batch ``B`` exceeds ``cost_max_state_mb`` reported as
``skipped (memory)``, one that does not apply as ``n/a``.  The ceilings (stream bandwidth, matmul
throughput) are measured first by ``roofline`` in the same run.

**Learning.**  ``AtlasCopyConfig`` / ``AtlasCharConfig`` subclass the benchmarks' configs; their
``learner_options`` give ``tbptt_window`` to every method that declares a window (read from the
registry, no name switch).  Every rule updates every step (``tbptt``: once per window, at its end;
``sliding_tbptt``: every step, through the last ``window`` steps).  Each run stops at its token /
character budget or at its time cap (``hit_time_cap`` says which: a slow rule, exact RTRL at 128
units for one, is reported with the tokens it saw).  A rule whose build fails (``ValueError``) or
whose loss turns non-finite (``FloatingPointError``) is recorded as such, and the grid goes on.

Example::

    >>> import _atlas_rules as R
    >>> cfg = copy_config(R.preset("tiny"), ["snap1", "tbptt"])
    >>> cfg.learner_options()
    {'snap1': {}, 'tbptt': {'tbptt_window': 4}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import _atlas_rules as R
import char_lm
import copy_task
import jax
import numpy as np
import roofline

from snapjax.data.text import TextCorpus, corpus_from_texts, load_shakespeare


# --------------------------------------------------------------------------- cost
def run_cost(rules: list[dict], p: R.Preset, log: Callable = print) -> dict:
    """Ceilings and ``roofline.measure`` rows of every runnable rule at every ``cost_ks``."""
    names = [r["rule"] for r in rules if r["status"] == "run"]
    big = max(p.cost_ks)
    n_params = sum(int(a.size) for a in jax.tree.leaves(roofline.init_params(roofline.CELLS["gru"](big))))
    ceilings = {"stream": roofline.stream_bandwidth(p.cost_batch * n_params, 3 * p.cost_repeats),
                "matmul": roofline.matmul_throughput(min(1024, 16 * big), p.cost_repeats)}
    rows = []
    for k in p.cost_ks:
        got = roofline.measure("gru", k, p.cost_batch, p.cost_steps, p.cost_repeats, names, ceilings,
                               p.cost_max_state_mb, options=lambda n: R.rule_options(n, p))
        for r in got:
            if r.get("skipped") == "memory":  # not timed: its state size still tells the memory
                cell = roofline.CELLS["gru"](k)
                method = R.build(r["method"], cell, roofline.init_params(cell), p)
                r["stored_per_example"] = int(method.num_stored() or 0)
            if "stored_per_example" in r:
                r["bytes_per_example"] = 4 * r["stored_per_example"]
        rows += got
        log(f"cost k={k}: " + ", ".join(f"{r['method']} {r['x_bptt']:.2f}x" for r in got if "x_bptt" in r))
    return {"ceilings": ceilings, "rows": rows}


# --------------------------------------------------------------------------- learning configs
@dataclasses.dataclass
class AtlasCopyConfig(copy_task.CopyConfig):
    """``CopyConfig`` whose ``learner_options`` give the window to every method declaring one."""

    def learner_options(self) -> dict[str, dict]:
        return {m: R.learner_options(m, self.tbptt_window) for m in self.methods}


@dataclasses.dataclass
class AtlasCharConfig(char_lm.CharConfig):
    """``CharConfig`` whose ``learner_options`` give the window to every method declaring one."""

    def learner_options(self) -> dict[str, dict]:
        return {m: R.learner_options(m, self.window) for m in self.methods}


def copy_config(p: R.Preset, methods: list[str]) -> AtlasCopyConfig:
    return AtlasCopyConfig(
        methods=tuple(methods), densities=p.copy_densities, seeds=p.seeds, units=p.copy_units,
        batch_size=p.copy_batch, lr=p.copy_lr, token_budget=p.copy_tokens, time_budget_s=p.copy_time_s,
        max_length=p.copy_max_length, tbptt_window=p.window, chunk=p.window, mode=f"atlas-{p.name}")


def char_config(p: R.Preset, methods: list[str]) -> AtlasCharConfig:
    return AtlasCharConfig(
        methods=tuple(methods), densities=(1.0,), seeds=p.seeds, units=p.char_units, batch_size=p.char_batch,
        window=p.window, lr=p.char_lr, char_budget=p.char_chars, time_budget_s=p.char_time_s,
        eval_every=p.char_eval_every, val_chars=p.char_val_chars, mode=f"atlas-{p.name}")


def synthetic_corpus() -> TextCorpus:
    """A small word corpus for the tiny preset (no download)."""
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    texts = {f"work{i:02d}": " ".join(rng.choice(words, 400)) + "\n" for i in range(4)}
    return corpus_from_texts(texts, validation_every=4)


def _guarded(fn: Callable[[], dict], head: dict) -> dict:
    """``fn()``, or ``head`` with an ``error`` where the rule does not apply or its loss diverged."""
    try:
        return fn()
    except (ValueError, FloatingPointError) as err:
        return {**head, "error": f"{type(err).__name__}: {err}"}


def run_learning(rules: list[dict], p: R.Preset, log: Callable = print, corpus: TextCorpus | None = None) -> dict:
    """Copy task (``copy_densities``; ``sparse_copy_rules`` also at ``sparse_copy_densities``) and
    char LM (dense) for every runnable rule and seed."""
    names = [r["rule"] for r in rules if r["status"] == "run"]
    ccfg, lcfg = copy_config(p, names), char_config(p, names)
    copy_runs, char_runs = [], []
    grid = [(n, d) for d in p.copy_densities for n in names]
    grid += [(n, d) for d in p.sparse_copy_densities for n in names if n in p.sparse_copy_rules]
    n_char = len(names) * len(p.seeds)
    log(f"learning: {len(grid) * len(p.seeds)} copy runs (≤ {p.copy_time_s:g} s each) and {n_char} char runs "
        f"(≤ {p.char_time_s:g} s each): at most {(len(grid) * len(p.seeds) * p.copy_time_s + n_char * p.char_time_s) / 60:.0f} min "
        f"plus evaluation after the caps")
    for name, d in grid:
        for seed in p.seeds:
            head = {"method": name, "label": name, "density": d, "seed": seed}
            r = _guarded(lambda name=name, d=d, seed=seed: copy_task.train_copy(name, d, seed, ccfg, progress=False), head)
            copy_runs.append(r)
            log(f"copy {name} d={d:g} s={seed}: " + (r.get("error") or
                f"L={r['final_L']} tokens={r['tokens']:,} {r['wall_s']:.0f}s{' (cap)' if r['hit_time_cap'] else ''}"))
    if corpus is None:
        corpus = synthetic_corpus() if p.synthetic_corpus else load_shakespeare()
    for name in names:
        for seed in p.seeds:
            head = {"method": name, "label": name, "density": 1.0, "seed": seed}
            r = _guarded(lambda name=name, seed=seed: char_lm.train_char(name, 1.0, seed, corpus, lcfg, progress=False), head)
            char_runs.append(r)
            log(f"char {name} s={seed}: " + (r.get("error") or
                f"val {r['final_val_bpc']:.3f} bpc chars={r['chars']:,} {r['wall_s']:.0f}s"
                f"{' (cap)' if r['hit_time_cap'] else ''}"))
    return {"copy_config": dataclasses.asdict(ccfg), "char_config": dataclasses.asdict(lcfg),
            "vocab_size": corpus.vocab_size, "copy": copy_runs, "char": char_runs}


# --------------------------------------------------------------------------- summaries
def _ms(v: list[float]) -> dict:
    a = np.asarray(v, float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def L_at(run: dict, tokens: float) -> int:
    """Curriculum length a copy run had reached after ``tokens`` tokens."""
    L = 1
    for tok, l in zip(run["history"]["tokens"], run["history"]["L"]):
        if tok <= tokens:
            L = l
    return int(L)


def summarize_copy(runs: list[dict], name: str, density: float, levels=(5, 10, 20)) -> dict | None:
    rs = [r for r in runs if r["method"] == name and r["density"] == density and "error" not in r]
    errs = [r["error"] for r in runs if r["method"] == name and r["density"] == density and "error" in r]
    if not rs:
        return {"error": errs[0]} if errs else None
    out = {"final_L": _ms([r["final_L"] for r in rs]), "tokens": _ms([r["tokens"] for r in rs]),
           "hit_time_cap": any(r["hit_time_cap"] for r in rs), "label": rs[0]["label"],
           "us_per_token": 1e6 / float(np.mean([r["tokens_per_s"] for r in rs]))}
    for L in levels:
        reach = [copy_task.tokens_to_reach(r, L) for r in rs]
        out[f"tokens_to_L{L}"] = _ms(reach) | {"reached": int(np.isfinite(reach).sum())}
    return out


def summarize_char(runs: list[dict], name: str) -> dict | None:
    rs = [r for r in runs if r["method"] == name and "error" not in r]
    errs = [r["error"] for r in runs if r["method"] == name and "error" in r]
    if not rs:
        return {"error": errs[0]} if errs else None
    return {"final_val_bpc": _ms([r["final_val_bpc"] for r in rs]), "best_val_bpc": _ms([r["best_val_bpc"] for r in rs]),
            "chars": _ms([r["chars"] for r in rs]), "hit_time_cap": any(r["hit_time_cap"] for r in rs),
            "label": rs[0]["label"], "us_per_char": 1e6 / float(np.mean([r["chars_per_s"] for r in rs]))}
