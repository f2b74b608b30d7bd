"""SnAp-n against exact RTRL per step, where SnAp-n stores as much as RTRL (issue #28).

SnAp-n stores either its pattern's entries or, when the pattern reaches more than half the
state per parameter, RTRL's dense influence masked to the pattern (``method.storage``); in the
dense case it must cost what RTRL costs.  For each configuration this times RTRL, SnAp-1/2/3
through the method interface (``step`` + ``gradient`` every step, summed, in a jitted
``lax.scan`` of ``T`` steps), compiled first, then ``--repeats`` rounds that call every method
once in turn (interleaved, so load drifts hit all alike), and reports medians, the spread
(min, quartiles, max) and the median of the per-round ratios to RTRL.

Configurations: ``demo`` (``make demo``: GRU-32, 4 inputs, batch 8, density 0.25),
``char`` (the character LM's shape: GRU-32, 84 inputs, batch 8, density 0.25), ``k64`` and
``k64s`` (GRU-64, 64 inputs, batch 16, density 0.1 and 0.05)::

    python benchmarks/snap_vs_rtrl.py                        # all four, ~4 min on 2 CPU cores
    python benchmarks/snap_vs_rtrl.py --configs demo --repeats 21

Writes ``--out`` (default ``benchmarks/out/snap_vs_rtrl.json``) with the command line.
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
from snapjax.engine.sparsity import random_masks

CONFIGS = {  # name: (units, inputs, batch, density)
    "demo": (32, 4, 8, 0.25),
    "char": (32, 84, 8, 0.25),
    "k64": (64, 64, 16, 0.1),
    "k64s": (64, 64, 16, 0.05),
}
METHODS = ("rtrl", "snap1", "snap2", "snap3")


def _runner(method, B, T):
    def run(params, xs):
        def body(c, x):
            carry, st, g = c
            carry, st, _ = method.step(params, carry, st, x)
            gg, st = method.gradient(params, st, carry)  # a cotangent of the carry's shape
            return (carry, st, jax.tree.map(jnp.add, g, gg)), None

        c0 = (method.init_carry(B), method.init(B), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(body, c0, xs)[0][2]

    return jax.jit(run)


def _spread(ts):
    q = np.percentile(ts, [0, 25, 50, 75, 100])
    return {"min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4]}


def measure(name, units, n_in, B, density, T, repeats):
    cell = sj.GRUCell(units)
    params = sj.as_recurrent(cell).init_params(jax.random.key(0), n_in)
    masks = random_masks(0, params, density, spec=cell)
    xs = jax.random.normal(jax.random.key(1), (T, B, n_in))
    methods = {m: sj.online_method(m, cell, params, masks=masks) for m in METHODS}
    fns = {m: _runner(meth, B, T) for m, meth in methods.items()}
    times = round_robin({m: (lambda f=f: f(params, xs)) for m, f in fns.items()}, repeats, 1e6 / T)
    rows = {}
    for m, meth in methods.items():
        ratios = [a / b for a, b in zip(times[m], times["rtrl"])]
        rows[m] = {"storage": meth.storage, "stored": meth.num_stored(), "pattern": meth.pattern_count(),
                   "us_per_step": _spread(times[m]), "ratio_to_rtrl_median": statistics.median(ratios),
                   "ratio_to_rtrl_spread": _spread(ratios), "times_us": times[m]}
    return {"config": name, "units": units, "inputs": n_in, "batch": B, "density": density, "T": T,
            "repeats": repeats, "methods": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "snap_vs_rtrl.json"))
    args = p.parse_args(argv)
    results = []
    for name in args.configs.split(","):
        units, n_in, B, density = CONFIGS[name]
        r = measure(name, units, n_in, B, density, args.steps, args.repeats)
        results.append(r)
        print(f"{name}: GRU-{units}, {n_in} inputs, B={B}, density {density}")
        for m, row in r["methods"].items():
            s = row["us_per_step"]
            print(f"  {m:6s} {row['storage']:8s} stored {row['stored']:7d}  median {s['median']:8.1f} µs/step "
                  f"[{s['min']:.1f} .. {s['max']:.1f}]  ratio to RTRL {row['ratio_to_rtrl_median']:.3f}")
    print("wrote", write_results(args.out, results=results))


if __name__ == "__main__":
    main()
