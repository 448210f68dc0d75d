"""Where the data pipeline keeps things, and how it writes them safely.

Layout under the data dir (all caches are keyed so that changing the task,
vocabulary or sequence length never reuses a stale file):

  routed_vocab/<corpus>-v<size>-s<N>.model   SentencePiece model trained on the
                                             stdlib corpus
  routed_prepared/<task>-<vocab>-L<seq_len>/ the stdlib corpus prepared like any
                                             other (routed/data/records.py)

This module imports nothing heavy (no TensorFlow), so cached loads stay fast.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from routed.data.errors import DataError

ENV_DATA_DIR = 'ROUTED_DATA_DIR'
DEFAULT_DATA_DIR = os.path.join('~', '.cache', 'routed', 'data')

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

VOCAB_SUBDIR = 'routed_vocab'
PREPARED_SUBDIR = 'routed_prepared'


def resolve_data_dir(data_cfg, create: bool = True) -> str:
  """The data dir for `data_cfg`: data.data_dir, else $ROUTED_DATA_DIR, else
  ~/.cache/routed/data.

  A user-given `data.data_dir` must already exist (a typo should not silently
  start a fresh 30 s preparation somewhere else); the fallbacks are created
  when `create` is true.
  """
  given = str(data_cfg.get('data_dir', '') or '')
  if given:
    path = os.path.abspath(os.path.expanduser(given))
    if not os.path.isdir(path):
      raise DataError(
          f'data.data_dir={given!r} does not exist ({path}); create it or set '
          f"data.data_dir='' to use ${ENV_DATA_DIR} or {DEFAULT_DATA_DIR}")
    return path
  path = os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR
  path = os.path.abspath(os.path.expanduser(path))
  if create:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise DataError(f'cannot create data dir {path} ({e.strerror}); set '
                      f'data.data_dir or ${ENV_DATA_DIR} to a writable dir')
  return path


def vocab_file(data_dir: str, corpus: str, vocab_size: int,
               settings_version: int) -> str:
  """Path of the cached SentencePiece model for a corpus and size."""
  return os.path.join(data_dir, VOCAB_SUBDIR,
                      f'{corpus}-v{vocab_size}-s{settings_version}.model')


def prepared_dir(data_dir: str, key: str) -> str:
  """The prepared directory (records.py) of an embedded corpus, for `key`."""
  return os.path.join(data_dir, PREPARED_SUBDIR, key)


@contextlib.contextmanager
def atomic_output(path: str, mode: str = 'wb') -> Iterator:
  """Open a temp file next to `path`; rename it onto `path` only on success.

  A killed or failed writer leaves at most a stray `.tmp` file, never a
  truncated `path`: os.replace is atomic on POSIX within one file system,
  which is why the temp file lives in the same directory.
  """
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; caches are shared
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def atomic_write_bytes(path: str, data: bytes) -> None:
  with atomic_output(path, 'wb') as f:
    f.write(data)
