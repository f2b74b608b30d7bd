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
# # Quickstart: online training of a GRU with SnAp-1
#
# SnAp-1 (Menick et al. 2020) keeps one influence number per parameter and per example
# (`J[θ] ≈ ds_i/dθ` for the unit `i` that `θ` writes to), so a recurrent network can learn
# *online*, one optimizer step per time step, with no unrolled history — at roughly the
# cost of backpropagation.
#
# This notebook
# 1. trains a GRU online with SnAp-1 and optax on an endless stream (a delayed-recall task),
# 2. shows the one interface every online method implements, and compares the online
#    gradients of SnAp-1, SnAp-2, exact RTRL, UORO and truncated BPTT with the BPTT gradient.
#
# Set `SNAPJAX_FAST=1` for a quick run (CI).

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

print("snapjax", sj.__version__, "| jax", jax.__version__, "| fast mode:", FAST)


def check(claim: str, holds) -> None:
    """Print a claim this notebook makes and whether it holds; stop the notebook if it does not."""
    print(("✓ " if holds else "✗ ") + claim)
    if not holds:
        raise RuntimeError(f"the notebook's claim does not hold: {claim}")

# %% [markdown]
# ## 1. Train online (the 20 lines)
#
# The stream is a sequence of random bits; the target at time `t` is the bit seen `DELAY`
# steps earlier, so the GRU has to remember. `sj.OnlineLearner` wraps a model (here a GRU cell
# plus a dense read-out of 2 logits: `readout_size=2`), an online method chosen by name and
# an optax optimizer. `learner.run_jit` is one jitted `lax.scan` over a time-major chunk of the
# stream (`xs (T, B, n_in)`, `ys (T, B)`): at every step the cell advances, the method updates
# its state (SnAp-1: the influence `J`), and Adam applies the online gradient. The hidden state
# (`state.carry`) and the method state carry over from chunk to chunk.

# %%
DELAY, B, T = 2, 16, 50
CHUNKS = 12 if FAST else 40

learner = sj.OnlineLearner(sj.GRUCell(16), readout_size=2, method="snap1", optimizer=optax.adam(1e-2))
state = learner.init(jax.random.key(0), batch_size=B, input_size=1)
print({name: jax.tree.map(jnp.shape, p) for name, p in state.params.items()})  # layers_0: GRU, layers_1: read-out

bits = jax.random.bernoulli(jax.random.key(1), 0.5, (CHUNKS * T + DELAY, B)).astype(jnp.int32)
xs_all = bits[DELAY:, :, None].astype(jnp.float32)  # (time, B, 1): the bit stream
ys_all = bits[:-DELAY]  # (time, B): the bit seen DELAY steps ago

losses = []
t0 = time.perf_counter()
for c in range(CHUNKS):
    sl = slice(c * T, (c + 1) * T)
    state, logits, metrics = learner.run_jit(state, xs_all[sl], ys_all[sl])
    losses.append(float(metrics["loss"].mean()))
print(f"{CHUNKS * T} online steps in {time.perf_counter() - t0:.1f} s; "
      f"loss first chunk {losses[0]:.3f} -> last chunk {losses[-1]:.3f} nats (chance: ln 2 = {np.log(2):.3f})")

# %% [markdown]
# The same loop with a different `method=` trains with exact RTRL (`"rtrl"`), SnAp-n
# (`"snap2"`, ...), UORO (`"uoro"`) or truncated BPTT (`method="tbptt", tbptt_window=W`: the
# optimizer then steps once per window, `learner.period(params) == W`).
# For comparison, truncated BPTT with a window of 10 steps on the same stream:

# %%
def train(learner):
    st = learner.init(jax.random.key(0), batch_size=B, input_size=1)
    out = []
    for c in range(CHUNKS):
        sl = slice(c * T, (c + 1) * T)
        st, _, m = learner.run_jit(st, xs_all[sl], ys_all[sl])
        out.append(float(m["loss"].mean()))
    return out


tbptt = sj.OnlineLearner(sj.GRUCell(16), readout_size=2, method="tbptt", tbptt_window=10, optimizer=optax.adam(1e-2))
t0 = time.perf_counter()
losses_tbptt = train(tbptt)
print(f"TBPTT(10): {time.perf_counter() - t0:.1f} s; loss {losses_tbptt[0]:.3f} -> {losses_tbptt[-1]:.3f}; "
      f"optimizer period {tbptt.period(state.params)} steps")

steps = (np.arange(CHUNKS) + 1) * T
plt.figure(figsize=(6, 3.5))
plt.plot(steps, losses, label="SnAp-1 (online)")
plt.plot(steps, losses_tbptt, label="TBPTT, window 10")
plt.axhline(np.log(2), color="gray", ls=":", label="chance")
plt.xlabel("time steps seen")
plt.ylabel("loss per step (nats)")
plt.title(f"Delayed recall (delay {DELAY}), GRU-16, batch {B}")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Forward only: `learner.evaluate` runs the trained model over a fresh stream from a zero
# carry, without learning (`learner.predict` returns the outputs and the final carry). The
# first `DELAY` targets were never shown, so the loss mask (`(T, B)`) leaves them out.

# %%
test_bits = jax.random.bernoulli(jax.random.key(7), 0.5, (200 + DELAY, B)).astype(jnp.int32)
test_mask = jnp.ones((200, B)).at[:DELAY].set(0.0)
ev = learner.evaluate(state, test_bits[DELAY:, :, None].astype(jnp.float32), test_bits[:-DELAY], test_mask)
print(f"held-out loss {float(ev['loss']):.3f} nats")

# %%
# The online learner really learned: the loss at the end is well below chance and below the start.
check("every loss is finite", np.all(np.isfinite(losses)))
check(f"final loss {np.mean(losses[-3:]):.3f} < half of chance ({0.5 * np.log(2):.3f} nats)",
      np.mean(losses[-3:]) < 0.5 * np.log(2))
check(f"final loss {np.mean(losses[-3:]):.3f} is at least 0.2 below the first ({np.mean(losses[:3]):.3f})",
      np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2)
check(f"held-out loss {float(ev['loss']):.3f} < half of chance: it generalises to a fresh stream",
      float(ev["loss"]) < 0.5 * np.log(2))

# %% [markdown]
# ## 2. The method interface, and how close the online gradient is to BPTT
#
# Every method, built by name with `sj.online_method(name, cell, params, ...)`, is an
# `sj.OnlineMethod` driven the same way, one step at a time:
#
# ```python
# carry, mstate = method.init_carry(B), method.init(B, key=key)
# carry, mstate, aux = method.step(params, carry, mstate, x_t)      # forward + method update
# grads, mstate = method.gradient(params, mstate, dloss_dcarry_t)   # parameter-shaped
# ```
#
# with `carry` and `dloss_dcarry` in the cell's flax carry layout. `sj.online_gradient` is
# exactly this loop in a `lax.scan`, summing the gradients over a sequence with the parameters
# held fixed; `sj.bptt_gradient` is the reference (`jax.grad` through `lax.scan`).

# %%
cell = sj.GRUCell(16)
x_seq = jax.random.normal(jax.random.key(2), (20, 4, 3))  # (T, B, n_in)
y_seq = jax.random.normal(jax.random.key(3), (20, 4, 16))  # regression targets for h_t
params = cell.init(jax.random.key(4), jnp.zeros((4, 16)), x_seq[0])["params"]
carry = jnp.zeros((4, 16))


def loss_fn(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


# the loop by hand, with SnAp-1 (step and gradient are pure functions: jit them) ...
method = sj.online_method("snap1", cell, params)
step, gradient = jax.jit(method.step), jax.jit(method.gradient)
c, mstate = method.init_carry(4), method.init(4)
g_hand = jax.tree.map(jnp.zeros_like, params)
for x_t, y_t in zip(x_seq, y_seq):
    c, mstate, _ = step(params, c, mstate, x_t)
    g_t, mstate = gradient(params, mstate, jax.grad(loss_fn)(c, y_t))
    g_hand = jax.tree.map(jnp.add, g_hand, g_t)
# ... is what online_gradient computes in one lax.scan
g_scan = sj.online_gradient(method, params, carry, x_seq, y_seq, loss_fn).grads
hand_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_hand), jax.tree.leaves(g_scan)))
print(f"by hand vs online_gradient: max abs difference {hand_err:.1e}")
check(f"the hand-written loop equals online_gradient ({hand_err:.1e} < 1e-5)", hand_err < 1e-5)

# %% [markdown]
# With the parameters held fixed over a sequence, the summed online gradient
# `Σ_t (∂L_t/∂s_t) J_t` of **exact RTRL** equals the BPTT gradient (up to float32 rounding),
# and so does truncated BPTT with a window as long as the sequence. SnAp-1 drops the influence
# that flows between units, so its gradient is biased; it stays well aligned with the true
# gradient for short dependencies. UORO's rank-one estimate is unbiased but noisy (one random
# draw here).

# %%
bptt = jax.jit(lambda p: sj.bptt_gradient(cell, p, carry, x_seq, y_seq, loss_fn))(params)
flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])  # noqa: E731
g_ref = flat(bptt.grads)

options = {"tbptt": {"window": 20}}  # per-method options: truncated BPTT needs its window
results = {}
for name in ["rtrl", "snap1", "snap2", "uoro", "tbptt"]:
    method = sj.online_method(name, cell, params, **options.get(name, {}))
    res = jax.jit(lambda p: sj.online_gradient(method, p, carry, x_seq, y_seq, loss_fn, key=jax.random.key(5)))(params)
    g = flat(res.grads)
    results[method.name] = dict(
        max_abs_err=float(jnp.max(jnp.abs(g - g_ref))),
        rel_err=float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)),
        cosine=float(g @ g_ref / (jnp.linalg.norm(g) * jnp.linalg.norm(g_ref))),
        stored=method.num_stored(),
        loss_diff=float(abs(res.loss - bptt.loss)),
    )
    print(f"{method.name:7s} state floats/example {results[method.name]['stored']:7d} | "
          f"cosine to BPTT {results[method.name]['cosine']:+.4f} | relative error {results[method.name]['rel_err']:.2e}")

# %%
# Exact RTRL == BPTT to float32 precision, and so is TBPTT over the whole sequence; SnAp-1 is an
# approximation, positively aligned; with dense weights SnAp-2 already reaches every unit, i.e.
# it is exact RTRL too.
r = results
check(f"RTRL's loss equals BPTT's (difference {r['rtrl']['loss_diff']:.1e})", r["rtrl"]["loss_diff"] < 1e-4)
check(f"RTRL's gradient equals BPTT's (relative error {r['rtrl']['rel_err']:.1e})",
      r["rtrl"]["max_abs_err"] < 1e-4 and r["rtrl"]["rel_err"] < 1e-5)
check(f"TBPTT over the whole sequence equals BPTT (relative error {r['tbptt20']['rel_err']:.1e})",
      r["tbptt20"]["rel_err"] < 1e-5)
check(f"SnAp-2 on dense weights is exact RTRL (relative error {r['snap2']['rel_err']:.1e})", r["snap2"]["rel_err"] < 1e-5)
check(f"SnAp-1 is an approximation, positively aligned (cosine {r['snap1']['cosine']:.3f})",
      0.5 < r["snap1"]["cosine"] < 0.99999)
check("UORO's estimate is finite", np.isfinite(r["uoro"]["cosine"]))
check(f"SnAp-1 stores one float per parameter ({r['snap1']['stored']})",
      r["snap1"]["stored"] == sum(a.size for a in jax.tree.leaves(params)))
