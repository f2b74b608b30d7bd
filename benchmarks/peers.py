"""Side by side with the peers (issue #28): per-step online gradients, same process, same run.

Each configuration builds the same cell on the same parameters and inputs in snapjax and in a
peer, checks that the peer's gradient equals ours (float32; a faster wrong answer is not a win),
compiles every contender, then times ``--repeats`` rounds calling each contender once in turn
(round-robin: load drifts hit all alike), ``jax.block_until_ready`` after every call.  A call
runs ``--steps`` time steps of ``B`` examples and returns the gradient of ``Σ_t Σ_b ½‖h_t − y_t‖²``;
reported: median µs per step with the min-max spread, and per peer the ratio peer / ours (the
median of the per-round ratios, and the ratio of the medians).

Comparisons (``PEERS.md`` says how to install the peers; without them only snapjax runs):

* **GRU** (flax.linen's GRU maths: ``r, z = σ(x W_i· + b_i· + h W_h·)``,
  ``n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``), input 64,
  ``k ∈ --units``, ``B = --batch``: snapjax ``"snap1"`` against braintrace 0.2.6's

  - ``D_RTRL`` (the issue's named peer).  Its trace recursion keeps only the element-wise part
    of ``∂h'/∂h`` (here ``z``), leaving out the diagonal paths through the recurrent weights
    (``W_hr[j, j]``, ``W_hz[j, j]``, ``W_hn[j, j]``) that SnAp-1 keeps: it is the e-prop-style
    estimator, not SnAp-1, so its gradient is *expected* to differ from ours (checked against a
    recursion written out here with that ``D``, :func:`elementwise_d_gradient`);
  - ``SnAp(n=1)`` (the same estimator as our SnAp-1: gradients agree to float32 rounding).

  braintrace's own ``nn.GRUCell`` computes ``tanh(W [x, r ⊙ h])`` (reset before the matmul), a
  different cell; so the braintrace model here is the flax maths written with
  ``braintrace.nn.Linear`` layers (ETP matmuls) on snapjax's parameters.  braintrace runs in its
  per-example mode (``compile(..., vmap=True)``, its fastest; ``--braintrace-batch-mode`` for the
  other).  ``--native-gru`` adds
  braintrace's own cell under D_RTRL for reference (no gradient check: other maths).
* **CTRNN** (FranzKnut/jax_rtrl ``OnlineCTRNNCell(ode_type="murray", plasticity="eprop")``,
  one Euler step ``h' = h + dt (tanh(W [x, h, 1]) − h) / τ`` with ``W`` and ``τ`` learned), input
  64, ``k ∈ --ctrnn-units``, ``B ∈ --ctrnn-batch``: jax_rtrl's e-prop traces, which are SnAp-1
  on this cell, against snapjax's SnAp-1 on the same cell given as a user
  :class:`snapjax.CellSpec` (:func:`ctrnn_spec`; ``sj.leaky_spec`` is not it: its ``τ`` is a
  fixed constant, not a parameter).  jax_rtrl runs one example per sequence (its trace update
  does not broadcast over a batch axis) under ``jax.vmap``; the gradient is ``jax.grad`` through
  ``lax.scan`` over its cell, whose custom VJP returns the trace-based gradient (that is how its
  own tests drive it).
* ``--rtrl`` (optional): exact RTRL on the GRU, snapjax ``"rtrl"`` against braintrace
  ``SnAp(n=2)`` (the all-to-all pattern saturates at order 2: full RTRL within the group).
* ``--uoro`` (optional): UORO on the GRU against braintrace's ``UORO`` in its batch mode (its
  per-example mode does not compile); stochastic estimators, so timed only.
* ``--plain-jax`` (optional): SnAp-1 on the GRU written out in plain JAX
  (:func:`plain_jax_snap1_gru`), timed beside ours as a floor for the engine, not as a peer.

Usage (peers in a separate venv, see ``benchmarks/PEERS.md``)::

    /work/peers-venv/bin/python benchmarks/peers.py                 # the #28 acceptance set
    /work/peers-venv/bin/python benchmarks/peers.py --quick         # seconds: tiny sizes
    python benchmarks/peers.py --quick --peers none                 # snapjax side only

Writes ``--out`` (default ``benchmarks/out/peers_cpu.json``): the command, the versions of jax,
snapjax and the peers, the load average before and after, the gradient checks and the timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import machine_info

import snapjax as sj
from snapjax import CellSpec, Projection

try:  # braintrace 0.2.6 (pip); `import brainstate` turns jax_enable_x64 off: float32 only here
    import brainstate
    import braintrace
except ImportError:  # pragma: no cover - the peers are not installed in CI
    brainstate = braintrace = None

try:  # FranzKnut/jax_rtrl (not on PyPI: a checkout on the path, see PEERS.md)
    import jax_rtrl
    from jax_rtrl.models.cells.ctrnn import OnlineCTRNNCell
except ImportError:  # pragma: no cover
    jax_rtrl = OnlineCTRNNCell = None

JAX_RTRL_COMMIT = "7d95ca607d021ef8f35bdc281a06c06222442860"  # the checkout PEERS.md describes
GRAD_RTOL = 1e-4  # float32: max |peer − ours| ≤ GRAD_RTOL · max |ours| per leaf


def _loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


# --------------------------------------------------------------------------- the CTRNN as a CellSpec
def _ctrnn_phi(dt, pre, unit, s):
    h = s[..., 0]
    return (h + dt * (jnp.tanh(pre["i"] + pre["h"]) - h) / unit["tau"])[..., None]


@functools.cache
def ctrnn_spec(units: int, dt: float = 1.0) -> CellSpec:
    """jax_rtrl's "murray" CTRNN as a user :class:`snapjax.CellSpec`: ``u = x W_i + b_i + h W_h``,
    ``h' = h + dt (tanh(u) − h) / τ`` with ``τ`` a learned per-unit parameter (shape ``(units,)``).

    Example::

        >>> import jax, jax.numpy as jnp, snapjax as sj
        >>> spec = ctrnn_spec(4)
        >>> params = spec.init(jax.random.key(0), 3)
        >>> params["tau"] = jnp.full((4,), 2.0)
        >>> sj.verify_spec(spec, params)
        >>> sorted(params)
        ['h', 'i', 'tau']
    """
    return CellSpec(name="ctrnn", units=units, state_dim=1, readout=0, unit_params=("tau",),
                    projections=(Projection("i", "input", True), Projection("h", "state", False)),
                    phi=functools.partial(_ctrnn_phi, float(dt)))


def ctrnn_params_from_jax_rtrl(W, tau, n_in: int) -> dict:
    """jax_rtrl's ``W`` (``(k, n_in + k + 1)`` = ``[W_in | W_rec | bias]``, rows feed units) and
    ``τ`` in :func:`ctrnn_spec`'s layout (kernels ``(n_in, k)``, flax convention)."""
    k = W.shape[0]
    return {"i": {"kernel": W[:, :n_in].T, "bias": W[:, -1]}, "h": {"kernel": W[:, n_in:n_in + k].T}, "tau": tau}


def ctrnn_grads_to_jax_rtrl(g: dict) -> dict:
    """The inverse of :func:`ctrnn_params_from_jax_rtrl` on a gradient."""
    W = jnp.concatenate([g["i"]["kernel"].T, g["h"]["kernel"].T, g["i"]["bias"][:, None]], axis=1)
    return {"W": W, "tau": g["tau"]}


# --------------------------------------------------------------------------- snapjax contenders
def snapjax_fn(method_name: str, cell, params, B: int):
    """A jitted ``(params, xs, ys) -> grads``: ``snapjax.online_gradient`` of ``method_name``."""
    rec = sj.as_recurrent(cell)
    method = sj.online_method(method_name, rec, params)
    key = jax.random.key(42)  # seeds the methods that draw (UORO); the others ignore it
    return jax.jit(lambda p, xs, ys: sj.online_gradient(method, p, rec.init_carry(B), xs, ys, _loss, key=key).grads)


def elementwise_d_gradient(params, xs, ys):
    """The flax GRU's online gradient of ``W_in`` (``(n_in, k)``) with D-RTRL's trace recursion,
    written out: ``ε_t = z_t ⊙ ε_{t−1} + (1 − z_t)(1 − n_t²) x_t`` per example (``D`` = the
    element-wise part of ``∂h'/∂h`` only), ``g = Σ_t Σ_b (h_t − y_t) ε_t``."""
    p = params

    def step(carry, xy):
        h, e, g = carry
        x, y = xy
        r = jax.nn.sigmoid(x @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
        z = jax.nn.sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
        n = jnp.tanh(x @ p["in"]["kernel"] + p["in"]["bias"] + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
        e = z[:, None, :] * e + ((1 - z) * (1 - n ** 2))[:, None, :] * x[:, :, None]
        h = (1 - z) * n + z * h
        return (h, e, g + jnp.einsum("bk,bik->ik", h - y, e)), None

    B, n_in, k = xs.shape[1], xs.shape[2], p["hr"]["kernel"].shape[0]
    init = (jnp.zeros((B, k)), jnp.zeros((B, n_in, k)), jnp.zeros((n_in, k)))
    return jax.lax.scan(step, init, (xs, ys))[0][2]


def plain_jax_snap1_gru(params, xs, ys):
    """SnAp-1 on flax's GRU written out in plain JAX (a floor for what XLA makes of the bare
    recursion; not a peer): gate derivatives ``g_z = (h − n) z (1 − z)``, ``g_n = (1 − z)(1 − n²)``,
    ``g_r = g_n a_hn r (1 − r)``, ``g_hn = g_n r`` with ``a_hn = h W_hn + b_hn``;
    ``D = z + g_z W_hz[j,j] + g_r W_hr[j,j] + g_hn W_hn[j,j]``; per kernel ``ε ← D ε + v ⊗ g``
    (``v`` = ``x`` or ``h``), per bias ``ε ← D ε + g``; ``grad += Σ_b (h' − y) ε``."""
    p = params
    diag = {w: jnp.diagonal(p[w]["kernel"]) for w in ("hr", "hz", "hn")}

    def step(carry, xy):
        h, eps, grad = carry
        x, y = xy
        r = jax.nn.sigmoid(x @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
        z = jax.nn.sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
        a_hn = h @ p["hn"]["kernel"] + p["hn"]["bias"]
        n = jnp.tanh(x @ p["in"]["kernel"] + p["in"]["bias"] + r * a_hn)
        h_new = (1 - z) * n + z * h
        g_n, g_z = (1 - z) * (1 - n ** 2), (h - n) * z * (1 - z)
        g_r, g_hn = g_n * a_hn * r * (1 - r), g_n * r
        D = z + g_z * diag["hz"] + g_r * diag["hr"] + g_hn * diag["hn"]
        g = {"ir": g_r, "iz": g_z, "in": g_n, "hr": g_r, "hz": g_z, "hn": g_hn}
        delta = h_new - y
        new_eps, new_grad = {}, {}
        for w in p:
            v = x if w.startswith("i") else h
            e = {"kernel": D[:, None, :] * eps[w]["kernel"] + v[:, :, None] * g[w][:, None, :]}
            new_grad[w] = {"kernel": grad[w]["kernel"] + jnp.einsum("bj,bij->ij", delta, e["kernel"])}
            if "bias" in p[w]:
                e["bias"] = D * eps[w]["bias"] + g[w]
                new_grad[w]["bias"] = grad[w]["bias"] + jnp.sum(delta * e["bias"], 0)
            new_eps[w] = e
        return (h_new, new_eps, new_grad), None

    B, k = xs.shape[1], p["hr"]["kernel"].shape[0]
    init = (jnp.zeros((B, k)), jax.tree.map(lambda a: jnp.zeros((B,) + a.shape), p), jax.tree.map(jnp.zeros_like, p))
    return jax.lax.scan(step, init, (xs, ys))[0][2]


# --------------------------------------------------------------------------- braintrace contenders
if braintrace is not None:
    class FlaxGRU(brainstate.nn.Module):
        """flax.linen's GRU maths with ``braintrace.nn.Linear`` (ETP matmul) projections, on the
        parameters of ``snapjax.GRUCell`` / ``flax.linen.GRUCell`` (names ``ir iz in hr hz hn``)."""

        def __init__(self, params):
            super().__init__()
            self.k = params["hr"]["kernel"].shape[1]

            def lin(name):
                w = params[name]["kernel"]
                return braintrace.nn.Linear(w.shape[0], w.shape[1], w_init=w, b_init=params[name].get("bias"))

            self.ir, self.iz, self.in_ = lin("ir"), lin("iz"), lin("in")
            self.hr, self.hz, self.hn = lin("hr"), lin("hz"), lin("hn")

        def init_state(self, batch_size=None, **kwargs):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.k) if batch_size else (self.k,)))

        def update(self, x):
            h = self.h.value
            r = jax.nn.sigmoid(self.ir(x) + self.hr(h))
            z = jax.nn.sigmoid(self.iz(x) + self.hz(h))
            n = jnp.tanh(self.in_(x) + r * self.hn(h))
            h = (1 - z) * n + z * h
            self.h.value = h
            return h


def braintrace_fn(model, algorithm, x0, B: int, vmap: bool = True, **options):
    """A jitted ``(params, xs, ys) -> grads`` driving ``learner.etrace_grad`` (``reduction='sum'``);
    ``params`` is ignored (braintrace holds its weights in the model's states).  ``vmap=True``:
    ``braintrace.compile(..., vmap=True)``, one example per trace under ``jax.vmap`` (braintrace's
    per-example mode: 1.4-3.7x faster than its batch mode for D_RTRL / SnAp(n=1) at GRU-64, B = 16,
    and the only mode where SnAp(n=2) compiles, since batch mode counts the batch axis as positions
    of the hidden group).  The learner's hidden state and traces carry over between calls (its API
    is stateful); the first call starts from zeros, so the first call's gradient is the one checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = braintrace.compile(model, algorithm, x0, batch_size=B, vmap=vmap, **options)

    def step_loss(x, y):
        return _loss(learner(x), y)

    run = brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=step_loss, reduction="sum"))
    return lambda params, xs, ys: run(xs, ys)


def braintrace_grads_to_flax(g: dict) -> dict:
    """braintrace's ``{(module, 'weight'): {'weight', 'bias'}}`` in flax's GRU layout."""
    return {mod.rstrip("_"): {("kernel" if leaf == "weight" else leaf): v for leaf, v in d.items()}
            for (mod, _), d in g.items()}


# --------------------------------------------------------------------------- jax_rtrl contender
def jax_rtrl_fn(cell, variables, n_in: int):
    """A jitted ``(variables, xs, ys) -> grads`` for jax_rtrl: ``jax.grad`` of one example's
    ``Σ_t ½‖h_t − y_t‖²`` through ``lax.scan`` over the online cell (its custom VJP returns the
    trace gradient), ``jax.vmap`` over the batch, summed."""
    carry0 = cell.apply(variables, jax.random.PRNGKey(0), (n_in,), method=cell.initialize_carry)

    def seq_loss(v, xs1, ys1):
        def body(c, xy):
            c, h = cell.apply(v, c, xy[0])
            return c, _loss(h, xy[1])
        return jnp.sum(jax.lax.scan(body, carry0, (xs1, ys1))[1])

    def grads(v, xs, ys):
        g = jax.vmap(jax.grad(seq_loss), (None, 1, 1))(v, xs, ys)
        return jax.tree.map(lambda a: jnp.sum(a, 0), g)["params"]

    return jax.jit(grads)


# --------------------------------------------------------------------------- checks and timing
def compare(peer: dict, ours: dict) -> dict:
    """Per leaf ``max |peer − ours|``, ``max |ours|`` and whether they agree (``GRAD_RTOL``)."""
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(ours):
        key = jax.tree_util.keystr(path)
        b = functools.reduce(lambda t, k: t[k.key], path, peer)
        err, scale = float(jnp.max(jnp.abs(b - a))), float(jnp.max(jnp.abs(a)))
        out[key] = {"max_abs_err": err, "max_abs_ours": scale, "agree": err <= GRAD_RTOL * max(scale, 1e-30)}
    return {"agree": all(v["agree"] for v in out.values()), "leaves": out}


def time_round_robin(contenders: dict, T: int, repeats: int) -> dict:
    """Compile each ``(fn, args)``, then ``repeats`` rounds calling each once (µs per step)."""
    warmup_s = {}
    for name, (fn, args) in contenders.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warmup_s[name] = time.perf_counter() - t0
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (fn, args) in contenders.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) / T * 1e6)
    return {"warmup_s": warmup_s, "times_us": times,
            "us_per_step": {n: statistics.median(t) for n, t in times.items()},
            "spread_us": {n: [min(t), max(t)] for n, t in times.items()}}


def ratios(timing: dict, ours: str) -> dict:
    """Per peer: median of per-round ratios peer / ours, and the ratio of the medians."""
    t, med = timing["times_us"], timing["us_per_step"]
    return {name: {"median_of_round_ratios": statistics.median(a / b for a, b in zip(t[name], t[ours])),
                   "ratio_of_medians": med[name] / med[ours],
                   "round_ratio_range": [min(a / b for a, b in zip(t[name], t[ours])),
                                         max(a / b for a, b in zip(t[name], t[ours]))]}
            for name in t if name != ours}


def data(T: int, B: int, n_in: int, k: int, seed: int = 1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (T, B, n_in)), 0.1 * jax.random.normal(ky, (T, B, k))


# --------------------------------------------------------------------------- configurations
def gru_case(k: int, B: int, n_in: int, T: int, repeats: int, use_braintrace: bool, native: bool,
             method_name: str = "snap1", peer_algorithms=None, bt_vmap: bool = True, plain: bool = False) -> dict:
    """GRU: snapjax ``method_name`` against braintrace's algorithms (``peer_algorithms``: label ->
    (class name, options, expected to agree with ours))."""
    cell = sj.GRUCell(k)
    params = sj.as_recurrent(cell).init_params(jax.random.key(0), n_in)
    xs, ys = data(T, B, n_in, k)
    ours = f"snapjax {method_name}"
    contenders = {ours: (snapjax_fn(method_name, cell, params, B), (params, xs, ys))}
    checks = {}
    g_ours = contenders[ours][0](params, xs, ys)
    if plain:
        label = "plain-JAX SnAp-1 (written out, not a peer)"
        contenders[label] = (jax.jit(plain_jax_snap1_gru), (params, xs, ys))
        checks[label] = {"expected_to_agree": True, **compare(contenders[label][0](params, xs, ys), g_ours)}
    if use_braintrace:
        for label, (alg, options, same, *mode) in (peer_algorithms or {}).items():
            fn = braintrace_fn(FlaxGRU(params), getattr(braintrace, alg), xs[0], B, mode[0] if mode else bt_vmap,
                               **options)
            g = braintrace_grads_to_flax(fn(params, xs, ys))  # first call: from zero state and traces
            contenders[label] = (fn, (params, xs, ys))
            if same is None:  # a stochastic estimator: nothing to compare value by value
                continue
            checks[label] = {"expected_to_agree": same, **compare(g, g_ours)}
            if not same:  # checked against the estimator it does compute, written out here
                ref = elementwise_d_gradient(params, xs, ys)
                checks[label]["vs_elementwise_d_recursion"] = compare({"in": {"kernel": g["in"]["kernel"]}},
                                                                      {"in": {"kernel": ref}})
        if native:
            model = braintrace.nn.GRUCell(n_in, k)
            contenders["braintrace D_RTRL (its own nn.GRUCell, other maths)"] = (
                braintrace_fn(model, braintrace.D_RTRL, xs[0], B, bt_vmap), (params, xs, ys))
    timing = time_round_robin(contenders, T, repeats)
    return {"cell": "gru (flax maths)", "units": k, "batch": B, "inputs": n_in, "steps": T, "repeats": repeats,
            "braintrace_mode": "vmap" if bt_vmap else "batch",
            "ours": ours, "gradient_checks": checks, **timing, "ratios_peer_over_ours": ratios(timing, ours)}


def ctrnn_case(k: int, B: int, n_in: int, T: int, repeats: int, use_jax_rtrl: bool, dt: float = 1.0) -> dict:
    """CTRNN: snapjax SnAp-1 on :func:`ctrnn_spec` against jax_rtrl's e-prop on its cell."""
    xs, ys = data(T, B, n_in, k)
    if use_jax_rtrl:
        cell = OnlineCTRNNCell(num_units=k, plasticity="eprop", ode_type="murray", dt=dt)
        variables = cell.init(jax.random.PRNGKey(0), None, xs[0, 0])
        params = ctrnn_params_from_jax_rtrl(variables["params"]["W"], variables["params"]["tau"], n_in)
    else:
        params = ctrnn_spec(k, dt).init(jax.random.key(0), n_in)
        params["tau"] = jax.random.uniform(jax.random.key(2), (k,), minval=1.0, maxval=8.0)
    ours = "snapjax snap1 (CTRNN CellSpec)"
    contenders = {ours: (snapjax_fn("snap1", ctrnn_spec(k, dt), params, B), (params, xs, ys))}
    checks = {}
    if use_jax_rtrl:
        label = "jax_rtrl eprop (OnlineCTRNNCell murray)"
        fn = jax_rtrl_fn(cell, variables, n_in)
        checks[label] = {"expected_to_agree": True,
                         **compare(fn(variables, xs, ys), ctrnn_grads_to_jax_rtrl(contenders[ours][0](params, xs, ys)))}
        contenders[label] = (fn, (variables, xs, ys))
    timing = time_round_robin(contenders, T, repeats)
    return {"cell": f"ctrnn (jax_rtrl murray, dt={dt:g})", "units": k, "batch": B, "inputs": n_in, "steps": T,
            "repeats": repeats, "ours": ours, "gradient_checks": checks, **timing,
            "ratios_peer_over_ours": ratios(timing, ours)}


SNAP1_PEERS = {
    "braintrace D_RTRL": ("D_RTRL", {}, False),
    "braintrace SnAp(n=1)": ("SnAp", {"n": 1}, True),
}
RTRL_PEERS = {"braintrace SnAp(n=2) (= RTRL)": ("SnAp", {"n": 2}, True)}
# braintrace's per-example UORO (vmap=True) fails to compile ("Cannot interpret 'key<fry>' as a
# data type"); its batch mode runs, with one rank-1 estimate over the whole batch (the batch axis
# counts as positions), where ours keeps one per example: timed, not compared value by value.
UORO_PEERS = {"braintrace UORO (batch mode, one projection for the batch)": ("UORO", {}, None, False)}


def _git_state() -> str:
    """``<commit>`` of the checkout, ``+ uncommitted changes in snapjax/`` when the tree is dirty."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "snapjax"], check=False,
                               capture_output=True, text=True).stdout.split()
    except OSError:  # pragma: no cover - no git
        return "unknown"
    return head + (" + uncommitted changes in snapjax/: " + " ".join(dirty[1::2]) if dirty else "")


def versions() -> dict:
    v = {"jax": jax.__version__, "snapjax": getattr(sj, "__version__", "?"), "snapjax_git": _git_state()}
    if braintrace is not None:
        v.update(braintrace=braintrace.__version__, brainstate=brainstate.__version__)
    if jax_rtrl is not None:
        v["jax_rtrl"] = f"{JAX_RTRL_COMMIT} (checkout: {os.path.dirname(os.path.dirname(jax_rtrl.__file__))})"
    return v


def _summary(case: dict) -> str:
    us = case["us_per_step"]
    parts = [f"{case['cell']} k={case['units']} B={case['batch']}:"]
    parts += [f"  {n}: {us[n]:9.1f} µs/step [{case['spread_us'][n][0]:.1f}-{case['spread_us'][n][1]:.1f}]"
              + (f"  peer/ours {case['ratios_peer_over_ours'][n]['median_of_round_ratios']:.2f}x"
                 if n in case["ratios_peer_over_ours"] else "")
              + ("" if n not in case["gradient_checks"] else
                 f"  grads {'agree' if case['gradient_checks'][n]['agree'] else 'DIFFER'}"
                 f" (expected {'to agree' if case['gradient_checks'][n]['expected_to_agree'] else 'to differ'})")
              for n in us]
    return "\n".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", default="64,128,256", help="GRU state sizes")
    p.add_argument("--batch", type=int, default=16, help="GRU batch")
    p.add_argument("--ctrnn-units", default="64,128")
    p.add_argument("--ctrnn-batch", default="4,16")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="time steps per timed call")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--peers", default="braintrace,jax_rtrl", help="comma list, or 'none'")
    p.add_argument("--native-gru", action="store_true", help="also braintrace's own GRU under D_RTRL")
    p.add_argument("--rtrl", default="", help="GRU sizes for exact RTRL vs braintrace SnAp(n=2), e.g. 32,64")
    p.add_argument("--braintrace-batch-mode", action="store_true",
                   help="braintrace.compile(vmap=False): its batch mode (slower; SnAp(n=2) does not compile)")
    p.add_argument("--uoro", default="", help="GRU sizes for UORO vs braintrace UORO (timing only), e.g. 64,128")
    p.add_argument("--plain-jax", action="store_true", help="also SnAp-1 on the GRU written out in plain JAX")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "peers_cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.units, args.ctrnn_units, args.ctrnn_batch, args.inputs = "8", "8", "2", 4
        args.steps, args.repeats, args.batch = 4, 2, 2
    peers = set(args.peers.split(","))
    use_bt = "braintrace" in peers and braintrace is not None
    use_jr = "jax_rtrl" in peers and jax_rtrl is not None
    missing = sorted(q for q in peers - {"none", ""} if not {"braintrace": use_bt, "jax_rtrl": use_jr}.get(q))
    if missing:
        print("not installed (see benchmarks/PEERS.md), snapjax side only:", ", ".join(missing), flush=True)
    load_before, version_info = os.getloadavg(), versions()  # the code that runs: state at the start
    cases = []
    for k in (int(u) for u in args.units.split(",") if u):
        cases.append(gru_case(k, args.batch, args.inputs, args.steps, args.repeats, use_bt, args.native_gru,
                              "snap1", SNAP1_PEERS, not args.braintrace_batch_mode, args.plain_jax))
        print(_summary(cases[-1]), flush=True)
    for k in (int(u) for u in args.ctrnn_units.split(",") if u):
        for B in (int(b) for b in args.ctrnn_batch.split(",") if b):
            cases.append(ctrnn_case(k, B, args.inputs, args.steps, args.repeats, use_jr))
            print(_summary(cases[-1]), flush=True)
    for k in (int(u) for u in args.rtrl.split(",") if u):
        cases.append(gru_case(k, args.batch, args.inputs, args.steps, args.repeats, use_bt, False, "rtrl", RTRL_PEERS,
                              not args.braintrace_batch_mode))
        print(_summary(cases[-1]), flush=True)
    for k in (int(u) for u in args.uoro.split(",") if u):
        cases.append(gru_case(k, args.batch, args.inputs, args.steps, args.repeats, use_bt, False, "uoro", UORO_PEERS))
        print(_summary(cases[-1]), flush=True)
    result = {"command": " ".join(["python", "benchmarks/peers.py"] + list(sys.argv[1:] if argv is None else argv)),
              "versions": version_info, "peers_missing": missing, "machine": machine_info(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "grad_rtol": GRAD_RTOL, "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print("load average before", load_before, "after", result["loadavg_after"], "\nwrote", args.out)
    return result


if __name__ == "__main__":
    main()
