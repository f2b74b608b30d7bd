"""The atlas's presets and its list of rules, read from the method registry (no per-method code).

* ``Preset``: every size, budget and cap of one atlas run (``PRESETS``: ``tiny`` for the test
  suite, ``medium`` for 2 CPU cores in about 2 hours, ``full`` for an accelerator).
* ``expand_rules``: the rule names of the atlas: every entry of
  :func:`snapjax.registered_methods` in registration order, an ordered entry (SnAp-n) once per
  order of the preset (``snap1, snap2, snap3``).
* ``rule_options``: the :func:`snapjax.online_method` options a rule takes from the preset —
  ``window`` for every method that declares it (the registry's ``MethodEntry.options``), nothing
  else; ``learner_options`` the same for :class:`snapjax.OnlineLearner` (``tbptt_window``).
* ``classify_rules``: builds every rule once on the preset's GRU and sorts it into *runs*,
  *same as X* (builds the same method as an earlier rule: same class, ``name``, ``period`` and
  ``num_stored()``, e.g. ``drtrl`` is SnAp-1 and ``ostl`` is RTRL on one layer) and *n/a on GRU*
  (the builder's ``ValueError``).

Example::

    >>> p = preset("tiny")
    >>> names = expand_rules((1, 2, 3))
    >>> names[:4], "tbptt" in names
    (['rtrl', 'snap1', 'snap2', 'snap3'], True)
    >>> rule_options("tbptt", p), rule_options("snap2", p)
    ({'window': 4}, {})
    >>> preset("huge")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: unknown preset 'huge'; presets are 'tiny', 'medium', 'full'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import snapjax as sj
from snapjax.methods import parse_method_name, uses_window


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes, budgets and caps of one atlas run (see ``PRESETS``)."""

    name: str
    orders: tuple[int, ...] = (1, 2, 3)  # SnAp-n orders of the ordered entries
    window: int = 16  # truncated BPTT window (every method declaring ``window``)
    # 1. gradient quality
    quality_ks: tuple[int, ...] = (32, 64)
    quality_densities: tuple[float, ...] = (1.0, 0.25, 0.1)
    sparse_rules: tuple[str, ...] = ("rtrl", "snap1", "snap2", "snap3")  # the rules run at density < 1
    quality_batch: int = 4
    quality_steps: int = 512
    quality_lengths: tuple[int, int] = (3, 8)  # copy lengths L of the reference stream's episodes
    quality_lr: float = 3e-3  # Adam, the reference trajectory (exact RTRL, every step)
    seeds_stochastic: int = 100  # seeds per stochastic rule (bias and variance)
    # 2. cost (benchmarks/roofline.measure)
    cost_ks: tuple[int, ...] = (64, 128, 256)
    cost_batch: int = 16
    cost_steps: int = 16
    cost_repeats: int = 5
    cost_max_state_mb: float = 512.0
    # 3. learning (benchmarks/copy_task.train_copy, benchmarks/char_lm.train_char)
    seeds: tuple[int, ...] = (0, 1, 2)
    copy_units: int = 64
    copy_batch: int = 16
    copy_lr: float = 3e-3
    copy_tokens: int = 3_000_000
    copy_time_s: float = 50.0
    copy_max_length: int = 64
    copy_densities: tuple[float, ...] = (1.0,)
    sparse_copy_rules: tuple[str, ...] = ("snap2", "tbptt", "sliding_tbptt")  # claim (b): also at density < 1
    sparse_copy_densities: tuple[float, ...] = (0.25, 0.1)
    char_units: int = 128
    char_batch: int = 16
    char_lr: float = 3e-3
    char_chars: int = 3_000_000
    char_time_s: float = 75.0
    char_eval_every: int = 100_000
    char_val_chars: int = 20_000
    synthetic_corpus: bool = False  # the test's corpus (no download), instead of Shakespeare

    def describe(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny", orders=(1,), window=4, quality_ks=(4,), quality_densities=(1.0, 0.5), quality_batch=2,
        quality_steps=48, quality_lengths=(1, 3), seeds_stochastic=16, cost_ks=(4,), cost_batch=2,
        cost_steps=4, cost_repeats=1, cost_max_state_mb=64.0, seeds=(0,), copy_units=4, copy_batch=2,
        copy_tokens=300, copy_time_s=1e9, copy_max_length=8, sparse_copy_densities=(0.25,), char_units=4,
        char_batch=2, char_chars=256, char_time_s=1e9, char_eval_every=128, char_val_chars=64,
        synthetic_corpus=True,
    ),
    "medium": Preset("medium"),
    "full": Preset(
        "full", quality_ks=(64, 128), quality_batch=16, quality_steps=4096, seeds_stochastic=256,
        cost_ks=(64, 128, 256, 512), cost_repeats=9, cost_max_state_mb=8192.0, seeds=(0, 1, 2, 3, 4),
        copy_units=128, copy_tokens=5_000_000, copy_time_s=1800.0, copy_max_length=128,
        copy_densities=(1.0, 0.25, 0.1), sparse_copy_rules=(), char_units=256, char_chars=20_000_000,
        char_time_s=3600.0, char_eval_every=500_000,
    ),
}


def preset(name: str) -> Preset:
    """The preset ``name`` (``ValueError`` listing the presets otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(map(repr, PRESETS))}")
    return PRESETS[name]


def expand_rules(orders: Sequence[int]) -> list[str]:
    """Every registered method once, an ordered one once per order (``snap1, snap2, ...``)."""
    names = []
    for name, entry in sj.registered_methods().items():
        names += [f"{name}{n}" for n in orders] if entry.ordered else [name]
    return names


def check_rules(names: Sequence[str]) -> list[str]:
    """``names`` if :func:`snapjax.online_method` knows each (else its ``ValueError``)."""
    for name in names:
        parse_method_name(name)
    return list(names)


def rule_options(name: str, p: Preset) -> dict[str, Any]:
    """``online_method`` options of rule ``name``: the preset's window if the method declares one."""
    return {"window": p.window} if uses_window(name) else {}


def learner_options(name: str, window: int) -> dict[str, Any]:
    """``OnlineLearner`` keyword arguments of rule ``name``: ``tbptt_window`` if it declares a window."""
    return {"tbptt_window": window} if uses_window(name) else {}


def gru(k: int, n_in: int) -> tuple[sj.GRUCell, dict]:
    """A ``GRUCell(k)`` and its parameters for inputs of size ``n_in`` (seed 0)."""
    cell = sj.GRUCell(k)
    params = cell.init(jax.random.key(0), jnp.zeros((1, k)), jnp.zeros((1, n_in)))["params"]
    return cell, params


def build(name: str, cell: Any, params: Any, p: Preset, masks: Any = None) -> sj.OnlineMethod:
    """The rule ``name`` built for ``cell`` (its ``ValueError`` where it does not apply)."""
    return sj.online_method(name, cell, params, masks=masks, **rule_options(name, p))


def signature(method: sj.OnlineMethod) -> tuple:
    """What makes two built methods the same rule: class, ``name``, ``period``, ``num_stored()``."""
    return type(method).__qualname__, method.name, method.period, method.num_stored()


def classify_rules(names: Sequence[str], p: Preset, k: int, n_in: int) -> list[dict]:
    """One record per rule: ``{"rule", "status": "run" | "same" | "n/a", "same_as", "why",
    "built", "class", "period", "stored"}`` (``classify_rules`` in the module docstring)."""
    cell, params = gru(k, n_in)
    seen: dict[tuple, str] = {}
    out = []
    for name in names:
        rec: dict[str, Any] = {"rule": name, "status": "run", "same_as": None, "why": None}
        try:
            m = build(name, cell, params, p)
        except ValueError as err:
            rec.update(status="n/a", why=f"n/a on GRU: {err}")
            out.append(rec)
            continue
        sig = signature(m)
        rec.update(built=m.name, **{"class": sig[0]}, period=m.period, stored=m.num_stored())
        if sig in seen:
            rec.update(status="same", same_as=seen[sig], why=f"same as {seen[sig]} (builds {m.name})")
        else:
            seen[sig] = name
        out.append(rec)
    return out
