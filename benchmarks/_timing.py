"""Shared timing helper for the benchmarks: warm-up, ``block_until_ready``, median of repeats."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax

from snapjax.engine import native
from _common import write_json


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Time ``fn(*args)`` (a jitted function): ``warmup`` untimed calls (compilation), then
    ``repeats`` timed calls, each ended with ``jax.block_until_ready``.  If ``min_time`` > 0,
    keep repeating until the timed calls add up to at least ``min_time`` seconds.

    Returns ``{"median_s", "min_s", "max_s", "times_s", "compile_s"}`` (``compile_s``: the
    first warm-up call, compilation included).
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "compile_s": compile_s,
    }


def round_robin(calls: dict[str, Callable[[], Any]], repeats: int, scale: float = 1.0) -> dict[str, list[float]]:
    """Time several jitted calls side by side: each zero-argument ``calls[name]`` runs once
    untimed (compilation), then ``repeats`` rounds call every one in turn (so a load drift hits
    all alike), each ended with ``jax.block_until_ready``.  Returns ``{name: [elapsed seconds ×
    scale per round]}`` (e.g. ``scale = 1e6 / T`` for µs per step of a ``T``-step call)."""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - t0) * scale)
    return times


def machine_info() -> dict:
    """Platform, JAX version and device description for result files."""
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(getattr(dev, "device_kind", dev)),
        "cpu_count": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "commit": git_commit(),
        "snapjax_native": native.status(),  # per-step SnAp-1's native CPU kernel, or why not
    }


def git_commit() -> str | None:
    """The repository's checked-out commit (short hash, ``+dirty`` with uncommitted changes to
    tracked files), or ``None`` outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def write_results(path: str, **payload: Any) -> str:
    """Write ``{"command": this process's command line, "machine": machine_info(), **payload}``
    as JSON to ``path`` with :func:`_common.write_json`; returns ``path``."""
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), **payload}
    return str(write_json(path, payload))
