"""Reading a prepared directory (routed/data/records.py) with Grain.

`PreparedDataset` is what the trainer codes against:

  vocab_size, vocab_path, vocabulary   the SentencePiece model in DIR (vocabulary: seqio's)
  seq_len                              tokens per model input (examples hold seq_len + 1)
  train_batch(step, B, seed, rows)     one batch, a pure function of (seed, step, B)
  train_batches(start, B, seed, rows)  batches start, start + 1, ... read ahead by threads
  eval_batches(n, B, rows)             the same n validation batches every call
  num_train_tokens, num_eval_tokens, describe(), examples_decoded, batches_read

A batch is {'tokens', 'segment_ids', 'positions'}, each int32 [len(rows), seq_len + 1]:
rows `rows` (default: all B) of the *global* batch. Global example g = step * B + i is
record `order[g]` of the ArrayRecord files, where `order` is Grain's
`MapDataset.range(N).shuffle(seed).repeat()`: a global shuffle that reshuffles every
epoch (the same records as `MapDataset.source(files).shuffle(seed).repeat()[g]`, read
at less than half its cost per example). Batches therefore depend on (seed, step, B)
and the Grain version, not on how many processes read them or where a run was resumed: each
process reads only the rows its devices hold, and starting at step 1,000,000 costs what
starting at step 0 does (the position is the step; there is no iterator state to save).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from routed.data import records, vocab
from routed.data.errors import DataError

EVAL_SEED = 0x6576616C  # fixed: the validation sample is the same for every run
READ_THREADS = 2        # batches read in parallel ahead of the step
READ_AHEAD = 4          # batches buffered


def _fmt_tokens(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else str(n)


class PreparedDataset:
  """A prepared directory, read through Grain."""

  def __init__(self, directory: str, seq_len: int):
    index = records.read_index(directory)
    if index is None:
      raise DataError(f'data.path={directory!r} holds no prepared data ({records.INDEX} '
                      'missing); prepare it with python -m routed.data.prepare '
                      f'--input=GLOB --output={directory}')
    if index['seq_len'] != seq_len:
      raise DataError(f'data.path={directory!r} was prepared for seq_len {index["seq_len"]}, '
                      f'but train.seq_len={seq_len}; set train.seq_len={index["seq_len"]} or '
                      f'prepare again with --seq_len={seq_len}')
    for split in records.SPLITS:
      s = index['splits'][split]
      if not s['complete']:
        done = sum(v['done'] for v in s['sources'].values())
        want = sum(v['parts'] for v in s['sources'].values())
        raise DataError(f'data.path={directory!r}: the {split} split is incomplete ({done} '
                        f'of {want} parts prepared); rerun routed.data.prepare (every '
                        'shard) on it')
      if not s['examples']:
        raise DataError(f'data.path={directory!r} has no {split} examples; prepare a '
                        'validation split with --split=validation or --holdout'
                        if split == 'validation' else
                        f'data.path={directory!r} has no train examples')
    self.path, self.seq_len, self.index = directory, seq_len, index
    self.vocab_path = os.path.join(directory, index['vocab']['file'])
    self.vocab_size = int(index['vocab']['pieces'])
    self.layout = records.Layout.from_json(index['record'])
    self._sources = {split: self._source(split) for split in records.SPLITS}
    self._train = {}  # seed -> shuffled, repeated MapDataset of record indices
    # What this process has read and decoded so far (all splits, read-ahead included).
    self.examples_decoded = self.batches_read = 0
    self._lock = threading.Lock()
    self._vocabulary = None

  def _source(self, split: str):
    import grain  # pylint: disable=g-import-not-at-top
    files = [os.path.join(self.path, f['file']) for f in self.index['splits'][split]['files']]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise DataError(f'data.path={self.path!r}: {missing[0]} is missing; prepare again')
    return grain.sources.ArrayRecordDataSource(files)

  @property
  def vocabulary(self):
    """seqio.SentencePieceVocabulary; the first access imports seqio/TF."""
    if self._vocabulary is None:
      self._vocabulary = vocab.seqio_vocabulary(self.vocab_path)
    return self._vocabulary

  @property
  def num_train_sequences(self) -> int:
    return len(self._sources['train'])

  @property
  def num_eval_sequences(self) -> int:
    return len(self._sources['validation'])

  @property
  def num_train_tokens(self) -> int:
    return self.num_train_sequences * self.seq_len

  @property
  def num_eval_tokens(self) -> int:
    return self.num_eval_sequences * self.seq_len

  def _order(self, split: str, seed: int):
    import grain  # pylint: disable=g-import-not-at-top
    return grain.MapDataset.range(len(self._sources[split])).shuffle(seed=seed).repeat()

  def _batch(self, split: str, order, first: int, rows) -> dict:
    # _getitems: all of this process's indices in one call. Records are then read one
    # by one: ArrayRecord's batched read fans out to a thread pool, twice as slow per
    # record when the reader has one core; reader threads parallelize across batches.
    indices = order._getitems([first + int(r) for r in rows])  # pylint: disable=protected-access
    source = self._sources[split]
    examples = [self.layout.decode(source[i]) for i in indices]
    with self._lock:  # reader threads
      self.examples_decoded += len(examples)
      self.batches_read += 1
    return {k: np.stack([ex[k] for ex in examples]) for k in records.FIELDS}

  def _shuffled(self, seed: int):
    if seed not in self._train:
      if int(seed) != seed or not 0 <= seed < 1 << 32:
        raise DataError(f'train.seed={seed!r} must be an integer in [0, 2**32)')
      self._train[seed] = self._order('train', int(seed))
    return self._train[seed]

  def train_batch(self, step: int, batch_size: int, seed: int, rows=None) -> dict:
    """Rows `rows` (default all) of global batch `step`; a pure function of its arguments."""
    if int(step) != step or step < 0:
      raise ValueError(f'step must be a non-negative integer, got {step!r}')
    rows = np.arange(batch_size) if rows is None else rows
    return self._batch('train', self._shuffled(seed), int(step) * batch_size, rows)

  def train_batches(self, start: int, batch_size: int, seed: int, rows=None):
    """An iterator over train_batch(start), train_batch(start + 1), ..., read ahead.

    Built from the step alone, so it starts at once at any step (Grain indexes the
    shuffled dataset directly; nothing is replayed).
    """
    import grain  # pylint: disable=g-import-not-at-top
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    ds = self._shuffled(seed)
    steps = grain.MapDataset.range(int(start), 1 << 62).map(
        lambda step: self._batch('train', ds, step * batch_size, rows))
    return iter(steps.to_iter_dataset(grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)))

  def eval_batches(self, num_batches: int, batch_size: int, rows=None) -> list[dict]:
    """`num_batches` batches of a fixed shuffle of the validation split (cycled)."""
    rows = np.arange(batch_size) if rows is None else rows
    order = self._order('validation', EVAL_SEED)
    return [self._batch('validation', order, b * batch_size, rows)
            for b in range(num_batches)]

  def describe(self) -> str:
    return (f'data: {self.path}, train {_fmt_tokens(self.num_train_tokens)} tokens '
            f'({self.num_train_sequences} x {self.seq_len}+1), validation '
            f'{_fmt_tokens(self.num_eval_tokens)} tokens, vocab {self.vocab_size} '
            f'(sha256 {self.index["vocab"]["sha256"][:12]})')
