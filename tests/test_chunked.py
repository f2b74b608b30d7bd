"""Chunked RTRL / SnAp-1 (snapjax.methods.chunked): exactness against the per-step methods and
BPTT (float64), the influence after every chunk, ragged streams (flush), per-example resets,
16-bit influence storage, compile-once and input validation."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_rel_err

import snapjax as sj
from snapjax.methods.chunked import ChunkedInfluence, ChunkedState, chunked_method
from snapjax.training.sequence import bptt_gradient

TOL = 1e-10
N_IN, B = 3, 3
# Tests compile many small programs: XLA's backend optimisations buy nothing at these sizes.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _bptt(cell, params, xs, ys, masks=None):
    return _jit(lambda p: bptt_gradient(cell, p, None, xs, ys, _loss, masks=masks).grads)(params)


def _online(method, params, xs, ys, carry=None, state=None):
    return _jit(lambda p: sj.online_gradient(method, p, carry, xs, ys, _loss, method_state=state))(params)


def _loss(y, t):
    return 0.5 * jnp.sum((y - t) ** 2)


def _setup(kind, units=4, seed=0, density=None):
    cell = {"vanilla": sj.VanillaCell, "gru": sj.GRUCell, "lstm": sj.LSTMCell, "egru": sj.EGRUCell}[kind](units)
    carry = cell.initialize_carry(jax.random.key(0), (B, N_IN))
    params = cell.init(jax.random.key(seed), carry, jnp.zeros((B, N_IN)))["params"]
    noise = jax.random.normal(jax.random.key(seed + 7), (len(jax.tree.leaves(params)),))
    params = jax.tree.map(lambda a, z: a.astype(jnp.float64) + 0.1 * z,
                          params, jax.tree.unflatten(jax.tree.structure(params), list(noise)))
    masks = None if density is None else sj.random_masks(seed, params, density, spec=cell)
    return cell, params, masks


def _data(T, units, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (T, B, N_IN), jnp.float64), jax.random.normal(ky, (T, B, units), jnp.float64))


def _schedule(T, resets):
    sched = {w: np.zeros((T, B), bool) for w in ("between", "after")}
    for (t, ex, w) in resets:
        sched[w][t, ex] = True
    return jnp.asarray(sched["between"]), jnp.asarray(sched["after"])


def _drive(method, params, xs, ys, schedules=((),), dtype=jnp.float64):
    """Step/gradient over the stream in one jitted ``lax.scan`` (one compile per method).

    ``schedules``: reset schedules, each a tuple of ``(t, example, "after" | "between")``: reset
    after step ``t``'s gradient, or between step ``t`` and its gradient (the carry is zeroed
    either way).  Per schedule, returns the summed gradient (a ragged last chunk flushed), the
    influence after every step in the engine's compressed shapes (``(T, ...)`` per leaf; for a
    chunked method ``J`` at its last chunk boundary) and the final state.
    """

    def zero(carry, where):
        return jax.tree.map(lambda a: jnp.where(where[:, None], 0.0, a), carry)

    @_jit
    def run(xs, ys, between, after):
        def body(c, inp):
            carry, st, total = c
            x, y, rb, ra = inp
            carry, st, _ = method.step(params, carry, st, x)
            dcarry = jax.grad(lambda cc: _loss(method.cell.output(cc), y))(carry)
            if schedules != ((),):
                st, carry = method.reset(st, rb), zero(carry, rb)
            g, st = method.gradient(params, st, dcarry)
            if schedules != ((),):
                st, carry = method.reset(st, ra), zero(carry, ra)
            J = method.influence(st)  # engine shapes (float leaves) for both forms
            return (carry, st, jax.tree.map(jnp.add, total, g)), J

        init = (method.init_carry(B, jnp.float64), method.init(B, dtype), jax.tree.map(jnp.zeros_like, params))
        (_, st, total), Js = jax.lax.scan(body, init, (xs, ys, between, after))
        if xs.shape[0] % method.period:
            g, st = method.flush(params, st)
            total = jax.tree.map(jnp.add, total, g)
        return total, Js, st

    return [run(xs, ys, *_schedule(xs.shape[0], r)) for r in schedules]


def _at(Js, t):
    return jax.tree.map(lambda a: a[t], Js)


def _bptt_with_resets(cell, params, xs, ys, resets):
    """BPTT reference: the carry is zeroed after step ``t`` for each reset, and a reset between
    a step and its gradient also drops that step's loss (the per-step methods' ``J_t = 0``)."""
    between, after = _schedule(xs.shape[0], resets)
    rec = sj.as_recurrent(cell)

    def total(p):
        def body(c, inp):
            x, y, rb, ra = inp
            c = rec.apply(p, c, x)
            loss = 0.5 * jnp.sum(jnp.where(rb[:, None], 0.0, rec.output(c) - y) ** 2)
            return jax.tree.map(lambda a: jnp.where((rb | ra)[:, None], 0.0, a), c), loss

        return jax.lax.scan(body, rec.init_carry(B, jnp.float64), (xs, ys, between, after))[1].sum()

    return _jit(jax.grad(total))(params)


# (cell, masked, K for RTRL, K for SnAp-1), T = 7: every cell, both methods and both storage
# kinds see K = 1, K = 3 (two chunks and a flushed ragged one) and K = T.
CASES = [
    ("vanilla", False, 3, 1), ("vanilla", True, 7, 3),
    ("gru", False, 1, 7), ("gru", True, 3, 3),
    ("lstm", False, 7, 3), ("lstm", True, 3, 1),
]


@pytest.mark.parametrize("kind,masked,k_rtrl,k_snap", CASES)
def test_chunked_equals_per_step_and_bptt(x64, kind, masked, k_rtrl, k_snap):
    """Chunked RTRL == per-step RTRL == BPTT and chunked SnAp-1 == per-step SnAp-1: the summed
    gradient and the influence after every chunk (carried across chunks)."""
    T, units = 7, 4
    cell, params, masks = _setup(kind, units, density=0.5 if masked else None)
    xs, ys = _data(T, units)
    ref = _bptt(cell, params, xs, ys, masks)
    for name, n, K in (("rtrl", None, k_rtrl), ("snap1", 1, k_snap)):
        g_ref, J_ref, _ = _drive(sj.online_method(name, cell, params, masks=masks), params, xs, ys)[0]
        if name == "rtrl":
            assert tree_rel_err(g_ref, ref) < TOL
        g, Js, _ = _drive(chunked_method(cell, params, n=n, chunk=K, masks=masks), params, xs, ys)[0]
        assert tree_rel_err(g, g_ref) < TOL, (name, K)
        for t in range(K - 1, T, K):  # J after each full chunk == per-step J at that step
            assert tree_rel_err(_at(Js, t), _at(J_ref, t)) < TOL, (name, K, t)


def test_egru_and_online_method_entry(x64):
    """EGRU (a unit parameter: the threshold) through ``snapjax.online_method(..., chunk=K)``
    and the ``lax.scan`` driver (which flushes the ragged last chunk): RTRL == BPTT, SnAp-1 ==
    per-step SnAp-1."""
    T, units = 6, 4
    cell, params, _ = _setup("egru", units, seed=2)
    xs, ys = _data(T, units, seed=3)
    refs = {"rtrl": _bptt(cell, params, xs, ys),
            "snap1": _drive(sj.online_method("snap1", cell, params), params, xs, ys)[0][0]}
    for name in ("rtrl", "snap1"):
        ch = sj.online_method(name, cell, params, chunk=4)
        assert isinstance(ch, ChunkedInfluence) and ch.period == 4
        out = _online(ch, params, xs, ys)
        assert tree_rel_err(out.grads, refs[name]) < TOL
        assert float(jnp.abs(out.grads["threshold"]).sum()) > 0


RESETS = (
    (1, 0, "after"),     # mid-chunk, after the gradient
    (2, 1, "between"),   # between the chunk's last step and its gradient
    (3, 0, "after"),     # at a chunk boundary (K = 3: steps 0-2, 3-5, 6-7)
    (4, 2, "between"),   # mid-chunk, between step and gradient
    (6, 1, "after"),
)


# GRU is the fast case; LSTM (slow) adds its two-part carry, whose chunked exactness without
# resets is checked fast by test_chunked_equals_per_step_and_bptt.
@pytest.mark.parametrize("kind", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_reset_mid_chunk_is_exact(x64, kind):
    """Per-example resets at every position in a chunk (after a gradient, or between a step and
    its gradient) match the per-step methods exactly (gradient, influence after every chunk and
    after the flush), and for RTRL BPTT with the same resets."""
    T, units, K = 8, 4, 3
    cell, params, _ = _setup(kind, units, seed=4)
    xs, ys = _data(T, units, seed=5)
    schedules = (tuple(r for r in RESETS if r[2] == "after"), RESETS)
    refs = [_bptt_with_resets(cell, params, xs, ys, r) for r in schedules]
    assert tree_rel_err(refs[1], refs[0]) > 1e-3  # the resets between a step and its gradient matter
    for name, n in (("rtrl", None), ("snap1", 1)):
        per_step = sj.online_method(name, cell, params)
        ch = chunked_method(cell, params, n=n, chunk=K)
        outs = zip(schedules, refs, _drive(per_step, params, xs, ys, schedules), _drive(ch, params, xs, ys, schedules))
        for resets, ref, (g_ref, J_ref, st_ref), (g, Js, st) in outs:
            assert tree_rel_err(g, g_ref) < TOL, (name, resets)
            if name == "rtrl":
                assert tree_rel_err(g, ref) < TOL
            for t in range(K - 1, T, K):
                assert tree_rel_err(_at(Js, t), _at(J_ref, t)) < TOL, (name, t)
            assert tree_rel_err(ch.influence(st), st_ref.influence) < TOL  # after the flush


def test_hand_over_influence_between_per_step_and_chunked(x64):
    """A stream run per step for 3 steps and then chunk-wise (``with_influence``) gives the
    per-step method's gradient and influence: the two share the influence layout."""
    cell, params, _ = _setup("lstm", 3, seed=6)
    xs, ys = _data(7, 3, seed=7)
    per_step = sj.online_method("snap1", cell, params)
    full = _online(per_step, params, xs, ys)
    head = _online(per_step, params, xs[:3], ys[:3])
    ch = chunked_method(cell, params, n=1, chunk=2)
    st = ch.with_influence(ch.init(B, jnp.float64), head.final_method_state.influence)
    tail = _online(ch, params, xs[3:], ys[3:], head.final_carry, st)
    assert tree_rel_err(jax.tree.map(jnp.add, head.grads, tail.grads), full.grads) < TOL
    assert tree_rel_err(ch.influence(tail.final_method_state), per_step.influence(full.final_method_state)) < TOL
    with pytest.raises(ValueError, match="influence does not match"):
        ch.with_influence(st, per_step.init(B + 1, jnp.float64).influence)


def test_compiles_once_over_chunks(x64):
    """One trace of step+gradient serves every position in every chunk (the chunk's end is a
    traced position, not a retrace); gradients arrive at chunk ends; flush closes the rest."""
    cell, params, _ = _setup("gru", 4)
    ch = chunked_method(cell, params, n=None, chunk=3)
    xs, ys = _data(7, 4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(carry, st, x, y):
        carry, st, _ = ch.step(params, carry, st, x)
        g, st = ch.gradient(params, st, jax.grad(lambda c: _loss(c, y))(carry))
        return carry, st, g

    carry, st = ch.init_carry(B, jnp.float64), ch.init(B, jnp.float64)
    nonzero = []
    for t in range(7):
        carry, st, g = train_step(carry, st, xs[t], ys[t])
        nonzero.append(bool(jnp.any(g["hn"]["kernel"] != 0)))
    assert nonzero == [False, False, True, False, False, True, False]
    assert int(st.pos) == 1
    g, st = ch.flush(params, st)
    assert int(st.pos) == 0 and bool(jnp.any(g["hn"]["kernel"] != 0))


@pytest.mark.parametrize("name,n", [("rtrl", None), ("snap1", 1)])
def test_bfloat16_influence_storage(name, n):
    """A bfloat16 influence stays bfloat16 (per-step and chunked), the gradient comes out in
    float32 (the arithmetic is float32; only the stored J is rounded) and is close to the
    float32-storage gradient."""
    cell = sj.GRUCell(8)
    params = cell.init(jax.random.key(0), jnp.zeros((B, 8)), jnp.zeros((B, N_IN)))["params"]
    xs = jax.random.normal(jax.random.key(1), (12, B, N_IN))
    ys = jax.random.normal(jax.random.key(2), (12, B, 8))
    per_step = sj.online_method(name, cell, params)
    ref = _online(per_step, params, xs, ys).grads
    for method in (per_step, chunked_method(cell, params, n=n, chunk=4)):
        bf = _online(method, params, xs, ys, state=method.init(B, jnp.bfloat16))
        assert {a.dtype for a in jax.tree.leaves(bf.final_method_state.influence)} == {jnp.dtype(jnp.bfloat16)}
        assert {a.dtype for a in jax.tree.leaves(bf.grads)} == {jnp.dtype(jnp.float32)}
        err = tree_rel_err(bf.grads, ref)
        assert 0 < err < 2e-2, (method.name, err)


def test_state_layout_and_validation():
    cell = nn.GRUCell(4)
    params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)))["params"]
    ch = sj.online_method("snap1", cell, params, chunk=5)
    st = ch.init(2)
    assert isinstance(st, ChunkedState) and ch.name == "snap1-chunk5"
    for ax, sub in zip(ch.batch_axes(), st):  # every declared batch axis has the batch size
        if ax is None:
            assert all(jnp.ndim(a) == 0 for a in jax.tree.leaves(sub))
        else:
            assert {jnp.shape(a)[ax] for a in jax.tree.leaves(sub)} == {2}
    assert ch.num_stored() > ch.tracker.num_stored()
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        chunked_method(cell, params, n=1, chunk=0)
    with pytest.raises(ValueError, match=r"exact RTRL \(n=None\) or SnAp-1"):
        chunked_method(cell, params, n=2, chunk=4)
    with pytest.raises(ValueError, match="compressed form"):
        chunked_method(sj.as_recurrent(cell, generic=True), params, n=1, chunk=4)
    with pytest.raises(ValueError, match=r"x must be a float array of shape \(2, 3\)"):
        ch.step(params, ch.init_carry(2), st, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="carry must match"):
        ch.step(params, ch.init_carry(3), st, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="dloss_dcarry must match"):
        ch.gradient(params, st, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"where must have shape \(2,\)"):
        ch.reset(st, jnp.ones((3,), bool))
