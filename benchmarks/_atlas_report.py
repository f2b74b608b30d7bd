"""Atlas section 4 and outputs: the SnAp paper's three claims checked on the data, the atlas table,
and the plots.

Every claim is decided from differences of means with a ±2 standard-error interval (``diff``:
``SE = sqrt(s_a²/n_a + s_b²/n_b)``, seeds as samples; for gradient cosines the blocks of the
trajectory are the samples — correlated in time, so that interval is optimistic):

* (a) *SnAp-1 clearly beats UORO at comparable cost*: held if SnAp-1's final copy length or final
  validation bits per character is better with the interval excluding 0 and neither is worse so;
  not held if either is worse so; else inconclusive.  The gradient cosines and the cost ratio
  (``× BPTT`` of SnAp-1 over UORO's at each k) are reported beside it.
* (b) *at ≥ 75 % sparsity SnAp-2 online learns faster per token than truncated BPTT*: per density
  ≤ 0.25 and per windowed rule (every rule declaring a window), the copy length reached at the
  same number of tokens ``N`` (the fewest tokens any compared run saw), SnAp-2 minus the other;
  held if every interval is above 0, not held if one is below, else inconclusive.
* (c) *SnAp-n approaches RTRL as n grows*: at each (k, density), the per-block cosine of SnAp-(n+1)
  minus SnAp-n; held if every step up in n raises the cosine (interval above 0) or the lower
  order is already exact (cosine ≥ 1 − 1e-6); not held if one lowers it; else inconclusive.

Example::

    >>> diff([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])["low"] > 0
    True
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import _atlas_learning as AL
import numpy as np
from _common import markdown_table

import snapjax as sj
from snapjax.methods import uses_window


def diff(a: list[float], b: list[float]) -> dict:
    """Mean of ``a`` minus mean of ``b`` with ±2 standard errors (no interval, ``nan``, unless both
    have at least 2 samples)."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    nan = float("nan")
    if a_.size == 0 or b_.size == 0:
        return {"diff": nan, "low": nan, "high": nan, "n": [int(a_.size), int(b_.size)]}
    d = float(a_.mean() - b_.mean())
    if a_.size < 2 or b_.size < 2:  # no spread to estimate: no interval
        return {"diff": d, "low": nan, "high": nan, "n": [int(a_.size), int(b_.size)]}
    se = np.sqrt(a_.var(ddof=1) / a_.size + b_.var(ddof=1) / b_.size)
    return {"diff": d, "low": d - 2 * float(se), "high": d + 2 * float(se), "n": [int(a_.size), int(b_.size)]}


def _sign(d: dict) -> int:
    """+1 interval above 0, −1 below, 0 contains it (or no interval)."""
    if not np.isfinite(d["low"]):
        return 0
    return 1 if d["low"] > 0 else (-1 if d["high"] < 0 else 0)


def _verdict(signs: list[int], need_all: bool, data: bool = True) -> str:
    if not signs or not data:
        return "inconclusive (no data)"
    if any(s < 0 for s in signs):
        return "not held"
    if (all(s > 0 for s in signs) if need_all else any(s > 0 for s in signs)):
        return "held"
    return "inconclusive"


def _ok(runs: list[dict], name: str, density: float | None = None) -> list[dict]:
    return [r for r in runs if r["method"] == name and "error" not in r and (density is None or r["density"] == density)]


def claims(data: dict, p: Any, stochastic_ref: str = "uoro") -> dict:
    """The three claims (module docstring) from the atlas ``data``; SnAp-n is the registry's
    ordered entry, ``stochastic_ref`` the rule of claim (a)."""
    ordered = next(e.name for e in sj.registered_methods().values() if e.ordered)
    q, cost = data.get("quality", []), data.get("cost", {}).get("rows", [])
    copy, char = data.get("learning", {}).get("copy", []), data.get("learning", {}).get("char", [])
    s1, s2 = f"{ordered}1", f"{ordered}2"
    out = {}
    # (a)
    dl = diff([r["final_L"] for r in _ok(copy, s1, 1.0)], [r["final_L"] for r in _ok(copy, stochastic_ref, 1.0)])
    db = diff([-r["final_val_bpc"] for r in _ok(char, s1)], [-r["final_val_bpc"] for r in _ok(char, stochastic_ref)])
    cos = {r["rule"]: r for r in q if r.get("density") == 1.0 and "cos" in r and r["k"] == max(p.quality_ks)}
    ratio = {}
    for k in p.cost_ks:
        t = {r["method"]: r["us_per_step"] for r in cost if r["k"] == k and "us_per_step" in r}
        if s1 in t and stochastic_ref in t:
            ratio[k] = t[s1] / t[stochastic_ref]
    out["a"] = {"claim": "SnAp-1 clearly beats UORO at comparable cost",
                "copy_final_L_diff": dl, "char_bpc_gain": db, "verdict": _verdict([_sign(dl), _sign(db)], False, bool(np.isfinite(dl["diff"]) or np.isfinite(db["diff"]))),
                "cos": {n: cos[n]["cos"] for n in (s1, stochastic_ref) if n in cos},
                "cost_ratio_snap1_over_uoro": ratio}
    # (b)
    windowed = [n for n in {r["method"] for r in copy} if uses_window(n)]
    comps, signs = [], []
    for d in sorted({d for d in p.sparse_copy_densities + p.copy_densities if d <= 0.25}, reverse=True):
        a = _ok(copy, s2, d)
        for w in sorted(windowed):
            b = _ok(copy, w, d)
            if not a or not b:
                continue
            N = min(r["tokens"] for r in a + b)
            c = diff([AL.L_at(r, N) for r in a], [AL.L_at(r, N) for r in b])
            comps.append({"density": d, "versus": w, "tokens": N, **c})
            signs.append(_sign(c))
    out["b"] = {"claim": "at >= 75% sparsity SnAp-2 (online) learns faster per token than truncated BPTT",
                "comparisons": comps, "verdict": _verdict(signs, True)}
    # (c)
    comps, signs = [], []
    for k in p.quality_ks:
        for d in p.quality_densities:
            rows = {r["built"]: r for r in q if r.get("k") == k and r.get("density") == d and "cos" in r}
            orders = sorted(int(b[len(ordered):]) for b in rows if b.startswith(ordered) and b[len(ordered):].isdigit())
            for lo, hi in itertools.pairwise(orders):
                ra, rb = rows[f"{ordered}{lo}"], rows[f"{ordered}{hi}"]
                c = diff(rb["cos_blocks"], ra["cos_blocks"]) if len(rb["cos_blocks"]) > 1 else diff([rb["cos"]], [ra["cos"]])
                exact = ra["cos"] >= 1 - 1e-6
                comps.append({"k": k, "density": d, "from": lo, "to": hi, "cos_from": ra["cos"], "cos_to": rb["cos"],
                              "err_from": ra["err"], "err_to": rb["err"], "already_exact": exact, **c})
                signs.append(1 if exact and rb["cos"] >= 1 - 1e-6 else _sign(c))
    out["c"] = {"claim": "SnAp-n approaches RTRL as n grows", "comparisons": comps, "verdict": _verdict(signs, True)}
    return out


# --------------------------------------------------------------------------- table
def _pm(s: dict | None, key: str, fmt: str = "{:.3g}") -> str:
    if not s:
        return "—"
    if "error" in s:
        return "failed"
    v = s[key]
    txt = fmt.format(v["mean"]) + (f" ± {fmt.format(v['std'])}" if v["n"] > 1 else "")
    return txt + (" *" if s.get("hit_time_cap") else "")


def atlas_rows(data: dict, p: Any) -> list[list]:
    """One row per rule (module ``atlas.py`` docstring for the columns)."""
    k_q = max(p.quality_ks)
    k_c = sorted(p.cost_ks)[len(p.cost_ks) // 2]
    rows_c = data.get("cost", {}).get("rows", [])
    cost = {r["method"]: r for r in rows_c if r["k"] == k_c}
    timed = {}  # a rule skipped at k_c: its time at the largest smaller k where it ran
    for r in sorted(rows_c, key=lambda r: r["k"]):
        if "x_bptt" in r and r["k"] <= k_c:
            timed[r["method"]] = r
    q = {r["rule"]: r for r in data.get("quality", []) if r.get("k") == k_q and r.get("density") == 1.0 and "cos" in r}
    learn = data.get("learning", {})
    rows = []
    for rule in data["rules"]:
        name = rule["rule"]
        built = rule.get("built") or name
        label = f"`{name}`" + ("" if built == name else f" ({built})")
        if rule["status"] != "run":
            rows.append([name, rule["why"], "", "", "", "", "", ""])
            continue
        qr, cr = q.get(name), cost.get(name)
        kind = "—"
        if qr:
            kind = qr["kind"] + (f" (bias {qr['bias']:.2g} ≤ 2× floor {qr['noise_floor']:.2g})" if qr["kind"] == "unbiased"
                                 else f" (bias {qr['bias']:.2g}, floor {qr['noise_floor']:.2g})" if qr["stochastic"] else "")
        xb = "—" if cr is None else (f"{cr['x_bptt']:.2f}" if "x_bptt" in cr else f"skipped ({cr['skipped'][:40]})")
        if cr is not None and "x_bptt" not in cr and name in timed:
            xb += f"; {timed[name]['x_bptt']:.2f} at k={timed[name]['k']}"
        mem = "—" if cr is None or "stored_per_example" not in cr else f"{cr['bytes_per_example'] / 1024:.1f} KiB"
        cos = "—" if qr is None else f"{qr['cos']:.4f}" + (f" (mean of seeds {qr['cos_mean']:.3f})" if qr["stochastic"] else "")
        copy = AL.summarize_copy(learn.get("copy", []), name, 1.0) if learn else None
        char = AL.summarize_char(learn.get("char", []), name) if learn else None
        rows.append([label, kind, xb, mem, cos, _pm(copy, "final_L", "{:.3g}"), _pm(char, "final_val_bpc")])
    return rows


def markdown(data: dict, p: Any) -> str:
    k_q = max(p.quality_ks)
    k_c = sorted(p.cost_ks)[len(p.cost_ks) // 2]
    head = [f"# Atlas of online rules ({p.name})", "", f"`{data['command']}`", "",
            (f"Machine: {data['machine'].get('processor')} ({data['machine'].get('sched_cpus')} CPUs), "
             f"jax {data['machine'].get('jax_version')}, {data['machine'].get('backend')}, commit "
             f"{data['machine'].get('commit')}. Wall time {data.get('wall_s', float('nan')):.0f} s. "
             f"Sections: {', '.join(data['sections'])}."), ""]
    here = {"command": data["command"], "commit": data["machine"].get("commit")}
    for section, src in data.get("section_sources", {}).items():
        if src != here:  # reused by --resume from an earlier run
            head += [f"Section **{section}** comes from an earlier run: `{src.get('command')}` at commit "
                     f"{src.get('commit') or 'unrecorded'}.", ""]
    cols = ["rule", "gradient (measured)", f"× BPTT (k={k_c})", f"state/example (k={k_c})",
            f"cosine to RTRL (k={k_q}, median)", "copy final L", "char LM val bpc"]
    rows = [r if len(r) == len(cols) else r[:2] + [""] * (len(cols) - 2) for r in atlas_rows(data, p)]
    body = [markdown_table(cols, rows),
            (f"`*` a run stopped at its time cap (tokens/characters seen below the budget). Copy: GRU {p.copy_units}, "
             f"{p.copy_tokens:,} tokens or {p.copy_time_s:g} s per run; char LM: GRU {p.char_units}, "
             f"{p.char_chars:,} characters or {p.char_time_s:g} s per run; mean ± std over seeds {list(p.seeds)}."), ""]
    lc = data.get("learning", {})
    if lc:
        lines = []
        for r in data["rules"]:
            if r["status"] != "run":
                continue
            for d in sorted({x["density"] for x in lc["copy"] if x["method"] == r["rule"]}, reverse=True):
                s = AL.summarize_copy(lc["copy"], r["rule"], d)
                if s and "error" not in s:
                    lines.append([r["rule"], f"{d:g}", _pm(s, "final_L")] + [
                        (f"{s[f'tokens_to_L{L}']['mean']:,.0f} ({s[f'tokens_to_L{L}']['reached']}/{len(p.seeds)})"
                         if s[f"tokens_to_L{L}"]["n"] else "—") for L in (5, 10, 20)] + [_pm(s, "tokens", "{:,.0f}")])
        body += ["## Copy task", "", markdown_table(["rule", "density", "final L", "tokens to L=5", "tokens to L=10",
                                                     "tokens to L=20", "tokens seen"], lines)]
        lines = []
        for r in data["rules"]:
            s = AL.summarize_char(lc["char"], r["rule"]) if r["status"] == "run" else None
            if s and "error" not in s:
                lines.append([r["rule"], _pm(s, "final_val_bpc"), _pm(s, "best_val_bpc"), _pm(s, "chars", "{:,.0f}"),
                              f"{s['us_per_char']:.0f}"])
        body += ["## Character LM", "", markdown_table(["rule", "val bpc (final)", "val bpc (best)", "chars seen",
                                                        "µs/char"], lines)]
    if "claims" in data:
        body += ["## The SnAp paper's claims at this scale", ""]
        for key, c in data["claims"].items():
            body += [f"**({key}) {c['claim']}: {c['verdict']}.**", "", "```", _claim_text(c), "```", ""]
    return "\n".join(head + body) + "\n"


def _claim_text(c: dict) -> str:
    lines = []
    for k, v in c.items():
        if k in ("claim", "verdict"):
            continue
        if isinstance(v, list):
            lines += [f"{k}:"] + [f"  {_fmt(x)}" for x in v]
        else:
            lines.append(f"{k}: {_fmt(v)}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------- plots
def plots(data: dict, p: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    k_q = max(p.quality_ks)
    cost = {r["method"]: r for r in data.get("cost", {}).get("rows", []) if "x_bptt" in r and r["k"] == min(p.cost_ks)}
    q = [r for r in data.get("quality", []) if r.get("k") == k_q and "cos" in r]
    if q:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        dense = [r for r in q if r["density"] == 1.0]
        for r in dense:  # cost was measured on the dense GRU
            x = cost[r["rule"]]["x_bptt"] if r["rule"] in cost else float("nan")
            axes[0].scatter([x], [r["cos"]], color="C0")
            axes[0].annotate(r["rule"], (x, r["cos"]), fontsize=7)
        for i, d in enumerate(sorted({r["density"] for r in q}, reverse=True)):
            pts = [r for r in q if r["density"] == d]
            axes[1].scatter([r["stored_per_example"] for r in pts], [r["cos"] for r in pts], color=f"C{i}",
                            label=f"density {d:g}")
            for r in pts:
                axes[1].annotate(r["rule"], (r["stored_per_example"], r["cos"]), fontsize=7)
        axes[0].set_xlabel(f"× BPTT per step (k={min(p.cost_ks)}, dense)")
        axes[1].set_xlabel("method state, floats per example")
        for ax in axes:
            xs = [x for c in ax.collections for x, _ in c.get_offsets() if x > 0]
            if xs:  # a log axis needs positive data (no cost section: the left panel is empty)
                ax.set_xscale("log")
            else:
                ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
            ax.set_ylabel(f"median cosine to RTRL (k={k_q})")
            ax.grid(alpha=0.3)
        axes[1].legend()
        fig.tight_layout()
        paths.append(out / f"atlas_{p.name}_quality.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    lc = data.get("learning")
    if lc and (lc["copy"] or lc["char"]):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for i, r in enumerate(x for x in data["rules"] if x["status"] == "run"):
            col = f"C{i % 10}"
            for j, run in enumerate(x for x in lc["copy"] if x["method"] == r["rule"] and x["density"] == 1.0
                                    and "error" not in x):
                axes[0].step(run["history"]["tokens"], run["history"]["L"], where="post", color=col, alpha=0.7,
                             label=r["rule"] if j == 0 else None)
            for j, run in enumerate(x for x in lc["char"] if x["method"] == r["rule"] and "error" not in x):
                h = run["history"]
                axes[1].plot(h["chars"], h["val_bpc"], color=col, alpha=0.7, label=r["rule"] if j == 0 else None)
                axes[2].plot(h["time_s"], h["val_bpc"], color=col, alpha=0.7)
        for ax, xl, yl in zip(axes, ["tokens seen", "characters seen", "wall-clock s"],
                              ["copy length L", "validation bits/char", "validation bits/char"]):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"atlas_{p.name}_learning.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
