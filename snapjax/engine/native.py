"""A native CPU kernel for per-step SnAp-1: the diagonal influence update and the online
gradient's batch sum in one pass over the influence.

Per step and per diagonal leaf (SnAp-1 of a vanilla, GRU or user ``CellSpec`` cell, and of
two-component cells as complex pairs: LSTM, and the LRU's exact RTRL; ``J (B, L, U)``, ``L`` the
kernel's input rows, 1 for biases and unit parameters)::

    J_t[b, l, u] = D[b, u] · J_{t-1}[b, l, u] + V[b, l] · G[b, u]      (in place)
    g_t[l, u]    = acc[l, u] + Σ_b C[b, u] · J_t[b, l, u]              (C = ∂L_t/∂s_t)

(pairs: ``D`` a 2×2 block per unit, then the SnAp pattern).  XLA:CPU emits the update and the sum
as two loops (it has no multi-output fusion), so a learner that asks for the gradient every step
reads ``J`` twice: ``12·B·p`` bytes per step instead of ``8·B·p``.  ``native_diag.cc`` (an XLA
FFI handler next to this file) updates and sums each block of rows of every example while it is
in L1, all leaves of a step in one call, on the threads of XLA's intra-op pool, and adds the
running gradient ``acc`` in the same pass.  The products are XLA's and the sum over ``b`` runs in
the same order (pairs: each component's sum, then the two); the float64 tests hold it to the XLA
path at 1e-12.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) against the FFI headers jaxlib ships, into ``$SNAPJAX_NATIVE_CACHE``
(default ``~/.cache/snapjax/native``), keyed by the source, the flags, the jaxlib version and the
CPU.  Without a compiler, on other operating systems, or with ``SNAPJAX_NATIVE=0``,
:func:`available` is ``False`` and every path is XLA's (same values); a failed build warns once.
Only CPU uses it: :func:`diag_update_and_sum` chooses per platform with
:func:`jax.lax.platform_dependent`, so a GPU/TPU program lowers the XLA form, where the update and
the sum fuse.

Example (the kernel's result equals the two XLA passes it replaces)::

    >>> import jax, jax.numpy as jnp
    >>> from snapjax.engine import native
    >>> J, D, V, G, C = (jax.random.normal(jax.random.key(i), s) for i, s in
    ...                  enumerate([(3, 5, 4), (3, 4), (3, 5), (3, 4), (3, 4)]))
    >>> [(J1, g)] = native.diag_update_and_sum(D, C, [(J, V, G, jnp.zeros((5, 4)))])
    >>> Jr = D[:, None] * J + V[..., None] * G[:, None]
    >>> bool(jnp.allclose(J1, Jr, atol=1e-6) and jnp.allclose(g, (C[:, None] * Jr).sum(0), atol=1e-5))
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from snapjax.engine.propagation import apply_pattern, contract_leaves, decompress_kernels

Array = jax.Array
PyTree = Any

__all__ = ["available", "status", "diag_update_and_sum", "update_and_gradient"]

_SOURCE = Path(__file__).with_name("native_diag.cc")
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {  # (real dtype, complex pairs) -> (FFI target, symbol in the library)
    (jnp.dtype(jnp.float32), False): ("snapjax_diag_update_f32", "SnapjaxDiagUpdateF32"),
    (jnp.dtype(jnp.float64), False): ("snapjax_diag_update_f64", "SnapjaxDiagUpdateF64"),
    (jnp.dtype(jnp.float32), True): ("snapjax_pair_update_f32", "SnapjaxPairUpdateF32"),
    (jnp.dtype(jnp.float64), True): ("snapjax_pair_update_f64", "SnapjaxPairUpdateF64"),
}


def _cache_dir() -> Path:
    base = os.environ.get("SNAPJAX_NATIVE_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snapjax" / "native"


def _cpu_key() -> str:
    try:  # the flags line: -march=native code is only reused on a CPU with the same features
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() + platform.machine()


@functools.cache
def _load() -> tuple[bool, str]:
    """Compile (once per machine) and register the kernel; ``(ok, library path or why not)``."""
    if os.environ.get("SNAPJAX_NATIVE", "1") == "0":
        return False, "disabled by SNAPJAX_NATIVE=0"
    if sys.platform not in ("linux", "darwin"):
        return False, f"not built on {sys.platform}"
    compiler = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        return False, "no C++ compiler found (set CXX)"
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join(s.encode() for s in (
        _SOURCE.read_text(), " ".join(_FLAGS), compiler, jaxlib.__version__, _cpu_key()))).hexdigest()[:20]
    lib = _cache_dir() / f"diag-{key}.so"
    if not lib.exists():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # atomic: rename into place
                out = Path(tmp) / lib.name
                subprocess.run([compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(out)],
                               check=True, capture_output=True, timeout=300)
                os.replace(out, lib)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            warnings.warn(f"snapjax: the native SnAp-1 kernel did not compile ({err}; "
                          f"{detail.decode(errors='replace')[-500:]}); using XLA's two passes", stacklevel=2)
            return False, f"compile failed: {err}"
    try:
        so = ctypes.cdll.LoadLibrary(str(lib))
        for target, symbol in _TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(so, symbol)), platform="cpu")
    except (OSError, AttributeError) as err:  # a stale or foreign library in the cache
        warnings.warn(f"snapjax: the native SnAp-1 kernel {lib} did not load ({err}); using XLA's two passes",
                      stacklevel=2)
        return False, f"load failed: {err}"
    return True, str(lib)


def available() -> bool:
    """Whether the native kernel is compiled and registered (compiles it on the first call)."""
    return _load()[0]


def status() -> str:
    """``"native: <library>"`` or ``"xla: <why the kernel is not used>"``."""
    ok, what = _load()
    return f"{'native' if ok else 'xla'}: {what}"


def diag_update_and_sum(D: Array, C: Array, leaves: list[tuple]) -> list[tuple[Array, Array]]:
    """Per leaf ``(J, V, G, acc)``: ``(D ⊙ J + V ⊗ G, acc + Σ_b C ⊙ (D ⊙ J + V ⊗ G))``, with
    ``J (B, L, U)``, ``D, G, C (B, U)``, ``V (B, L)``, ``acc`` holding ``L·U`` entries (the sum
    takes its shape), all float32 or all float64.  Complex pairs (``J`` complex, component 0
    real and 1 imaginary; ``D (B, U, 4)`` the blocks ``(d00, d01, d10, d11)``, ``G, C (B, U, 2)``):
    ``J ← (d00 j0 + d01 j1 + V G0) + i (d10 j0 + d11 j1 + V G1)``, ``g = acc + Σ_b C0 j0 + C1 j1``;
    a pair leaf may add a fifth entry, a static SnAp pattern ``P (U, 2)`` (numpy bool, or
    ``None``) applied to the new ``J`` as :func:`~snapjax.engine.propagation.apply_pattern` does.
    One native call on CPU when :func:`available` (``J`` and ``acc`` updated in place when their
    buffers can be donated); XLA elsewhere.

    ``J`` may have any shape ``(B, ...)`` whose row-major entries are those of ``(B, L, U)``: an
    influence leaf ``(B, *rows, U, 1, 1)`` is passed as it is (reshaping a loop carry can make XLA
    copy it).

    Raises:
      ValueError: shapes or dtypes that do not match.
    """
    dt = jnp.result_type(D)
    paired = jnp.ndim(D) == 3
    if jnp.ndim(D) not in (2, 3) or (dt, paired) not in _TARGETS or (paired and jnp.shape(D)[-1] != 4):
        raise ValueError(f"diag_update_and_sum: D must be float32 or float64 (B, U) or (B, U, 4), "
                         f"got {jnp.shape(D)} {dt}")
    B, U = jnp.shape(D)[:2]
    unit = (B, U, 2) if paired else (B, U)
    jdt = jnp.result_type(dt, jnp.complex64) if paired else dt
    leaves = [tuple(leaf) + (None,) * (5 - len(leaf)) for leaf in leaves]
    for i, (J, V, G, acc, P) in enumerate(leaves):
        L = jnp.shape(V)[-1]
        for name, a, shape in (("C", C, unit), ("V", V, (B, L)), ("G", G, unit)):
            if jnp.shape(a) != shape or jnp.result_type(a) != dt:
                raise ValueError(f"diag_update_and_sum: leaf {i}: {name} must be {shape} {dt}, "
                                 f"got {jnp.shape(a)} {jnp.result_type(a)}")
        if jnp.result_type(J) != jdt or jnp.result_type(acc) != dt or jnp.shape(J)[:1] != (B,) \
                or math.prod(jnp.shape(J)) != B * L * U or math.prod(jnp.shape(acc)) != L * U:
            raise ValueError(f"diag_update_and_sum: leaf {i}: J {jnp.shape(J)} {jnp.result_type(J)} must hold "
                             f"(B, L, U) = {(B, L, U)} {jdt}, acc {jnp.shape(acc)} {jnp.result_type(acc)} L·U")
        if P is not None and (not paired or np.shape(P) != (U, 2)):
            raise ValueError(f"diag_update_and_sum: leaf {i}: a pattern is (U, 2) = {(U, 2)} and only for pairs, "
                             f"got {np.shape(P)}")
    if not leaves:
        return []
    patterns = [None if leaf[4] is None else np.asarray(leaf[4], bool) for leaf in leaves]

    def reference(D, C, *flat):
        out = []
        for (J, V, G, acc), P in zip(zip(*[iter(flat)] * 4), patterns):
            Jr, Vb = J.reshape(B, -1, U), V[:, :, None]
            if paired:
                j0, j1 = jnp.real(Jr), jnp.imag(Jr)
                Jn = jax.lax.complex(D[:, None, :, 0] * j0 + D[:, None, :, 1] * j1 + Vb * G[:, None, :, 0],
                                     D[:, None, :, 2] * j0 + D[:, None, :, 3] * j1 + Vb * G[:, None, :, 1])
                if P is not None:  # the pattern as the XLA path applies it: (B, L, U, K = 1, 1), M (U, 1, 2)
                    Jn = apply_pattern(Jn[..., None, None], P[:, None, :])[..., 0, 0]
                t = C[:, None, :, 0] * jnp.real(Jn) + C[:, None, :, 1] * jnp.imag(Jn)
            else:
                Jn = D[:, None, :] * Jr + Vb * G[:, None, :]
                t = C[:, None, :] * Jn
            out += [Jn.reshape(J.shape), acc + jnp.sum(t, axis=0).reshape(acc.shape)]
        return out

    flat = [a for leaf in leaves for a in leaf[:4]]
    if not available():
        return list(zip(*[iter(reference(D, C, *flat))] * 2))
    per = 5 if paired else 4  # the kernel's arguments per leaf: J, V, G, acc (and P)
    shapes = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for J, _, _, acc, _ in leaves for a in (J, acc)]
    aliases = {2 + per * i + k: 2 * i + (k > 0) for i in range(len(leaves)) for k in (0, 3)}
    call = jax.ffi.ffi_call(_TARGETS[dt, paired][0], shapes, vmap_method="sequential", input_output_aliases=aliases)

    def kernel(D, C, *flat):  # the static patterns go in as constants after each pair leaf's four arrays
        args = [a for i, P in enumerate(patterns) for a in list(flat[4 * i:4 * i + 4]) + (
            [jnp.zeros((0,), dt) if P is None else jnp.asarray(P, dt)] if paired else [])]
        return list(call(D, C, *args))

    @jax.custom_jvp  # derivatives (e.g. a meta-gradient through the learner) are XLA's, of the same maths
    def fused(D, C, *flat):
        return jax.lax.platform_dependent(D, C, *flat, cpu=kernel, default=reference)

    @fused.defjvp
    def fused_jvp(primals, tangents):
        return fused(*primals), jax.jvp(reference, primals, tangents)[1]

    out = fused(D, C, *flat)
    return list(zip(out[0::2], out[1::2]))


def update_and_gradient(tracker: Any, previous: PyTree, stepped: PyTree, factors: PyTree,
                        dloss_dstate: Array, accumulate: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """``(grads, J_t)`` of one step, the update redone in the native kernel where it applies.

    Args:
      tracker: the :class:`~snapjax.engine.influence.InfluenceTracker`.
      previous: ``J_{t-1}``.  stepped: ``J_t`` as ``tracker.step`` computed it (XLA).
      factors: ``tracker.step(..., factors=True)``'s third result.
      dloss_dstate: ``(B, units, m)``.
      accumulate: parameter-shaped gradients to add this step's to (``None``: zeros).
    Returns:
      ``accumulate + tracker.gradient(stepped, dloss_dstate)`` and ``stepped``, with the leaves
      that have factors (and ``dloss_dstate``'s dtype) taken from the kernel on CPU.  XLA then
      drops those leaves' first update and second read as dead code; other platforms keep the
      XLA values.
    """
    spec = tracker.spec
    xla = contract_leaves(spec, tracker.layout, tracker.table, tracker.precision, stepped, dloss_dstate)
    flat, treedef = jax.tree.flatten(previous)
    J_t = jax.tree.leaves(stepped)
    fac = jax.tree.leaves(factors, is_leaf=lambda f: f is None or isinstance(f, tuple))  # one per leaf
    cdt = jnp.result_type(dloss_dstate)
    acc = None if accumulate is None else jax.tree.leaves(accumulate)
    fused = [i for i, f in enumerate(fac) if f is not None and f[0].dtype == cdt and available()
             and (acc is None or jnp.result_type(acc[i]) == cdt)]  # mixed dtypes: XLA's promotions
    # kernels with compressed rows never have factors: their gradients are decompressed below
    grads = jax.tree.leaves(decompress_kernels(spec, tracker.kernels, xla))
    if not len(flat) == len(J_t) == len(fac) == len(grads) == (len(flat) if acc is None else len(acc)):
        raise ValueError("update_and_gradient: J_{t-1}, J_t, the factors, the gradients and accumulate must be "
                         "trees of the influence's structure")
    if acc is not None:
        grads = [a + g for a, g in zip(acc, grads)]
    for paired in (False, True):  # a call for the real leaves, one for the complex pairs
        idx = [i for i in fused if jnp.iscomplexobj(flat[i]) == paired]
        if not idx:
            continue
        C = dloss_dstate if paired else dloss_dstate[..., 0]  # a kernel operand: materialised as it is
        leaves = [(flat[i], jnp.ones((flat[i].shape[0], 1), cdt) if fac[i][1] is None else fac[i][1],
                   fac[i][2], jnp.zeros(grads[i].shape, cdt) if acc is None else acc[i], fac[i][3]) for i in idx]
        for i, (Jn, g) in zip(idx, diag_update_and_sum(fac[idx[0]][0], C, leaves)):  # diag(D_t): one for all
            J_t[i], grads[i] = Jn, g
    return jax.tree.unflatten(treedef, grads), jax.tree.unflatten(treedef, J_t)
