"""Per-step cost of ``snapjax.OnlineLearner`` against a hand-written loop over the same method.

Both are one jitted ``lax.scan`` over ``T`` steps of: method step, ``Dense`` read-out
softmax cross-entropy (masked mean over the batch), method gradient, one Adam update per step.
The hand-written loop is the ~12 lines a user would write with :func:`snapjax.online_method`;
the learner runs with its default settings (guard on).  Timed with ``block_until_ready`` after
a warm-up, interleaved repeats (learner, loop, learner, ...) so that machine load hits both;
the ratio is of the medians in the same run.

    python benchmarks/learner_overhead.py --out benchmarks/results/learner_overhead.json

Rows: ``{method, units, batch, learner_us, loop_us, ratio}`` (µs per time step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import snapjax as sj  # noqa: E402
from benchmarks._timing import machine_info  # noqa: E402

CONFIGS = [(32, 8), (128, 16)]
METHODS = ["snap1", "rtrl", "uoro"]


def hand_loop(cell, method, head, opt):
    """The loop a user would write by hand over ``method`` (returns a jitted run)."""

    def loss_fn(p_head, carry, y):
        logits = head.apply({"params": p_head}, method.cell.output(carry))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(c, inp):
        params, opt_state, carry, ms = c
        x, y = inp
        carry, ms, _ = method.step(params["cell"], carry, ms, x)
        loss, (g_head, dcarry) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params["head"], carry, y)
        g_cell, ms = method.gradient(params["cell"], ms, dcarry)
        updates, opt_state = opt.update({"cell": g_cell, "head": g_head}, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, carry, ms), loss

    @jax.jit
    def run(c, xs, ys):
        return lax.scan(step, c, (xs, ys))

    return run


def measure(method_name, units, batch, T, repeats, n_in=8, classes=4, max_floats=None):
    cell, head, opt = nn.GRUCell(units), nn.Dense(classes), optax.adam(1e-3)
    learner = sj.OnlineLearner(cell, readout_size=classes, method=method_name, optimizer=opt)
    state = learner.init(jax.random.key(0), batch_size=batch, input_size=n_in)
    params = {"cell": state.params["layers_0"], "head": state.params["layers_1"]}
    method = sj.online_method(method_name, cell, params["cell"])
    if max_floats:  # the same work budget for every method: fewer steps where the state is big
        T = int(max(16, min(T, max_floats // (batch * max(method.num_stored() or 1, 1)))))
    # the same initial method state as the learner (UORO: the same sign key), so the losses agree
    loop_state = (params, opt.init(params), method.init_carry(batch), state.method_state[0])
    kx, ky = jax.random.split(jax.random.key(2))
    xs = jax.random.normal(kx, (T, batch, n_in))
    ys = jax.random.randint(ky, (T, batch), 0, classes)
    run_learner = jax.jit(learner.run)
    run_loop = hand_loop(cell, method, head, opt)
    # the same losses (learner and loop are the same maths)
    _, _, m = run_learner(state, xs, ys)
    _, loop_losses = run_loop(loop_state, xs, ys)
    max_diff = float(jnp.max(jnp.abs(m["loss"] - loop_losses)))
    jax.block_until_ready((run_learner(state, xs, ys), run_loop(loop_state, xs, ys)))  # warm-up
    t_learner, t_loop = [], []
    for _ in range(repeats):
        for fn, args, acc in ((run_learner, (state, xs, ys), t_learner), (run_loop, (loop_state, xs, ys), t_loop)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            acc.append((time.perf_counter() - t0) / T * 1e6)
    lu, pu = statistics.median(t_learner), statistics.median(t_loop)
    return {
        "method": method_name, "units": units, "batch": batch,
        "learner_us": round(lu, 2), "loop_us": round(pu, 2), "ratio": round(lu / pu, 3),
        "learner_spread_us": [round(min(t_learner), 2), round(max(t_learner), 2)],
        "loop_spread_us": [round(min(t_loop), 2), round(max(t_loop), 2)],
        "steps": T, "repeats": repeats, "max_loss_diff": max_diff,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/learner_overhead.json")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-floats", type=float, default=4e8,
                    help="cap on steps x batch x method-state floats per timed call (fewer steps for costly methods)")
    ap.add_argument("--configs", default=",".join(f"{u}x{b}" for u, b in CONFIGS), help="UNITSxBATCH,...")
    args = ap.parse_args(argv)
    rows = []
    for cfg in args.configs.split(","):
        units, batch = (int(v) for v in cfg.split("x"))
        for name in args.methods.split(","):
            row = measure(name, units, batch, args.steps, args.repeats, max_floats=args.max_floats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": machine_info(), "rows": rows},
                              indent=1))
    print("\n| method | units | batch | learner µs/step | loop µs/step | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['units']} | {r['batch']} | {r['learner_us']} | {r['loop_us']} | {r['ratio']} |")
    return rows


if __name__ == "__main__":
    main()
