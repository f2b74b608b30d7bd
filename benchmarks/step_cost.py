"""Per-step cost of online gradient methods vs BPTT (GRU, input 64, time-major, lax.scan).

Methods: BPTT (jax.grad through lax.scan), SnAp-1, SnAp-2, SnAp-3, exact RTRL (dense), UORO,
all driven by ``snapjax.scan`` under ``jax.jit``; warm-up (compile) first, then the median of
repeats with ``block_until_ready``; per-step time = total / T.  Grid: state size k × parameter
density d (random static masks on every weight matrix, ``snapjax.sparsity.random_masks``).

Configs whose influence (x3 for the new value and temporaries) exceeds ``--mem-budget-gb`` at
``--batch`` run with a halved batch until they fit (the ``B`` column says so), or are
skipped ("skipped (memory)") if even B=1 does not fit.  Compare rows with different B by
the per-example column (µs/step/ex).  Expensive configs run fewer steps (``T`` column).

    python benchmarks/step_cost.py --quick     # ~minutes on 2 CPU cores (``make bench``)
    python benchmarks/step_cost.py             # full grid k ∈ {64..512}, d ∈ {1, .5, .25, .1}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snapjax as sj  # noqa: E402
from snapjax.sparsity import random_masks  # noqa: E402
from snapjax.uoro import uoro_tracker  # noqa: E402

from _timing import machine_info, time_fn  # noqa: E402

N_IN = 64
METHODS = ("bptt", "snap1", "snap2", "snap3", "rtrl", "uoro")
LABELS = {"bptt": "BPTT", "snap1": "SnAp-1", "snap2": "SnAp-2", "snap3": "SnAp-3", "rtrl": "RTRL", "uoro": "UORO"}


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def make_tracker(method, cell, params, masks):
    if method == "uoro":
        return uoro_tracker(cell, params, masks=masks)
    if method == "rtrl":
        return sj.influence_tracker(cell, params, "rtrl", masks=masks)
    return sj.influence_tracker(cell, params, "snap", int(method[-1]), masks=masks)


def est_flops_per_example(method, tracker, k, p_eff):
    """Rough FLOPs per example per step (only used to pick T for the slow configs)."""
    if method in ("bptt", "uoro", "snap1"):
        return 12.0 * p_eff
    stored = tracker.num_stored()
    return 2.0 * stored * tracker.width + 12.0 * p_eff


def run_config(method, k, density, args, rng_seed=0):
    cell = sj.GRUCell(k)
    params = cell.init(jax.random.key(0), jnp.zeros((1, k)), jnp.zeros((1, N_IN)))["params"]
    masks = None if density >= 1.0 else random_masks(rng_seed, params, density, spec=cell)
    p_eff = sj_param_count(params, masks)
    row = {"method": method, "k": k, "density": density, "params_nonzero": p_eff}
    if method == "bptt":
        tracker = None
        mem_ex = 4 * (args.T * k)  # stored states per example (lower bound of BPTT's activations)
        row["memory_note"] = "activations over T (lower bound T*k floats)"
    else:
        tracker = make_tracker(method, cell, params, masks)
        mem_ex = 4 * tracker.num_stored()
        if method in ("snap2", "snap3") and tracker.layout == "dense" and masks is None:
            row.update(status="same as RTRL (dense)", bytes_per_example=mem_ex)
            return row
        row["layout"] = getattr(tracker, "layout", "rank-one")
        row["K"] = getattr(tracker, "width", None) if method != "uoro" else None
    row["bytes_per_example"] = mem_ex
    B = args.batch
    while B > 1 and 3 * mem_ex * B > args.mem_budget_gb * 2**30:
        B //= 2
    if 3 * mem_ex * B > args.mem_budget_gb * 2**30:
        row.update(status="skipped (memory)", B=B)
        return row
    T = args.T
    if tracker is not None:
        flops = est_flops_per_example(method, tracker, k, p_eff) * B
        T = int(max(args.min_T, min(args.T, args.call_budget_s * args.assumed_gflops * 1e9 / flops)))
    row.update(B=B, T=T)
    keys = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(keys[0], (T, B, N_IN), jnp.float32)
    ys = 0.5 * jax.random.normal(keys[1], (T, B, k), jnp.float32)
    carry = jnp.zeros((B, k), jnp.float32)
    if method == "bptt":
        fn = jax.jit(lambda p, c, xs, ys: sj.bptt_gradient(cell, p, c, xs, ys, _loss, masks=masks).grads)
        fargs = (params, carry, xs, ys)
    elif method == "uoro":
        fn = jax.jit(
            lambda p, c, xs, ys, key: sj.online_gradient(
                tracker, p, c, xs, ys, _loss, influence=tracker.init(B, jnp.float32, key=key)
            ).grads
        )
        fargs = (params, carry, xs, ys, keys[2])
    else:
        fn = jax.jit(lambda p, c, xs, ys: sj.online_gradient(tracker, p, c, xs, ys, _loss).grads)
        fargs = (params, carry, xs, ys)
    r = time_fn(fn, *fargs, warmup=1, repeats=args.repeats)
    row.update(
        status="ok",
        us_per_step=1e6 * r["median_s"] / T,
        us_per_step_per_example=1e6 * r["median_s"] / T / B,
        spread=[1e6 * t / T for t in (r["min_s"], r["max_s"])],
        compile_s=r["compile_s"],
    )
    return row


def sj_param_count(params, masks):
    rep = __import__("snapjax.sparsity", fromlist=["density_report"]).density_report(params, masks)
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
        print(f"{r['k']:>4} {r['density']:>5} {LABELS[r['method']]:>7} {r['B']:>3} {r['T']:>3} {K if K else '-':>4} "
              f"{r['us_per_step']:>12.1f} {r['us_per_step_per_example']:>11.2f} {r.get('ratio_bptt_per_example', float('nan')):>9.2f} "
              f"{fmt_bytes(r['bytes_per_example']):>8}  ok")
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
    print(f"# GRU input {N_IN}, B={args.batch} (reduced where marked), budget {args.mem_budget_gb} GB, repeats {args.repeats}")
    t_start = time.time()
    rows = []
    for k in args.ks:
        for d in args.densities:
            group = []
            for m in args.methods:
                try:
                    row = run_config(m, k, d, args)
                except Exception as e:  # keep going: report the failure
                    row = {"method": m, "k": k, "density": d, "status": f"error: {type(e).__name__}: {e}"[:200]}
                group.append(row)
            base = next((r for r in group if r["method"] == "bptt" and r.get("status") == "ok"), None)
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
