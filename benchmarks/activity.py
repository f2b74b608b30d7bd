"""EGRU trained online with exact RTRL on sklearn digits (rows as a sequence): activity-sparse
propagation (snapjax.methods.activity) vs dense exact RTRL (same model, sparsity ignored), in one run.

Task: 8×8 digits, one row per step (T=8, input 8, pixel/16), a linear readout on the last
step's output ``h_T`` (cross-entropy at the last step only, so the online RTRL gradient is
``dL/ds_T · J_T`` and one Adam update is applied per sequence batch).  Steps are driven by
``lax.scan`` inside ``jit``, through the online-method interface (``method.step`` on the flax
carry, per-step statistics in ``aux``; ``method.gradient`` with ``dL/dcarry_T``).

State size k = 2·units (EGRU keeps (c, h) per unit): --units 128 ⇔ k = 256.

Three methods compute the same exact gradient: ``sparse`` (``online_method("activity")``,
blocks of ``--block`` units), ``ignored`` (the same kernel told to process every unit every step:
activity ignored, structure of D still exploited) and ``dense`` (``online_method("rtrl")``, the
library's dense exact RTRL, the full (U·m)² product).  Training uses ``sparse``; the three are
timed interleaved on the same parameters and batches after training (α then is the trained
network's).  The dense one is only timed on a few batches (its training trajectory would be
identical).

Usage:
  python benchmarks/activity.py --quick          # a few minutes on 2 CPU cores
  python benchmarks/activity.py                  # 200 online batches per row (~30 min on 2 CPU cores)

Output: ``benchmarks/out/activity_cpu.json`` unless ``--out`` (the published numbers are in
``benchmarks/results/``).
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
from snapjax.methods.activity_cost import step_cost
from snapjax.cells.egru import EGRUCell


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


def make_train_step(method, opt, masks):
    """One online update per sequence batch with ``method`` (an ``snapjax.OnlineMethod``);
    returns ``(theta, opt_state, loss, acc, aux)`` with ``aux`` stacked over the T steps."""

    def loss_from_carry(ro, carry, y):
        logits = method.cell.output(carry) @ ro["w"] + ro["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    @jax.jit
    def train_step(theta, opt_state, xs, y):
        p = theta["cell"]
        B = xs.shape[1]
        carry0 = method.init_carry(B, jnp.float32)
        state0 = method.init(B, jnp.float32)

        def body(c, x):
            carry, state, aux = method.step(p, *c, x)
            return (carry, state), aux

        (carry, state), stats = jax.lax.scan(body, (carry0, state0), xs)
        (loss, logits), (g_ro, dl_dcarry) = jax.value_and_grad(loss_from_carry, argnums=(0, 1), has_aux=True)(
            theta["readout"], carry, y
        )
        g_cell, _ = method.gradient(p, state, dl_dcarry)
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


def run_config(args, density, threshold, train, test, progress):
    """Train online with activity-sparse exact RTRL, then time sparse / activity-ignored / dense
    exact RTRL on the same parameters and batches (interleaved)."""
    args = argparse.Namespace(**{**vars(args), "threshold_init": list(threshold)})
    cell, theta, masks = build(args, density, args.seed)
    opt = optax.adam(args.lr)
    U = args.units
    sparse = sj.online_method("activity", cell, theta["cell"], masks=masks, block=args.block)
    ignored = sj.online_method("activity", cell, theta["cell"], masks=masks, block=U)  # every unit, every step
    dense = sj.online_method("rtrl", cell, theta["cell"], masks=masks)
    methods = {"sparse": sparse, "ignored": ignored, "dense": dense}
    steps = {name: make_train_step(m, opt, masks) for name, m in methods.items()}
    evaluate = make_eval(cell, masks)
    T = 8
    rng = np.random.default_rng(args.seed)

    # --- train online with the activity-sparse method (exact RTRL)
    opt_state = opt.init(theta)
    t0 = time.perf_counter()
    jax.block_until_ready(steps["sparse"](theta, opt_state, *next(batches(*train, args.batch, rng))))
    compile_s = {"sparse": time.perf_counter() - t0}
    times, alphas, caps, losses, accs = [], [], [], [], []
    it = batches(*train, args.batch, rng)
    for n in progress(range(args.train_batches), desc=f"train d={density} thr={tuple(threshold)}"):
        try:
            xs, y = next(it)
        except StopIteration:
            it = batches(*train, args.batch, rng)
            xs, y = next(it)
        t0 = time.perf_counter()
        theta, opt_state, loss, acc, st = steps["sparse"](theta, opt_state, xs, y)
        jax.block_until_ready(theta)
        times.append((time.perf_counter() - t0) / T)
        alphas.append(np.asarray(st["alpha"]))
        caps.append(np.asarray(st["capacity"]))
        losses.append(float(loss))
        accs.append(float(acc))
    alphas, caps = np.concatenate(alphas), np.concatenate(caps)

    # --- time the three methods on the same fixed batches and (trained) parameters, interleaved
    tb = [b for _, b in zip(range(args.time_batches), batches(*train, args.batch, np.random.default_rng(1)))]
    opt_state0 = opt.init(theta)
    for name in ("ignored", "dense"):
        t0 = time.perf_counter()
        jax.block_until_ready(steps[name](theta, opt_state0, *tb[0]))
        compile_s[name] = time.perf_counter() - t0
    ts = {k: [] for k in steps}
    a_t, c_t = [], []
    for xs, y in tb:
        for _ in range(args.repeats):
            for name, f in steps.items():
                t0 = time.perf_counter()
                o = f(theta, opt_state0, xs, y)
                jax.block_until_ready(o)
                ts[name].append((time.perf_counter() - t0) / T)
                if name == "sparse":
                    a_t.append(np.asarray(o[4]["alpha"]))
                    c_t.append(np.asarray(o[4]["capacity"]))
    a_t, c_t = np.concatenate(a_t), np.concatenate(c_t)

    # --- exactness spot check: the same update from the same state with each method
    outs = {k: f(theta, opt_state0, *tb[0])[0] for k, f in steps.items()}
    diff = {
        k: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(outs[k]), jax.tree.leaves(outs["dense"])))
        for k in ("sparse", "ignored")
    }

    test_acc, test_event = [], []
    for xs, y in batches(*test, 120, np.random.default_rng(0)):
        a, e = evaluate(theta, xs, y)
        test_acc.append(float(a))
        test_event.append(float(e))
    cost = step_cost(sparse, args.batch, c_t)
    med = {k: float(np.median(v)) for k, v in ts.items()}
    return {
        "density": density,
        "threshold_init": list(threshold),
        "param_density": sparse.parameter_density(),
        "units": U,
        "state_size_k": 2 * U,
        "batch": args.batch,
        "block": sparse.block,
        "train_batches": args.train_batches,
        "train_loss_first10": float(np.mean(losses[:10])),
        "train_loss_last10": float(np.mean(losses[-10:])),
        "train_acc_last20": float(np.mean(accs[-20:])),
        "test_acc": float(np.mean(test_acc)),
        "test_event_rate": float(np.mean(test_event)),
        "alpha_train_mean": float(alphas.mean()),
        "alpha_train_first10_batches": float(alphas[: 10 * T].mean()),
        "alpha_train_last10_batches": float(alphas[-10 * T :].mean()),
        "alpha_timed_mean": float(a_t.mean()),
        "capacity_timed_mean": float(c_t.mean()),
        "train_ms_per_step_sparse_median": 1e3 * float(np.median(times)),
        "ms_per_step": {k: 1e3 * v for k, v in med.items()},
        "speedup_vs_dense": med["dense"] / med["sparse"],
        "speedup_vs_ignored": med["ignored"] / med["sparse"],
        "flops_per_step_sparse": float(np.mean(cost["flops"])),
        "flops_per_step_dense": float(cost["flops_dense"]),
        "flops_per_step_ignored": float(cost["flops_dense_structured"]),
        "flop_ratio_vs_dense": float(cost["flops_dense"] / np.mean(cost["flops"])),
        "influence_bytes": int(cost["influence_bytes"]),
        "scratch_bytes": int(cost["scratch_bytes"]),
        "max_abs_param_diff_vs_dense_after_update": diff,
        "compile_s": compile_s,
        "timing_samples_s": ts,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=128, help="EGRU units (state size k = 2*units)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2])
    ap.add_argument(
        "--thresholds",
        default="0.7:1.0,0.45:0.75,0.15:0.45",
        help="comma-separated uniform threshold-init ranges lo:hi, one row each (they set alpha)",
    )
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--block", type=float, default=0.125, help="units per block (int) or fraction of units")
    ap.add_argument("--train-batches", type=int, default=200)
    ap.add_argument("--time-batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few train batches, one threshold (minutes on CPU)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "activity_cpu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_batches, args.time_batches, args.repeats = 30, 2, 2
        args.thresholds = args.thresholds.split(",")[0]
    if args.block >= 1:
        args.block = int(args.block)
    thresholds = [tuple(float(v) for v in t.split(":")) for t in args.thresholds.split(",")]
    from tqdm.auto import tqdm

    progress = (lambda x, desc: x) if args.no_progress else (lambda x, desc: tqdm(x, desc=desc, leave=False))
    train, test = load_digits_rows(args.seed)
    rows = []
    for d in args.densities:
        for thr in thresholds:
            r = run_config(args, d, thr, train, test, progress)
            rows.append(r)
            ms = r["ms_per_step"]
            print(
                f"d={d:.2f} thr={thr} k={r['state_size_k']} B={r['batch']}: test acc {r['test_acc']:.3f}, "
                f"alpha train {r['alpha_train_mean']:.3f} timed {r['alpha_timed_mean']:.3f}, ms/step sparse "
                f"{ms['sparse']:.1f} ignored {ms['ignored']:.1f} dense {ms['dense']:.1f} -> "
                f"{r['speedup_vs_dense']:.2f}x vs dense RTRL, {r['speedup_vs_ignored']:.2f}x vs activity ignored",
                flush=True,
            )
    print(
        "\n| density | threshold init | test acc | α train (first→last 10 batches) | α timed | "
        "sparse ms/step | activity-ignored ms/step | dense RTRL ms/step | speedup vs dense | "
        "vs ignored | FLOP ratio vs dense | influence + scratch MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms_per_step"]
        print(
            f"| {r['density']} | {r['threshold_init'][0]}–{r['threshold_init'][1]} | {r['test_acc']:.3f} | "
            f"{r['alpha_train_mean']:.3f} ({r['alpha_train_first10_batches']:.3f}→{r['alpha_train_last10_batches']:.3f}) | "
            f"{r['alpha_timed_mean']:.3f} | {ms['sparse']:.1f} | {ms['ignored']:.1f} | {ms['dense']:.1f} | "
            f"{r['speedup_vs_dense']:.2f}x | {r['speedup_vs_ignored']:.2f}x | {r['flop_ratio_vs_dense']:.1f}x | "
            f"{r['influence_bytes'] / 2**20:.0f} + {r['scratch_bytes'] / 2**20:.0f} |"
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
