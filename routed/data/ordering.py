"""Which packed sequences go into which batch: pure functions of the indices.

Training: global example g = step * batch_size + i (i < batch_size) is
sequence perm_e[g mod N] of epoch e = g // N, where perm_e is a permutation of
range(N) seeded by (seed, e). So batch `step` depends only on (seed, step,
batch_size, N): a resumed run sees exactly the batches an uninterrupted one
would, and every sequence is seen once per epoch.

Permutations come from argsort of raw PCG64 output seeded via SeedSequence.
Both are fixed algorithms (numpy guarantees their streams), unlike
`Generator.permutation`, whose output numpy may change between releases.
"""

from __future__ import annotations

import functools

import numpy as np

_TRAIN_TAG = 0x7261696E  # 'rain': keeps train/eval streams independent
_EVAL_TAG = 0x6576616C   # 'eval'


@functools.lru_cache(maxsize=4)  # a batch touches at most two epochs
def _permutation(tag: int, seed: int, epoch: int, n: int) -> np.ndarray:
  seq = np.random.SeedSequence([tag, seed, epoch])
  keys = np.random.PCG64(seq).random_raw(n)
  perm = np.argsort(keys, kind='stable')
  perm.flags.writeable = False  # shared through the cache
  return perm


def train_indices(step: int, batch_size: int, seed: int,
                  num_sequences: int) -> np.ndarray:
  """int64 [batch_size] sequence indices of training batch `step`."""
  for name, value in (('step', step), ('seed', seed)):
    if int(value) != value or value < 0:
      raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
  if batch_size < 1 or num_sequences < 1:
    raise ValueError(f'need batch_size >= 1 and a non-empty split, got '
                     f'batch_size={batch_size}, {num_sequences} sequences')
  g = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epoch, pos = np.divmod(g, num_sequences)
  out = np.empty_like(g)
  for e in np.unique(epoch):
    mask = epoch == e
    out[mask] = _permutation(_TRAIN_TAG, int(seed), int(e), num_sequences)[
        pos[mask]]
  return out


def eval_indices(num_batches: int, batch_size: int,
                 num_sequences: int) -> np.ndarray:
  """int64 [num_batches, batch_size]: a fixed sample of validation sequences.

  A fixed shuffle (independent of the training seed) spreads the batches over
  all validation files instead of the first few; if more sequences are asked
  for than exist, the list wraps around (cycles).
  """
  if num_batches < 0 or batch_size < 1 or num_sequences < 1:
    raise ValueError(f'bad eval request: {num_batches} batches of '
                     f'{batch_size} from {num_sequences} sequences')
  perm = _permutation(_EVAL_TAG, 0, 0, num_sequences)
  g = np.arange(num_batches * batch_size, dtype=np.int64) % num_sequences
  return perm[g].reshape(num_batches, batch_size)
