"""The native CPU kernel of per-step SnAp-1 (snapjax.engine.native): the fused update and
gradient equal an independent reference and the XLA path, in every caller (online_gradient, the
learner with its fault containment, vmap), and the package falls back to XLA when it cannot
build the kernel."""

import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj
from snapjax.engine import native


def _reference(D, C, leaves):
    """The defining recursion, written out in numpy: J ← D J + V ⊗ G, g = acc + Σ_b C J (pairs:
    a 2×2 block per unit on (Re J, Im J), then the pattern P: an all-out component is 0)."""
    out = []
    for J, V, G, acc, *P in leaves:
        B, U = D.shape[:2]
        if D.ndim == 2:
            Jn = D[:, None, :] * J.reshape(B, -1, U) + V[:, :, None] * G[:, None, :]
            g = np.einsum("bu,blu->lu", C, Jn)
        else:
            j = np.stack([J.real, J.imag], -1).reshape(B, -1, U, 2)
            n = np.stack([D[:, None, :, 2 * a] * j[..., 0] + D[:, None, :, 2 * a + 1] * j[..., 1] for a in (0, 1)], -1)
            n = n + V[:, :, None, None] * G[:, None, :, :]
            if P and P[0] is not None:
                keep = np.asarray(P[0], bool)
                n = np.where(keep.all(0)[None, None, None, :], n, np.where(keep.any(0), n * keep, 0.0))
            Jn = n[..., 0] + 1j * n[..., 1]
            g = np.einsum("bua,blua->lu", C, n)
        out.append((Jn.reshape(J.shape), acc + g.reshape(acc.shape)))
    return out


def test_the_kernel_is_built_where_a_compiler_is():
    if sys.platform != "linux" or not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler here: the XLA path is used (tested below)")
    assert native.available(), native.status()
    assert native.status().startswith("native: ")


@pytest.mark.parametrize("B,Ls,U", [(1, [1], 1), (5, [7, 1], 3), (16, [64, 9, 1], 33), (3, [300], 17)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_equals_the_recursion(x64, B, Ls, U, dtype):
    rng = np.random.default_rng(B + U)
    D, C = (rng.standard_normal((B, U)).astype(dtype) for _ in range(2))
    leaves = [(rng.standard_normal((B, L, U, 1, 1)).astype(dtype), rng.standard_normal((B, L)).astype(dtype),
               rng.standard_normal((B, U)).astype(dtype), rng.standard_normal((L, U)).astype(dtype)) for L in Ls]
    got = jax.jit(native.diag_update_and_sum)(jnp.asarray(D), jnp.asarray(C),
                                              [tuple(jnp.asarray(a) for a in leaf) for leaf in leaves])
    tol = 1e-12 if dtype == "float64" else 2e-5
    for (J, g), (Jr, gr) in zip(got, _reference(D, C, leaves)):
        assert J.shape == Jr.shape and g.shape == gr.shape and J.dtype == dtype
        np.testing.assert_allclose(np.asarray(J), Jr, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(g), gr, rtol=tol, atol=tol * B)


@pytest.mark.parametrize("pattern", [None, "partial", "one component out"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pair_kernel_equals_the_recursion(x64, pattern, dtype):
    """Complex pairs (LSTM, LRU): the 2×2 block per unit, then the SnAp pattern."""
    B, Ls, U = 6, [5, 1], 7
    rng = np.random.default_rng(3)
    cdt = np.complex64 if dtype == "float32" else np.complex128
    D = rng.standard_normal((B, U, 4)).astype(dtype)
    C = rng.standard_normal((B, U, 2)).astype(dtype)
    P = {None: None, "partial": rng.random((U, 2)) > 0.4,
         "one component out": np.stack([np.zeros(U, bool), np.ones(U, bool)], -1)}[pattern]
    leaves = [((rng.standard_normal((B, L, U, 1, 1)) + 1j * rng.standard_normal((B, L, U, 1, 1))).astype(cdt),
               rng.standard_normal((B, L)).astype(dtype), rng.standard_normal((B, U, 2)).astype(dtype),
               rng.standard_normal((L, U)).astype(dtype), P) for L in Ls]
    got = jax.jit(lambda D, C, ls: native.diag_update_and_sum(D, C, [leaf + (P,) for leaf in ls]))(
        jnp.asarray(D), jnp.asarray(C), [tuple(jnp.asarray(a) for a in leaf[:4]) for leaf in leaves])
    tol = 1e-12 if dtype == "float64" else 2e-5
    for (J, g), (Jr, gr) in zip(got, _reference(D, C, leaves)):
        assert J.dtype == cdt and g.dtype == dtype
        np.testing.assert_allclose(np.asarray(J), Jr, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(g), gr, rtol=tol, atol=tol * B)


def test_mismatched_inputs_raise():
    D = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"leaf 0: V must be \(2, 4\)"):
        native.diag_update_and_sum(D, D, [(jnp.ones((2, 4, 3)), jnp.ones((3, 4)), D, jnp.ones((4, 3)))])
    with pytest.raises(ValueError, match=r"leaf 0: J \(2, 5, 3\) float32 must hold \(B, L, U\) = \(2, 4, 3\)"):
        native.diag_update_and_sum(D, D, [(jnp.ones((2, 5, 3)), jnp.ones((2, 4)), D, jnp.ones((4, 3)))])
    with pytest.raises(ValueError, match="D must be float32 or float64"):
        native.diag_update_and_sum(D.astype(jnp.bfloat16), D, [])


@pytest.fixture
def xla_only(monkeypatch):
    """Run a block with the kernel switched off (every leaf through XLA's two passes)."""
    def switch():
        monkeypatch.setattr(native, "available", lambda: False)
    return switch


def _cells():
    return [("gru", sj.GRUCell(6)), ("vanilla", sj.VanillaCell(6)), ("leaky", sj.LeakyRNNCell(6)),
            ("linen-gru", nn.GRUCell(6)), ("lstm", sj.LSTMCell(6)), ("lru", sj.LRUCell(6))]


@pytest.mark.parametrize("name,cell", _cells(), ids=[n for n, _ in _cells()])
def test_online_gradient_is_the_xla_one(x64, xla_only, name, cell):
    rec = sj.as_recurrent(cell)
    params = rec.init_params(jax.random.key(0), 3)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    xs = jax.random.normal(jax.random.key(1), (9, 5, 3), jnp.float64)
    out = int(np.shape(rec.output(rec.init_carry(1)))[-1])
    ys = jax.random.normal(jax.random.key(2), (9, 5, out), jnp.float64)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    method = sj.online_method("snap1", cell, params)
    def run():  # a new function each time: jit's cache never hands back the other path
        return jax.jit(lambda: sj.online_gradient(method, params, None, xs, ys, loss))

    assert "snapjax_" in run().lower().as_text()  # the kernel is in the program
    fused = run()()
    xla_only()
    assert "snapjax_diag_update" not in run().lower().as_text()
    plain = run()()
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_learner_with_a_fault_is_the_xla_one(x64, xla_only):
    """The learner's step, a NaN input in one example at t = 3 (its reset goes through the
    guard's containment, which reads the fused step's state): parameters, influence and the
    fault counters equal XLA's path."""
    learner = sj.OnlineLearner(nn.GRUCell(5), readout_size=3, method="snap1", optimizer=optax.adam(1e-2))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), learner.online_model.init(jax.random.key(0), 2))
    state = learner.init(jax.random.key(0), params, batch_size=4, input_size=2)
    xs = jax.random.normal(jax.random.key(1), (7, 4, 2), jnp.float64).at[3, 1, 0].set(jnp.nan)
    ys = jax.random.randint(jax.random.key(2), (7, 4), 0, 3)
    assert "snapjax_diag_update_f64" in jax.jit(lambda s: learner.run(s, xs, ys)).lower(state).as_text()
    fused, _, m_fused = jax.jit(lambda s: learner.run(s, xs, ys))(state)
    xla_only()
    plain, _, m_plain = jax.jit(lambda s: learner.run(s, xs, ys))(state)
    assert int(fused.resets) == int(plain.resets) == 1
    assert int(fused.step) == int(plain.step) == 7 and int(fused.excluded) == int(plain.excluded)
    parts = lambda s: jax.tree.leaves((s.params, s.method_state, s.carry, s.opt_state))  # noqa: E731
    for a, b in zip(parts(fused), parts(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(m_fused["loss"]), np.asarray(m_plain["loss"]), rtol=1e-12)


def test_vmapped_online_gradient_is_per_seed(x64):
    cell = sj.GRUCell(4)
    rec = sj.as_recurrent(cell)
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: jax.tree.map(lambda a: a.astype(jnp.float64), rec.init_params(k, 2)))(keys)
    xs = jax.random.normal(jax.random.key(1), (6, 3, 2), jnp.float64)
    ys = jnp.zeros((6, 3, 4), jnp.float64)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    one = jax.tree.map(lambda a: a[0], params)
    method = sj.online_method("snap1", cell, one)
    grad = lambda p: sj.online_gradient(method, p, None, xs, ys, loss).grads  # noqa: E731
    batched = jax.jit(jax.vmap(grad))(params)
    for i in range(3):
        single = jax.jit(grad)(jax.tree.map(lambda a: a[i], params))
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("SNAPJAX_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="the native SnAp-1 kernel did not compile"):
        ok, why = native._load.__wrapped__()
    assert not ok and why.startswith("compile failed")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    monkeypatch.setenv("SNAPJAX_NATIVE", "0")
    assert native._load.__wrapped__() == (False, "disabled by SNAPJAX_NATIVE=0")


def test_derivatives_through_the_kernel_are_xla_ones(x64, xla_only):
    """A meta-gradient (d/dθ of a function of the online gradient) through the fused step equals
    the one through XLA's path (the kernel's JVP is the XLA form's)."""
    cell = sj.GRUCell(4)
    rec = sj.as_recurrent(cell)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), rec.init_params(jax.random.key(0), 2))
    xs = jax.random.normal(jax.random.key(1), (5, 3, 2), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (5, 3, 4), jnp.float64)
    method = sj.online_method("snap1", cell, params)

    def meta(p):  # squared norm of the online gradient
        g = sj.online_gradient(method, p, None, xs, ys, lambda y, t: jnp.sum((y - t) ** 2)).grads
        return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g))

    fused = jax.jit(lambda p: jax.grad(meta)(p))
    assert "snapjax_diag_update_f64" in fused.lower(params).as_text()
    a = fused(params)
    xla_only()
    b = jax.jit(lambda p: jax.grad(meta)(p))(params)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-12)
