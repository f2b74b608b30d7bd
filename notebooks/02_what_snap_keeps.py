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
# # What SnAp keeps: influence sparsity patterns of a sparse GRU
#
# Exact RTRL stores the full influence `J = ds/dθ`: every state unit × every parameter
# (`k·p` floats per example). SnAp-n keeps only the entries that can become nonzero within
# `n` steps: a parameter in column `i` of a gate matrix writes unit `i`; after `n` steps it
# can have reached the units at most `n - 1` recurrent edges away from `i`.
#
# * SnAp-1: one number per parameter (unit `i` only) — the size of the parameters.
# * SnAp-n, n ≥ 2: the `n`-step neighbourhood — small only when the recurrent weights are sparse.
# * SnAp-n with large enough `n` (or a dense network and `n ≥ 2`): exact RTRL.
#
# This notebook draws the patterns for `n = 1, 2, 3` on a sparse GRU, checks the stored
# sizes against closed-form counts, and plots the sizes against the parameter density.

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



def check(claim: str, holds) -> None:
    """Print a claim this notebook makes and whether it holds; stop the notebook if it does not."""
    print(("✓ " if holds else "✗ ") + claim)
    if not holds:
        raise RuntimeError(f"the notebook's claim does not hold: {claim}")


T0 = time.perf_counter()
UNITS = 24 if FAST else 48
N_IN = 3
cell = sj.GRUCell(UNITS)
params = cell.init(jax.random.key(0), jnp.zeros((1, UNITS)), jnp.zeros((1, N_IN)))["params"]
RECURRENT = ["hr", "hz", "hn"]
print({k: {n: v.shape for n, v in leaf.items()} for k, leaf in params.items()})


# %% [markdown]
# ## A sparse GRU and its influence patterns
#
# We give the three recurrent matrices one shared random connectivity (each unit reads
# `fan_in` other units plus itself), keep the input matrices dense, build each method with
# `sj.online_method(name, cell, params, masks=...)` and run it for a few steps on random inputs
# (`method.step` in a `lax.scan`; the method state of RTRL / SnAp-n is the influence, and
# `method.to_dense(state)` expands it to `(B, *param_shape, units, m)`). The picture shows, for
# the parameters of column `i` of `W_hz` (rows: `i`), which state units `u` (columns) have a
# nonzero influence `dh_u/dθ`.


# %%
def shared_recurrent_mask(seed, units, fan_in):
    """Unit i reads itself and `fan_in` random other units (same mask for every gate)."""
    rng = np.random.default_rng(seed)
    m = np.eye(units, dtype=bool)
    for u in range(units):
        others = rng.choice(np.delete(np.arange(units), u), fan_in, replace=False)
        m[others, u] = True  # flax layout: row v reads h_v, column u writes unit u
    return m


def masked_params(params, masks):
    return {k: ({**v, "kernel": v["kernel"] * masks[k]} if k in masks else v) for k, v in params.items()}


def run_method(method, params, steps=8, batch=2, seed=1):
    """`steps` method steps on random inputs; returns the final method state."""
    xs = jax.random.normal(jax.random.key(seed), (steps, batch, N_IN))

    def body(c, x):
        carry, state = c
        carry, state, _ = method.step(params, carry, state, x)
        return (carry, state), None

    init = (method.init_carry(batch), method.init(batch))
    (_, state), _ = jax.jit(lambda xs: lax.scan(body, init, xs))(xs)
    return state


rec = shared_recurrent_mask(0, UNITS, fan_in=2)
masks = {name: rec for name in RECURRENT}
p_sparse = masked_params(params, masks)

LABEL = {"snap1": "SnAp-1", "snap2": "SnAp-2", "snap3": "SnAp-3", "rtrl": "RTRL"}  # method name -> label
methods = {name: sj.online_method(name, cell, p_sparse, masks=masks) for name in LABEL}
states = {name: run_method(m, p_sparse) for name, m in methods.items()}

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, (name, m) in zip(axes, methods.items()):
    dense = m.to_dense(states[name])["hz"]["kernel"]  # (B, n_in rows, i, u, m)
    img = np.asarray(jnp.any(dense[0] != 0, axis=(0, 3)))  # (i, u)
    ax.imshow(img, cmap="Greys", interpolation="nearest")
    ax.set_title(f"{LABEL[name]}: {m.num_stored()} floats/ex.")
    ax.set_xlabel("state unit u")
axes[0].set_ylabel("column i of W_hz")
fig.suptitle(f"nonzero dh_u/dW_hz[:, i] after 8 steps, GRU-{UNITS}, recurrent fan-in 2 + self")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Check:** for SnAp-n, the nonzero entries of the influence after `≥ n` steps are exactly
# the SnAp-n pattern (`method.pattern_count()`), and the pattern of column `i` is the set of
# units reachable from `i` in at most `n - 1` recurrent edges (computed here independently
# with boolean matrix powers).

# %%
def nonzeros(method, state, example=0):
    return int(sum(int(jnp.count_nonzero(leaf[example])) for leaf in jax.tree.leaves(method.to_dense(state))))


adj = rec.T  # adj[u, v]: unit v feeds unit u (D[u, v] may be nonzero)
for n in (1, 2, 3):
    m, st = methods[f"snap{n}"], states[f"snap{n}"]
    reach = np.eye(UNITS, dtype=bool)  # reach[i, u]
    for _ in range(n - 1):
        reach = reach | ((reach.astype(int) @ adj.T.astype(int)) > 0)
    dense = m.to_dense(st)["hz"]["kernel"][0]
    img = np.asarray(jnp.any(dense != 0, axis=(0, 3)))
    print(f"SnAp-{n}: stored {m.num_stored():6d}, pattern {m.pattern_count():6d}, "
          f"nonzeros {nonzeros(m, st):6d}, mean reach {reach.sum(1).mean():.1f} units")
    check(f"SnAp-{n}'s pattern is the {n}-step reachability", (img == reach).all())
    check(f"SnAp-{n}'s nonzeros fill its pattern exactly", nonzeros(m, st) == m.pattern_count())
    check(f"SnAp-{n} stores at least its pattern", m.pattern_count() <= m.num_stored())
# RTRL stores every unit for every kept parameter; only units reachable from i can be nonzero.
print("RTRL stored", methods["rtrl"].num_stored(), "nonzeros", nonzeros(methods["rtrl"], states["rtrl"]))
check("RTRL's nonzeros lie inside its pattern", nonzeros(methods["rtrl"], states["rtrl"]) <= methods["rtrl"].pattern_count())

# %% [markdown]
# ## Sizes from a formula: ring (circulant) connectivity
#
# With a circulant recurrent mask where unit `u` reads units `u - c + 1, …, u` (a ring,
# `c` nonzeros per column), the units reachable from `i` in `n - 1` steps are
# `i, …, i + (n-1)(c-1)`, so every parameter keeps exactly `K = min(k, (n-1)(c-1) + 1)` floats.
# The stored parameters are `p_s = k·(3·n_in + 3·c + 4)` (3 input kernels, 3 compressed
# recurrent kernels, 4 biases), and the SnAp-n influence holds exactly `p_s · K` floats per
# example: `p_s` for SnAp-1, `2·p_s` for SnAp-2 with `c = 2`, and so on.

# %%
def ring_mask(units, c):
    m = np.zeros((units, units), bool)
    for u in range(units):
        for j in range(c):
            m[(u - j) % units, u] = True
    return m


rows = []
for c in (2, 3):
    ring = {name: ring_mask(UNITS, c) for name in RECURRENT}
    p_ring = masked_params(params, ring)
    p_stored = UNITS * (3 * N_IN + 3 * c + 4)
    for n in (1, 2, 3, 4):
        m = sj.online_method(f"snap{n}", cell, p_ring, masks=ring)
        K = min(UNITS, (n - 1) * (c - 1) + 1)
        rows.append((c, n, m.num_stored(), m.pattern_count(), p_stored * K))
        check(f"ring c={c}, SnAp-{n} stores p_s·K = {p_stored * K} floats",
              m.num_stored() == m.pattern_count() == p_stored * K)
print(" c  n   stored  pattern  p_s*K")
for r in rows:
    print("{:2d} {:2d} {:8d} {:8d} {:6d}".format(*r))

# %% [markdown]
# ## Stored influence vs parameter density
#
# Random masks (`sj.random_masks`: every kernel keeps a fraction `d` of each
# column, drawn independently per gate). SnAp-1 scales like the parameters (`d·p`); SnAp-2 and
# SnAp-3 like the parameters times the `n`-step neighbourhood, which grows quickly with `d`
# until it covers the whole network and SnAp-n becomes RTRL. RTRL itself stores every kept
# parameter against every unit (`d·k·p`; masked weights are not stored by any method).

# %%
densities = [0.05, 0.1, 0.25, 0.5, 1.0] if FAST else [0.03, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0]
sizes = {name: [] for name in ["SnAp-1", "SnAp-2", "SnAp-3", "RTRL"]}
t0 = time.perf_counter()
for d in densities:
    mk = sj.random_masks(0, params, d, spec=cell)
    p_d = masked_params(params, mk)
    for name in LABEL:
        sizes[LABEL[name]].append(sj.online_method(name, cell, p_d, masks=mk).num_stored())
print(f"built {4 * len(densities)} methods in {time.perf_counter() - t0:.1f} s")

dense_p = sum(a.size for a in jax.tree.leaves(params))
plt.figure(figsize=(6, 4))
for name, vals in sizes.items():
    plt.plot(densities, vals, "o-", label=name)
plt.plot(densities, [dense_p * UNITS] * len(densities), "k:", label="k·p (dense RTRL)")
plt.plot(densities, [d * dense_p for d in densities], "c--", lw=1, label="d·p")
plt.xscale("log")
plt.yscale("log")
plt.xlabel("parameter density d")
plt.ylabel("influence floats per example")
plt.title(f"GRU-{UNITS}: what each method stores")
plt.legend()
plt.tight_layout()
plt.show()

# %%
s1, s2, s3, rt = (np.array(sizes[k]) for k in ["SnAp-1", "SnAp-2", "SnAp-3", "RTRL"])
check("SnAp-1 ≤ SnAp-2 ≤ SnAp-3 ≤ RTRL at every density", (s1 <= s2).all() and (s2 <= s3).all() and (s3 <= rt).all())
check("SnAp-1 stores one float per kept parameter", (np.diff(s1) > 0).all() and s1[-1] == dense_p)
check("with dense weights SnAp-2 is already RTRL", s2[-1] == s3[-1] == rt[-1] == dense_p * UNITS)
for i, d in enumerate(densities):
    print(f"d={d:<5} SnAp-1 {s1[i]:7d}  SnAp-2 {s2[i]:7d}  SnAp-3 {s3[i]:7d}  RTRL {rt[i]:7d}")
check(f"at density {densities[0]} SnAp-2 stores less than half of RTRL ({s2[0]} vs {rt[0]})", s2[0] < rt[0] / 2)
print(f"total {time.perf_counter() - T0:.1f} s")
