"""The streaming driver ``snapjax.fit`` / ``learner.fit``: an endless stream at flat memory,
checkpoints (atomic, the last ``keep`` kept), a killed and restarted run bit-identical to an
uninterrupted one, the metrics the hooks receive, and its argument checks."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import snapjax as sj

B, N_IN, T = 2, 3, 6


def _chunk(i, length=T):
    x = jax.random.normal(jax.random.key(100 + i), (length, B, N_IN))
    return x, (x[..., 0] > 0).astype(jnp.int32)


def factory(n, length=T):
    def stream(start):
        for i in range(start, n):
            yield _chunk(i, length)
    return stream


# exact RTRL chunked over update periods of 4 steps: chunks of 6 steps end mid-period, so a
# checkpoint holds a half-accumulated gradient and half-filled chunk buffers
LEARNER = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="rtrl", update_every=4,
                           optimizer=optax.adam(1e-2))


def _init(learner=LEARNER):
    return learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x),
                       np.asarray(jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y))
        for x, y in zip(la, lb))


def test_100k_steps_hold_the_state_bytes_flat():
    learner = sj.OnlineLearner(nn.GRUCell(4), readout_size=2, method="snap1", optimizer=optax.sgd(0.05))
    state = learner.init(jax.random.key(0), batch_size=B, input_size=N_IN)
    start_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    seen = []
    result = learner.fit(state, factory(100, 1000), progress=False,
                         hooks=lambda step, m: seen.append((step, m["state_bytes"], m["loss"])))
    assert result.metrics["step"] == int(result.state.step) == 100_000 and len(seen) == 100
    assert [s for s, _, _ in seen] == list(range(1000, 100_001, 1000))
    assert {b for _, b, _ in seen} == {start_bytes} == {sum(a.nbytes for a in jax.tree.leaves(result.state))}
    assert all(math.isfinite(loss) for _, _, loss in seen)
    assert result.losses.shape == (100,) and np.all(np.isfinite(result.losses))
    assert result.losses[-10:].mean() < result.losses[:10].mean()  # it learns the sign of x[0]


def _uninterrupted(n):
    return sj.fit(LEARNER, _init(), factory(n), progress=False)


@pytest.mark.parametrize("kill", ["hook", "max_chunks", "list"])
def test_killed_and_restarted_run_is_bit_identical(tmp_path, kill):
    n = 11
    reference = _uninterrupted(n)
    d = tmp_path / "ckpt"
    if kill == "hook":
        def die(step, metrics):
            if metrics["chunk"] == 7:
                raise KeyboardInterrupt("killed")
        with pytest.raises(KeyboardInterrupt, match="killed"):
            sj.fit(LEARNER, _init(), factory(n), checkpoint_dir=d, checkpoint_every=12, hooks=die, progress=False)
        assert sj.training.fit.latest_checkpoint(d).endswith("ckpt-000000006.snapjax")  # every 12 steps
        stream = factory(n)
    elif kill == "max_chunks":
        first = sj.fit(LEARNER, _init(), factory(n), checkpoint_dir=d, max_chunks=5, progress=False)
        assert first.metrics["chunk"] == 5 and first.metrics["checkpoint"].endswith("ckpt-000000005.snapjax")
        stream = factory(n)
    else:  # a re-iterable stream: the restart draws and skips the chunks already consumed
        stream = [_chunk(i) for i in range(n)]
        sj.fit(LEARNER, _init(), stream, checkpoint_dir=d, max_chunks=4, progress=False)
    resumed = sj.fit(LEARNER, _init(), stream, checkpoint_dir=d, progress=False)
    assert resumed.metrics["chunk"] == n and resumed.metrics["step"] == n * T
    assert resumed.metrics["tokens"] == reference.metrics["tokens"] == n * T * B
    assert _leaves_equal(resumed.state.params, reference.state.params)
    assert _leaves_equal(resumed.state, reference.state)  # optimizer, influence, buffers, key, counters
    assert resumed.metrics["loss_ema"] == reference.metrics["loss_ema"]
    np.testing.assert_array_equal(resumed.losses, reference.losses[-len(resumed.losses):])


def test_only_the_last_checkpoints_remain(tmp_path):
    result = sj.fit(LEARNER, _init(), factory(10), checkpoint_dir=tmp_path, checkpoint_every=T, keep=3,
                    progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000008.snapjax", "ckpt-000000009.snapjax",
                                           "ckpt-000000010.snapjax"]  # and no temporary file
    back = sj.restore_state(tmp_path / "ckpt-000000010.snapjax",
                            {"state": jax.eval_shape(_init), "meta": jax.ShapeDtypeStruct((8,), jnp.uint32)})
    chunk, tokens = np.asarray(back["meta"][:4]).view(np.int64)  # int64 chunk, tokens, float64 EMA, int64 flag
    assert (chunk, tokens) == (10, 10 * T * B) and _leaves_equal(back["state"], result.state)
    assert np.asarray(back["meta"][4:6]).view(np.float64)[0] == result.metrics["loss_ema"]
    # a finished run resumed: nothing left to run, the same state
    again = sj.fit(LEARNER, _init(), factory(10), checkpoint_dir=tmp_path, progress=False)
    assert again.losses.shape == (0,) and again.metrics == {} and _leaves_equal(again.state, result.state)


def test_hooks_receive_the_documented_metrics(tmp_path):
    n, ema = 5, 0.5
    masks = [jnp.ones((T, B)).at[0].set(0.0) for _ in range(n)]
    chunks = [(*_chunk(i), masks[i]) for i in range(n)]
    calls = []
    sj.fit(LEARNER, _init(), chunks, checkpoint_dir=tmp_path, checkpoint_every=12, ema=ema, progress=False,
           hooks=[lambda step, m: calls.append((step, m))])
    # the same chunks through run_jit by hand
    state, losses = _init(), []
    for xs, ys, mk in chunks:
        state, _, out = LEARNER.run_jit(state, xs, ys, mk)
        losses.append(float(np.mean(np.asarray(out["loss"]))))
    assert len(calls) == n
    avg = None
    for i, (step, m) in enumerate(calls):
        assert set(m) == {"chunk", "step", "tokens", "tokens_per_s", "loss", "loss_ema", "skipped", "resets",
                          "excluded", "state_bytes", "seconds", "checkpoint"}
        avg = losses[i] if avg is None else ema * avg + (1 - ema) * losses[i]
        assert step == m["step"] == (i + 1) * T and m["chunk"] == i + 1 and m["tokens"] == (i + 1) * T * B
        assert m["loss"] == losses[i] and m["loss_ema"] == pytest.approx(avg, rel=1e-12)
        assert (m["skipped"], m["resets"], m["excluded"]) == (0, 0, 0)
        assert m["state_bytes"] == sum(a.nbytes for a in jax.tree.leaves(state))
        assert m["tokens_per_s"] > 0 and m["seconds"] > 0
        expected = f"ckpt-{i + 1:09d}.snapjax" if (i + 1) % 2 == 0 else None  # every 12 steps = 2 chunks
        assert (m["checkpoint"] and os.path.basename(m["checkpoint"])) == expected
    assert _leaves_equal(state, sj.fit(LEARNER, _init(), chunks, progress=False).state)


def test_progress_bar_goes_to_stderr(capsys):
    sj.fit(LEARNER, _init(), [_chunk(0), _chunk(1)], progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "chunk" in err and "loss_ema=" in err and "tok_s=" in err


BAD = [
    (dict(keep=0), r"keep must be a positive int, got 0"),
    (dict(checkpoint_every=5), r"checkpoint_every needs checkpoint_dir"),
    (dict(checkpoint_dir="x", checkpoint_every=0), r"checkpoint_every must be a positive int, got 0"),
    (dict(max_chunks=-1), r"max_chunks must be an int >= 0 or None, got -1"),
    (dict(ema=1.0), r"ema must be a number in \[0, 1\)"),
    (dict(hooks=[print, 3]), r"hooks must be callables hook\(step, metrics\), got int"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        sj.fit(LEARNER, _init(), [_chunk(0)], progress=False, **kw)


def test_bad_stream_state_and_chunks_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"stream must be an iterable of \(xs, ys\[, masks\]\) chunks or a factory"):
        sj.fit(LEARNER, _init(), 5, progress=False)
    with pytest.raises(ValueError, match=r"fit needs the learner's OnlineState .*, got dict"):
        sj.fit(LEARNER, {"params": 1}, [_chunk(0)], progress=False)
    with pytest.raises(ValueError, match=r"chunk 1 of the stream: expected \(xs, ys\) or \(xs, ys, masks\) .* got "
                                         r"a tuple of length 1"):
        sj.fit(LEARNER, _init(), [_chunk(0), (_chunk(1)[0],)], progress=False)
    sj.fit(LEARNER, _init(), [_chunk(0)], checkpoint_dir=tmp_path, progress=False)
    other = sj.OnlineLearner(nn.GRUCell(5), readout_size=2, method="rtrl", update_every=4)
    with pytest.raises(ValueError, match=r"ckpt-000000001.snapjax.*leaf .* template expects"):
        sj.fit(other, other.init(jax.random.key(0), batch_size=B, input_size=N_IN), [_chunk(0)],
               checkpoint_dir=tmp_path, progress=False)
