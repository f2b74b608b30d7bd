"""Per-step SnAp-1 (= exact RTRL for the LRU) against BPTT, and its cost per stored float, per cell.

For each cell (GRU, LSTM, LRU) and state size ``k``: BPTT (``snapjax.bptt_gradient``, ``jax.grad``
through ``lax.scan``) and SnAp-1 (``snapjax.online_gradient``: ``step`` + ``gradient`` every
step) over the same ``T`` steps, jitted and compiled first, then ``--repeats`` rounds calling
each once in turn (interleaved: load drifts hit both alike).  Reported: median µs per step,
spread, the median of the per-round ratios SnAp-1 / BPTT, and ns per stored influence float
per example (µs per step / (B × floats)), the figure that compares cells whose influence sizes
differ (issue #28: LRU-256 RTRL ≤ 8× BPTT; LSTM SnAp-1 per stored float within 1.3× of GRU's)::

    python benchmarks/cell_step_cost.py                            # k = 256, ~1 min on 2 cores
    python benchmarks/cell_step_cost.py --cells lru --units 256 --repeats 15

Writes ``--out`` (default ``benchmarks/out/cell_step_cost.json``) with the command line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import round_robin, write_results

import snapjax as sj

CELLS = {"gru": sj.GRUCell, "lstm": sj.LSTMCell, "lru": sj.LRUCell}


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def measure(cell_name, k, n_in, B, T, repeats):
    rec = sj.as_recurrent(CELLS[cell_name](k))
    params = rec.init_params(jax.random.key(0), n_in)
    xs = jax.random.normal(jax.random.key(1), (T, B, n_in))
    ys = jnp.zeros((T, B) + rec.output(rec.init_carry(1)).shape[1:])
    method = sj.online_method("snap1", rec, params)
    fns = {
        "bptt": jax.jit(lambda p, xs: sj.bptt_gradient(rec, p, rec.init_carry(B), xs, ys, _loss).grads),
        "snap1": jax.jit(lambda p, xs: sj.online_gradient(method, p, rec.init_carry(B), xs, ys, _loss).grads),
    }
    times = round_robin({m: (lambda f=f: f(params, xs)) for m, f in fns.items()}, repeats, 1e6 / T)
    ratios = [a / b for a, b in zip(times["snap1"], times["bptt"])]
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"cell": cell_name, "units": k, "inputs": n_in, "batch": B, "T": T, "repeats": repeats,
            "stored_floats": method.num_stored(), "us_per_step": med,
            "spread_us": {m: [min(t), float(np.percentile(t, 25)), float(np.percentile(t, 75)), max(t)]
                          for m, t in times.items()},
            "ratio_snap1_to_bptt": statistics.median(ratios),
            "ns_per_stored_float": 1e3 * med["snap1"] / (B * method.num_stored()), "times_us": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="gru,lstm,lru")
    p.add_argument("--units", default="256", help="comma list of k")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cell_step_cost.json"))
    args = p.parse_args(argv)
    results = []
    for k in (int(u) for u in args.units.split(",")):
        for c in args.cells.split(","):
            r = measure(c, k, args.inputs, args.batch, args.steps, args.repeats)
            results.append(r)
            us = r["us_per_step"]
            print(f"{c}-{k} B={args.batch}: BPTT {us['bptt']:8.1f} µs/step, SnAp-1 {us['snap1']:8.1f} µs/step "
                  f"(x{r['ratio_snap1_to_bptt']:.1f} BPTT), {r['stored_floats']} floats/example, "
                  f"{r['ns_per_stored_float']:.3f} ns per stored float", flush=True)
    print("wrote", write_results(args.out, results=results))


if __name__ == "__main__":
    main()
