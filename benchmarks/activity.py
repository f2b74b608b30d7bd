"""EGRU trained online with exact RTRL on sklearn digits (rows as a sequence): activity-sparse
propagation (snapjax.activity) vs dense exact RTRL (same model, sparsity ignored), in one run.

Task: 8×8 digits, one row per step (T=8, input 8, pixel/16), a linear readout on the last
step's output ``h_T`` (cross-entropy at the last step only, so the online RTRL gradient is
``dL/ds_T · J_T`` and one Adam update is applied per sequence batch).  Steps are driven by
``lax.scan`` inside ``jit``.  Both trackers compute the same exact gradient; the dense one is
only timed on a few batches (its training trajectory would be identical).

State size k = 2·units (EGRU keeps (c, h) per unit): --units 128 ⇔ k = 256.

Usage:
  python benchmarks/activity.py --quick          # a few minutes on 2 CPU cores
  python benchmarks/activity.py --units 128 --train-batches 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import snapjax as sj
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import snapjax as sj
from snapjax.activity import activity_sparse_tracker, step_cost
from snapjax.egru import EGRUCell


def load_digits_rows(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (N, 8, 8): T=8 rows of 8 pixels
    y = d.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def make_masks(rng, params, density):
    if density >= 1:
        return None
    return {n: rng.random(np.shape(params[n]["kernel"])) < density for n in ("hu", "hr", "hz")}


def build(args, density, seed):
    cell = EGRUCell(args.units, threshold_init=tuple(args.threshold_init), epsilon=args.epsilon, gamma=args.gamma)
    key = jax.random.key(seed)
    k1, k2 = jax.random.split(key)
    carry = cell.initialize_carry(k1, (args.batch, 8))
    params = cell.init(k1, carry, jnp.zeros((args.batch, 8)))["params"]
    masks = make_masks(np.random.default_rng(seed), params, density)
    if masks is not None:  # masked weights start (and stay) at zero
        params = {**params, **{n: {"kernel": params[n]["kernel"] * masks[n]} for n in masks}}
    readout = {
        "w": jax.random.normal(k2, (args.units, 10)) / np.sqrt(args.units),
        "b": jnp.zeros((10,)),
    }
    return cell, {"cell": params, "readout": readout}, masks


def make_train_step(cell, tracker, opt, masks, with_stats):
    spec = cell.spec

    def loss_from_state(ro, s, y):
        logits = spec.output(s) @ ro["w"] + ro["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    @jax.jit
    def train_step(theta, opt_state, xs, y):
        p = theta["cell"]
        B = xs.shape[1]
        s0 = spec.zero_state(B)
        J0 = tracker.init(B, jnp.float32)

        def body(c, x):
            s, J = c
            if with_stats:
                s, J, st = tracker.step_with_stats(p, s, J, x)
                return (s, J), st
            s, J = tracker.step(p, s, J, x)
            return (s, J), None

        (s, J), stats = jax.lax.scan(body, (s0, J0), xs)
        (loss, logits), (g_ro, dlds) = jax.value_and_grad(loss_from_state, argnums=(0, 1), has_aux=True)(
            theta["readout"], s, y
        )
        g_cell = tracker.gradient(J, dlds)
        if masks is not None:
            g_cell = {k: ({**v, "kernel": v["kernel"] * masks[k]} if k in masks else v) for k, v in g_cell.items()}
        grads = {"cell": g_cell, "readout": g_ro}
        updates, opt_state = opt.update(grads, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        acc = (logits.argmax(-1) == y).mean()
        return theta, opt_state, loss, acc, stats

    return train_step


def make_eval(cell, masks):
    spec = cell.spec

    @jax.jit
    def evaluate(theta, xs, y):
        s0 = spec.zero_state(xs.shape[1])

        def body(s, x):
            s = sj.cell_step(spec, theta["cell"], s, x, masks)
            return s, (spec.output(s) != 0).mean()

        s, ev = jax.lax.scan(body, s0, xs)
        logits = spec.output(s) @ theta["readout"]["w"] + theta["readout"]["b"]
        return (logits.argmax(-1) == y).mean(), ev.mean()

    return evaluate


def batches(x, y, batch, rng):
    idx = rng.permutation(len(y))
    for i in range(0, len(idx) - batch + 1, batch):
        j = idx[i : i + batch]
        yield jnp.asarray(np.transpose(x[j], (1, 0, 2))), jnp.asarray(y[j])


def run_density(args, density, train, test):
    cell, theta, masks = build(args, density, args.seed)
    opt = optax.adam(args.lr)
    sparse = activity_sparse_tracker(cell, theta["cell"], masks=masks)
    dense = sj.influence_tracker(cell, theta["cell"], "rtrl", masks=masks)
    sparse_step = make_train_step(cell, sparse, opt, masks, True)
    dense_step = make_train_step(cell, dense, opt, masks, False)
    evaluate = make_eval(cell, masks)
    T = 8
    rng = np.random.default_rng(args.seed)

    # --- train online with the sparse tracker, timing every batch after compilation
    opt_state = opt.init(theta)
    it = batches(*train, args.batch, rng)
    xs, y = next(it)
    t0 = time.perf_counter()
    out = sparse_step(theta, opt_state, xs, y)
    jax.block_until_ready(out)
    compile_sparse = time.perf_counter() - t0
    theta_timed = theta  # dense is timed from the same parameters as the first sparse batches
    times, alphas, caps, losses, accs = [], [], [], [], []
    n = 0
    while n < args.train_batches:
        for xs, y in it:
            t0 = time.perf_counter()
            theta, opt_state, loss, acc, st = sparse_step(theta, opt_state, xs, y)
            jax.block_until_ready(theta)
            times.append((time.perf_counter() - t0) / T)
            alphas.append(np.asarray(st["alpha"]))
            caps.append(np.asarray(st["capacity"]))
            losses.append(float(loss))
            accs.append(float(acc))
            n += 1
            if n >= args.train_batches:
                break
        it = batches(*train, args.batch, rng)
    alphas, caps = np.concatenate(alphas), np.concatenate(caps)

    # --- time sparse and dense on the same fixed batches and parameters (interleaved)
    tb = [b for _, b in zip(range(args.time_batches), batches(*train, args.batch, np.random.default_rng(1)))]
    opt_state0 = opt.init(theta)
    t0 = time.perf_counter()
    jax.block_until_ready(dense_step(theta, opt_state0, *tb[0]))
    compile_dense = time.perf_counter() - t0
    ts_sparse, ts_dense, a_t, c_t = [], [], [], []
    for xs, y in tb:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            o = dense_step(theta, opt_state0, xs, y)
            jax.block_until_ready(o)
            ts_dense.append((time.perf_counter() - t0) / T)
            t0 = time.perf_counter()
            o = sparse_step(theta, opt_state0, xs, y)
            jax.block_until_ready(o)
            ts_sparse.append((time.perf_counter() - t0) / T)
        a_t.append(np.asarray(o[4]["alpha"]))
        c_t.append(np.asarray(o[4]["capacity"]))
    a_t, c_t = np.concatenate(a_t), np.concatenate(c_t)

    # --- exactness spot check: same gradient step from the same state
    o_s = sparse_step(theta, opt_state0, *tb[0])
    o_d = dense_step(theta, opt_state0, *tb[0])
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(o_s[0]), jax.tree.leaves(o_d[0])))

    test_acc, test_event = [], []
    for xs, y in batches(*test, 120, np.random.default_rng(0)):
        a, e = evaluate(theta, xs, y)
        test_acc.append(float(a))
        test_event.append(float(e))
    cost = step_cost(sparse, args.batch, c_t)
    med_s, med_d = float(np.median(ts_sparse)), float(np.median(ts_dense))
    return {
        "density": density,
        "param_density": sparse.parameter_density(),
        "units": args.units,
        "state_size_k": 2 * args.units,
        "batch": args.batch,
        "train_batches": args.train_batches,
        "train_loss_last10": float(np.mean(losses[-10:])),
        "train_acc_last10": float(np.mean(accs[-10:])),
        "test_acc": float(np.mean(test_acc)),
        "test_event_rate": float(np.mean(test_event)),
        "alpha_train_mean": float(alphas.mean()),
        "alpha_timed_mean": float(a_t.mean()),
        "capacity_timed_mean": float(c_t.mean()),
        "train_ms_per_step_sparse_median": 1e3 * float(np.median(times)),
        "ms_per_step_sparse_median": 1e3 * med_s,
        "ms_per_step_dense_median": 1e3 * med_d,
        "speedup": med_d / med_s,
        "flops_per_step_sparse": float(np.mean(cost["flops"])),
        "flops_per_step_dense": float(cost["flops_dense"]),
        "flop_ratio": float(cost["flops_dense"] / np.mean(cost["flops"])),
        "influence_bytes": int(cost["influence_bytes"]),
        "max_abs_param_diff_sparse_vs_dense_after_update": diff,
        "compile_s": {"sparse": compile_sparse, "dense": compile_dense},
        "timing_samples": {"sparse": ts_sparse, "dense": ts_dense},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=128, help="EGRU units (state size k = 2*units)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2])
    ap.add_argument("--threshold-init", type=float, nargs=2, default=[0.45, 0.75], help="uniform (low, high); sets alpha")
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-batches", type=int, default=200)
    ap.add_argument("--time-batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few train batches (a few minutes on CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "activity_cpu.json"))
    args = ap.parse_args()
    if args.quick:
        args.train_batches, args.time_batches, args.repeats = 25, 2, 2
    train, test = load_digits_rows(args.seed)
    rows = []
    for d in args.densities:
        r = run_density(args, d, train, test)
        rows.append(r)
        print(
            f"d={d:.2f} k={r['state_size_k']} B={r['batch']}: test acc {r['test_acc']:.3f} "
            f"(train last10 {r['train_acc_last10']:.3f}), alpha train {r['alpha_train_mean']:.3f} timed "
            f"{r['alpha_timed_mean']:.3f} (mean capacity {r['capacity_timed_mean']:.1f}/{args.units}), "
            f"sparse {r['ms_per_step_sparse_median']:.1f} ms/step, dense {r['ms_per_step_dense_median']:.1f} ms/step, "
            f"speedup {r['speedup']:.2f}x (FLOP ratio {r['flop_ratio']:.1f}x), |Δθ| {r['max_abs_param_diff_sparse_vs_dense_after_update']:.1e}",
            flush=True,
        )
    print("\n| density | k | B | test acc | mean α (train) | mean α (timed) | sparse ms/step | dense ms/step | speedup | FLOP ratio | influence MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['density']} | {r['state_size_k']} | {r['batch']} | {r['test_acc']:.3f} | {r['alpha_train_mean']:.3f} | "
            f"{r['alpha_timed_mean']:.3f} | {r['ms_per_step_sparse_median']:.1f} | {r['ms_per_step_dense_median']:.1f} | "
            f"{r['speedup']:.2f}x | {r['flop_ratio']:.1f}x | {r['influence_bytes'] / 2**20:.0f} |"
        )
    meta = {
        "args": vars(args),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
