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
# The runs below reuse `benchmarks/copy_task.py` (`make demo` runs its `--quick` mode) with a
# small budget.
# `SNAPJAX_FAST=1` shrinks the run to a few seconds per method — the curves are then short:
# use the full mode (or `make demo`) to see the methods separate.

# %%
import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path

FAST = os.environ.get("SNAPJAX_FAST", "0") == "1"
try:
    import snapjax
except ImportError:  # fallback for a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().resolve().parent))
    import snapjax

import jax
import matplotlib.pyplot as plt
import numpy as np

T0 = time.perf_counter()
DENSITY = 0.25
if FAST:
    METHODS = ("snap1", "snap2", "tbptt")
    SETTINGS = dict(units=16, batch_size=8, lr=1e-2, token_budget=12_000, max_length=8)
else:
    METHODS = ("snap1", "snap2", "snap3", "rtrl", "uoro", "tbptt")
    SETTINGS = dict(units=32, batch_size=8, lr=1e-2, token_budget=300_000, max_length=64)
TIME_CAP_S = 90.0 if FAST else 300.0  # per run, a safety cap only: the token budget decides

# %% [markdown]
# ## The benchmark's trainer
#
# `benchmarks/copy_task.py` is a script, not part of the package: load it from the repository
# that holds the imported `snapjax` (an error here means the checkout has no `benchmarks/`).


# %%
def load_benchmark():
    path = Path(snapjax.__file__).resolve().parent.parent / "benchmarks" / "copy_task.py"
    spec = importlib.util.spec_from_file_location("snapjax_copy_task_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = load_benchmark()
print("methods:", METHODS)


def train(method, seed=0):
    fields = {f.name for f in dataclasses.fields(bench.CopyConfig)}
    overrides = {**SETTINGS, "methods": METHODS, "densities": (DENSITY,), "seeds": (seed,), "window": 10,
                 "time_budget_s": TIME_CAP_S}
    base = {k: v for k, v in bench.QUICK.items() if k in fields}
    cfg = bench.CopyConfig(**{**base, **{k: v for k, v in overrides.items() if k in fields}})
    return bench.train_copy(method, DENSITY, seed, cfg, progress=False)


# %% [markdown]
# ## Run

# %%
runs = {}
for method in METHODS:
    t0 = time.perf_counter()
    runs[method] = r = train(method)
    print(f"{r['label']:10s} L reached {r['final_L']:3d} after {r['tokens']:7,d} tokens "
          f"({time.perf_counter() - t0:5.1f} s{', TIME CAP HIT' if r['hit_time_cap'] else ''})")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for method, r in runs.items():
    h = r["history"]
    ax1.step(h["tokens"], h["L"], where="post", label=r["label"])
    ax2.plot(h["tokens"][1:], h["loss_bits"][1:], label=r["label"], lw=1)
ax1.set_xlabel("tokens seen")
ax1.set_ylabel("curriculum length L")
ax1.legend()
ax2.axhline(0.15, color="gray", ls=":", label="curriculum threshold")
ax2.set_xlabel("tokens seen")
ax2.set_ylabel("recent loss (bits per bit)")
fig.suptitle(f"Copy task, GRU-{SETTINGS['units']} at density {DENSITY}, batch {SETTINGS['batch_size']}")
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
    assert np.all(np.isfinite(r["history"]["L"])) and len(bits) > 0, method
    assert bits[0] > 0.5, (method, bits[:3])  # starts near chance (1 bit)
    assert bits.min() < 0.5 * bits[0], (method, bits.min(), bits[0])  # the loss decreased
    if not r["hit_time_cap"]:
        assert r["final_L"] >= 2, (method, r["final_L"])
assert max(r["final_L"] for r in runs.values()) >= 2
print(f"total {time.perf_counter() - T0:.1f} s")
