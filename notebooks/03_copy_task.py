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
# # Copy task with a curriculum: learning curves of the online methods
#
# The benchmark of the SnAp paper (after Mujika et al. 2018): a random binary string of length
# `L` is shown one bit per step, then a delimiter; the GRU must then reproduce the string.
# The loss (bits per bit) counts only on the reproduction. `L` starts at 1 and grows by one when
# the recent average loss falls below 0.15 bits. Every method learns **online** (an Adam step
# after every scored time step; TBPTT: after every window) on a sparse GRU (each kernel keeps a
# random 25% of its weights).
#
# This notebook is self-contained: it uses only the installed package (`sj.OnlineLearner` and
# the copy-task data of `snapjax.data`). `benchmarks/copy_task.py` in a repository checkout runs
# the same protocol at larger scale, over several densities and seeds (`make demo` runs its
# `--quick` mode). `SNAPJAX_FAST=1` shrinks the run to a few seconds per method — the curves
# are then short: use the full mode (or `make demo`) to see the methods separate.

# %%
import os
import time

FAST = os.environ.get("SNAPJAX_FAST", "0") == "1"
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import snapjax as sj
from snapjax.data import NUM_TOKENS, PAD, copy_task_batch, curriculum_init, curriculum_update


def check(claim: str, holds) -> None:
    """Print a claim this notebook makes and whether it holds; stop the notebook if it does not."""
    print(("✓ " if holds else "✗ ") + claim)
    if not holds:
        raise RuntimeError(f"the notebook's claim does not hold: {claim}")


T0 = time.perf_counter()
DENSITY, BATCH, LR, WINDOW, THRESHOLD = 0.25, 8, 1e-2, 10, 0.15
if FAST:
    METHODS = ("snap1", "snap2", "tbptt")
    UNITS, TOKEN_BUDGET, MAX_LENGTH = 16, 12_000, 8
else:
    METHODS = ("snap1", "snap2", "snap3", "rtrl", "uoro", "tbptt")
    UNITS, TOKEN_BUDGET, MAX_LENGTH = 32, 300_000, 64
OPTIONS = {"tbptt": {"tbptt_window": 8}}  # per-method OnlineLearner options: TBPTT's window
CHUNK = 8  # time steps per compiled call

# %% [markdown]
# ## The learner
#
# A GRU with a 2-way read-out, inputs one-hot over the 4 tokens (bits, delimiter, blank).
# `skip_unscored_updates=True`: a step (or a TBPTT window) with no scored example makes no
# optimizer call, so the presentation phase only propagates the state and the method state.
#
# Sequences grow with `L`; to compile `learner.run` once, every batch is cut into chunks of
# `C` steps and the last chunk is padded with a zero loss mask. `C` is a multiple of the
# learner's optimizer period (`learner.period(params)`: 1 for RTRL / SnAp / UORO, the window
# for TBPTT), so every sequence starts a new period. Padded steps come after the sequence's
# last scored step and train nothing; `learner.reset_carry` zeroes the carry and
# re-initialises the method state at every sequence start.


# %%
def make_learner(method, seed):
    cell = sj.GRUCell(UNITS)
    shapes = cell.init(jax.random.key(0), jnp.zeros((1, UNITS)), jnp.zeros((1, NUM_TOKENS)))["params"]
    masks = sj.random_masks(seed, shapes, DENSITY, spec=cell)  # static: every kernel keeps 25%
    return sj.OnlineLearner(cell, readout_size=2, method=method, optimizer=optax.adam(LR), masks=masks,
                            skip_unscored_updates=True, **OPTIONS.get(method, {}))


def train(method, seed=0, log_every=5):
    learner = make_learner(method, seed)
    k_init, k_data = jax.random.split(jax.random.key(seed))
    state = learner.init(k_init, batch_size=BATCH, input_size=NUM_TOKENS)
    period = learner.period(state.params)
    C = period * -(-CHUNK // period)
    reset = jax.jit(learner.reset_carry)
    label = "+".join(m.name for m in learner.methods(state.params))
    cur = curriculum_init(1, THRESHOLD, WINDOW, max_length=MAX_LENGTH)
    hist = {"tokens": [0], "L": [1], "loss_bits": [float("nan")]}
    tokens, batches, recent, updates = 0, 0, [], 0
    while tokens < TOKEN_BUDGET:
        L = int(cur.length)
        k_data, kb = jax.random.split(k_data)
        inputs, targets, mask = (np.asarray(a) for a in copy_task_batch(kb, BATCH, L))  # (2L+1, B)
        T = 2 * L + 1
        pad = -T % C
        inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=PAD)
        targets, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (targets, mask))
        xs = jax.nn.one_hot(inputs, NUM_TOKENS)  # (T + pad, B, 4)
        state = reset(state)
        loss_sum = 0.0
        for i in range(0, T + pad, C):
            state, _, metrics = learner.run_jit(state, xs[i:i + C], targets[i:i + C], mask[i:i + C])
            loss_sum += metrics["loss"].sum()  # per-step mean CE (nats) over the scored examples
            updates += metrics["updated"].sum()
        bits = float(loss_sum) / L / np.log(2.0)  # every reproduction step scores all B examples
        cur = curriculum_update(cur, bits)
        tokens += BATCH * T
        batches += 1
        recent = (recent + [bits])[-WINDOW:]
        if int(cur.length) != L or batches % log_every == 0:
            hist["tokens"].append(tokens)
            hist["L"].append(int(cur.length))
            hist["loss_bits"].append(float(np.mean(recent)))
        if int(cur.length) != L:
            recent = []
    return {"label": label, "final_L": int(cur.length), "tokens": tokens, "updates": int(updates), "history": hist}


# %% [markdown]
# ## Run

# %%
runs = {}
for method in METHODS:
    t0 = time.perf_counter()
    runs[method] = r = train(method)
    print(f"{r['label']:8s} L reached {r['final_L']:3d} after {r['tokens']:7,d} tokens, "
          f"{r['updates']:6,d} optimizer steps ({time.perf_counter() - t0:5.1f} s)")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for method, r in runs.items():
    h = r["history"]
    ax1.step(h["tokens"], h["L"], where="post", label=r["label"])
    ax2.plot(h["tokens"][1:], h["loss_bits"][1:], label=r["label"], lw=1)
ax1.set_xlabel("tokens seen")
ax1.set_ylabel("curriculum length L")
ax1.legend()
ax2.axhline(THRESHOLD, color="gray", ls=":", label="curriculum threshold")
ax2.set_xlabel("tokens seen")
ax2.set_ylabel("recent loss (bits per bit)")
fig.suptitle(f"Copy task, GRU-{UNITS} at density {DENSITY}, batch {BATCH}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checks
#
# Every method must have learned: its loss at `L = 1` fell from about 1 bit (chance) to below
# the 0.15-bit threshold, so the curriculum moved on to `L ≥ 2`.

# %%
for method, r in runs.items():
    bits = np.asarray(r["history"]["loss_bits"][1:], float)
    bits = bits[np.isfinite(bits)]
    check(f"{method}: ran its {TOKEN_BUDGET:,}-token budget with {r['updates']:,} updates",
          len(bits) > 0 and r["tokens"] >= TOKEN_BUDGET and r["updates"] > 0)
    check(f"{method}: starts near chance ({bits[0]:.2f} bits)", bits[0] > 0.5)
    check(f"{method}: its loss fell below half of that ({bits.min():.2f} bits)", bits.min() < 0.5 * bits[0])
    check(f"{method}: the curriculum moved on (final L = {r['final_L']})", r["final_L"] >= 2)
print(f"total {time.perf_counter() - T0:.1f} s")
