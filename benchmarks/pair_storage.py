"""How to store a two-component influence (LSTM, LRU SnAp-1): one update, three storages.

The diagonal layout's update of a cell with two state components per unit is, per entry,
``(J₀, J₁) ← (c₀₀ J₀ + c₀₁ J₁ + g₀ x, c₁₁ J₁ + c₁₀ J₀ + g₁ x)``: each new component reads the other
old one.  This times that update alone, in one jitted ``lax.scan`` of ``T`` steps with its
coefficients materialised (:func:`snapjax.engine.jacobians.computed_once`, as the engine does),
for three storages of the same bytes, interleaved round-robin beside a stream pass:

* ``interleaved``: one float array ``(B, n, k, 2)``, the second term read reversed on the minor
  axis (the engine's storage today);
* ``split``: two float arrays ``(B, n, k)``;
* ``complex``: one complex array ``(B, n, k)``, component 0 real and 1 imaginary (each entry's
  new pair reads only its own old pair, so the update can be done in place);
* ``stream``: ``a ← 0.999·a + 10⁻³`` over the same bytes, in place (the bandwidth bound).

    python benchmarks/pair_storage.py                       # B = 16, n = k = 256
    python benchmarks/pair_storage.py --batch 4 --size 128 --out benchmarks/out/pair_storage.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import write_json
from _timing import machine_info, round_robin

from snapjax.engine.jacobians import computed_once


def _new_pair(J0, J1, x, c, g):
    """The two new components from the old ones (``x (B, n)``, ``c (4, B, k)``, ``g (2, B, k)``)."""
    xb = x[:, :, None]
    return (c[0][:, None] * J0 + c[2][:, None] * J1 + g[0][:, None] * xb,
            c[1][:, None] * J1 + c[3][:, None] * J0 + g[1][:, None] * xb)


def updates() -> dict:
    """``{storage: (to_storage(J0, J1), one_step(J, inputs) -> J)}``."""
    def interleaved(J, inp):
        x, c, g = computed_once(inp)
        c0, c1 = jnp.stack([c[0], c[1]], -1)[:, None], jnp.stack([c[2], c[3]], -1)[:, None]
        return c0 * J + c1 * J[..., ::-1] + jnp.stack([g[0], g[1]], -1)[:, None] * x[:, :, None, None]

    def split(J, inp):
        return _new_pair(*J, *computed_once(inp))

    def complex_(J, inp):
        return jax.lax.complex(*_new_pair(jnp.real(J), jnp.imag(J), *computed_once(inp)))

    def stream(J, inp):
        return J * 0.999 + 1e-3

    return {
        "interleaved": (lambda a, b: jnp.stack([a, b], -1), interleaved),
        "split": (lambda a, b: (a, b), split),
        "complex": (jax.lax.complex, complex_),
        "stream": (lambda a, b: jnp.stack([a, b], -1), stream),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="n = k: inputs and units per entry block")
    ap.add_argument("--steps", type=int, default=32, help="T, steps per timed call")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/out/pair_storage.json")
    args = ap.parse_args(argv)
    B, n, T = args.batch, args.size, args.steps
    key = jax.random.key(0)
    inputs = (jax.random.normal(key, (T, B, n)), 0.45 * jnp.tanh(jax.random.normal(key, (T, 4, B, n))),  # |c| < 0.45: a contracting update
              jax.random.normal(key, (T, 2, B, n)))
    zeros = jnp.zeros((B, n, n))
    calls, finals = {}, {}
    for name, (store, step) in updates().items():
        run = jax.jit(lambda J, inp, step=step: jax.lax.scan(lambda c, i: (step(c, i), None), J, inp)[0])
        J0 = store(zeros, zeros)
        calls[name] = lambda run=run, J0=J0: run(J0, inputs)
    times = round_robin(calls, args.repeats, 1e6 / T)
    for name in ("interleaved", "split", "complex"):  # the same maths in every storage
        out = calls[name]()
        finals[name] = (out[..., 0], out[..., 1]) if name == "interleaved" else \
            out if name == "split" else (jnp.real(out), jnp.imag(out))
    ref = finals["interleaved"]
    agree = all(bool(jnp.allclose(a, b, rtol=1e-5, atol=1e-5)) for name in ("split", "complex")
                for a, b in zip(finals[name], ref))
    rows = [{"storage": name, "us_per_step": statistics.median(ts), "us_range": [min(ts), max(ts)]}
            for name, ts in times.items()]
    command = "python benchmarks/pair_storage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows:
        print(f"{r['storage']:12s} {r['us_per_step']:9.1f} µs/step [{r['us_range'][0]:.1f}-{r['us_range'][1]:.1f}]")
    print("the three storages give the same influence:", agree)
    path = write_json(args.out, {"command": command, "machine": machine_info(), "batch": B, "size": n, "steps": T,
                                 "rows": rows, "storages_agree": agree})
    print("wrote", path)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
