"""Atlas section 1: the quality of every rule's gradient along one fixed training trajectory.

**Reference trajectory.**  A ``GRUCell(k)`` (kernels masked at ``density`` by
:func:`snapjax.random_masks`, seed 0) with a linear read-out to the copy task's 2 classes, trained
online by exact RTRL and Adam (every step, cell and read-out) on one stream: copy-task episodes
(:func:`snapjax.data.copy_task_batch`, lengths ``L`` drawn in ``quality_lengths``) concatenated in
time, never reset.  Per step ``t`` it records the cell parameters ``P_t`` used at the step, the loss
cotangent ``C_t = ∂L_t/∂carry_t`` (``L_t = Σ_b mask_tb·CE_tb / B``: zero on presentation steps) and
RTRL's gradient ``g_t``.

**Every rule** then runs the same stream with the same ``P_t`` and ``C_t`` (``method.step(P_t,
...)``, ``method.gradient(P_t, state, C_t)``, one ``lax.scan``), so the rules differ only in how they
turn ``C_t`` into a gradient.  A rule with ``period = K`` (truncated BPTT) is compared on block sums
over ``K`` steps (``K = 1``: per step); blocks where RTRL's gradient is zero (no scored step) are
skipped.  Per block, over all cell parameters as one vector, against ``r`` = RTRL's block sum:

* ``cos`` = ⟨g, r⟩ / (‖g‖‖r‖) and ``err`` = ‖g − r‖ / ‖r‖ (a stochastic rule: per seed, then the mean);
* a rule whose state depends on its key (``draws_on_key``) runs ``S`` seeds, vmapped inside the
  scan body and reduced per block (memory ``O(S·p)``, not ``O(S·T·p)``): ``bias`` =
  ‖ḡ − r‖/‖r‖ (ḡ the mean over seeds), ``rel_var`` = Σ_i var_i / ‖r‖² (unbiased variance, summed
  over parameters), ``noise_floor`` = sqrt(rel_var / S) — what ``bias`` would be for an unbiased
  rule — and ``cos_mean`` = cos(ḡ, r).  The rule is *stochastic* if the seeds' gradients differ.

The record of a rule keeps the median over blocks of each measure (and the 10th / 90th
percentiles of ``cos``).  Example::

    >>> import _atlas_rules as R
    >>> p = R.preset("tiny")
    >>> ref = reference(p, k=4, density=1.0)
    >>> ref.grads["hn"]["kernel"].shape[0], ref.cots.shape
    (48, (48, 2, 4))
    >>> rec = quality("rtrl", ref, p)
    >>> rec["stochastic"], abs(rec["cos"] - 1.0) < 1e-6
    (False, True)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import _atlas_rules as R
import jax
import jax.numpy as jnp
import numpy as np
import optax

import snapjax as sj
from snapjax.data.copy_task import NUM_TOKENS, copy_task_batch
from snapjax.methods.base import is_key

PyTree = Any


class Reference(NamedTuple):
    """The reference trajectory (leading axis ``T`` on every array)."""

    k: int
    density: float
    cell: Any
    masks: Any  # numpy masks per projection, or None
    xs: jax.Array  # (T, B, NUM_TOKENS) one-hot inputs
    params: PyTree  # P_t, cell parameters used at step t
    cots: jax.Array  # (T, B, k) C_t
    grads: PyTree  # RTRL's g_t


def stream(p: R.Preset, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy-task episodes concatenated in time, cut to ``quality_steps``: tokens, targets, mask ``(T, B)``."""
    key, rng = jax.random.key(seed), np.random.default_rng(seed)
    parts: list[tuple] = []
    total = 0
    lo, hi = p.quality_lengths
    while total < p.quality_steps:
        key, kb = jax.random.split(key)
        L = int(rng.integers(lo, hi + 1))
        parts.append(tuple(np.asarray(a)[: 2 * L + 1] for a in copy_task_batch(kb, p.quality_batch, L)))
        total += 2 * L + 1
    return tuple(np.concatenate(a)[: p.quality_steps] for a in zip(*parts))  # type: ignore[return-value]


def _masked(params: PyTree, masks: Any) -> PyTree:
    if masks is None:
        return params
    return {n: ({**v, "kernel": v["kernel"] * masks[n]} if masks.get(n) is not None else v) for n, v in params.items()}


def reference(p: R.Preset, k: int, density: float) -> Reference:
    """The reference trajectory at ``k`` units and kernel density ``density`` (module docstring)."""
    cell, params = R.gru(k, NUM_TOKENS)
    masks = None
    if density < 1.0:
        masks = {n: np.asarray(m, np.float32) for n, m in sj.random_masks(0, params, density, spec=cell).items()
                 if m is not None}
    params = _masked(params, masks)
    rtrl = sj.online_method("rtrl", cell, params, masks=masks)
    tokens, targets, mask = stream(p)
    xs = jax.nn.one_hot(tokens, NUM_TOKENS, dtype=jnp.float32)
    B = p.quality_batch
    readout = {"kernel": jax.random.normal(jax.random.key(1), (k, 2)) / math.sqrt(k), "bias": jnp.zeros((2,))}
    opt = optax.adam(p.quality_lr)
    both = {"cell": params, "out": readout}

    def loss(out, h, y, m):
        ce = optax.softmax_cross_entropy_with_integer_labels(h @ out["kernel"] + out["bias"], y)
        return jnp.sum(ce * m) / B

    def body(c, inp):
        both, ostate, carry, st = c
        x, y, m = inp
        carry, st, _ = rtrl.step(both["cell"], carry, st, x)
        g_out, cot = jax.grad(loss, argnums=(0, 1))(both["out"], carry, y, m)
        g, st = rtrl.gradient(both["cell"], st, cot)
        upd, ostate = opt.update({"cell": g, "out": g_out}, ostate, both)
        return (optax.apply_updates(both, upd), ostate, carry, st), (both["cell"], cot, g)

    init = (both, opt.init(both), rtrl.init_carry(B), rtrl.init(B))
    _, (ps, cots, gs) = jax.jit(lambda c, i: jax.lax.scan(body, c, i))(init, (xs, jnp.asarray(targets),
                                                                            jnp.asarray(mask, jnp.float32)))
    return Reference(k, density, cell, masks, xs, ps, cots, gs)


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _run(method: sj.OnlineMethod, ref: Reference, keys: jax.Array) -> dict:
    """Block measures of ``method`` with one seed per key (``keys`` shape ``(S,)``)."""
    K = method.period
    T = int(ref.cots.shape[0])
    nb = T // K
    blocks = jax.tree.map(lambda g: g[: nb * K].reshape((nb, K) + g.shape[1:]).sum(1), ref.grads)
    ref_of_step = jax.tree.map(lambda r: jnp.repeat(r, K, axis=0), blocks)  # r of the block holding t
    B = int(ref.cots.shape[1])
    S = int(keys.shape[0])

    def one(P, carry, st, acc, x, c):
        carry, st, _ = method.step(P, carry, st, x)
        g, st = method.gradient(P, st, c)
        return carry, st, jax.tree.map(jnp.add, acc, g)

    def body(c, inp):
        carry, st, acc = c
        t, P, x, cot, r = inp
        carry, st, acc = jax.vmap(one, in_axes=(None, 0, 0, 0, None, None))(P, carry, st, acc, x, cot)
        end = (t + 1) % K == 0
        rr = _vdot(r, r)
        nr = jnp.sqrt(rr)
        dots = jax.vmap(lambda a: _vdot(a, r))(acc)
        norms = jnp.sqrt(jax.vmap(lambda a: _vdot(a, a))(acc))
        diffs = jax.vmap(lambda a: _vdot(jax.tree.map(jnp.subtract, a, r), jax.tree.map(jnp.subtract, a, r)))(acc)
        mean = jax.tree.map(lambda a: a.mean(0), acc)
        dm = jax.tree.map(jnp.subtract, mean, r)
        var = sum(jnp.sum((a - a.mean(0)) ** 2) for a in jax.tree.leaves(acc)) / max(S - 1, 1)
        nm = jnp.sqrt(_vdot(mean, mean))
        tiny = 1e-30
        out = {
            "valid": end & (nr > 0),
            "cos": jnp.mean(dots / jnp.maximum(norms * nr, tiny)),
            "err": jnp.mean(jnp.sqrt(diffs) / jnp.maximum(nr, tiny)),
            "bias": jnp.sqrt(_vdot(dm, dm)) / jnp.maximum(nr, tiny),
            "rel_var": var / jnp.maximum(rr, tiny),
            "cos_mean": _vdot(mean, r) / jnp.maximum(nm * nr, tiny),
        }
        acc = jax.tree.map(lambda a: jnp.where(end, jnp.zeros_like(a), a), acc)
        return (carry, st, acc), out

    P0 = jax.tree.map(lambda a: a[0], ref.params)
    carry0 = jnp.broadcast_to(method.init_carry(B), (S,) + tuple(np.shape(method.init_carry(B))))
    st0 = jax.vmap(lambda kk: method.init(B, key=kk))(keys)
    acc0 = jax.tree.map(lambda a: jnp.zeros((S,) + a.shape, a.dtype), P0)
    inputs = (jnp.arange(nb * K), jax.tree.map(lambda a: a[: nb * K], ref.params), ref.xs[: nb * K],
              ref.cots[: nb * K], ref_of_step)
    _, out = jax.jit(lambda c, i: jax.lax.scan(body, c, i))((carry0, st0, acc0), inputs)
    return {k: np.asarray(v) for k, v in out.items()}


def draws_on_key(method: sj.OnlineMethod, batch: int = 1) -> bool:
    """Whether ``method.init`` gives different states for two keys (a method that draws random
    numbers keeps them, or its running key, in its state).  Such a rule runs ``S`` seeds; it is
    *stochastic* if its gradients then differ between seeds (``rel_var > 0``)."""
    a, b = (jax.tree.leaves(method.init(batch, key=jax.random.key(s))) for s in (0, 1))
    data = [(jax.random.key_data(x) if is_key(x) else x, jax.random.key_data(y) if is_key(y) else y)
            for x, y in zip(a, b)]
    return any(bool(jnp.any(x != y)) for x, y in data)


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if v.size else float("nan")


def quality(name: str, ref: Reference, p: R.Preset) -> dict:
    """One rule against ``ref``: medians over the scored blocks (module docstring)."""
    params0 = jax.tree.map(lambda a: a[0], ref.params)
    method = R.build(name, ref.cell, params0, p, masks=ref.masks)
    S = p.seeds_stochastic if draws_on_key(method) else 1
    out = _run(method, ref, jax.random.split(jax.random.key(1234), S))
    v = out["valid"]
    stochastic = bool(S > 1 and np.any(out["rel_var"][v] > 0))
    if not v.any():
        raise ValueError(f"{name}: no scored block in {p.quality_steps} steps; lengthen quality_steps")
    rec = {
        "rule": name, "built": method.name, "k": ref.k, "density": ref.density, "period": method.period,
        "stored_per_example": method.num_stored(), "stochastic": stochastic, "seeds": S, "blocks": int(v.sum()),
        "cos": _median(out["cos"][v]), "cos_p10": float(np.percentile(out["cos"][v], 10)),
        "cos_p90": float(np.percentile(out["cos"][v], 90)), "err": _median(out["err"][v]),
        "cos_blocks": out["cos"][v].tolist(),
    }
    if stochastic:
        ratio = out["bias"][v] / np.maximum(np.sqrt(out["rel_var"][v] / S), 1e-30)
        rec.update(bias=_median(out["bias"][v]), rel_var=_median(out["rel_var"][v]),
                   noise_floor=_median(np.sqrt(out["rel_var"][v] / S)), bias_over_floor=_median(ratio),
                   cos_mean=_median(out["cos_mean"][v]))
    return rec


def kind(rec: dict, exact_tol: float = 1e-5, floor_factor: float = 2.0) -> str:
    """``exact`` (median cos ≥ 1 − tol and err ≤ sqrt(tol)), ``unbiased`` (stochastic, bias within
    ``floor_factor`` × its noise floor), else ``biased`` — measured, not declared."""
    if rec["stochastic"]:
        return "unbiased" if rec["bias_over_floor"] <= floor_factor else "biased"
    return "exact" if rec["cos"] >= 1 - exact_tol and rec["err"] <= math.sqrt(exact_tol) else "biased"


def run_quality(rules: list[dict], p: R.Preset, log=print) -> list[dict]:
    """Every runnable rule at every ``quality_ks`` (dense), and ``sparse_rules`` at each density < 1."""
    rows = []
    runnable = [r["rule"] for r in rules if r["status"] == "run"]
    for k in p.quality_ks:
        for d in p.quality_densities:
            ref = reference(p, k, d)
            names = runnable if d >= 1.0 else [n for n in runnable if n in p.sparse_rules]
            for name in names:
                try:
                    rec = quality(name, ref, p)
                except ValueError as err:  # a rule that does not take masks, e.g.
                    rows.append({"rule": name, "k": k, "density": d, "skipped": str(err)})
                    continue
                rec["kind"] = kind(rec)
                rows.append(rec)
                log(f"quality k={k} d={d:g} {name}: cos {rec['cos']:.4f} err {rec['err']:.3g} {rec['kind']}")
    return rows
