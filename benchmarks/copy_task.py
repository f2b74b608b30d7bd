"""Copy task with curriculum: SnAp-1/2/3, RTRL, UORO and truncated BPTT, online, sparse GRUs.

Protocol (SnAp paper, after Mujika et al. 2018; see snapjax.data.copy_task):

* a batch of ``B`` random binary strings of length ``L`` is shown one bit per step, then a
  delimiter; the GRU must then reproduce the string (input: blank).  Inputs are one-hot over
  4 tokens, the read-out has 2 classes, the loss counts only on the ``L`` reproduction steps.
* every batch is a fresh set of sequences: the hidden state and the influence (or UORO /
  TBPTT state) are reset at each sequence start.
* online updates: one Adam step after every scored time step (TBPTT: one step per window).
* curriculum: ``L`` starts at 1 and grows by 1 when the mean loss of the last ``window``
  batches at the current ``L`` is below 0.15 bits per bit (``snapjax.data.curriculum_*``).
  The loss used is the online one (predictions made while learning).
* **tokens seen** = Σ over batches of ``B × (2L + 1)``: every input time step of every
  sequence, presentation, delimiter and reproduction (padding never counts).
* sparsity: every GRU kernel (input and recurrent) keeps a random fixed fraction ``density``
  of its entries (``make_masks``); biases and the read-out stay dense.

Outputs (``--out``, default ``benchmarks/out``, untracked; published runs: ``benchmarks/results``): ``copy_task_<mode>.json`` (config and
the full L-vs-tokens history of every run), ``.png`` (L vs tokens, one panel per density)
and ``.md`` (table).  Usage::

    python benchmarks/copy_task.py --quick          # ~1-2 min on 2 CPU cores (make demo)
    python benchmarks/copy_task.py                  # full: all methods, 3 densities, 3 seeds (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ChunkedLearner,
    check_methods,
    make_masks,
    markdown_table,
    mean_std,
    parse_list,
    plot_curves,
    run_sequence,
    write_json,
)

import jax  # noqa: E402
import optax  # noqa: E402

from snapjax.data.copy_task import (  # noqa: E402
    NUM_TOKENS,
    copy_task_batch,
    curriculum_init,
    curriculum_update,
)
from snapjax.methods import uses_window  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed, published runs (pass --out to rewrite)
OUT_DIR = Path(__file__).resolve().parent / "out"  # default output: untracked (.gitignore)


@dataclasses.dataclass
class CopyConfig:
    methods: tuple[str, ...] = ("snap1", "snap2", "snap3", "rtrl", "uoro", "tbptt")
    densities: tuple[float, ...] = (1.0, 0.25, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)
    units: int = 128
    batch_size: int = 16
    lr: float = 1e-2
    token_budget: int = 2_000_000
    time_budget_s: float = 3600.0  # per run, safety cap
    max_length: int = 128
    threshold_bits: float = 0.15
    window: int = 20
    tbptt_window: int = 16
    chunk: int = 16
    log_every: int = 10  # batches between history points (plus every change of L)
    mode: str = "full"

    def learner_options(self) -> dict[str, dict]:
        """Extra ``OnlineLearner`` keyword arguments per method name (configuration, looked up
        by name; no method needs code of its own)."""
        return {m: {"tbptt_window": self.tbptt_window} for m in self.methods if uses_window(m)}


QUICK = dict(
    methods=("snap1", "snap2", "rtrl", "uoro", "tbptt"),
    densities=(0.25,),
    seeds=(0,),
    units=32,
    batch_size=8,
    lr=1e-2,
    token_budget=50_000,
    time_budget_s=75.0,
    max_length=64,
    window=10,
    tbptt_window=8,
    chunk=8,
    log_every=5,
    mode="quick",
)


def train_copy(method: str, density: float, seed: int, cfg: CopyConfig, progress: bool = True) -> dict:
    """Train one (method, density, seed) run; returns a JSON-able record."""
    key = jax.random.key(seed)
    k_init, k_data = jax.random.split(key)
    masks = make_masks(seed, cfg.units, NUM_TOKENS, density)
    trainer = ChunkedLearner(
        cfg.units, NUM_TOKENS, 2, method, optax.adam(cfg.lr), masks=masks, chunk=cfg.chunk,
        **cfg.learner_options().get(method, {}),
    )
    ts = trainer.init(k_init, cfg.batch_size)
    cur = curriculum_init(1, cfg.threshold_bits, cfg.window, max_length=cfg.max_length)

    label = trainer.label
    hist = {"tokens": [0], "L": [1], "loss_bits": [float("nan")], "time_s": [0.0]}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.token_budget, desc=f"{label:8s} d={density:g} s={seed}", unit="tok",
                   unit_scale=True, leave=True, dynamic_ncols=True, mininterval=0.5)
    tokens, batches, t0 = 0, 0, time.perf_counter()
    compile_s = None
    recent: list[float] = []
    L = 1
    while tokens < cfg.token_budget and time.perf_counter() - t0 < cfg.time_budget_s:
        k_data, kb = jax.random.split(k_data)
        batch = copy_task_batch(kb, cfg.batch_size, L, max_length=cfg.max_length)
        T = 2 * L + 1
        inputs, targets, mask = (np.asarray(a)[:T] for a in batch)
        ts = trainer.reset(ts)
        ts, ce = run_sequence(trainer, ts, inputs, targets, mask)
        bits = float(np.sum(ce * mask) / max(mask.sum(), 1.0) / math.log(2.0))
        if not np.isfinite(bits):
            raise FloatingPointError(f"{label}: non-finite loss at L={L}, tokens={tokens}")
        if compile_s is None:
            compile_s = time.perf_counter() - t0
        cur = curriculum_update(cur, bits)
        tokens += cfg.batch_size * T
        batches += 1
        recent = (recent + [bits])[-cfg.window:]
        new_L = int(cur.length)
        if new_L != L or batches % cfg.log_every == 0:
            hist["tokens"].append(tokens)
            hist["L"].append(new_L)
            hist["loss_bits"].append(float(np.mean(recent)))
            hist["time_s"].append(time.perf_counter() - t0)
        if new_L != L:
            recent = []
        L = new_L
        if bar is not None:
            bar.update(min(cfg.batch_size * T, cfg.token_budget - bar.n))
            bar.set_postfix(L=L, loss=f"{bits:.3f}", refresh=False)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if hist["tokens"][-1] != tokens:
        hist["tokens"].append(tokens)
        hist["L"].append(L)
        hist["loss_bits"].append(float(np.mean(recent)) if recent else float("nan"))
        hist["time_s"].append(wall)
    return {
        "method": method,
        "label": label,
        "density": density,
        "seed": seed,
        "final_L": L,
        "tokens": tokens,
        "batches": batches,
        "updates": int(ts.updates),
        "wall_s": wall,
        "compile_s": compile_s,
        "hit_time_cap": tokens < cfg.token_budget,
        "tokens_per_s": tokens / max(wall - (compile_s or 0.0), 1e-9),
        "influence_floats_per_example": trainer.influence_floats(),
        "history": hist,
    }


def tokens_to_reach(run: dict, level: int) -> float:
    for tok, L in zip(run["history"]["tokens"], run["history"]["L"]):
        if L >= level:
            return float(tok)
    return float("nan")


def summarize(runs: list[dict], cfg: CopyConfig) -> tuple[list[str], list[list]]:
    milestones = [m for m in (3, 5, 10, 20, 40) if m <= cfg.max_length]
    headers = ["method", "density", "seeds", "final L (tokens budget)"]
    headers += [f"tokens to L={m}" for m in milestones]
    headers += ["state floats/example", "µs/token", "wall s"]
    rows = []
    for d in sorted({r["density"] for r in runs}, reverse=True):
        for m in cfg.methods:
            rs = [r for r in runs if r["method"] == m and r["density"] == d]
            if not rs:
                continue
            capped = " *" if any(r["hit_time_cap"] for r in rs) else ""
            row = [rs[0]["label"], f"{d:g}", len(rs), mean_std([r["final_L"] for r in rs]) + capped]
            for ms in milestones:
                vals = [tokens_to_reach(r, ms) for r in rs]
                reached = [v for v in vals if np.isfinite(v)]
                row.append(f"{np.mean(reached):,.0f} ({len(reached)}/{len(rs)})" if reached else "—")
            row.append(rs[0]["influence_floats_per_example"])
            row.append(f"{1e6 / np.mean([r['tokens_per_s'] for r in rs]):.0f}")
            row.append(f"{np.mean([r['wall_s'] for r in rs]):.0f}")
            rows.append(row)
    return headers, rows


def main(argv=None, cfg: CopyConfig | None = None, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU run (SnAp-1/2, RTRL, UORO, TBPTT; density 0.25; 1 seed)")
    p.add_argument("--methods", type=str, default=None,
                   help="comma list of method names for snapjax.online_method (default: "
                        f"{','.join(CopyConfig.methods)}; --quick: {','.join(QUICK['methods'])})")
    p.add_argument("--densities", type=str, default=None)
    p.add_argument("--seeds", type=str, default=None)
    p.add_argument("--units", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--tokens", type=int, default=None, help="token budget per run")
    p.add_argument("--time-budget", type=float, default=None, help="wall-clock cap per run (s)")
    p.add_argument("--tbptt-window", type=int, default=None)
    p.add_argument("--out", type=str, default=None,
                   help="output directory (default benchmarks/out; the published runs are in benchmarks/results)")
    p.add_argument("--tag", type=str, default=None, help="output name suffix (default quick/full)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if cfg is None:
        cfg = CopyConfig(**QUICK) if args.quick else CopyConfig()
        over = dict(
            methods=args.methods and tuple(parse_list(args.methods)),
            densities=args.densities and tuple(parse_list(args.densities, float)),
            seeds=args.seeds and tuple(parse_list(args.seeds, int)),
            units=args.units, batch_size=args.batch_size, lr=args.lr, token_budget=args.tokens,
            time_budget_s=args.time_budget, tbptt_window=args.tbptt_window,
        )
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    try:
        check_methods(cfg.methods)
    except ValueError as err:
        p.error(str(err))
    out = Path(out_dir or args.out or OUT_DIR)
    tag = args.tag or cfg.mode
    progress = progress and not args.no_progress

    print(f"copy task [{tag}] GRU units={cfg.units} B={cfg.batch_size} methods={','.join(cfg.methods)} "
          f"densities={cfg.densities} seeds={cfg.seeds} budget={cfg.token_budget:,} tokens/run "
          f"(jax {jax.__version__}, {jax.devices()[0].platform})", flush=True)
    t_all = time.perf_counter()
    runs = []
    for d in cfg.densities:
        for seed in cfg.seeds:
            for m in cfg.methods:
                runs.append(train_copy(m, d, seed, cfg, progress=progress))
    total = time.perf_counter() - t_all

    headers, rows = summarize(runs, cfg)
    table = markdown_table(headers, rows)
    png = plot_curves(out / f"copy_task_{tag}.png", runs, "tokens", "L", "tokens seen",
                      "curriculum length L", "Copy task", step=True)
    md = (f"### Copy task ({tag})\n\nGRU {cfg.units} units, batch {cfg.batch_size}, Adam lr {cfg.lr:g}, "
          f"online updates every scored step (TBPTT: every {cfg.tbptt_window} steps), "
          f"budget {cfg.token_budget:,} tokens per run (cap {cfg.time_budget_s:g} s), curriculum threshold "
          f"{cfg.threshold_bits} bits over {cfg.window} batches. Tokens = B × (2L+1) per batch. "
          f"`*` = a run stopped at the time cap before the token budget. µs/token excludes compilation. "
          f"Total wall time {total:.0f} s on {jax.devices()[0].platform}.\n\n" + table
          + f"\n![copy task]({png.name})\n")
    (out / f"copy_task_{tag}.md").write_text(md)
    js = write_json(out / f"copy_task_{tag}.json", {
        "config": dataclasses.asdict(cfg), "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "total_wall_s": total, "runs": runs,
    })
    print()
    print(table)
    print(f"plot:  {png}\njson:  {js}\ntable: {out / f'copy_task_{tag}.md'}")
    return {"runs": runs, "table": table, "png": png, "json": js, "md": out / f"copy_task_{tag}.md"}


if __name__ == "__main__":
    main()
