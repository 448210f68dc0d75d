"""Data pipeline: seqio tasks over TFDS, packed for LM training.

  from routed.data import load_dataset, DataError
  ds = load_dataset(config.data, seq_len)   # prepares on first use
  batch = ds.train_batch(step, batch_size, seed)  # int32 [B, seq_len + 1]

Tasks (config.data.task): `stdlib` (the running Python's standard library,
~10 M tokens at vocab 4096, built by a local TFDS builder), `stdlib_mini`
(~0.9 M tokens at vocab 512, for tests) and `c4` (TFDS c4/en, which the user
prepares). Modules:

  errors     DataError
  paths      data dir resolution, cache layout, atomic writes
  tf_env     lazy, quiet, CPU-only TensorFlow/seqio/TFDS imports
  corpus     stdlib file list and train/validation split (no TF)
  stdlib_tfds  the TFDS builder routed_stdlib/{full,mini}
  vocab      SentencePiece training/caching for the stdlib corpus
  tasks      seqio Tasks and the concatenate-and-split packing preprocessor
  packed     .npy cache of packed splits (memory-mapped loads)
  ordering   batch order as a pure function of (seed, step)
  datasets   the dataset objects the trainer uses
  load       load_dataset / check_data_config

Importing this package is cheap: TensorFlow is imported only when data must
be prepared or streamed.
"""

from routed.data.errors import DataError
from routed.data.load import check_data_config, load_dataset
from routed.data.datasets import PackedLMDataset, StreamingLMDataset

__all__ = ['DataError', 'check_data_config', 'load_dataset',
           'PackedLMDataset', 'StreamingLMDataset']
