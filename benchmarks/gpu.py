"""GPU benchmark of snapjax: ceilings, SnAp-1 bandwidth, exact RTRL FLOP/s, SnAp-2, memory vs T.

Everything is measured in ONE run on one device (``jax.devices()[0]``) and printed as a
markdown table at the end; results go to ``benchmarks/out/gpu_<device_kind>.json``
(written after every section, so a run cut short keeps what it measured).

Sections:

1. Ceilings measured in this run: stream bandwidth (jitted ``x*a+b`` on a large float32
   array, bytes = read + write) and matmul peak (n³, f32 default precision = TF32 on
   recent NVIDIA GPUs, f32 ``'highest'``, bf16).
2. SnAp-1 per-step time, GRU and LSTM (input 64), k ∈ {256, 512, 1024, 2048}, B ∈ {16, 64},
   through ``snapjax.online_gradient`` under ``jax.jit`` (the method interface, ``step`` +
   ``gradient`` in a ``lax.scan``), per step = time / T;
   achieved bytes/s = 8·B·p·m / step (read + write of the influence) and % of the measured
   stream bandwidth; the same with the donated chained driver (section 6); BPTT
   (``snapjax.bptt_gradient``) per step beside it.
3. Exact RTRL, GRU k ∈ {64, 128, 256, 512}, B = 16 (halved while the influence ×3 exceeds
   ``--mem-gb``): per-step time, FLOP/s with FLOPs/step = 2·k·(entries of J) = 2·B·p·k²,
   roofline = min(matmul peak, (k/4 FLOP/byte)·stream bandwidth), % of roofline; in TF32
   mode (``precision=None``, peak = f32 default) and full float32 (``'highest'``, peak =
   f32 highest); relative gradient error of each mode vs a float64 BPTT reference
   (``jax.enable_x64``) on a short sequence.
4. SnAp-2 at parameter density 0.1 (``random_masks``, all kernels), k ∈ {256, 512, 1024}:
   per-step time and ratio to SnAp-1 at the same k (dense SnAp-1 and SnAp-1 with the
   same masks).
5. Peak device memory vs T ∈ {1e2, 1e3, 1e4, 1e5} for SnAp-1, RTRL (small k) and BPTT:
   ``memory_stats()['peak_bytes_in_use']`` measured in a fresh subprocess per point
   (the allocator's peak never goes down within a process) when the device reports it,
   else ``n/a``; plus XLA's compiled memory analysis (arguments + outputs + temporaries),
   available on every backend.  Online methods should be flat in T, BPTT linear.
6. Donation: the chained online driver is ``jax.jit(..., donate_argnums=(1, 2))`` over the
   flax carry and the method state (the influence), and returns both, so consecutive chunks
   reuse the influence buffer in place; there is no host sync inside the loop (one
   ``block_until_ready`` after the last chunk of a timed call).

Every online method is built by name with ``snapjax.online_method(name, cell, params, ...)``;
BPTT (``snapjax.bptt_gradient``) is the reference.

Timing: one untimed warm-up call (compilation), then the median of ``--repeats`` calls,
each ended with ``jax.block_until_ready``.  T of each call is picked so that the call takes
about ``--call-budget-s`` (from an estimate, then corrected once from the warm-up time).

    python benchmarks/gpu.py                 # H100 sizes (default)
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json   # tiny sizes, CPU, < 60 s
"""

from __future__ import annotations

import os

# No preallocation: memory probes run in subprocesses beside this one (section 5).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import snapjax as sj  # noqa: E402
from snapjax.engine.sparsity import random_masks  # noqa: E402

from _timing import machine_info, time_fn  # noqa: E402

N_IN = 64
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # untracked; published: results/


# ----------------------------------------------------------------------------- helpers
def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


REFERENCE = "bptt"  # jax.grad through lax.scan; every other name is an online method


def make_cell(kind: str, k: int, dtype=jnp.float32):
    """``(cell, spec, params)``; ``spec`` (:class:`snapjax.CellSpec`) gives ``units`` and the
    components per unit ``state_dim`` (``m``: 1 for a GRU, 2 for an LSTM) for the byte counts."""
    cell = {"gru": sj.GRUCell, "lstm": sj.LSTMCell}[kind](k)
    spec = sj.as_cell_spec(cell)
    params = sj.as_recurrent(cell).init_params(jax.random.key(0), N_IN, dtype)
    return cell, spec, params


def param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def data(cell, spec, B, T, dtype=jnp.float32, seed=1):
    """Zero flax carry ``(B, ...)``, inputs ``(T, B, 64)`` and regression targets ``(T, B, units)``."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k1, (T, B, N_IN), dtype)
    ys = 0.5 * jax.random.normal(k2, (T, B, spec.units), dtype)
    carry = sj.as_recurrent(cell).init_carry(B, dtype)
    return carry, xs, ys


def pick_T(est_step_s: float, budget_s: float, t_min: int, t_max: int) -> int:
    if not est_step_s or est_step_s <= 0:
        return t_max
    return int(max(t_min, min(t_max, budget_s / est_step_s)))


def fmt(x, spec=".1f", none="n/a"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def mem_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without it
        return None
    if m is None:
        return None
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes),
    }


def timed(fn, *args, repeats):
    r = time_fn(fn, *args, warmup=1, repeats=repeats)
    return r


# --------------------------------------------------------------------------- drivers
def online_fn(method, loss=_loss):
    """``snapjax.online_gradient`` of an :class:`snapjax.OnlineMethod` under jit (method state
    initialised inside)."""
    return jax.jit(lambda p, c, xs, ys: sj.online_gradient(method, p, c, xs, ys, loss).grads)


def bptt_fn(cell, masks=None, loss=_loss):
    """The reference: ``snapjax.bptt_gradient`` (``jax.grad`` through ``lax.scan``) under jit."""
    return jax.jit(lambda p, c, xs, ys: sj.bptt_gradient(cell, p, c, xs, ys, loss, masks=masks).grads)


def gradient_fn(name: str, cell, params):
    """Jitted ``(params, carry, xs, ys) -> grads``: the BPTT reference for ``REFERENCE``, else
    the online method ``snapjax.online_method(name, cell, params)``."""
    if name == REFERENCE:
        return bptt_fn(cell)
    return online_fn(sj.online_method(name, cell, params))


def donated_driver(method):
    """Chained online driver: ``(params, s, J, xs, ys) -> (s, J, grads, loss)``, with the flax
    carry ``s`` and the method state ``J`` donated (argnums 1, 2), so the caller chains chunks
    and the influence is updated in place; it is ``online_gradient`` continuing from ``J`` and
    returning the final method state."""

    def run(params, s, J, xs, ys):
        out = sj.online_gradient(method, params, s, xs, ys, _loss, J)
        return out.final_carry, out.final_method_state, out.grads, out.loss

    return jax.jit(run, donate_argnums=(1, 2))


def time_donated(method, params, B, xs, ys, repeats):
    """Median time of one chained, donated chunk (warm-up chunk first)."""
    drv = donated_driver(method)
    s = method.init_carry(B, xs.dtype)
    J = method.init(B, xs.dtype)
    t0 = time.perf_counter()
    s, J, g, tot = drv(params, s, J, xs, ys)
    jax.block_until_ready((s, J, g, tot))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s, J, g, tot = drv(params, s, J, xs, ys)  # no host sync between chunks of the chain
        jax.block_until_ready(tot)
        times.append(time.perf_counter() - t0)
    jax.block_until_ready((s, J, g))
    del s, J, g
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "compile_s": compile_s}


# --------------------------------------------------------------------------- section 1
def ceilings(a) -> dict:
    out = {}
    n = a.stream_n
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x, s, b: x * s + b)
    r = timed(f, x, jnp.float32(1.0001), jnp.float32(0.5), repeats=max(a.repeats, 10))
    out["stream"] = {"n": n, "bytes": 8 * n, "median_s": r["median_s"], "bytes_per_s": 8 * n / r["median_s"]}
    del x
    m = a.matmul_n
    for name, dtype, prec in (("f32_default", jnp.float32, None), ("f32_highest", jnp.float32, "highest"),
                              ("bf16", jnp.bfloat16, None)):
        k1, k2 = jax.random.split(jax.random.key(0))
        A = jax.random.normal(k1, (m, m), dtype)
        Bm = jax.random.normal(k2, (m, m), dtype)
        g = jax.jit(lambda A, B, prec=prec: jnp.dot(A, B, precision=prec))
        r = timed(g, A, Bm, repeats=max(a.repeats, 10))
        out[f"matmul_{name}"] = {"n": m, "median_s": r["median_s"], "flops_per_s": 2 * m**3 / r["median_s"]}
        del A, Bm
    return out


# --------------------------------------------------------------------------- section 2
def snap1_rows(a, bw) -> list:
    rows = []
    for kind in ("gru", "lstm"):
        for k in a.snap_k:
            cell, spec, params = make_cell(kind, k)
            method = sj.online_method("snap1", cell, params)
            stored = method.num_stored()  # p·m per example
            for B in a.snap_B:
                infl = 4 * B * stored
                row = {"cell": kind, "k": k, "B": B, "params": param_count(params), "m": spec.state_dim,
                       "influence_bytes": infl}
                if 3 * infl > a.mem_gb * 2**30:
                    row["status"] = "skipped (memory)"
                    rows.append(row)
                    print(f"  snap1 {kind} k={k} B={B}: skipped (memory)", flush=True)
                    continue
                T = pick_T(2 * infl / bw + 20e-6, a.call_budget_s, a.t_min, a.T)
                carry, xs, ys = data(cell, spec, B, T)
                r = timed(online_fn(method), params, carry, xs, ys, repeats=a.repeats)
                step = r["median_s"] / T
                rd = time_donated(method, params, B, xs, ys, a.repeats)
                step_d = rd["median_s"] / T
                rb = timed(bptt_fn(cell), params, carry, xs, ys, repeats=a.repeats)
                moved = 8 * B * stored
                row.update(status="ok", T=T, us_per_step=1e6 * step, GBps=moved / step / 1e9,
                           pct_stream=100 * moved / step / bw, us_per_step_donated=1e6 * step_d,
                           GBps_donated=moved / step_d / 1e9, pct_stream_donated=100 * moved / step_d / bw,
                           bptt_us_per_step=1e6 * rb["median_s"] / T, compile_s=r["compile_s"])
                rows.append(row)
                print(f"  snap1 {kind} k={k} B={B} T={T}: {1e6*step:.1f} µs/step "
                      f"({row['pct_stream']:.0f}% stream), donated {1e6*step_d:.1f}, "
                      f"BPTT {row['bptt_us_per_step']:.1f}", flush=True)
                del xs, ys, carry
    return rows


# --------------------------------------------------------------------------- section 3
def rel_err(g, ref) -> float:
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in
              zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(ref))
    return math.sqrt(num / max(den, 1e-300))


def rtrl_rows(a, bw, peaks) -> list:
    rows = []
    for k in a.rtrl_k:
        cell, spec, params = make_cell("gru", k)
        # float64 reference (BPTT) on a short sequence, computed once per k.
        Bref, Tref = a.err_B, a.err_T
        carry32, xs32, ys32 = data(cell, spec, Bref, Tref, seed=3)
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
            c64, x64, y64 = (jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), t)
                             for t in (carry32, xs32, ys32))
            ref = sj.bptt_gradient(cell, p64, c64, x64, y64, _loss).grads
            ref = jax.tree.map(lambda x: np.asarray(x, np.float64), ref)
        for prec, peak_key in ((None, "matmul_f32_default"), ("highest", "matmul_f32_highest")):
            mode = "tf32" if prec is None else "highest"
            method = sj.online_method("rtrl", cell, params, precision=prec)
            stored = method.num_stored()  # p·k per example
            B = a.rtrl_B
            while B > 1 and 3 * 4 * B * stored > a.mem_gb * 2**30:
                B //= 2
            row = {"k": k, "mode": mode, "B": B, "B_requested": a.rtrl_B, "params": param_count(params),
                   "influence_bytes": 4 * B * stored}
            if 3 * 4 * B * stored > a.mem_gb * 2**30:
                row["status"] = "skipped (memory)"
                rows.append(row)
                continue
            kstate = spec.units * spec.state_dim
            flops = 2.0 * kstate * B * stored
            peak = peaks[peak_key]
            roof = min(peak, (kstate / 4.0) * bw)
            T = pick_T(flops / (0.3 * roof) + 20e-6, a.call_budget_s, a.t_min, a.T)
            carry, xs, ys = data(cell, spec, B, T)
            fn = online_fn(method)
            r = timed(fn, params, carry, xs, ys, repeats=a.repeats)
            step = r["median_s"] / T
            g = fn(params, carry32, xs32, ys32)
            err = rel_err(jax.tree.map(np.asarray, g), ref)
            row.update(status="ok", T=T, us_per_step=1e6 * step, flops_per_step=flops,
                       TFLOPs=flops / step / 1e12, roofline_TFLOPs=roof / 1e12, pct_roofline=100 * flops / step / roof,
                       roofline_bound="matmul" if peak <= (kstate / 4.0) * bw else "bandwidth",
                       rel_grad_err_vs_f64=err, err_B=Bref, err_T=Tref)
            rows.append(row)
            print(f"  rtrl k={k} {mode} B={B} T={T}: {1e6*step:.1f} µs/step, {row['TFLOPs']:.2f} TFLOP/s "
                  f"({row['pct_roofline']:.0f}% roofline), rel err {err:.2e}", flush=True)
            del xs, ys, carry
    return rows


# --------------------------------------------------------------------------- section 4
def snap2_rows(a, bw) -> list:
    rows = []
    for k in a.snap2_k:
        cell, spec, params = make_cell("gru", k)
        masks = random_masks(0, params, a.density, spec=cell)
        row = {"k": k, "density": a.density}
        res = {}
        for name, method_name, mk in (("snap2", "snap2", masks), ("snap1_masked", "snap1", masks),
                                      ("snap1_dense", "snap1", None)):
            method = sj.online_method(method_name, cell, params, masks=mk)
            tracker = getattr(method, "tracker", None)  # the compressed-influence engine: width K, layout
            width = getattr(tracker, "width", None)
            stored = method.num_stored()
            B = a.snap2_B
            while B > 1 and 3 * 4 * B * stored > a.mem_gb * 2**30:
                B //= 2
            if 3 * 4 * B * stored > a.mem_gb * 2**30:
                res[name] = None
                continue
            est = (2 * 4 * B * stored * max(1, width or 1)) / (0.3 * bw * 8) + 2 * 4 * B * stored / bw + 20e-6
            T = pick_T(est, a.call_budget_s, a.t_min, a.T)
            carry, xs, ys = data(cell, spec, B, T)
            r = timed(online_fn(method), params, carry, xs, ys, repeats=a.repeats)
            res[name] = {"B": B, "T": T, "us_per_step": 1e6 * r["median_s"] / T,
                         "us_per_step_per_ex": 1e6 * r["median_s"] / T / B, "width_K": width,
                         "layout": getattr(tracker, "layout", None), "method_name": method.name,
                         "influence_bytes": 4 * B * stored}
            del xs, ys, carry
        row.update(res)
        s2 = res.get("snap2")
        for ref in ("snap1_masked", "snap1_dense"):
            if s2 and res.get(ref):
                row[f"ratio_vs_{ref}"] = s2["us_per_step_per_ex"] / res[ref]["us_per_step_per_ex"]
        rows.append(row)
        print(f"  snap2 k={k}: {row}", flush=True)
    return rows


# --------------------------------------------------------------------------- section 5
def mem_probe(method: str, k: int, B: int, T: int, mem_gb: float, execute: bool = True) -> dict:
    """Compile (and run, if it fits ``mem_gb`` by XLA's analysis) one sequence of length T.
    Reports XLA's compiled memory analysis and the device's peak bytes in use (if known)."""
    cell, spec, params = make_cell("gru", k)
    carry, xs, ys = data(cell, spec, B, T)
    fn = gradient_fn(method, cell, params)
    out = {"method": method, "k": k, "B": B, "T": T, "inputs_bytes": int(xs.nbytes + ys.nbytes)}
    compiled = fn.lower(params, carry, xs, ys).compile()
    out["xla"] = mem_analysis(compiled)
    stats0 = jax.devices()[0].memory_stats()
    out["peak_before"] = None if not stats0 else stats0.get("peak_bytes_in_use")
    if out["xla"] and out["xla"]["total_bytes"] > mem_gb * 2**30:
        out["status"] = "skipped (memory)"
        return out
    if execute:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, carry, xs, ys))
        out["run_s"] = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats()
    out["peak_bytes_in_use"] = None if not stats else stats.get("peak_bytes_in_use")
    out["status"] = "ok"
    return out


def memory_rows(a, use_subprocess: bool) -> list:
    rows = []
    for method, k in (("snap1", a.mem_k), ("rtrl", a.mem_k_rtrl), (REFERENCE, a.mem_k)):
        for T in a.mem_T:
            if use_subprocess:
                cmd = [sys.executable, os.path.abspath(__file__), "--_mem-probe",
                       f"{method},{k},{a.mem_B},{T},{a.mem_gb}"]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.probe_timeout_s)
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMPROBE ")]
                    if line:
                        row = json.loads(line[-1][len("MEMPROBE "):])
                    else:
                        row = {"method": method, "k": k, "B": a.mem_B, "T": T, "status": "failed",
                               "stderr_tail": p.stderr[-800:]}
                except subprocess.TimeoutExpired:
                    row = {"method": method, "k": k, "B": a.mem_B, "T": T, "status": "timeout"}
            else:
                row = mem_probe(method, k, a.mem_B, T, a.mem_gb, execute=True)
                row["peak_bytes_in_use"] = None  # in-process peaks are not per point
            rows.append(row)
            print(f"  mem {method} k={k} T={T}: {row.get('status')} peak={row.get('peak_bytes_in_use')} "
                  f"xla={(row.get('xla') or {}).get('total_bytes')}", flush=True)
    return rows


# --------------------------------------------------------------------------- report
def mib(x):
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def markdown(res: dict) -> str:
    L = []
    dev = res["machine"]["device"]
    L.append(f"## snapjax GPU benchmark — {dev} (jax {res['machine']['jax_version']}, backend {res['machine']['backend']})")
    L.append("")
    c = res.get("ceilings")
    if c:
        L.append("### 1. Ceilings (this run)")
        L.append("| ceiling | value |\n|---|---|")
        L.append(f"| stream x*a+b (read+write), n={c['stream']['n']} | {c['stream']['bytes_per_s']/1e9:.0f} GB/s |")
        for nm in ("f32_default", "f32_highest", "bf16"):
            e = c[f"matmul_{nm}"]
            L.append(f"| matmul {e['n']}³ {nm} | {e['flops_per_s']/1e12:.2f} TFLOP/s |")
        L.append("")
    if res.get("snap1") is not None:
        L.append("### 2. SnAp-1 (online_gradient, jit + lax.scan) vs BPTT, per step; bytes = 8·B·p·m")
        L.append("| cell | k | B | T | SnAp-1 µs | GB/s | % stream | SnAp-1 donated µs | % stream (donated) | BPTT µs |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["snap1"]:
            if r["status"] != "ok":
                L.append(f"| {r['cell']} | {r['k']} | {r['B']} | – | {r['status']} | | | | | |")
                continue
            L.append(f"| {r['cell']} | {r['k']} | {r['B']} | {r['T']} | {r['us_per_step']:.1f} | {r['GBps']:.0f} | "
                     f"{r['pct_stream']:.0f}% | {r['us_per_step_donated']:.1f} | {r['pct_stream_donated']:.0f}% | "
                     f"{r['bptt_us_per_step']:.1f} |")
        L.append("")
    if res.get("rtrl") is not None:
        L.append("### 3. Exact RTRL, GRU (FLOPs/step = 2·B·p·k²; roofline = min(peak, k/4·stream))")
        L.append("| k | mode | B | T | µs/step | TFLOP/s | roofline TFLOP/s (bound) | % roofline | rel. grad err vs f64 |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["rtrl"]:
            bnote = f"{r['B']}" + ("" if r["B"] == r["B_requested"] else f" (reduced from {r['B_requested']}: memory)")
            if r["status"] != "ok":
                L.append(f"| {r['k']} | {r['mode']} | {bnote} | – | {r['status']} | | | | |")
                continue
            L.append(f"| {r['k']} | {r['mode']} | {bnote} | {r['T']} | {r['us_per_step']:.1f} | {r['TFLOPs']:.3g} | "
                     f"{r['roofline_TFLOPs']:.3g} ({r['roofline_bound']}) | {r['pct_roofline']:.0f}% | "
                     f"{r['rel_grad_err_vs_f64']:.2e} |")
        L.append("")
    if res.get("snap2") is not None:
        L.append(f"### 4. SnAp-2 at density {res['args']['density']} (GRU), per step")
        L.append("| k | B | K | SnAp-2 µs | SnAp-1 (same masks) µs | SnAp-1 dense µs | ratio vs SnAp-1 masked | ratio vs SnAp-1 dense |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in res["snap2"]:
            s2, s1m, s1d = r.get("snap2"), r.get("snap1_masked"), r.get("snap1_dense")
            us = lambda e: "skipped (memory)" if e is None else f"{e['us_per_step']:.1f} (B={e['B']})"  # noqa: E731
            L.append(f"| {r['k']} | {s2['B'] if s2 else '–'} | {s2['width_K'] if s2 else '–'} | {us(s2)} | {us(s1m)} | "
                     f"{us(s1d)} | {fmt(r.get('ratio_vs_snap1_masked'), '.2f')} | {fmt(r.get('ratio_vs_snap1_dense'), '.2f')} |")
        L.append("(ratios per example, µs/step/B)")
        L.append("")
    if res.get("memory") is not None:
        L.append("### 5. Memory vs T (GRU; peak = memory_stats peak_bytes_in_use in a fresh process; XLA = compiled args+out+temp)")
        L.append("(XLA total includes the arguments xs, ys, which grow with T for every method; temp is the working set)")
        L.append("| method | k | B | T | peak MiB | XLA MiB | XLA temp MiB | status |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in res["memory"]:
            x = r.get("xla") or {}
            L.append(f"| {r['method']} | {r['k']} | {r['B']} | {r['T']} | {mib(r.get('peak_bytes_in_use'))} | "
                     f"{mib(x.get('total_bytes'))} | {mib(x.get('temp_bytes'))} | {r.get('status')} |")
        L.append("")
    L.append("### 6. Donation")
    L.append("Chained online driver: `jax.jit(run, donate_argnums=(1, 2))` over (flax carry, method state), returning both; "
             "chunks are chained without host sync (one block_until_ready per timed chunk). "
             "Column 'SnAp-1 donated' in section 2. online_gradient itself initialises the method state inside the jit "
             "(no donation needed).")
    return "\n".join(L)


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, < 60 s): tests the script")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/gpu_<device_kind>.json, untracked; "
                    "the published runs are in benchmarks/results)")
    ap.add_argument("--mem-gb", type=float, default=40.0, help="memory budget per config (GiB)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (5; 3 in --smoke)")
    ap.add_argument("--call-budget-s", type=float, default=None, help="target seconds per timed call")
    ap.add_argument("--T", type=int, default=None, help="max time steps per timed call")
    ap.add_argument("--sections", default="1,2,3,4,5", help="comma list of sections to run (1-5; 6 is in 2)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--probe-timeout-s", type=float, default=180.0)
    ap.add_argument("--_mem-probe", dest="mem_probe", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        d = dict(stream_n=2**20, matmul_n=256, snap_k=[16], snap_B=[2], rtrl_k=[8], rtrl_B=4,
                 snap2_k=[16, 32], snap2_B=2, mem_k=16, mem_k_rtrl=8, mem_B=2, mem_T=[10, 100],
                 err_B=2, err_T=10, T_default=32, t_min=4, budget=0.05)
    else:
        d = dict(stream_n=2**28, matmul_n=8192, snap_k=[256, 512, 1024, 2048], snap_B=[16, 64],
                 rtrl_k=[64, 128, 256, 512], rtrl_B=16, snap2_k=[256, 512, 1024], snap2_B=16,
                 mem_k=256, mem_k_rtrl=64, mem_B=16, mem_T=[100, 1000, 10000, 100000],
                 err_B=2, err_T=20, T_default=128, t_min=8, budget=0.25)
    for key, v in d.items():
        if key not in ("T_default", "budget"):
            setattr(a, key, v)
    a.T = a.T or d["T_default"]
    a.repeats = a.repeats or (3 if a.smoke else 5)
    a.call_budget_s = a.call_budget_s or d["budget"]
    a.sections = {int(s) for s in a.sections.split(",") if s.strip()}
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.mem_probe:
        method, k, B, T, gb = a.mem_probe.split(",")
        r = mem_probe(method, int(k), int(B), int(T), float(gb))
        print("MEMPROBE " + json.dumps(r), flush=True)
        return
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    kind = str(getattr(dev, "device_kind", dev))
    out = a.out or os.path.join(RESULTS_DIR, "gpu_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", kind) + ".json")
    has_stats = bool(dev.memory_stats())
    args_json = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items() if k != "mem_probe"}
    res = {"machine": machine_info(), "args": args_json, "memory_stats_available": has_stats,
           "notes": ["per-step = median call time / T; bytes/s = 8·B·p·m / step",
                     "RTRL FLOPs/step = 2·(k·m)·B·(p·k·m); roofline = min(matmul peak of the mode, k/4·stream)"]}

    def lap(name):
        res.setdefault("section_start_s", {})[name] = time.perf_counter() - t_start

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        res["elapsed_s"] = time.perf_counter() - t_start
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=float)

    print(f"device: {kind} ({jax.default_backend()}), memory_stats: {'yes' if has_stats else 'n/a'}", flush=True)
    # Section 5 first: its probes run in fresh subprocesses before this process holds device memory.
    if 5 in a.sections:
        print("5. memory vs T", flush=True)
        lap("memory")
        res["memory"] = memory_rows(a, use_subprocess=has_stats)
        save()
    need_ceil = bool(a.sections & {1, 2, 3, 4})
    if need_ceil:
        print("1. ceilings", flush=True)
        lap("ceilings")
        res["ceilings"] = ceilings(a)
        save()
        c = res["ceilings"]
        bw = c["stream"]["bytes_per_s"]
        peaks = {kk: v["flops_per_s"] for kk, v in c.items() if kk.startswith("matmul")}
        print(f"  stream {bw/1e9:.0f} GB/s; " + ", ".join(f"{kk} {v/1e12:.2f} TFLOP/s" for kk, v in peaks.items()),
              flush=True)
    if 2 in a.sections:
        print("2. SnAp-1 vs BPTT", flush=True)
        lap("snap1")
        res["snap1"] = snap1_rows(a, bw)
        save()
    if 3 in a.sections:
        print("3. exact RTRL", flush=True)
        lap("rtrl")
        res["rtrl"] = rtrl_rows(a, bw, peaks)
        save()
    if 4 in a.sections:
        print("4. SnAp-2 sparse", flush=True)
        lap("snap2")
        res["snap2"] = snap2_rows(a, bw)
        save()
    save()
    print(f"\nwrote {out} ({res['elapsed_s']:.1f} s)\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
