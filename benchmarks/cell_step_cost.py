"""Per-step SnAp-1 (= exact RTRL for the LRU) against BPTT, and its cost per stored float, per cell.

For each cell (GRU, LSTM, LRU) and state size ``k``: BPTT (``snapjax.bptt_gradient``, ``jax.grad``
through ``lax.scan``) and SnAp-1 (``snapjax.online_gradient``: ``step`` + ``gradient`` every
step) over the same ``T`` steps, jitted and compiled first, then ``--repeats`` rounds calling
each once in turn (interleaved: load drifts hit both alike).  Reported: median µs per step,
spread, the median of the per-round ratios SnAp-1 / BPTT, and ns per stored influence float
per example (µs per step / (B × floats)), the figure that compares cells whose influence sizes
differ (issue #28: LRU-256 RTRL ≤ 8× BPTT; LSTM SnAp-1 per stored float within 1.3× of GRU's).
Every cell of one ``(k, B)`` is timed in the same round-robin, so each cell's per-float time is
also given as the median of its per-round ratios to the first cell's (``per_float_vs_first``)::

    python benchmarks/cell_step_cost.py                            # k = 256, ~1 min on 2 cores
    python benchmarks/cell_step_cost.py --units 64,128,256 --batch 4,16 --repeats 15

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


def measure(cell_names, k, n_in, B, T, repeats):
    """Rows for ``cell_names`` at state size ``k``: BPTT and SnAp-1 of *every* cell in one
    round-robin, so the per-float ratio of each cell to the first (``per_float_vs_first``, the
    median of per-round ratios) compares cells timed side by side."""
    fns, stored = {}, {}
    for cell_name in cell_names:
        rec = sj.as_recurrent(CELLS[cell_name](k))
        params = rec.init_params(jax.random.key(0), n_in)
        xs = jax.random.normal(jax.random.key(1), (T, B, n_in))
        ys = jnp.zeros((T, B) + rec.output(rec.init_carry(1)).shape[1:])
        method = sj.online_method("snap1", rec, params)
        stored[cell_name] = method.num_stored()
        bptt = jax.jit(lambda p, xs, rec=rec, ys=ys: sj.bptt_gradient(rec, p, rec.init_carry(B), xs, ys, _loss).grads)
        snap1 = jax.jit(lambda p, xs, rec=rec, ys=ys, method=method:
                        sj.online_gradient(method, p, rec.init_carry(B), xs, ys, _loss).grads)
        fns[(cell_name, "bptt")] = lambda f=bptt, p=params, xs=xs: f(p, xs)
        fns[(cell_name, "snap1")] = lambda f=snap1, p=params, xs=xs: f(p, xs)
    times = round_robin(fns, repeats, 1e6 / T)
    first = cell_names[0]
    per_float_first = [t / stored[first] for t in times[(first, "snap1")]]
    rows = []
    for cell_name in cell_names:
        t = {m: times[(cell_name, m)] for m in ("bptt", "snap1")}
        med = {m: statistics.median(v) for m, v in t.items()}
        per_float = [x / stored[cell_name] for x in t["snap1"]]
        rows.append({"cell": cell_name, "units": k, "inputs": n_in, "batch": B, "T": T, "repeats": repeats,
                     "stored_floats": stored[cell_name], "us_per_step": med,
                     "spread_us": {m: [min(v), float(np.percentile(v, 25)), float(np.percentile(v, 75)), max(v)]
                                   for m, v in t.items()},
                     "ratio_snap1_to_bptt": statistics.median([a / b for a, b in zip(t["snap1"], t["bptt"])]),
                     "ns_per_stored_float": 1e3 * med["snap1"] / (B * stored[cell_name]),
                     "per_float_vs_first": statistics.median([a / b for a, b in zip(per_float, per_float_first)]),
                     "first": first, "times_us": t})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="gru,lstm,lru")
    p.add_argument("--units", default="256", help="comma list of k")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--batch", default="16", help="comma list of B")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cell_step_cost.json"))
    args = p.parse_args(argv)
    results = []
    for k in (int(u) for u in args.units.split(",")):
        for B in (int(b) for b in args.batch.split(",")):
            for r in measure(args.cells.split(","), k, args.inputs, B, args.steps, args.repeats):
                results.append(r)
                us = r["us_per_step"]
                print(f"{r['cell']}-{k} B={B}: BPTT {us['bptt']:8.1f} µs/step, SnAp-1 {us['snap1']:8.1f} µs/step "
                      f"(x{r['ratio_snap1_to_bptt']:.1f} BPTT), {r['stored_floats']} floats/example, "
                      f"{r['ns_per_stored_float']:.3f} ns per stored float, x{r['per_float_vs_first']:.2f} "
                      f"{r['first']}'s per float (same rounds)", flush=True)
    print("wrote", write_results(args.out, results=results))


if __name__ == "__main__":
    main()
