"""Images as sequences for sequential classification (row-by-row or pixel-by-pixel).

Sources (both offline):

* ``sklearn.datasets.load_digits()``: 1,797 8x8 digit images shipped inside scikit-learn
  (values 0..16, scaled here to [0, 1]). scikit-learn is imported lazily.
* Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; (c) Zalando SE, MIT/Expat licence), as installed
  by the Debian package ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``
  (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``). 28x28, values scaled to [0, 1].

Inputs are host float32 arrays, time-major:

* ``mode='rows'``:   ``(H, N, W)``    one image row per step (digits T=8, Fashion-MNIST T=28);
* ``mode='pixels'``: ``(H*W, N, 1)``  one pixel per step in row-major order (T=64 / T=784).

Labels are int32 ``(N,)``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "SequenceDataset",
    "images_to_sequences",
    "load_digits_sequences",
    "read_idx",
    "load_fashion_mnist",
    "FASHION_MNIST_ROOT",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_MODES = ("rows", "pixels")


class SequenceDataset(NamedTuple):
    """Train/test split of images as time-major sequences.

    Attributes:
      train_inputs: float32 ``(T, N_train, F)``.
      train_labels: int32 ``(N_train,)``.
      test_inputs: float32 ``(T, N_test, F)``.
      test_labels: int32 ``(N_test,)``.
    """

    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray


def images_to_sequences(images: np.ndarray, mode: str = "rows") -> np.ndarray:
    """``(N, H, W)`` images -> time-major ``(H, N, W)`` (rows) or ``(H*W, N, 1)`` (pixels)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    images = np.asarray(images, dtype=np.float32)
    n, h, w = images.shape
    if mode == "rows":
        seq = images.transpose(1, 0, 2)
    else:
        seq = images.reshape(n, h * w).T[:, :, None]
    return np.ascontiguousarray(seq)


def load_digits_sequences(
    split_seed: int = 0, test_fraction: float = 0.2, mode: str = "rows"
) -> SequenceDataset:
    """sklearn's 8x8 digits as sequences, with a seeded random train/test split.

    Args:
      split_seed: seed of the permutation (``numpy.random.default_rng``) defining the split.
      test_fraction: fraction of the 1,797 examples in the test set (rounded).
      mode: ``'rows'`` -> inputs ``(8, N, 8)``; ``'pixels'`` -> inputs ``(64, N, 1)``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_sequences needs scikit-learn (`pip install scikit-learn`)."
        ) from err
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = np.asarray(digits.target, dtype=np.int32)
    n = images.shape[0]
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return SequenceDataset(
        train_inputs=images_to_sequences(images[train_idx], mode),
        train_labels=labels[train_idx],
        test_inputs=images_to_sequences(images[test_idx], mode),
        test_labels=labels[test_idx],
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX data is supported (code {dtype_code:#x})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} = {np.prod(shape)} bytes, got {data.size}")
    return data.reshape(shape)


def load_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    mode: str = "rows",
    max_train: int | None = None,
    max_test: int | None = None,
) -> SequenceDataset:
    """Fashion-MNIST (official 60k/10k split) as sequences.

    Args:
      root: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
      mode: ``'rows'`` -> inputs ``(28, N, 28)``; ``'pixels'`` -> inputs ``(784, N, 1)``.
      max_train, max_test: keep only the first examples of each split (small runs).

    Raises:
      FileNotFoundError: files missing; install with ``apt-get install dataset-fashion-mnist``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    root = Path(root)
    names = {
        split: (root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz")
        for split in ("train", "t10k")
    }
    missing = [str(p) for pair in names.values() for p in pair if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "Fashion-MNIST files not found: " + ", ".join(missing) + ". Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
            f"{FASHION_MNIST_ROOT}) or pass root= pointing at a directory holding them."
        )

    def split(name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        images_path, labels_path = names[name]
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"inconsistent Fashion-MNIST {name} files in {root}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        seq = images_to_sequences(images.astype(np.float32) / 255.0, mode)
        return seq, labels.astype(np.int32)

    train_inputs, train_labels = split("train", max_train)
    test_inputs, test_labels = split("t10k", max_test)
    return SequenceDataset(train_inputs, train_labels, test_inputs, test_labels)
