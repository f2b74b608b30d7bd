# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Activity sparsity: EGRU events and the cost of exact RTRL
#
# The event-based GRU (EGRU, Subramoney et al. 2023) only communicates when a unit's internal
# state `c` crosses its threshold `ϑ`: the output is `h = H(c - ϑ)·c`, zero most of the time.
# A unit that is silent (no event, and outside the pseudo-derivative window `|c - ϑ| < ε`)
# has `h = 0` **and** `dh/dθ = 0` exactly, so its column of the recurrent Jacobian contributes
# nothing to the RTRL update `J_t = D_t J_{t-1} + I_t`. The online method `"activity"`
# (`sj.online_method("activity", cell, params)`) skips those units (exactly — no
# approximation): the expensive part of exact RTRL then scales with the fraction of active
# units `α`.
#
# This notebook shows an events raster, measures `α`, checks that the activity-sparse RTRL
# gradient equals dense RTRL (and BPTT), and counts the FLOPs saved.

# %%
import os
import time

FAST = os.environ.get("SNAPJAX_FAST", "0") == "1"
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax

import snapjax as sj
from snapjax.methods.activity_cost import step_cost


def check(claim: str, holds) -> None:
    """Print a claim this notebook makes and whether it holds; stop the notebook if it does not."""
    print(("✓ " if holds else "✗ ") + claim)
    if not holds:
        raise RuntimeError(f"the notebook's claim does not hold: {claim}")


T0 = time.perf_counter()
UNITS, N_IN, B = 32, 8, 4
T = 40 if FAST else 120

# Threshold 0.5, pseudo-derivative γ·max(0, 1 - |c-ϑ|/ε) with ε = 0.1: a narrow window.
cell = sj.EGRUCell(UNITS, threshold_init=0.5, epsilon=0.1)
rec = sj.as_recurrent(cell)  # the cell as the methods see it: a step on the flax carry (c, h)
xs = jax.random.normal(jax.random.key(1), (T, B, N_IN))  # (T, B, n_in), time-major
carry0 = cell.initialize_carry(jax.random.key(0), (B, N_IN))  # (c, h), each (B, units)
params = cell.init(jax.random.key(0), carry0, xs[0])["params"]
print({k: (jax.tree.map(jnp.shape, v) if isinstance(v, dict) else v.shape) for k, v in params.items()})

# %% [markdown]
# ## Events raster
#
# The forward pass only (`rec.apply` on the flax carry in a `lax.scan`); an event is `h ≠ 0`.


# %%
@jax.jit
def forward(params, xs):
    def body(carry, x):
        carry = rec.apply(params, carry, x)
        return carry, carry

    return lax.scan(body, carry0, xs)[1]  # (c, h), each (T, B, units)


c, h = (np.asarray(a) for a in forward(params, xs))
events = h != 0  # (T, B, units)
alpha = events.mean()
print(f"fraction of active units (events) α = {alpha:.3f}")

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
ax1.imshow(events[:, 0].T, aspect="auto", cmap="Greys", interpolation="nearest")
ax1.set_ylabel("unit")
ax1.set_title(f"EGRU-{UNITS} events (example 0), α = {alpha:.2f}")
ax2.plot(events.mean(axis=(1, 2)))
ax2.set_ylabel("fraction active")
ax2.set_xlabel("time step")
plt.tight_layout()
plt.show()

check(f"the activity α = {alpha:.3f} lies strictly between 0 and 1", 0.0 < alpha < 1.0)
theta = np.asarray(params["threshold"])
check("h is exactly c where an event happened (c above threshold) and exactly 0 elsewhere",
      np.array_equal(events, c > theta) and np.array_equal(h[events], c[events]))

# %% [markdown]
# ## Activity-sparse exact RTRL
#
# `sj.online_method("activity", ...)` is an `OnlineMethod` like `"rtrl"` (same `init`, `step`,
# `gradient`, flax carries); per step it gathers only the active units' read-out rows of the
# influence and processes them in blocks of `block` units (`lax.fori_loop`s with a dynamic trip
# count, every buffer updated in place), so the work grows with the number of active units;
# when every unit fires it runs all blocks, which is still exact. Its summed online gradient
# (`sj.online_gradient`) must equal dense RTRL and BPTT.

# %%
ys = jax.random.normal(jax.random.key(2), (T, B, UNITS)) * 0.3


def loss_fn(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


sparse = sj.online_method("activity", cell, params)
dense = sj.online_method("rtrl", cell, params)
print(f"block = {sparse.block} units, {-(-UNITS // sparse.block)} blocks when all {UNITS} units are active")

f_sparse = jax.jit(lambda p: sj.online_gradient(sparse, p, carry0, xs, ys, loss_fn))
f_dense = jax.jit(lambda p: sj.online_gradient(dense, p, carry0, xs, ys, loss_fn))
g_sparse, g_dense = f_sparse(params), f_dense(params)
g_bptt = jax.jit(lambda p: sj.bptt_gradient(cell, p, carry0, xs, ys, loss_fn))(params)

flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g.grads)])
gs, gd, gb = flat(g_sparse), flat(g_dense), flat(g_bptt)
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
print(f"sparse vs dense RTRL: rel. err {rel(gs, gd):.2e} | dense RTRL vs BPTT: {rel(gd, gb):.2e} "
      f"| sparse vs BPTT: {rel(gs, gb):.2e}")
check("the BPTT gradient is not zero", np.linalg.norm(gb) > 0)
check(f"activity-sparse RTRL equals dense RTRL (relative error {rel(gs, gd):.1e})",
      rel(gs, gd) < 1e-5 and np.allclose(gs, gd, rtol=1e-5, atol=1e-6))
check(f"activity-sparse RTRL equals BPTT (relative error {rel(gs, gb):.1e})", rel(gs, gb) < 1e-4)

# %% [markdown]
# ## Measured activity and the RTRL cost saved
#
# `step` returns, besides the new carry and method state, per-step statistics in `aux`: the
# fraction of units whose influence is nonzero (`alpha`, before the step: events plus units
# inside the pseudo-derivative window — a superset of the events) and the capacity actually
# computed (blocks × block size); the state's `active` holds the active set itself. Here the
# steps are driven by hand in a `lax.scan`. `snapjax.methods.activity_cost.step_cost` turns the capacity into FLOPs
# of the propagation, against dense RTRL (the full `(k·m)×(k·m)` Jacobian product) and
# against a dense RTRL that already exploits the structure of `D` (only `h` mixes units).


# %%
@jax.jit
def run_stats(params, xs):
    def body(c, x):
        carry, state, aux = sparse.step(params, *c, x)
        return (carry, state), (sparse.cell.output(carry), state.active, aux)

    return lax.scan(body, (carry0, sparse.init(B)), xs)[1]


h_tr, active, stats = run_stats(params, xs)
active = np.asarray(active)  # (T, B, units): units with nonzero read-out influence after step t
events_tr = np.asarray(h_tr) != 0
alpha_infl = np.asarray(stats["alpha"])  # per step, fraction of units active at t-1
capacity = np.asarray(stats["capacity"])

check("the method's forward pass is the plain one: the same events raster", np.array_equal(events_tr, events))
check("every event is an active unit of the influence (events ⊆ active)", np.all(active | ~events))
check("the reported α is the mean of the previous step's active set",
      np.allclose(alpha_infl[1:], active[:-1].mean(axis=(1, 2)), atol=1e-6) and alpha_infl[0] == 0)
n_active_prev = np.r_[0, active[:-1].sum(-1).max(-1)]  # most active units in the batch, step t-1
check("the computed capacity always covers the active set", np.all(capacity >= n_active_prev))

cost = step_cost(sparse, B, capacity)
flops = float(np.sum(cost["flops"]))
flops_dense = float(cost["flops_dense"]) * T
flops_struct = float(cost["flops_dense_structured"]) * T
print(f"α (events) = {alpha:.3f}, α (nonzero influence) = {alpha_infl.mean():.3f}, "
      f"mean capacity = {capacity.mean():.1f} / {UNITS} units")
print(f"propagation FLOPs: {flops / flops_dense:.1%} of dense RTRL, {flops / flops_struct:.1%} of structured "
      f"dense RTRL -> saved {1 - flops / flops_struct:.0%}")

fig, ax = plt.subplots(figsize=(9, 3))
ax.plot(events.mean(axis=(1, 2)), label="α events")
ax.plot(alpha_infl, label="α nonzero influence (t-1)")
ax.step(np.arange(T), capacity / UNITS, where="mid", label="capacity computed / units")
ax.set_xlabel("time step")
ax.set_ylim(0, 1.05)
ax.legend()
plt.tight_layout()
plt.show()

check(f"the influence's activity {alpha_infl.mean():.3f} lies in (0, 1) and covers the events' α",
      0.0 < alpha_infl.mean() < 1.0 and alpha_infl.mean() >= alpha - 1e-6)
check(f"skipping silent units saves work ({flops:.3g} < {flops_struct:.3g} < {flops_dense:.3g} FLOPs)",
      flops < flops_struct < flops_dense)

# %% [markdown]
# Wall-clock, informative only (not asserted): at this size (k = 32, batch 4, CPU) the loop and
# gather overheads eat much of the FLOP saving, and timings on a shared CPU are noisy; the saving
# turns into time at larger state sizes (`benchmarks/activity.py`: k = 256, see the README).

# %%
def timeit(f, *a, reps=3):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*a))
    return (time.perf_counter() - t) / reps / T * 1e6


print(f"µs per step: activity-sparse RTRL {timeit(f_sparse, params):.0f}, dense RTRL {timeit(f_dense, params):.0f}")
print(f"total {time.perf_counter() - T0:.1f} s")
