"""Checkpoint/resume of the full online state: bit-identical to an uninterrupted run; the file
carries an integrity check (truncation and corruption are detected), is written atomically
with the user's umask, and restores into an abstract ``jax.eval_shape`` template."""

import os
import struct
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from snapjax import OnlineLearner
from snapjax.checkpoint import restore_state, save_state, state_from_bytes, state_to_bytes


def test_resume_mid_stream_is_bit_identical(tmp_path):
    B, n_in, T = 4, 2, 10
    learner = OnlineLearner(nn.GRUCell(5), 3, method="snap1", optimizer=optax.adam(1e-2), update_every=3)
    ks = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(ks[0], (2 * T, B, n_in))
    ys = jax.random.randint(ks[1], (2 * T, B), 0, 3)
    run = jax.jit(learner.run)

    # uninterrupted: two chunks of 10 steps
    state = learner.init(jax.random.key(1), None, batch_size=B, input_size=n_in)
    a, out_a1, _ = run(state, xs[:T], ys[:T])
    a, out_a2, met_a = run(a, xs[T:], ys[T:])

    # interrupted: 10 steps, save, restore into a fresh template, 10 steps
    b, out_b1, _ = run(state, xs[:T], ys[:T])
    path = tmp_path / "ckpt" / "state.msgpack"
    save_state(path, b)
    template = learner.init(jax.random.key(99), None, batch_size=B, input_size=n_in)
    restored = restore_state(path, template)
    chex.assert_trees_all_equal(restored, b)
    assert restored.key.dtype == state.key.dtype  # typed PRNG key survives
    b, out_b2, met_b = run(restored, xs[T:], ys[T:])

    chex.assert_trees_all_equal(b, a)
    chex.assert_trees_all_equal(out_b2, out_a2)
    chex.assert_trees_all_equal(met_b, met_a)
    assert int(a.step) == 2 * T


def test_restore_rejects_mismatched_template(tmp_path):
    learner = OnlineLearner(nn.GRUCell(5), 3, method="snap1", optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(1), None, batch_size=4, input_size=2)
    save_state(tmp_path / "s", state)
    other = learner.init(jax.random.key(1), None, batch_size=2, input_size=2)  # another batch size
    with pytest.raises(ValueError, match=r"leaf \.carry\[0\] is \(4, 5\)/float32, the template expects \(2, 5\)"):
        restore_state(tmp_path / "s", other)
    with pytest.raises(ValueError, match="does not match the template's structure"):
        restore_state(tmp_path / "s", {"w": jnp.zeros(3)})


# --------------------------------------------------------------------------- plain pytrees


class _Inner(NamedTuple):
    count: jax.Array
    flags: jax.Array


def _state():
    """A pytree with every kind of leaf a state holds: floats (incl. NaN/-0.0 bit patterns),
    bf16, ints, bools, typed keys of two implementations, NamedTuple and nested containers."""
    w = jnp.asarray(np.array([1.5, -0.0, np.nan, np.inf, 3e-39], np.float32))
    return {
        "params": {"w": w, "b": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7},
        "inner": _Inner(jnp.int32(7), jnp.array([True, False, True])),
        "keys": (jax.random.key(3), jax.random.split(jax.random.key(4, impl="rbg"), 2)),
        "raw_key": jax.random.PRNGKey(5),
    }


def _bits(tree):
    """Leaves as (dtype, shape, raw bytes); typed keys as their key dtype + key_data bytes."""
    out = []
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            out.append((str(x.dtype), x.shape, np.asarray(jax.random.key_data(x)).tobytes()))
        else:
            out.append((str(x.dtype), x.shape, np.asarray(x).tobytes()))
    return out


def test_restore_from_eval_shape_template_is_bit_exact(tmp_path):
    state = _state()
    path = tmp_path / "ckpt.bin"
    save_state(path, state)
    abstract = jax.eval_shape(lambda: _state())
    assert isinstance(abstract["keys"][0], jax.ShapeDtypeStruct)
    restored = restore_state(path, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _bits(restored) == _bits(state)
    assert restored["keys"][1].dtype == state["keys"][1].dtype  # key<rbg> stays rbg
    # the restored keys are usable keys: same draws as the originals
    np.testing.assert_array_equal(jax.random.normal(restored["keys"][1][0], (3,)),
                                  jax.random.normal(state["keys"][1][0], (3,)))
    # a concrete template gives the same result
    assert _bits(restore_state(path, _state())) == _bits(state)


def test_learner_state_restores_into_abstract_template(tmp_path):
    learner = OnlineLearner(nn.GRUCell(4), 2, method="snap2", optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(1), None, batch_size=3, input_size=2)
    state, _, _ = jax.jit(learner.run)(state, jnp.ones((4, 3, 2)), jnp.zeros((4, 3), jnp.int32))
    save_state(tmp_path / "s", state)
    abstract = jax.eval_shape(lambda: learner.init(jax.random.key(2), None, batch_size=3, input_size=2))
    restored = restore_state(tmp_path / "s", abstract)
    assert _bits(restored) == _bits(state)


def test_flipped_bit_in_payload_is_detected(tmp_path):
    path = tmp_path / "ckpt.bin"
    save_state(path, _state())
    data = bytearray(path.read_bytes())
    header = struct.calcsize("<8sIQ32s")
    assert len(data) > header + 10
    data[header + (len(data) - header) // 2] ^= 0x10  # one bit in the middle of the payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.bin is corrupted: SHA-256"):
        restore_state(path, _state())
    # a flipped bit in the recorded digest is detected the same way
    data = bytearray(state_to_bytes(_state()))
    data[25] ^= 0x01
    with pytest.raises(ValueError, match="corrupted"):
        state_from_bytes(bytes(data), _state())


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "ckpt.bin"
    save_state(path, _state())
    full = path.read_bytes()
    for keep in (len(full) - 1, len(full) // 2, 60, 30, 3, 0):
        path.write_bytes(full[:keep])
        with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.bin is truncated"):
            restore_state(path, _state())
    path.write_bytes(full + b"\x00")
    with pytest.raises(ValueError, match="corrupted: 1 bytes follow"):
        restore_state(path, _state())


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"other\.bin is not a snapjax checkpoint"):
        restore_state(path, _state())
    data = bytearray(state_to_bytes(_state()))
    data[8:12] = struct.pack("<I", 99)
    with pytest.raises(ValueError, match="format version 99"):
        state_from_bytes(bytes(data), _state())


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = tmp_path / f"ckpt_{umask:o}.bin"
        save_state(path, _state())
        save_state(path, _state())  # overwriting keeps the umask mode too
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    save_state(path, _state())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        save_state(path, {"other": jnp.zeros(4)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]
    assert _bits(restore_state(path, _state())) == _bits(_state())
