"""Exact RTRL with the influence split over devices (``OnlineLearner(param_axis="model")``):
per-step time, per-device memory and correctness on 1, 2, 4 and 8 devices.

**Forced host devices share one CPU.** The devices here are ``8`` XLA host devices forced on a
shared 2-core CPU (``--xla_force_host_platform_device_count=8``, set by this script before jax
is imported, with ``JAX_PLATFORMS=cpu``): they share the same cores and the same RAM.  So this
run shows *memory scaling and correctness*, not speed: no speed-up from more hardware is
possible, and the time ratios only show the split's overhead (collectives, smaller kernels) or
a different use of the same two cores.

Model: ``OnlineLearner(GRUCell(k), readout_size=4, method="rtrl", optimizer=optax.sgd(0.1,
momentum=0.9), param_axis="model")``, input size ``n_in = 8``, batch ``B = 1``, float32, softmax
cross-entropy on random labels.  Exact RTRL stores ``J`` with ``k·p`` floats per example, ``p =
3k² + 3·n_in·k + 4k`` GRU parameters (``k = 512``: 410 M floats, 1.64 GB).  Its recursion
``J_t = D_t J_{t-1} + I_t`` contracts over state units only, so every influence leaf is split
along its parameter-unit axis over the mesh axis ``"model"`` and the update needs no
communication; only the parameter-shaped gradient (``p`` floats) is reduced.

For each ``k`` and each ``D``: mesh ``jax.make_mesh((D,), ("model",), devices=jax.devices()[:D])``
(Explicit axis; ``--axis-type auto`` for an Auto one), state placed with
``sj.shard_state``, ``learner.run_jit`` lowered and compiled under ``jax.set_mesh(mesh)`` for a
chunk of ``T`` steps.  Recorded per row:

* memory: influence bytes in total and on one device (``leaf.addressable_shards[0]``), which
  must be ``total / D``; the compiled program's per-device ``memory_analysis()`` (argument,
  output, alias and temp bytes); the collectives in the compiled HLO (kind, count, largest
  result shape: an ``all-gather`` of influence size would mean XLA re-assembles ``J``);
* time: one untimed call (from the initial state), then ``--repeats`` timed calls (each ends
  with ``block_until_ready``; the state chains through them, donated); per-step time = call time
  / ``T``; median, min, max; ratio of medians to ``D = 1`` of the same ``k``;
* correctness: after the first ``T`` steps (from the same initial state), the parameters, the
  optimizer's momentum trace ``Σ_t 0.9^(T-t) g_t`` (the gradients, without the parameters'
  offset, whose float32 rounding would dominate a difference of parameter changes), the
  outputs and the influence against the plain single-device learner (no mesh, no
  ``param_axis``), each as the largest per-leaf ``max |a - b| / max |b|`` (the influence
  compared shard by shard); all must be ``<= 1e-5`` (float32), and the influence must still be
  split after the steps.

A configuration whose estimated host memory (``D ×`` the per-device compiled footprint: the
forced devices share the host's RAM) exceeds 90 % of what the machine has available is skipped
and recorded as such; an error (e.g. out of memory) is caught and recorded.  The JSON and the
``.md`` table are rewritten after every row; the script exits non-zero (after writing) if a
check failed.  ``--quick`` also sets ``--xla_backend_optimization_level=0`` (faster XLA:CPU
compilation; its timings mean nothing).

    python benchmarks/scaling.py --out benchmarks/results/scaling.json   # k ∈ {128, 256, 512}
    python benchmarks/scaling.py --quick --out /tmp/scaling_quick.json   # k ∈ {16, 32}, D ∈ {1, 2}
    python benchmarks/scaling.py --render --out benchmarks/results/scaling.json  # rewrite the .md only
"""

from __future__ import annotations

import os
import re
import sys

_FORCE = "--xla_force_host_platform_device_count=8"
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " " + _FORCE).strip()  # before jax is imported
os.environ["JAX_PLATFORMS"] = "cpu"
if "--quick" in sys.argv[1:]:  # a smoke run: XLA:CPU compiles faster (timings not meaningful)
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import argparse
import functools
import gc
import json
import resource
import statistics
import time
import traceback

import jax
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import markdown_table, write_json
from _timing import machine_info

import snapjax as sj

NOTE = ("Forced host devices (--xla_force_host_platform_device_count=8) share one CPU (and its RAM): "
        "this run shows memory scaling and correctness, not speed.")
READOUT = 4
LR = 0.1
MOMENTUM = 0.9  # the optimizer's trace Σ_t 0.9^(T-t) g_t: the gradients, compared without the parameters' offset
TOL = 1e-5  # float32: max |a - b| / max |b| against the plain single-device learner
DIFFS = ("params", "grad_trace", "outputs", "influence")
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")


def collectives(hlo: str) -> dict:
    """``{kind: {"count", "bytes", "largest": result shape, "largest_bytes"}}`` of the collective
    ops in compiled HLO text (static ops: one inside the step loop runs every step)."""
    out: dict = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        shape, kind = m.groups()
        nbytes = sum(_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape))
        r = out.setdefault(kind, {"count": 0, "bytes": 0, "largest": "", "largest_bytes": 0})
        r["count"] += 1
        r["bytes"] += nbytes
        if nbytes > r["largest_bytes"]:
            r["largest"], r["largest_bytes"] = re.sub(r"\{[\d,]*\}", "", shape), nbytes
    return out


def memory_stats(compiled) -> dict | None:
    """The compiled program's per-device ``memory_analysis()`` (bytes), or None if unavailable."""
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - backend without it
        return {"error": repr(e)}
    if ma is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def footprint(mem: dict | None) -> int:
    """Bytes one device needs to run the program: arguments + outputs not aliased + temps."""
    if not mem or "error" in mem:
        return 0
    return mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def learner_for(k: int, param_axis: str | None):
    return sj.OnlineLearner(sj.GRUCell(k), readout_size=READOUT, method="rtrl",
                            optimizer=optax.sgd(LR, momentum=MOMENTUM), param_axis=param_axis)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-30))


def tree_rel_diff(a, b) -> float:
    return max(rel_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def influence_bytes(method_state) -> tuple[int, int]:
    """(total bytes, bytes held by the first device) of the method states' leaves."""
    leaves = jax.tree.leaves(method_state)
    return sum(x.nbytes for x in leaves), sum(x.addressable_shards[0].data.nbytes for x in leaves)


def sharded_rel_diff(sharded_tree, ref_tree) -> float:
    """``max |a - b| / max |b|`` leaf by leaf, comparing every shard with its slice of ``b``."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(sharded_tree), jax.tree.leaves(ref_tree)):
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
        for s in a.addressable_shards:
            worst = max(worst, float(np.max(np.abs(np.asarray(s.data) - b[s.index]), initial=0.0)) / scale)
    return worst


def data(k: int, args):
    rng = np.random.default_rng(k)
    xs = rng.standard_normal((args.T, args.batch, args.n_in)).astype(np.float32)
    ys = rng.integers(0, READOUT, (args.T, args.batch)).astype(np.int32)
    return xs, ys


@functools.cache
def _init_fn(k: int):
    return jax.jit(learner_for(k, "model").init, static_argnames=("batch_size", "input_size"))


def initial_state(k: int, args):
    """``learner.init`` under ``jax.jit`` (eager init is slow; call it outside a mesh context):
    the same values for every run of this ``k`` (the sharded and the plain learners have the
    same state layout)."""
    return _init_fn(k)(jax.random.key(0), batch_size=args.batch, input_size=args.n_in)


def reference(k: int, args) -> dict:
    """The plain single-device learner (no mesh): its first ``T`` steps, kept on the host."""
    learner = learner_for(k, None)
    state = initial_state(k, args)
    xs, ys = data(k, args)
    compiled = learner.run_jit.lower(state, xs, ys).compile()
    mem = memory_stats(compiled)
    need, avail = footprint(mem), available_bytes()
    if need > 0.9 * avail:
        raise MemoryError(f"the single-device reference needs ~{need / 2**30:.2f} GiB, "
                          f"{avail / 2**30:.2f} GiB available")
    state, outs, _ = compiled(state, xs, ys)
    return {"params": jax.device_get(state.params), "trace": jax.device_get(state.opt_state),
            "outs": np.asarray(outs), "influence": jax.device_get(state.method_state), "memory": mem,
            "bytes": sum(x.nbytes for x in jax.tree.leaves(state.method_state))}


def run_row(k: int, D: int, args, ref: dict) -> dict:
    row = {"units": k, "devices": D, "batch": args.batch, "n_in": args.n_in, "T": args.T}
    learner = learner_for(k, "model")
    mesh = jax.make_mesh((D,), ("model",), axis_types=(AXIS_TYPES[args.axis_type],), devices=jax.devices()[:D])
    row["mesh"] = str(mesh)
    xs, ys = data(k, args)
    state = initial_state(k, args)
    with jax.set_mesh(mesh):
        state = sj.shard_state(learner, state, mesh)
        xs, ys = sj.put_sharded((xs, ys), mesh, P())
        total, first = influence_bytes(state.method_state)
        row.update(params=int(sum(np.size(x) for x in jax.tree.leaves(state.params["layers_0"]))),
                   influence_bytes_total=total, influence_bytes_per_device=first,
                   per_device_is_total_over_D=bool(first * D == total),
                   influence_specs=sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.method_state)}))
        placed = [x.sharding for x in jax.tree.leaves(state.method_state)]
        t0 = time.perf_counter()
        compiled = learner.run_jit.lower(state, xs, ys).compile()
        row["compile_s"] = time.perf_counter() - t0
        row["memory"] = memory_stats(compiled)
        row["collectives"] = collectives(compiled.as_text())
        row["largest_collective_bytes"] = max((c["largest_bytes"] for c in row["collectives"].values()), default=0)
        row["largest_collective_over_influence_per_device"] = row["largest_collective_bytes"] / first
        need, kept, avail = D * footprint(row["memory"]), ref["bytes"], available_bytes()
        row["host_bytes_needed_est"], row["host_bytes_available"] = need, avail
        if need > 0.9 * avail:
            row["status"] = (f"skipped (memory): {D} devices x {footprint(row['memory']) / 2**30:.2f} GiB "
                             f"= {need / 2**30:.2f} GiB needed, {avail / 2**30:.2f} GiB available "
                             f"({kept / 2**30:.2f} GiB held by the reference)")
            return row
        t0 = time.perf_counter()
        state, outs, metrics = jax.block_until_ready(compiled(state, xs, ys))
        row["first_call_s"] = time.perf_counter() - t0
        row["loss"] = np.asarray(metrics["loss"]).tolist()
        params = jax.device_get(state.params)
        row["params_max_abs_diff"] = max(float(np.max(np.abs(np.float64(a) - b))) for a, b in
                                         zip(jax.tree.leaves(params), jax.tree.leaves(ref["params"])))
        row["rel_diff_params"] = tree_rel_diff(params, ref["params"])
        row["rel_diff_grad_trace"] = tree_rel_diff(jax.device_get(state.opt_state), ref["trace"])
        row["rel_diff_outputs"] = rel_diff(outs, ref["outs"])
        row["rel_diff_influence"] = sharded_rel_diff(state.method_state, ref["influence"])
        row["specs_kept"] = all(x.sharding.is_equivalent_to(s, x.ndim)  # still split after the steps
                                for x, s in zip(jax.tree.leaves(state.method_state), placed))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = jax.block_until_ready(compiled(state, xs, ys)[0])
            times.append(time.perf_counter() - t0)
    per = [t / args.T for t in times]
    row["matches_reference"] = bool(max(row[f"rel_diff_{x}"] for x in DIFFS) <= TOL)
    row.update(status="ok", step_s_median=statistics.median(per), step_s_min=min(per), step_s_max=max(per),
               step_s_all=per, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row


def num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def mib(b) -> str:
    return num(b / 2**20) if isinstance(b, (int, float)) else ""


TABLE_HEADERS = ("k", "D", "p", "status", "ms/step median (min–max)", "÷ D=1", "influence MiB total", "per device",
                 "= total/D", "compiled per device MiB: arg / out / temp", "temp·D ÷ D=1",
                 "collectives (count, largest)", "rel. diff params / grad trace / outputs / J")


def table(rows: list) -> str:
    cells = []
    for r in rows:
        mem = r.get("memory") or {}
        m = " / ".join(mib(mem.get(x)) for x in ("argument_bytes", "output_bytes", "temp_bytes")) if mem else "n/a"
        coll = "; ".join(f"{kind} ×{c['count']}, {c['largest']}" for kind, c in (r.get("collectives") or {}).items())
        t = diffs = ratio = ""
        tr = f"{r['temp_bytes_x_D_over_1_device']:.2f}" if "temp_bytes_x_D_over_1_device" in r else ""
        if r.get("status") == "ok":
            t = f"{num(1e3 * r['step_s_median'])} ({num(1e3 * r['step_s_min'])}–{num(1e3 * r['step_s_max'])})"
            ratio = f"{r['ratio_vs_1_device']:.2f}" if "ratio_vs_1_device" in r else ""
            diffs = " / ".join(f"{r['rel_diff_' + x]:.1e}" for x in DIFFS)
        cells.append([str(r["units"]), str(r["devices"]), str(r.get("params", "")), r.get("status", ""), t, ratio,
                      mib(r.get("influence_bytes_total")), mib(r.get("influence_bytes_per_device")),
                      str(r.get("per_device_is_total_over_D", "")), m, tr, coll, diffs])
    return markdown_table(TABLE_HEADERS, cells)


def summary(rows: list) -> list:
    """Findings over the finished rows (bullets for the .md)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = [f"- rows ok: {len(ok)} of {len(rows)}"] + [f"- k={r['units']} D={r['devices']}: {r['status']}"
                                                     for r in rows if r.get("status") != "ok"]
    if not ok:
        return out
    split = [r for r in ok if r["devices"] > 1]
    out.append("- per-device influence bytes = total / D in every row: "
               + ("yes" if all(r["per_device_is_total_over_D"] for r in ok) else "NO"))
    out.append("- results equal the plain single-device learner (all rel. diffs <= 1e-5) in every row: "
               + ("yes" if all(r["matches_reference"] for r in ok) else "NO")
               + f" (largest: {max(max(r['rel_diff_' + x] for x in DIFFS) for r in ok):.1e}; parameters: max abs "
               f"diff {max(r['params_max_abs_diff'] for r in ok):.1e})")
    temps = [r["temp_bytes_x_D_over_1_device"] for r in split if "temp_bytes_x_D_over_1_device" in r]
    if temps:
        out.append(f"- compiled temp bytes × D ÷ the 1-device temp bytes: {min(temps):.2f} – {max(temps):.2f}")
    if split:
        worst = max(split, key=lambda r: r["largest_collective_over_influence_per_device"])
        out.append(f"- largest collective result: {worst['largest_collective_bytes']:,} bytes = "
                   f"{worst['largest_collective_over_influence_per_device']:.2g} × the influence on one device "
                   f"(k={worst['units']}, D={worst['devices']})")
    return out + [""]


def write(args, info, rows, t_start, command):
    out = {"note": NOTE, "command": command, "machine": info, "args": vars(args), "rows": rows,
           "wall_s": time.time() - t_start}
    write_json(args.out, out)
    write_md(args, info, rows, command)


def write_md(args, info, rows, command):
    """The ``.md`` next to ``args.out``: the command, the note, the table and the findings."""
    title = (f"### Exact RTRL, influence split over forced host devices (GRU, n_in {args.n_in}, B {args.batch}, "
             f"T {args.T}, float32)")
    legend = (f"{info['processor']}, {info['cpu_count']} cpus (shared), jax {info['jax_version']}, XLA_FLAGS "
              f"`{info['xla_flags']}`; median of {args.repeats} calls of T = {args.T} steps (per-step = call / T); "
              "÷ D=1: ratio of medians to the 1-device mesh of the same k in the same run.  Memory per device "
              "from the arrays' shards and from the compiled program's `memory_analysis()`; temp·D ÷ D=1: 1.00 "
              "when the compiled temporaries shrink as 1/D.  Collectives: static ops of the compiled program "
              "(those in the step loop run every step), largest result shape.  rel. diff: largest per-leaf "
              "max |a − b| / max |b| against the plain single-device learner after the first T steps "
              "(grad trace: the momentum trace Σ 0.9^(T−t) g_t).")
    md = [title, "", f"    {command}", "", f"**{NOTE}**", "", legend, "", table(rows), *summary(rows)]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(md))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="k ∈ {16, 32}, D ∈ {1, 2}, T = 2 (seconds)")
    ap.add_argument("--units", type=int, nargs="*", default=None, help="k values (default 128 256 512)")
    ap.add_argument("--devices", type=int, nargs="*", default=None, help="device counts (default 1 2 4 8)")
    ap.add_argument("--T", type=int, default=None, help="steps per call (default 4, quick 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n-in", dest="n_in", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 3, quick 2)")
    ap.add_argument("--axis-type", choices=sorted(AXIS_TYPES), default="explicit",
                    help="the mesh axis type (jax.make_mesh's default: explicit)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "scaling.json"))
    ap.add_argument("--render", action="store_true", help="no run: rewrite the .md from the JSON at --out")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.out) as f:
            saved = json.load(f)
        write_md(argparse.Namespace(**{**saved["args"], "out": args.out}), saved["machine"], saved["rows"],
                 saved["command"])
        return
    args.units = args.units or ([16, 32] if args.quick else [128, 256, 512])
    args.devices = args.devices or ([1, 2] if args.quick else [1, 2, 4, 8])
    args.T = args.T or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 3)
    for name in ("T", "batch", "n_in", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if jax.device_count() < max(args.devices) or min(args.devices) < 1:
        ap.error(f"--devices must be in 1..{jax.device_count()} (forced host devices), got {args.devices}")
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:]) \
        if argv is None else " ".join(["python", "benchmarks/scaling.py", *argv])
    info = machine_info()
    info.update(xla_flags=os.environ["XLA_FLAGS"], jax_platforms=os.environ["JAX_PLATFORMS"],
                devices=jax.device_count())
    print(f"# {NOTE}\n# {info['platform']} | jax {info['jax_version']} | {info['devices']} devices", flush=True)
    t_start, rows = time.time(), []
    for k in args.units:
        try:
            ref = reference(k, args)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            rows += [{"units": k, "devices": D, "status": f"reference failed: {type(e).__name__}: {e}"}
                     for D in args.devices]
            write(args, info, rows, t_start, command)
            continue
        group = []
        for D in args.devices:
            try:
                row = run_row(k, D, args, ref)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, not fatal
                row = {"units": k, "devices": D, "status": f"failed: {type(e).__name__}: {str(e)[:300]}",
                       "traceback": traceback.format_exc()[-2000:]}
            group.append(row)
            rows.append(row)
            gc.collect()
            base = next((r for r in group if r["devices"] == 1 and r.get("status") == "ok"), None)
            if base and row.get("status") == "ok":
                row["ratio_vs_1_device"] = row["step_s_median"] / base["step_s_median"]
                if row.get("memory") and base.get("memory") and base["memory"].get("temp_bytes"):
                    # 1.0: the compiled temporaries shrink exactly as 1/D
                    row["temp_bytes_x_D_over_1_device"] = D * row["memory"]["temp_bytes"] / base["memory"]["temp_bytes"]
            print(table([row]).splitlines()[-1], flush=True)
            write(args, info, rows, t_start, command)
        del ref
        gc.collect()
    write(args, info, rows, t_start, command)
    print(table(rows))
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md ({time.time() - t_start:.0f} s)")
    bad = [f"k={r['units']} D={r['devices']}: " + ", ".join(
        name for name in ("per_device_is_total_over_D", "matches_reference", "specs_kept") if not r[name])
        for r in rows if r.get("status") == "ok" and not all(
            r[name] for name in ("per_device_is_total_over_D", "matches_reference", "specs_kept"))]
    if bad:
        sys.exit("CHECK FAILED (results written): " + "; ".join(bad))


if __name__ == "__main__":
    main()
