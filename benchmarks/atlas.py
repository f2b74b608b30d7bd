"""The atlas of every online rule: gradient quality, cost and learning, and the SnAp paper's claims.

One command measures every method of :func:`snapjax.registered_methods` (an ordered entry once
per order: SnAp-1, 2, 3) with no code of its own per method:

1. **gradient quality** (``_atlas_quality``): cosine and relative error of each rule's gradient
   against exact RTRL's along one fixed training trajectory of a GRU on copy-task inputs; bias,
   variance and noise floor over many seeds for the stochastic rules; sparse networks for SnAp-n;
2. **cost** (``_atlas_learning.run_cost``, ``roofline.measure``): µs per step, × BPTT, bytes of
   method state per example, at several sizes;
3. **learning** (``_atlas_learning.run_learning``): the curriculum copy task and the Shakespeare
   character LM, every rule updating every step, several seeds;
4. **claims** (``_atlas_report.claims``): SnAp-1 vs UORO; SnAp-2 vs truncated BPTT at ≥ 75 %
   sparsity; SnAp-n → RTRL, each with a ±2 SE interval and a verdict.

Rules that build the same method as an earlier one (``drtrl`` is SnAp-1, ``ostl`` is RTRL on one
layer) are reported "same as" and not rerun; a rule whose builder refuses a GRU is reported "n/a".
The gradient column of the table is *measured*: ``exact`` (median cosine ≥ 1 − 1e-5), ``unbiased``
(a stochastic rule whose bias is within 2× its noise floor) or ``biased``.

Outputs in ``--out`` (default ``benchmarks/out``, untracked): ``atlas_<preset>.json`` (command,
machine, preset, every row), ``atlas_<preset>.md`` (the table and the claims),
``atlas_<preset>_quality.png`` (cosine vs cost) and ``atlas_<preset>_learning.png``.  Each section
is saved to ``atlas_<preset>.partial.json`` as it finishes (removed at the end), so ``--resume``
reruns only what an interrupted run had not finished.  Usage::

    python benchmarks/atlas.py --tiny                                  # seconds (the test)
    python benchmarks/atlas.py --medium --out benchmarks/results/      # ~2 h on 2 CPU cores
    python benchmarks/atlas.py --full                                  # an accelerator
    python benchmarks/atlas.py --medium --methods snap1,uoro --sections quality,cost

Example::

    >>> parse_args(["--tiny", "--methods", "rtrl,snap1"]).methods
    'rtrl,snap1'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a clean clone, without an install
import _atlas_learning as AL
import _atlas_quality as AQ
import _atlas_report as AR
import _atlas_rules as R
from _common import write_json
from _timing import machine_info

from snapjax.data.copy_task import NUM_TOKENS

OUT_DIR = Path(__file__).resolve().parent / "out"
SECTIONS = ("quality", "cost", "learning")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    for name in R.PRESETS:
        g.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=f"the {name} preset")
    g.add_argument("--preset", dest="preset", help=f"one of {list(R.PRESETS)}")
    ap.add_argument("--methods", default=None, help="comma list of rules (default: every registered method)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    ap.add_argument("--out", default=str(OUT_DIR), help="output directory (default benchmarks/out)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the sections already saved in <out>/atlas_<preset>.partial.json by an interrupted "
                         "run of the same preset and rules (each section is saved there as it finishes)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.preset = args.preset or "tiny"
    return args


def run(argv: list[str] | None = None, corpus=None) -> dict:
    """Run the atlas for command-line ``argv``; returns the data written to the JSON.

    Raises:
      ValueError: an unknown preset, section or rule name (the library's message).
    """
    args = parse_args(argv)
    p = R.preset(args.preset)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise ValueError(f"unknown section(s) {bad}; sections are {list(SECTIONS)}")
    names = R.check_rules([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
                          else R.expand_rules(p.orders))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/atlas.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    rules = R.classify_rules(names, p, max(p.quality_ks), NUM_TOKENS)
    for r in rules:
        if r["status"] != "run":
            log(f"{r['rule']}: {r['why']}")
    data: dict = {"command": command, "preset": p.describe(), "machine": machine_info(), "sections": sections,
                  "rules": rules}
    partial = out / f"atlas_{p.name}.partial.json"
    saved = _resumable(partial, data) if args.resume else {}
    timings = dict(saved.get("section_wall_s", {}))
    runners = {"quality": lambda: AQ.run_quality(rules, p, log), "cost": lambda: AL.run_cost(rules, p, log),
               "learning": lambda: AL.run_learning(rules, p, log, corpus=corpus)}
    here = {"command": command, "commit": data["machine"].get("commit")}
    sources = {}  # section -> the run that measured it (an earlier one for a reused section)
    for section in sections:
        if section in saved:
            data[section] = saved[section]
            sources[section] = saved["section_sources"].get(section, {})
            log(f"{section}: reused from {partial}")
            continue
        t = time.perf_counter()
        data[section] = runners[section]()
        timings[section] = time.perf_counter() - t
        sources[section] = here
        write_json(partial, data | {"section_wall_s": timings, "section_sources": sources})
    data["section_sources"] = sources
    data["claims"] = AR.claims(data, p)
    data["section_wall_s"] = timings
    data["wall_s"] = time.perf_counter() - t0
    data["files"] = {"json": f"atlas_{p.name}.json", "md": f"atlas_{p.name}.md"}
    data["files"]["plots"] = [q.name for q in AR.plots(data, p, out)]
    (out / f"atlas_{p.name}.md").write_text(AR.markdown(data, p))
    write_json(out / f"atlas_{p.name}.json", data)
    partial.unlink(missing_ok=True)
    for key, c in data["claims"].items():
        log(f"claim ({key}) {c['claim']}: {c['verdict']}")
    log(f"wrote {out / data['files']['json']}, {data['files']['md']}, {', '.join(data['files']['plots'])} "
        f"in {data['wall_s']:.0f} s")
    return data


def _resumable(partial: Path, data: dict) -> dict:
    """The sections saved in ``partial`` if it was written by a run of the same preset and rules."""
    if not partial.exists():
        return {}
    saved = json.loads(partial.read_text())
    now = json.loads(json.dumps({"preset": data["preset"], "rules": data["rules"]}))  # tuples as JSON lists
    if saved.get("preset") != now["preset"] or saved.get("rules") != now["rules"]:
        raise ValueError(f"{partial} was written by a run with another preset or other rules; "
                         "remove it or run without --resume")
    out = {k: v for k, v in saved.items() if k in SECTIONS or k == "section_wall_s"}
    earlier = {"command": saved.get("command"), "commit": saved.get("machine", {}).get("commit")}
    out["section_sources"] = {k: saved.get("section_sources", {}).get(k, earlier) for k in SECTIONS}
    return out


if __name__ == "__main__":
    run()
