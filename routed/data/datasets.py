"""The dataset objects `load_dataset` returns; the trainer codes against these.

Both classes offer the same interface:

  vocab_size                   int, logits dimension (SentencePiece pieces)
  vocabulary                   seqio.Vocabulary (loaded lazily; imports TF)
  vocab_path                   str, the SentencePiece model file
  seq_len                      int, tokens per model input (chunks hold +1)
  train_batch(step, B, seed)   int32 [B, seq_len + 1], f(seed, step, B) only
  eval_batches(n, B)           n x int32 [B, seq_len + 1], fixed list
  num_train_tokens             target tokens per epoch (sequences * seq_len)
  num_eval_tokens              the same for the validation split
  describe()                   one-line summary

`PackedLMDataset` serves the stdlib tasks from memory-mapped arrays (no TF);
`StreamingLMDataset` streams C4 through seqio/tf.data.
"""

from __future__ import annotations

import numpy as np

from routed.data import ordering, packed


def _fmt_tokens(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else str(n)


class _VocabMixin:
  vocab_path: str
  _vocabulary = None

  @property
  def vocabulary(self):
    """seqio.SentencePieceVocabulary; the first access imports seqio/TF."""
    if self._vocabulary is None:
      from routed.data import vocab  # pylint: disable=g-import-not-at-top
      self._vocabulary = vocab.seqio_vocabulary(self.vocab_path)
    return self._vocabulary


class PackedLMDataset(_VocabMixin):
  """A stdlib task: packed arrays cached on disk, batches by index."""

  def __init__(self, task: str, seq_len: int, splits: packed.PackedSplits,
               vocab_path: str, vocab_size: int, cache_dir: str):
    self.task = task
    self.seq_len = seq_len
    self.vocab_path = vocab_path
    self.vocab_size = vocab_size
    self.cache_dir = cache_dir
    self._train = splits.train
    self._validation = splits.validation
    self.meta = splits.meta

  @property
  def num_train_sequences(self) -> int:
    return int(self._train.shape[0])

  @property
  def num_eval_sequences(self) -> int:
    return int(self._validation.shape[0])

  @property
  def num_train_tokens(self) -> int:
    return self.num_train_sequences * self.seq_len

  @property
  def num_eval_tokens(self) -> int:
    return self.num_eval_sequences * self.seq_len

  def train_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """int32 [batch_size, seq_len + 1]; a pure function of (seed, step)."""
    idx = ordering.train_indices(step, batch_size, seed,
                                 self.num_train_sequences)
    return self._gather(self._train, idx)

  def eval_batches(self, num_batches: int,
                   batch_size: int) -> list[np.ndarray]:
    """`num_batches` int32 [batch_size, seq_len + 1]; the same every call."""
    idx = ordering.eval_indices(num_batches, batch_size,
                                self.num_eval_sequences)
    return [self._gather(self._validation, row) for row in idx]

  @staticmethod
  def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # Reading rows in sorted order is kinder to the memory map; then restore
    # the batch order.
    order = np.argsort(idx, kind='stable')
    rows = np.empty((len(idx), arr.shape[1]), np.int32)
    rows[order] = arr[idx[order]]
    return rows

  def describe(self) -> str:
    return (f'data: task {self.task}, train {_fmt_tokens(self.num_train_tokens)}'
            f' tokens ({self.num_train_sequences} x {self.seq_len}+1), '
            f'validation {_fmt_tokens(self.num_eval_tokens)} tokens, vocab '
            f'{self.vocab_size} ({self.vocab_path}), cache {self.cache_dir}')


class StreamingLMDataset(_VocabMixin):
  """C4 through seqio: shuffled stream with a fixed seed, skipped on resume.

  Too large to materialise, so batch `step` is reached by replaying the
  seeded stream and skipping step * batch_size chunks (cost grows with step;
  tf.data's determinism makes the result equal to an uninterrupted run's for
  the same seed and batch size). Consecutive calls reuse one iterator.
  """

  def __init__(self, task_obj, task: str, seq_len: int, vocab_path: str,
               vocab_size: int, data_dir: str, tfds_name: str):
    self._task = task_obj
    self.task = task
    self.seq_len = seq_len
    self.vocab_path = vocab_path
    self.vocab_size = vocab_size
    self.data_dir = data_dir
    self.tfds_name = tfds_name
    self._iter = None
    self._iter_key = None  # (seed, batch_size, next step)
    self._eval_cache = {}

  # Unknown without a full pass over hundreds of GB: 0 means "unknown".
  num_train_tokens = 0
  num_eval_tokens = 0

  def train_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    if self._iter is None or self._iter_key != (seed, batch_size, step):
      from routed.data import tasks  # pylint: disable=g-import-not-at-top
      ds = tasks.chunks(self._task, 'train', self.seq_len, shuffle=True,
                        seed=seed, num_epochs=None)
      ds = ds.skip(step * batch_size).batch(batch_size, drop_remainder=True)
      self._iter = ds.prefetch(2).as_numpy_iterator()
    batch = np.asarray(next(self._iter), np.int32)
    self._iter_key = (seed, batch_size, step + 1)
    return batch

  def eval_batches(self, num_batches: int,
                   batch_size: int) -> list[np.ndarray]:
    key = (num_batches, batch_size)
    if key not in self._eval_cache:
      from routed.data import tasks  # pylint: disable=g-import-not-at-top
      ds = tasks.chunks(self._task, 'validation', self.seq_len,
                        shuffle=False, num_epochs=None)  # None: cycle
      ds = ds.batch(batch_size, drop_remainder=True).take(num_batches)
      self._eval_cache[key] = [np.asarray(b, np.int32)
                               for b in ds.as_numpy_iterator()]
    return list(self._eval_cache[key])

  def describe(self) -> str:
    return (f'data: task {self.task}, streaming {self.tfds_name} from '
            f'{self.data_dir}, seq_len {self.seq_len}, vocab {self.vocab_size}'
            f' ({self.vocab_path})')
