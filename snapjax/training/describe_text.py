"""The text of a cost preview: the table ``str(learner.describe(...))`` prints, and the byte and
count formats it uses (:mod:`snapjax.training.describe` computes the figures).

Example::

    >>> from snapjax.training.describe_text import fmt_bytes, fmt_count
    >>> fmt_bytes(1536), fmt_bytes(13.6 * 2**30), fmt_count(1.5e9), fmt_count(None)
    ('1.5 KiB', '13.6 GiB', '1.5 G', '?')
"""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_bytes", "fmt_count", "table"]


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in binary units (``'?'`` for ``None``)."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"  # pragma: no cover


def fmt_count(n: float | None) -> str:
    """``n`` with a decimal suffix (k, M, G, T; ``'?'`` for ``None``)."""
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def table(cost: Any) -> str:
    """The text of a :class:`snapjax.training.describe.LearnerCost`."""
    head = ("layer", "cell", "method", "path", "state/example", "params", "FLOPs/step/example", "state traffic/step")
    rows = [head] + [
        (r.layer, r.cell, r.method, r.path, fmt_bytes(r.state_bytes) if r.path != "feed-forward" else "-",
         f"{r.params:,}", fmt_count(r.flops), fmt_bytes(r.traffic_bytes) if r.traffic_bytes is not None else "-")
        for r in cost.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    title = (f"OnlineLearner cost preview: batch {cost.batch_size}, input size {cost.input_size}, {cost.dtype}, "
             f"optimizer every {cost.period} step{'s' if cost.period > 1 else ''}")
    lines = [title]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    methods = sum(cost.batch_size * r.state_bytes + r.shared_bytes for r in cost.layers)
    lines.append(f"state (whole batch): {fmt_bytes(cost.state_bytes)}, of which method states {fmt_bytes(methods)}")
    limit = "unknown" if cost.limit_bytes is None else f"{fmt_bytes(cost.limit_bytes)} ({cost.limit_source})"
    verdict = "" if cost.limit_bytes is None else (" - fits" if cost.estimate_bytes <= cost.limit_bytes
                                                    else " - learner.init refuses it")
    lines.append(f"memory at least (checked at init): {fmt_bytes(cost.estimate_bytes)}; device limit: {limit}{verdict}")
    c = cost.compiled
    if c is not None:
        lines.append(f"XLA, compiled run of {c.steps} step{'s' if c.steps > 1 else ''} ({c.compile_seconds:.1f} s to "
                     f"compile): arguments {fmt_bytes(c.argument_bytes)}, outputs {fmt_bytes(c.output_bytes)}, "
                     f"donated {fmt_bytes(c.alias_bytes)}, temporaries {fmt_bytes(c.temp_bytes)}")
    lines += [f"warning: {n}" for n in cost.notes]
    return "\n".join(lines)
