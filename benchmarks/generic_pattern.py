"""Generic-path SnAp-n storing only its pattern vs its dense storage vs exact RTRL (issue #27).

A GRU whose candidate is layer-normalised (``LNGRU`` below, as in ``tests/test_generic.py``) has
no compressed form, so snapjax runs it on the generic path (dense per-example Jacobians).  Its
SnAp-1 pattern is one unit for the update gate's and the norm's parameters and every unit for
the others.  Timed per step, interleaved (every method once per round), in one process:

* ``rtrl``: exact RTRL, ``J (B, k, p)``;
* ``snap1-dense``: SnAp-1 stored as ``J (B, k, p)`` and masked (the storage before pattern
  storage existed; ``storage="dense"``);
* ``snap1-pattern``: SnAp-1 storing its pattern (the default when the input size is known);
* ``gru-snap1``: the built-in GRU's compressed SnAp-1 (``p`` floats), for cost per stored float;
* ``gru-generic-snap1-dense`` / ``-pattern``: flax's ``GRUCell`` forced onto the generic path
  (``as_recurrent(..., generic=True)``), whose SnAp-1 pattern is diagonal (one float per
  parameter, ``I`` from one row-coloured product).

Usage::

    python benchmarks/generic_pattern.py                    # k = 32 and 64, B = 16, 64 inputs
    python benchmarks/generic_pattern.py --units 64 --repeats 9

Writes ``--out`` (default ``benchmarks/out/generic_pattern.json``) with the command line.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import round_robin, write_results

import snapjax as sj
from snapjax.methods.dense import dense_method


class LNGRU(nn.Module):
    """GRU (flax form) whose candidate pre-activation is layer-normalised over the units."""

    features: int

    @nn.compact
    def __call__(self, carry, x):
        dense = functools.partial(nn.Dense, self.features)
        r = nn.sigmoid(dense(name="ir")(x) + dense(use_bias=False, name="hr")(carry))
        z = nn.sigmoid(dense(name="iz")(x) + dense(use_bias=False, name="hz")(carry))
        n = jnp.tanh(nn.LayerNorm(name="ln")(dense(name="in")(x) + r * dense(name="hn")(carry)))
        h = (1.0 - z) * n + z * carry
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        del rng
        return jnp.zeros(input_shape[:-1] + (self.features,))


def _runner(method, params, B, T):
    def run(params, xs):
        def body(c, x):
            carry, st, g = c
            carry, st, _ = method.step(params, carry, st, x)
            gg, st = method.gradient(params, st, carry)
            return (carry, st, jax.tree.map(jnp.add, g, gg)), None

        c0 = (method.init_carry(B), method.init(B), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(body, c0, xs)[0][2]

    return jax.jit(run)


def measure(units, n_in, B, T, repeats):
    module = LNGRU(units)
    params = module.init(jax.random.key(0), jnp.zeros((B, units)), jnp.zeros((B, n_in)))["params"]
    rec = sj.as_recurrent(module)
    gru = sj.GRUCell(units)
    gru_params = sj.as_recurrent(gru).init_params(jax.random.key(0), n_in)
    methods = {
        "rtrl": (dense_method(rec, params, input_size=n_in), params),
        "snap1-dense": (dense_method(rec, params, n=1, input_size=n_in, storage="dense"), params),
        "snap1-pattern": (dense_method(rec, params, n=1, input_size=n_in), params),
        "gru-snap1": (sj.online_method("snap1", gru, gru_params), gru_params),
    }
    flax_gru = nn.GRUCell(units)
    fparams = flax_gru.init(jax.random.key(0), jnp.zeros((B, units)), jnp.zeros((B, n_in)))["params"]
    generic = sj.as_recurrent(flax_gru, generic=True)
    methods["gru-generic-snap1-dense"] = (dense_method(generic, fparams, n=1, input_size=n_in, storage="dense"),
                                          fparams)
    methods["gru-generic-snap1-pattern"] = (dense_method(generic, fparams, n=1, input_size=n_in), fparams)
    xs = jax.random.normal(jax.random.key(1), (T, B, n_in))
    fns = {m: _runner(meth, p, B, T) for m, (meth, p) in methods.items()}
    times = round_robin({m: (lambda f=f, p=methods[m][1]: f(p, xs)) for m, f in fns.items()}, repeats, 1e6 / T)
    rows = {}
    for m, (meth, _) in methods.items():
        med = statistics.median(times[m])
        rows[m] = {"storage": meth.storage, "stored": meth.num_stored(), "us_per_step": med,
                   "spread": [min(times[m]), max(times[m])], "ns_per_stored_float": 1e3 * med / (B * meth.num_stored()),
                   "ratio_to_rtrl_median": statistics.median(a / b for a, b in zip(times[m], times["rtrl"])),
                   "times_us": times[m]}
    return {"units": units, "inputs": n_in, "batch": B, "T": T, "repeats": repeats, "methods": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", default="32,64", help="comma list of k")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "generic_pattern.json"))
    args = p.parse_args(argv)
    results = []
    for k in (int(u) for u in args.units.split(",")):
        r = measure(k, args.inputs, args.batch, args.steps, args.repeats)
        results.append(r)
        print(f"LN-GRU-{k}, {args.inputs} inputs, B={args.batch} (generic path); built-in GRU-{k} for reference")
        for m, row in r["methods"].items():
            print(f"  {m:26s} {row['storage']:8s} stored {row['stored']:8d}  median {row['us_per_step']:9.1f} µs/step "
                  f"[{row['spread'][0]:.1f} .. {row['spread'][1]:.1f}]  {row['ns_per_stored_float']:.3f} ns/float  "
                  f"ratio to RTRL {row['ratio_to_rtrl_median']:.3f}")
    print("wrote", write_results(args.out, results=results, numpy=np.__version__))


if __name__ == "__main__":
    main()
