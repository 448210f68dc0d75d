"""Packed token arrays cached on disk: materialise once, memory-map after.

A cache dir `routed_packed/<task>-<vocab>-L<seq_len>/` holds

  train.npy, validation.npy   [num_sequences, seq_len + 1] token ids, in the
                              task's stream order; uint16 when the vocab fits
                              (half the disk/page cache), else int32
  meta.json                   what the arrays were built from; written last,
                              so it marks a complete cache

Loading reads only meta.json and the .npy headers (arrays are memory-mapped),
and imports neither TensorFlow nor seqio: restarting a run is instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from routed.data import paths
from routed.data.errors import DataError

FORMAT_VERSION = 1
SPLITS = ('train', 'validation')
META = 'meta.json'


class PackedSplits(NamedTuple):
  train: np.ndarray       # [num_train_sequences, seq_len + 1], memory-mapped
  validation: np.ndarray  # [num_eval_sequences, seq_len + 1], memory-mapped
  meta: dict


def storage_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _expected(task: str, seq_len: int, vocab_md5: str) -> dict:
  return {'format': FORMAT_VERSION, 'task': task, 'seq_len': seq_len,
          'vocab_md5': vocab_md5}


def load(cache_dir: str, task: str, seq_len: int,
         vocab_md5: str) -> PackedSplits | None:
  """The cached arrays, or None if absent, incomplete or built differently."""
  try:
    with open(os.path.join(cache_dir, META)) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  if any(meta.get(k) != v for k, v in
         _expected(task, seq_len, vocab_md5).items()):
    return None
  arrays = []
  for split in SPLITS:
    try:
      arr = np.load(os.path.join(cache_dir, f'{split}.npy'), mmap_mode='r')
    except (OSError, ValueError):
      return None
    try:
      want_rows = meta['splits'][split]['sequences']
      want_dtype = np.dtype(meta['dtype'])
    except (KeyError, TypeError):
      return None
    if list(arr.shape) != [want_rows, seq_len + 1] or arr.dtype != want_dtype:
      return None
    arrays.append(arr)
  return PackedSplits(arrays[0], arrays[1], meta)


def _materialise(task_obj, split: str, seq_len: int,
                 dtype: np.dtype) -> np.ndarray:
  """All packed chunks of one split, in stream order (runs TF)."""
  from routed.data import tasks  # pylint: disable=g-import-not-at-top
  ds = tasks.chunks(task_obj, split, seq_len).batch(4096)
  parts = [np.asarray(b, dtype=dtype) for b in ds.as_numpy_iterator()]
  if not parts:
    return np.zeros([0, seq_len + 1], dtype)
  return np.concatenate(parts)


def write(cache_dir: str, task_obj, task: str, seq_len: int, vocab_md5: str,
          vocab_size: int) -> PackedSplits:
  """Tokenize + pack both splits through the seqio task and cache them.

  Each file is written atomically; meta.json is removed first and written
  last, so an interrupted run leaves a cache that `load` rejects.
  """
  os.makedirs(cache_dir, exist_ok=True)
  try:
    os.remove(os.path.join(cache_dir, META))
  except FileNotFoundError:
    pass
  dtype = storage_dtype(vocab_size)
  meta = dict(_expected(task, seq_len, vocab_md5), vocab_size=vocab_size,
              dtype=dtype.name, splits={}, python=sys.version.split()[0],
              created=time.strftime('%Y-%m-%dT%H:%M:%S'))
  for split in SPLITS:
    arr = _materialise(task_obj, split, seq_len, dtype)
    if len(arr) == 0:
      raise DataError(f'the {split} split of task {task} has fewer than '
                      f'seq_len+1={seq_len + 1} tokens; use a smaller '
                      'train.seq_len or a larger corpus')
    with paths.atomic_output(os.path.join(cache_dir, f'{split}.npy')) as f:
      np.save(f, arr)
    meta['splits'][split] = {'sequences': int(arr.shape[0]),
                             'tokens': int(arr.size)}
  paths.atomic_write_bytes(os.path.join(cache_dir, META),
                           json.dumps(meta, indent=1).encode())
  result = load(cache_dir, task, seq_len, vocab_md5)
  assert result is not None, f'just-written cache in {cache_dir} is invalid'
  return result
