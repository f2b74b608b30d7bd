"""Per-step cost of online gradient methods vs BPTT (GRU, input 64, time-major, lax.scan).

Methods: BPTT (the reference: ``jax.grad`` through ``lax.scan``, ``snapjax.bptt_gradient``) and
the online methods SnAp-1, SnAp-2, SnAp-3, exact RTRL and UORO, each built by name with
``snapjax.online_method(name, cell, params, masks=...)`` and driven through the method interface
(``step`` + ``gradient`` in a ``lax.scan``: ``snapjax.online_gradient``) under ``jax.jit``;
warm-up (compile) first, then the median of repeats with ``block_until_ready``; per-step
time = total / T.  Grid: state size k × parameter density d (random static masks on every
weight matrix, ``snapjax.engine.sparsity.random_masks``).

Configs whose method state (x3 for the new value and temporaries) exceeds ``--mem-budget-gb``
at ``--batch`` run with a halved batch until they fit (the ``B`` column says so), or are
skipped ("skipped (memory)") if even B=1 does not fit.  Compare rows with different B by the
per-example column (µs/step/ex).  Expensive configs run fewer steps (``T`` column, from XLA's
FLOP count of one step).  A method whose state is the same computation as one already timed
in the same (k, d) group (same class, stored floats and pattern, e.g. SnAp-2 of a dense GRU
and RTRL) is timed once; its row repeats the numbers and says ``same as ...``.

    python benchmarks/step_cost.py --quick     # ~minutes on 2 CPU cores (``make bench``)
    python benchmarks/step_cost.py             # full grid k ∈ {64..512}, d ∈ {1, .5, .25, .1}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snapjax as sj  # noqa: E402
from snapjax.engine.sparsity import random_masks  # noqa: E402

from _timing import machine_info, time_fn  # noqa: E402

N_IN = 64
REFERENCE = "bptt"
ONLINE = ("snap1", "snap2", "snap3", "rtrl", "uoro")
METHODS = (REFERENCE,) + ONLINE
LABELS = {"bptt": "BPTT", "snap1": "SnAp-1", "snap2": "SnAp-2", "snap3": "SnAp-3", "rtrl": "RTRL", "uoro": "UORO"}


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def step_flops(method, params, B):
    """XLA's FLOP count of one ``step`` + ``gradient`` for ``B`` examples (None if unknown)."""

    def one(p, c, s, x):
        c, s, _ = method.step(p, c, s, x)
        return method.gradient(p, s, c)

    args = (params, method.init_carry(B), method.init(B, key=jax.random.key(0)), jnp.zeros((B, N_IN)))
    try:
        cost = jax.jit(one).lower(*args).cost_analysis()
    except Exception:  # pragma: no cover - backend without a cost model
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def signature(method):
    """What decides a method's computation: its class, stored floats and (if it has one) its
    pattern size.  Two methods with the same signature do the same work."""
    count = getattr(method, "pattern_count", None)
    try:
        size = count() if callable(count) else None
    except TypeError:  # the generic dense path needs the input size: its pattern is built lazily
        size = None
    return (type(method).__name__, method.num_stored(), size)


CELLS = {
    # name: (cell built from k, whether random masks apply)
    "gru": (lambda k: sj.GRUCell(k), True),
    "lru": (lambda k: sj.LRUCell(k), False),                                   # diagonal recurrence
    "gru-generic": (lambda k: sj.as_recurrent(flax.linen.GRUCell(k), generic=True), False),  # dense path
}
CELL = "gru"


def _setup(k, density, rng_seed=0):
    make, maskable = CELLS[CELL]
    cell = make(k)
    rec = sj.as_recurrent(cell)
    params = rec.init_params(jax.random.key(0), N_IN)
    masks = None if density >= 1.0 or not maskable else random_masks(rng_seed, params, density, spec=cell)
    return cell, params, masks


def _data(T, B, k):
    keys = jax.random.split(jax.random.key(1), 3)
    rec = sj.as_recurrent(CELLS[CELL][0](k))
    out = int(rec.output(rec.init_carry(1)).shape[-1])
    xs = jax.random.normal(keys[0], (T, B, N_IN), jnp.float32)
    ys = 0.5 * jax.random.normal(keys[1], (T, B, out), jnp.float32)
    return xs, ys, rec.init_carry(B, jnp.float32), keys[2]


def _fit_batch(mem_ex, args):
    B = args.batch
    while B > 1 and 3 * mem_ex * B > args.mem_budget_gb * 2**30:
        B //= 2
    return B, 3 * mem_ex * B <= args.mem_budget_gb * 2**30


def _timed_row(row, fn, fargs, T, B, args):
    r = time_fn(fn, *fargs, warmup=1, repeats=args.repeats)
    row.update(
        status="ok", B=B, T=T,
        us_per_step=1e6 * r["median_s"] / T,
        us_per_step_per_example=1e6 * r["median_s"] / T / B,
        spread=[1e6 * t / T for t in (r["min_s"], r["max_s"])],
        compile_s=r["compile_s"],
    )
    return row


def run_reference(k, density, args):
    """BPTT: ``jax.grad`` of the summed loss through ``lax.scan`` (``snapjax.bptt_gradient``)."""
    cell, params, masks = _setup(k, density)
    row = {"method": REFERENCE, "k": k, "density": density, "params_nonzero": sj_param_count(params, masks),
           "memory_note": "activations over T (lower bound T*k floats)"}
    mem_ex = 4 * (args.T * k)  # stored states per example (lower bound of BPTT's activations)
    row["bytes_per_example"] = mem_ex
    B, fits = _fit_batch(mem_ex, args)
    if not fits:
        return {**row, "status": "skipped (memory)", "B": B}
    xs, ys, carry, _ = _data(args.T, B, k)
    fn = jax.jit(lambda p, c, xs, ys: sj.bptt_gradient(cell, p, c, xs, ys, _loss, masks=masks).grads)
    return _timed_row(row, fn, (params, carry, xs, ys), args.T, B, args)


def run_online(name, k, density, args, timed=None):
    """One online method through its interface (``snapjax.online_gradient``).

    ``timed``: ``{signature: row}`` of the methods already timed in this (k, d) group; a method
    with the same signature reuses that row's numbers (``same_as``).
    """
    cell, params, masks = _setup(k, density)
    method = sj.online_method(name, cell, params, masks=masks)
    tracker = getattr(method, "tracker", None)  # the compressed-influence engine, if the method has one
    mem_ex = 4 * method.num_stored()
    row = {"method": name, "k": k, "density": density, "params_nonzero": sj_param_count(params, masks),
           "method_name": method.name, "bytes_per_example": mem_ex,
           "layout": getattr(tracker, "layout", None), "K": getattr(tracker, "width", None)}
    sig = signature(method)
    if timed is not None and sig in timed:
        same = timed[sig]
        keep = ("status", "B", "T", "us_per_step", "us_per_step_per_example", "spread", "compile_s")
        return {**row, **{key: same[key] for key in keep if key in same}, "same_as": same["method"]}
    B, fits = _fit_batch(mem_ex, args)
    if not fits:
        return {**row, "status": "skipped (memory)", "B": B}
    flops = step_flops(method, params, B)
    T = args.T if flops is None else int(max(args.min_T, min(args.T, args.call_budget_s * args.assumed_gflops * 1e9 / flops)))
    row["flops_per_step"] = flops
    xs, ys, carry, key = _data(T, B, k)
    fn = jax.jit(lambda p, c, xs, ys, key: sj.online_gradient(method, p, c, xs, ys, _loss, key=key).grads)
    row = _timed_row(row, fn, (params, carry, xs, ys, key), T, B, args)
    if timed is not None:
        timed[sig] = row
    return row


def sj_param_count(params, masks):
    rep = __import__("snapjax.engine.sparsity", fromlist=["density_report"]).density_report(params, masks)
    return rep["nonzero_params"]


def fmt_bytes(b):
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024:
            return f"{b:.0f}{unit}"
        b /= 1024
    return f"{b:.1f}TB"


def print_table(rows):
    hdr = f"{'k':>4} {'d':>5} {'method':>7} {'B':>3} {'T':>3} {'K':>4} {'µs/step':>12} {'µs/step/ex':>11} {'÷BPTT/ex':>9} {'infl/ex':>8}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['k']:>4} {r['density']:>5} {LABELS[r['method']]:>7} {'':>3} {'':>3} {'':>4} {'':>12} {'':>11} {'':>9} "
                  f"{fmt_bytes(r.get('bytes_per_example', 0)):>8}  {r['status']}")
            continue
        K = r.get("K")
        status = f"same as {LABELS[r['same_as']]}" if r.get("same_as") else "ok"
        print(f"{r['k']:>4} {r['density']:>5} {LABELS[r['method']]:>7} {r['B']:>3} {r['T']:>3} {K if K else '-':>4} "
              f"{r['us_per_step']:>12.1f} {r['us_per_step_per_example']:>11.2f} {r.get('ratio_bptt_per_example', float('nan')):>9.2f} "
              f"{fmt_bytes(r['bytes_per_example']):>8}  {status}")
    sys.stdout.flush()


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dens = sorted({r["density"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(dens), figsize=(4.2 * len(dens), 3.8), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], dens):
        for m in METHODS:
            pts = sorted((r["k"], r["us_per_step_per_example"]) for r in rows
                         if r["method"] == m and r["density"] == d and r.get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"density {d}")
        ax.set_xlabel("state size k")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("µs per step per example")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("GRU, input 64, CPU: time per step (per example)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="k ∈ {64,128,256}, d ∈ {1, 0.1}, fewer repeats")
    ap.add_argument("--ks", type=int, nargs="*", default=None)
    ap.add_argument("--densities", type=float, nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cell", choices=sorted(CELLS), default="gru",
                    help="gru (compressed), lru (diagonal recurrence), gru-generic (the dense-Jacobian path)")
    ap.add_argument("--T", type=int, default=None, help="sequence length (default 32, quick 16)")
    ap.add_argument("--min-T", dest="min_T", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 3)")
    ap.add_argument("--mem-budget-gb", dest="mem_budget_gb", type=float, default=2.0)
    ap.add_argument("--call-budget-s", dest="call_budget_s", type=float, default=None,
                    help="target seconds per timed call for slow configs (picks T)")
    ap.add_argument("--assumed-gflops", dest="assumed_gflops", type=float, default=10.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "step_cost_cpu.json"),
                    help="JSON path (default benchmarks/out/step_cost_cpu.json, untracked; published: benchmarks/results)")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    args = ap.parse_args(argv)
    global CELL
    CELL = args.cell
    if args.ks is None:
        args.ks = [64, 128, 256] if args.quick else [64, 128, 256, 512]
    if args.densities is None:
        args.densities = [1.0, 0.1] if args.quick else [1.0, 0.5, 0.25, 0.1]
    if args.T is None:
        args.T = 16 if args.quick else 32
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.call_budget_s is None:
        args.call_budget_s = 2.0 if args.quick else 5.0
    if args.plot is None:
        args.plot = os.path.splitext(args.out)[0] + ".png"

    info = machine_info()
    print(f"# {info['platform']} | jax {info['jax_version']} ({info['backend']}) | cpus {info['cpu_count']}")
    print(f"# cell {CELL}, input {N_IN}, B={args.batch} (reduced where marked), budget {args.mem_budget_gb} GB, repeats {args.repeats}")
    t_start = time.time()
    rows = []
    for k in args.ks:
        for d in args.densities:
            timed = {}
            jobs = [(REFERENCE, lambda: run_reference(k, d, args))] if REFERENCE in args.methods else []
            jobs += [(m, lambda m=m: run_online(m, k, d, args, timed)) for m in args.methods if m in ONLINE]
            group = []
            for m, job in jobs:
                try:
                    row = job()
                except Exception as e:  # keep going: report the failure
                    row = {"method": m, "k": k, "density": d, "status": f"error: {type(e).__name__}: {e}"[:200]}
                group.append(row)
            base = next((r for r in group if r["method"] == REFERENCE and r.get("status") == "ok"), None)
            for r in group:
                if base is not None and r.get("status") == "ok":
                    r["ratio_bptt_per_example"] = r["us_per_step_per_example"] / base["us_per_step_per_example"]
            rows.extend(group)
            print_table(group)
    print("\n# all results")
    print_table(rows)

    def find(m, k, d):
        return next((r for r in rows if r["method"] == m and r["k"] == k and r["density"] == d and r.get("status") == "ok"), None)

    summary = {}
    s2, rt = find("snap2", 256, 0.1), find("rtrl", 256, 1.0)
    if s2 and rt:
        summary["snap2_k256_d0.1_vs_rtrl_k256_dense"] = {
            "snap2_us_per_step": s2["us_per_step"], "snap2_B": s2["B"],
            "rtrl_us_per_step": rt["us_per_step"], "rtrl_B": rt["B"],
            "speedup_per_example": rt["us_per_step_per_example"] / s2["us_per_step_per_example"],
        }
        print(f"\nSnAp-2 (k=256, d=0.1, B={s2['B']}): {s2['us_per_step']:.0f} µs/step = "
              f"{s2['us_per_step_per_example']:.1f} µs/step/ex;  RTRL dense (k=256, d=1, B={rt['B']}): "
              f"{rt['us_per_step']:.0f} µs/step = {rt['us_per_step_per_example']:.1f} µs/step/ex;  "
              f"speedup per example {summary['snap2_k256_d0.1_vs_rtrl_k256_dense']['speedup_per_example']:.1f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows, "summary": summary,
                   "wall_s": time.time() - t_start}, f, indent=1)
    plot(rows, args.plot)
    print(f"\nwrote {args.out} and {args.plot} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
