"""Per-step cost of the chunked forward-backward hybrid (exact RTRL and SnAp-1 with the optimizer
stepping every K steps) against the per-step methods and BPTT, plus 16-bit influence storage.

GRU, input 64, float32, time-major ``lax.scan`` drivers under ``jax.jit``; warm-up (compile)
first, then the median of repeats with ``block_until_ready``; per-step time = total / T.  The
online methods run through one period-aware driver (an outer scan over periods, an inner scan
over the period's first ``K-1`` steps, then the step whose gradient completes the period is
accumulated: how a training loop that updates every ``K`` steps consumes them; for the per-step
methods ``K = 1``).  Method state and carry are passed in (not created inside the timed call).

Grid (``--quick`` shrinks it): per-step vs chunked RTRL for k ∈ {64, 128, 256}, K ∈ {8, 32, k};
per-step vs chunked SnAp-1 for k ∈ {128, 256, 512}, K ∈ {8, 32, 128}; BPTT beside each size.
Batch 16, halved where the estimated memory exceeds ``--mem-budget-gb`` (compare rows by the
per-example column).  Ratios are to BPTT measured in the same run (same k).

The machine this was written on is a shared 2-core CPU: by default the process is pinned to
one core and XLA's Eigen threading is off (``--xla_cpu_multi_thread_eigen=false``, set before
jax is imported; ``--multithread`` keeps XLA's defaults), so a method's time is its own work;
both wall and process CPU time are recorded.  Storage study (``--no-dtype`` skips it): gradient error with a bfloat16 influence on
the copy task's GRU (32 units) against float64 BPTT, and the speed of bfloat16 storage for
SnAp-1 at k = 256, B = 16.

    python benchmarks/chunked.py --out benchmarks/results/chunked.json   # full grid (~10 min)
    python benchmarks/chunked.py --quick --out /tmp/chunked_quick.json   # ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--multithread" not in sys.argv:  # one thread on one core: each method's own work, less noise
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snapjax as sj  # noqa: E402
from snapjax.data.copy_task import NUM_TOKENS, copy_task_batch, one_hot_inputs  # noqa: E402

from _timing import machine_info  # noqa: E402

N_IN = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def time_call(fn, *args, repeats=3):
    """Warm-up call (compile), then ``repeats`` timed calls: wall and process-CPU seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall),
            "cpu_s": statistics.median(cpu), "compile_s": compile_s}


def period_driver(method, B):
    """jit(params, carry, state, xs, ys) -> summed gradient (see the module docstring)."""
    P = method.period

    def one(params, carry, st, x, y):
        carry, st, _ = method.step(params, carry, st, x)
        g, st = method.gradient(params, st, carry - y)
        return carry, st, g

    def run(params, carry, st, xs, ys):
        xs, ys = xs.reshape(-1, P, *xs.shape[1:]), ys.reshape(-1, P, *ys.shape[1:])

        def inner(c, inp):
            carry, st, _ = one(params, *c, *inp)
            return (carry, st), None

        def outer(c, inp):
            carry, st, g = c
            x, y = inp
            (carry, st), _ = jax.lax.scan(inner, (carry, st), (x[:-1], y[:-1]))
            carry, st, gi = one(params, carry, st, x[-1], y[-1])
            return (carry, st, jax.tree.map(jnp.add, g, gi)), None

        g0 = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(outer, (carry, st, g0), (xs, ys))[0][2]

    return jax.jit(run)


def gru(k):
    cell = sj.GRUCell(k)
    return cell, cell.init(jax.random.key(0), jnp.zeros((1, k)), jnp.zeros((1, N_IN)))["params"]


def bytes_per_example(method, name, k, K):
    """Rough peak bytes per example (float32): influence ×3 (old, new, update), plus for chunked
    RTRL the K matrices Φ_τ and the Φ_τ I_τ blocks of one input source (3 projections)."""
    if name == "bptt":
        return 4 * 512 * k * 8
    J = 4 * method.num_stored()
    return 3 * J + (4 * K * k * k * 4 if name == "rtrl_chunked" else 0)


def run_row(name, k, K, args, storage="float32"):
    cell, params = gru(k)
    kind = name.split("_")[0]
    method = None
    if name != "bptt":
        method = sj.online_method(kind, cell, params, chunk=K) if name.endswith("chunked") else \
            sj.online_method(kind, cell, params)
    B = args.batch
    mem = bytes_per_example(method, name, k, K)
    while B > 1 and mem * B > args.mem_budget_gb * 2**30:
        B //= 2
    row = {"method": name, "units": k, "K": K if name.endswith("chunked") else None, "batch": B,
           "storage": storage, "bytes_per_example_est": mem}
    if mem * B > args.mem_budget_gb * 2**30:
        return {**row, "status": "skipped (memory)"}
    if name == "bptt":
        T = args.T
    elif name.endswith("chunked"):
        T = max(K, args.T // K * K)
    else:  # per-step: a few steps (RTRL is slow)
        T = PER_STEP_STEPS.get(kind, max(2, min(args.T, int(args.snap_step_budget))))
    ks = jax.random.split(jax.random.key(1), 2)
    xs = jax.random.normal(ks[0], (T, B, N_IN), jnp.float32)
    ys = 0.5 * jax.random.normal(ks[1], (T, B, k), jnp.float32)
    carry = jnp.zeros((B, k), jnp.float32)
    if name == "bptt":
        fn = jax.jit(lambda p, c, xs, ys: sj.bptt_gradient(cell, p, c, xs, ys, _loss).grads)
        r = time_call(fn, params, carry, xs, ys, repeats=args.repeats)
    else:
        st = method.init(B, jnp.dtype(storage))
        r = time_call(period_driver(method, B), params, carry, st, xs, ys, repeats=args.repeats)
    us = 1e6 * r["median_s"] / T
    return {**row, "T": T, "status": "ok", "us_per_step": us, "us_per_example_step": us / B,
            "cpu_us_per_step": 1e6 * r["cpu_s"] / T, "spread_us_per_step": [1e6 * r["min_s"] / T, 1e6 * r["max_s"] / T],
            "compile_s": r["compile_s"]}


def dtype_error_study(units=32, batch=16, lengths=(8, 32), chunk=16):
    """Relative gradient error (all cell parameters) vs float64 BPTT on copy-task batches, for
    float32 and bfloat16 influence storage (arithmetic float32); SnAp-1 also vs float64 SnAp-1
    (the storage error alone, without SnAp-1's own bias)."""
    cell = sj.GRUCell(units)
    params = cell.init(jax.random.key(0), jnp.zeros((1, units)), jnp.zeros((1, NUM_TOKENS)))["params"]
    W = np.asarray(jax.random.normal(jax.random.key(1), (units, 2))) / np.sqrt(units)

    def loss(h, t):
        target, mask = t
        logits = h @ W.astype(h.dtype)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1)[:, 0]
        return jnp.sum(mask * ce)

    def flat(g):
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(g)])

    out = []
    for L in lengths:
        batch_ = copy_task_batch(jax.random.key(2 + L), batch, L)
        xs = one_hot_inputs(batch_.inputs)
        ys = (batch_.targets, batch_.loss_mask)
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
            y64 = (ys[0], ys[1].astype(jnp.float64))
            ref = flat(sj.bptt_gradient(cell, p64, None, xs.astype(jnp.float64), y64, loss).grads)
        for name in STUDY_METHODS:
            with jax.enable_x64(True):  # the same method, per step, in float64
                same64 = flat(sj.online_gradient(sj.online_method(name, cell, p64), p64, None,
                                                 xs.astype(jnp.float64), y64, loss).grads)
            for chunked in (False, True):
                method = sj.online_method(name, cell, params, chunk=chunk if chunked else None)
                for storage in ("float32", "bfloat16"):
                    st = method.init(batch, jnp.dtype(storage))
                    g = flat(sj.online_gradient(method, params, None, xs, ys, loss, method_state=st).grads)
                    row = {"method": method.name, "length": L, "T": 2 * L + 1, "storage": storage,
                           "rel_err_vs_f64_bptt": float(np.linalg.norm(g - ref) / np.linalg.norm(ref))}
                    row["rel_err_vs_f64_same_method"] = float(np.linalg.norm(g - same64) / np.linalg.norm(same64))
                    out.append(row)
    return out


STUDY_METHODS = ("rtrl", "snap1")  # the two methods with a chunked form
PER_STEP_STEPS = {"rtrl": 2}  # per-step exact RTRL is ~1e4 x BPTT: time only 2 steps of it
DTYPE_SPEED_ROW = ("snap1", 256)  # where the 16-bit storage speed is measured (issue #15)

LABEL = {"bptt": "BPTT", "rtrl": "RTRL", "rtrl_chunked": "RTRL chunked", "snap1": "SnAp-1",
         "snap1_chunked": "SnAp-1 chunked"}


def table(rows):
    lines = ["| method | k | K | B | storage | T | µs/step | µs/step/ex | CPU µs/step | ÷ BPTT wall / CPU "
             "| per-step ÷ this, wall / CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {LABEL[r['method']]} | {r['units']} | {r['K'] or '-'} | {r['batch']} | {r['storage']} "
                         f"| | | | | {r.get('status')} | |")
            continue
        f = lambda v: "" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")  # noqa: E731
        pair = lambda a, b: "" if r.get(a) is None else f"{f(r[a])} / {f(r[b])}"  # noqa: E731
        lines.append(f"| {LABEL[r['method']]} | {r['units']} | {r['K'] or '-'} | {r['batch']} | {r['storage']} | {r['T']} "
                     f"| {r['us_per_step']:.0f} | {r['us_per_example_step']:.1f} | {r['cpu_us_per_step']:.0f} "
                     f"| {pair('ratio_bptt', 'cpu_ratio_bptt')} | {pair('speedup_vs_per_step', 'cpu_speedup_vs_per_step')} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("rtrl", "snap1")):
        ks = sorted({r["units"] for r in rows if r["method"].startswith(kind) and r.get("status") == "ok"})
        for name, style in ((kind, "s--"), ("bptt", "k:")):
            pts = [(r["units"], r["us_per_example_step"]) for r in rows if r["method"] == name and r.get("status") == "ok"
                   and r["units"] in ks and r["storage"] == "float32"]
            if pts:
                ax.plot(*zip(*sorted(pts)), style, label=LABEL[name])
        chunk_key = lambda r: "k" if r["K"] == r["units"] else r["K"]  # noqa: E731
        for K in sorted({chunk_key(r) for r in rows if r["method"] == f"{kind}_chunked"}, key=lambda x: (isinstance(x, str), x)):
            pts = [(r["units"], r["us_per_example_step"]) for r in rows if r["method"] == f"{kind}_chunked"
                   and chunk_key(r) == K and r.get("status") == "ok" and r["storage"] == "float32"]
            if pts:
                ax.plot(*zip(*sorted(pts)), "o-", label=f"chunked K={K}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("units k")
        ax.set_title(LABEL[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("µs per step per example")
    fig.suptitle("GRU, input 64, CPU float32: per-step vs chunked (forward-backward) vs BPTT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid (RTRL k=64, SnAp-1 k=128), 2 repeats")
    ap.add_argument("--rtrl-units", type=int, nargs="*", default=None)
    ap.add_argument("--snap-units", type=int, nargs="*", default=None)
    ap.add_argument("--rtrl-chunks", nargs="*", default=["8", "32", "k"], help="K values; 'k' = the state size")
    ap.add_argument("--snap-chunks", type=int, nargs="*", default=[8, 32, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=256, help="steps per timed call (chunked: rounded to a multiple of K)")
    ap.add_argument("--snap-step-budget", type=int, default=32, help="steps per call of per-step SnAp-1")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    ap.add_argument("--mem-budget-gb", type=float, default=3.0)
    ap.add_argument("--no-dtype", action="store_true", help="skip the 16-bit storage study")
    ap.add_argument("--multithread", action="store_true", help="keep XLA's default CPU threading")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "chunked.json"))
    args = ap.parse_args(argv)
    if args.rtrl_units is None:
        args.rtrl_units = [64] if args.quick else [64, 128, 256]
    if args.snap_units is None:
        args.snap_units = [128] if args.quick else [128, 256, 512]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.quick:
        args.snap_chunks = [8, 32]
        args.T = min(args.T, 64)
    info = machine_info()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"# {info['platform']} | jax {info['jax_version']} | cpus {info['cpu_count']} | XLA_FLAGS={info['xla_flags']!r}")
    t_start = time.time()
    rows = []

    def add(group):
        base = next((r for r in group if r["method"] == "bptt" and r.get("status") == "ok"), None)
        per = {r["method"]: r for r in group if r["method"] in STUDY_METHODS and r.get("status") == "ok"
               and r["storage"] == "float32"}
        for r in group:
            if r.get("status") != "ok":
                continue
            cpu = r["cpu_us_per_step"] / r["batch"]
            if base:
                r["ratio_bptt"] = r["us_per_example_step"] / base["us_per_example_step"]
                r["cpu_ratio_bptt"] = cpu / (base["cpu_us_per_step"] / base["batch"])
            p = per.get(r["method"].split("_")[0])
            if r["method"].endswith("chunked") and p:
                r["speedup_vs_per_step"] = p["us_per_example_step"] / r["us_per_example_step"]
                r["cpu_speedup_vs_per_step"] = (p["cpu_us_per_step"] / p["batch"]) / cpu
        rows.extend(group)
        print(table(group), flush=True)

    for kind, units, chunks in (("rtrl", args.rtrl_units, args.rtrl_chunks), ("snap1", args.snap_units, args.snap_chunks)):
        for k in units:
            group = [run_row("bptt", k, None, args), run_row(kind, k, None, args)]
            Ks = sorted({k if str(K) == "k" else int(K) for K in chunks})
            group += [run_row(f"{kind}_chunked", k, K, args) for K in Ks]
            if (kind, k) == DTYPE_SPEED_ROW and not args.no_dtype:
                group += [run_row("snap1", k, None, args, "bfloat16"), run_row("snap1_chunked", k, 32, args, "bfloat16")]
            add(group)

    dtype_rows = [] if args.no_dtype else dtype_error_study()
    targets = {}

    def find(m, k, K, storage="float32"):
        return next((r for r in rows if r["method"] == m and r["units"] == k and r["K"] == K and r.get("status") == "ok"
                     and r["storage"] == storage), None)

    def target(key, r, wall, cpu, ok):
        if r and wall in r:
            targets[key] = {"value": r[wall], "cpu_value": r[cpu], "target": ok.__doc__,
                            "met": bool(ok(r[wall])), "met_cpu": bool(ok(r[cpu]))}

    for k, K, need in ((256, 256, 20.0), (128, 128, 10.0)):
        ge = lambda v, need=need: v >= need  # noqa: E731
        ge.__doc__ = f">= {need:g}"
        target(f"rtrl_chunked_k{k}_K{K}_speedup_vs_per_step", find("rtrl_chunked", k, K),
               "speedup_vs_per_step", "cpu_speedup_vs_per_step", ge)
    le2 = lambda v: v <= 2  # noqa: E731
    le2.__doc__ = "<= 2"
    target("snap1_chunked_k256_K32_ratio_bptt", find("snap1_chunked", 256, 32), "ratio_bptt", "cpu_ratio_bptt", le2)
    for key, m, K in (("snap1_k256_bf16_speedup", "snap1", None), ("snap1_chunked_k256_K32_bf16_speedup", "snap1_chunked", 32)):
        a, b = find(m, 256, K), find(m, 256, K, "bfloat16")
        if a and b:
            targets[key] = {"value": a["us_per_example_step"] / b["us_per_example_step"],
                            "cpu_value": a["cpu_us_per_step"] / b["cpu_us_per_step"]}

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    base = os.path.splitext(args.out)[0]
    with open(args.out, "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows, "storage_error": dtype_rows, "targets": targets,
                   "wall_s": time.time() - t_start}, f, indent=1)
    md = ["### Chunked RTRL / SnAp-1 vs per-step and BPTT (GRU, input 64, CPU, float32)", "",
          f"{info['processor']}, {info['cpu_count']} cpus (shared), jax {info['jax_version']}, XLA_FLAGS `{info['xla_flags']}`; "
          f"median of {args.repeats} calls; ratios per example, BPTT of the same k in the same run.", "", table(rows), ""]
    if dtype_rows:
        md += ["Gradient error with 16-bit influence storage (copy task, GRU 32 units, B = 16, chunk 16):", "",
               "| method | L (T) | storage | rel. err vs f64 BPTT | rel. err vs the same method in f64 |",
               "|---|---|---|---|---|"]
        md += [f"| {d['method']} | {d['length']} ({d['T']}) | {d['storage']} | {d['rel_err_vs_f64_bptt']:.2e} | "
               f"{d['rel_err_vs_f64_same_method']:.2e} |" for d in dtype_rows]
        md.append("")
    md += ["Targets (wall / CPU time):", ""]
    md += [f"- {k}: {v['value']:.2f} / {v['cpu_value']:.2f}" + (
        f" (target {v['target']}: {'met' if v['met'] else 'NOT met'} / {'met' if v['met_cpu'] else 'NOT met'})"
        if "target" in v else "") for k, v in targets.items()]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    plot(rows, base + ".png")
    print("\n".join(md[4:]))
    print(f"\nwrote {args.out}, {base}.md, {base}.png ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
