"""Data pipeline: corpora prepared into ArrayRecord shards, read with Grain.

  from routed.data import load_dataset, DataError
  ds = load_dataset(config.data, seq_len)      # prepares the stdlib corpus on first use
  batch = ds.train_batch(step, batch_size, seed)  # {'tokens', 'segment_ids', 'positions'}
                                                  # int32 [B, seq_len + 1] each

`python -m routed.data.prepare` turns any corpus (jsonl, json.gz, parquet, text, TFDS)
into a prepared directory, and `data.path` trains on it; the embedded tasks `stdlib`
(the running Python's standard library, ~10 M tokens at vocab 4096) and `stdlib_mini`
(~0.9 M tokens at vocab 512, for tests) go through the same code. Modules:

  errors       DataError
  paths        data dir resolution, cache layout, atomic writes
  tf_env       lazy, quiet, CPU-only TensorFlow/seqio/TFDS imports
  corpus       the stdlib file list and train/validation split
  vocab        SentencePiece training and caching
  seqio_vocab  seqio's Vocabulary over the same tokenizer
  sources      reading documents from each input format
  packing      documents -> fixed-length rows with segment ids and positions
  records      the prepared format: ArrayRecord examples and index.json
  prepare      the `routed.data.prepare` command and its worker pool
  reader       PreparedDataset: Grain over a prepared directory
  load         load_dataset / check_data_config

Importing this package is cheap: TensorFlow is imported only for a TFDS input or
`PreparedDataset.vocabulary`.
"""

from routed.data.errors import DataError
from routed.data.load import check_data_config, load_dataset
from routed.data.reader import PreparedDataset

__all__ = ['DataError', 'check_data_config', 'load_dataset', 'PreparedDataset']
