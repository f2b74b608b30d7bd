"""Each method's per-step speed as a fraction of this machine's own ceilings, measured in one run.

Two ceilings are measured first, in the same process (``../shared/SPEC.md`` §7):

* **stream bandwidth**: an in-place elementwise update ``a ← 0.999·a + 10⁻³`` (the buffer donated,
  as the learner donates the influence) over an array the size of the largest SnAp-1 influence of
  the grid (``B·p`` floats), counted as read + write = ``2·nbytes`` per pass;
* **matmul throughput**: ``(n × n) @ (n × n)`` in float32, ``2n³`` FLOPs.

Then per cell family (vanilla, GRU, LSTM, LRU and a user ``CellSpec``: the CTRNN of
``snapjax.leaky_spec``, as jax_rtrl's e-prop uses), state size ``k`` and batch ``B``: BPTT
(``jax.grad`` through ``lax.scan``) and the online methods (``step`` + ``gradient`` every step
in one jitted ``lax.scan``, :func:`snapjax.online_gradient`), timed round-robin (interleaved
repeats, medians with min-max spread; per-step time = total / T).  For each method:

* ``traffic GB/s`` = the method state read and written per step (``2 · S · 4 · B`` bytes, ``S``
  the stored floats per example), divided by the step time, and its fraction of the stream
  bandwidth measured *in the same round-robin* (``T`` in-place passes over ``B · S`` floats in one
  jitted scan, :func:`stream_steps`, at the largest state of the row) — the bound that governs
  SnAp-1 (one float per parameter, elementwise).  A step that also forms the gradient reads the
  state a second time, so three passes over it bound SnAp-1 at about 2/3 of this fraction; the
  fraction of the grid-wide ceiling above is kept beside it (``frac_bandwidth_of_ceiling``);
* ``GFLOP/s`` = XLA's FLOP count of one compiled step, divided by the step time, and its
  fraction of the measured matmul throughput — the bound for exact RTRL (``D·J``);
* ``× BPTT`` = step time over BPTT's in the same run.

A method runs only where its state fits ``--max-state-mb`` at batch ``B`` (exact RTRL's ``k·p``
floats per example grow as ``k³``); the row says ``skipped (memory)`` otherwise.

    python benchmarks/roofline.py --quick            # k ∈ {64, 128}, B ∈ {4, 16}: minutes
    python benchmarks/roofline.py                    # k ∈ {64, 128, 256}
    python benchmarks/roofline.py --out benchmarks/results/roofline_cpu.json

Run it on a quiet machine: the two ceilings and the methods share the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import markdown_table, write_json
from _timing import machine_info, round_robin

import snapjax as sj

N_IN = 64
CELLS = {
    "vanilla": lambda k: sj.VanillaCell(k),
    "gru": lambda k: sj.GRUCell(k),
    "lstm": lambda k: sj.LSTMCell(k),
    "lru": lambda k: sj.LRUCell(k),
    "ctrnn (user CellSpec)": lambda k: sj.leaky_spec(k),
}


def init_params(cell):
    """Parameters for inputs of size ``N_IN`` (:meth:`snapjax.Recurrent.init_params`)."""
    return sj.as_recurrent(cell).init_params(jax.random.key(0), N_IN)


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def _median_spread(ts: list[float]) -> tuple[float, float, float]:
    return statistics.median(ts), min(ts), max(ts)


_STREAM = "stream (in-place pass)"


def stream_steps(n_floats: int, T: int):
    """A zero-argument call running ``T`` in-place passes ``a ← 0.999·a + 10⁻³`` over ``n_floats``
    float32 in one jitted ``lax.scan`` (the buffer donated from call to call): the bandwidth
    bound of a row, timed in its round-robin beside the methods, at the state's own size."""
    def passes(a):
        return jax.lax.scan(lambda c, _: (c * 0.999 + 1e-3, None), a, None, length=T)[0]

    run = jax.jit(passes, donate_argnums=0)
    buf = [jnp.ones((n_floats,), jnp.float32)]

    def call():
        buf[0] = run(buf[0])
        return buf[0]

    return call


def stream_bandwidth(n_floats: int, repeats: int) -> dict:
    """Read + write bytes per second of an in-place elementwise pass over ``n_floats`` float32
    (one pass per call of :func:`stream_steps`)."""
    step = stream_steps(n_floats, 1)
    jax.block_until_ready(step())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    med, lo, hi = _median_spread(times)
    nbytes = 2 * 4 * n_floats
    return {"bytes": nbytes, "median_s": med, "GBps": nbytes / med / 1e9, "GBps_range": [nbytes / hi / 1e9, nbytes / lo / 1e9]}


def matmul_throughput(n: int, repeats: int) -> dict:
    f = jax.jit(lambda a, b: a @ b)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    med, lo, hi = _median_spread(times)
    flops = 2.0 * n**3
    return {"n": n, "median_s": med, "GFLOPs": flops / med / 1e9, "GFLOPs_range": [flops / hi / 1e9, flops / lo / 1e9]}


def _xla_flops(fn, *args) -> float | None:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def runners(cell, params, B: int, T: int, methods: list[str], max_state_mb: float, options=None):
    """``{name: (jitted run(params, xs, ys), stored floats per example, XLA FLOPs of one step)}``
    and ``[(name, why)]`` for the methods left out: a state over ``max_state_mb`` at batch ``B``,
    or a method that does not apply to the cell (its ``ValueError``).  ``options(name)`` gives
    each method's options (e.g. a window), ``{}`` by default."""
    out, skipped = {}, []
    out["bptt"] = (jax.jit(lambda p, xs, ys: sj.bptt_gradient(cell, p, None, xs, ys, _loss).grads), 0, None)
    for name in methods:
        try:
            method = sj.online_method(name, cell, params, **(options(name) if options else {}))
        except ValueError as err:
            skipped.append((name, f"n/a: {err}"))
            continue
        S = int(method.num_stored() or 0)
        if 4 * S * B / 2**20 > max_state_mb:
            skipped.append((name, "memory"))
            continue

        def one_step(p, c, s, x, method=method):
            c, s, _ = method.step(p, c, s, x)
            return method.gradient(p, s, c)

        example = (params, method.init_carry(B), method.init(B, key=jax.random.key(0)), jnp.zeros((B, N_IN)))
        run = jax.jit(lambda p, xs, ys, method=method: sj.online_gradient(method, p, None, xs, ys, _loss,
                                                                          key=jax.random.key(0)).grads)
        out[name] = (run, S, _xla_flops(one_step, *example))
    return out, skipped


def measure(cell_name: str, k: int, B: int, T: int, repeats: int, methods: list[str], ceilings: dict,
            max_state_mb: float, options=None, cell=None) -> list[dict]:
    """Rows of one (cell, k, B) configuration: BPTT and ``methods`` timed round-robin (module
    docstring); ``cell`` overrides ``CELLS[cell_name](k)``."""
    cell = CELLS[cell_name](k) if cell is None else cell
    params = init_params(cell)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((T, B, N_IN)), jnp.float32)
    rec = sj.as_recurrent(cell)
    out_size = int(np.shape(rec.output(rec.init_carry(1)))[-1])  # the loss is on the cell's output
    ys = jnp.asarray(rng.standard_normal((T, B, out_size)), jnp.float32)
    fns, skipped = runners(cell, params, B, T, methods, max_state_mb, options)
    calls = {name: (lambda run=run: run(params, xs, ys)) for name, (run, _, _) in fns.items()}
    n_stream = B * max([S for _, S, _ in fns.values()] + [1])
    calls[_STREAM] = stream_steps(n_stream, T)
    times = round_robin(calls, repeats, 1.0 / T)  # seconds per step, every method beside the others
    stream_gbps = 2 * 4 * n_stream / statistics.median(times.pop(_STREAM)) / 1e9
    bptt_s = statistics.median(times["bptt"])
    p = sum(int(a.size) for a in jax.tree.leaves(params))
    rows = []
    for name, (_, S, flops) in fns.items():
        med, lo, hi = _median_spread(times[name])
        traffic = 2 * 4 * S * B / med / 1e9
        gflops = flops / med / 1e9 if flops else None
        rows.append({
            "cell": cell_name, "k": k, "B": B, "params": p, "method": name, "stored_per_example": S,
            "us_per_step": med * 1e6, "us_range": [lo * 1e6, hi * 1e6], "x_bptt": med / bptt_s,
            "traffic_GBps": traffic, "stream_GBps": stream_gbps, "frac_bandwidth": traffic / stream_gbps,
            "frac_bandwidth_of_ceiling": traffic / ceilings["stream"]["GBps"],
            "xla_flops_per_step": flops, "GFLOPs": gflops,
            "frac_matmul": gflops / ceilings["matmul"]["GFLOPs"] if gflops else None,
            "ns_per_stored_float": med * 1e9 / (S * B) if S else None,
        })
    rows += [{"cell": cell_name, "k": k, "B": B, "params": p, "method": name, "skipped": why} for name, why in skipped]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="k ∈ {64, 128} only")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {list(CELLS)}")
    ap.add_argument("--ks", default=None, help="comma list of state sizes (default 64,128,256; --quick 64,128)")
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--methods", default="snap1,rtrl")
    ap.add_argument("--steps", type=int, default=32, help="T, time steps per timed call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-state-mb", type=float, default=512.0, help="leave out a method whose state at B exceeds this")
    ap.add_argument("--out", default="benchmarks/out/roofline_cpu.json")
    args = ap.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        ap.error(f"unknown cells {unknown}; known: {list(CELLS)}")
    ks = [int(k) for k in (args.ks or ("64,128" if args.quick else "64,128,256")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    # the stream is measured at the largest SnAp-1 influence of the grid (the working set it governs)
    biggest = max(max(batches) * sum(int(a.size) for a in jax.tree.leaves(init_params(CELLS[c](max(ks)))))
                  for c in cells)
    ceilings = {"stream": stream_bandwidth(biggest, 3 * args.repeats), "matmul": matmul_throughput(1024, args.repeats)}
    print(f"stream {ceilings['stream']['GBps']:.1f} GB/s over {ceilings['stream']['bytes'] / 2**20:.0f} MiB moved; "
          f"matmul {ceilings['matmul']['GFLOPs']:.0f} GFLOP/s", flush=True)
    rows = []
    for cell_name in cells:
        for k in ks:
            for B in batches:
                rows += measure(cell_name, k, B, args.steps, args.repeats, methods, ceilings, args.max_state_mb)
                print(f"done {cell_name} k={k} B={B}", flush=True)
    # the ceilings once more, after the grid: a loaded machine shows as a drift between the two
    ceilings["stream_after"] = stream_bandwidth(biggest, 3 * args.repeats)
    ceilings["matmul_after"] = matmul_throughput(1024, args.repeats)

    def pct(x):
        return "—" if x is None else f"{100 * x:.0f}%"

    table = markdown_table(
        ["cell", "k", "B", "method", "µs/step (min-max)", "× BPTT", "stream GB/s (same round-robin)",
         "state GB/s (of stream)", "GFLOP/s (of matmul)", "ns per stored float"],
        [[r["cell"], r["k"], r["B"], r["method"], f"skipped ({r['skipped'][:60]})", "", "", "", "", ""] if "skipped" in r else
         [r["cell"], r["k"], r["B"], r["method"], f"{r['us_per_step']:.0f} ({r['us_range'][0]:.0f}-{r['us_range'][1]:.0f})",
          f"{r['x_bptt']:.2f}", f"{r['stream_GBps']:.1f}",
          f"{r['traffic_GBps']:.2f} ({pct(r['frac_bandwidth'])})" if r["stored_per_example"] else "—",
          f"{r['GFLOPs']:.1f} ({pct(r['frac_matmul'])})" if r["GFLOPs"] else "—",
          f"{r['ns_per_stored_float']:.3f}" if r["ns_per_stored_float"] else "—"]
         for r in rows])
    command = "python benchmarks/roofline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{command}`\n\nstream {ceilings['stream']['GBps']:.1f} GB/s (after the grid "
              f"{ceilings['stream_after']['GBps']:.1f}), matmul {ceilings['matmul']['GFLOPs']:.0f} GFLOP/s (after "
              f"{ceilings['matmul_after']['GFLOPs']:.0f})\n\n")
    print(header + table)
    path = write_json(args.out, {"command": command, "machine": machine_info(), "ceilings": ceilings, "rows": rows,
                                 "markdown": header + table})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
