"""Entry points: `load_dataset(data_cfg, seq_len)` and `check_data_config`.

`load_dataset` prepares on first use, one stage at a time, each announced by
one line on stderr with its duration:

  1. preparing stdlib corpus   TFDS builder -> <data_dir>/routed_stdlib/...
  2. training vocabulary       SentencePiece on the train split
  3. tokenizing and packing    seqio task -> memory-mappable .npy arrays

Every stage is skipped when its output is cached, and a fully cached load
imports neither TensorFlow nor seqio. C4 is never prepared here (it needs a
manual download and Apache Beam); it must already be in the data dir.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from routed.data import corpus, packed, paths, vocab
from routed.data.datasets import PackedLMDataset, StreamingLMDataset
from routed.data.errors import DataError, first_line

TASKS = ('stdlib', 'stdlib_mini', 'c4')
STDLIB_CONFIGS = {'stdlib': 'full', 'stdlib_mini': 'mini'}
DEFAULT_C4_VOCAB = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
C4_DEFAULT_VERSION = '3.1.0'
C4_CATALOG = 'https://www.tensorflow.org/datasets/catalog/c4'


@contextlib.contextmanager
def _stage(message: str):
  """One stderr line per stage: 'routed.data: <message> ... 1.2 s'."""
  print(f'routed.data: {message} ...', end='', file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    yield
  except BaseException:
    print(' failed', file=sys.stderr, flush=True)
    raise
  print(f' {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)


def _get(data_cfg, key: str, default):
  value = data_cfg.get(key, default) if hasattr(data_cfg, 'get') else getattr(
      data_cfg, key, default)
  return default if value is None else value


def _c4_versions(data_dir: str) -> list[str]:
  """Prepared c4/en versions in data_dir, best first (cheap; no TFDS)."""
  root = os.path.join(data_dir, 'c4', 'en')
  try:
    names = os.listdir(root)
  except OSError:
    return []
  found = []
  for name in names:
    parts = name.split('.')
    if (len(parts) == 3 and all(p.isdigit() for p in parts) and
        os.path.isfile(os.path.join(root, name, 'dataset_info.json'))):
      found.append(name)
  found.sort(key=lambda v: (v != C4_DEFAULT_VERSION,
                            [-int(p) for p in v.split('.')]))
  return found


def _user_vocab_path(data_cfg, task: str) -> str:
  """Validated data.vocab_path ('' when unset)."""
  given = str(_get(data_cfg, 'vocab_path', ''))
  if not given:
    return ''
  if given.startswith('gs://'):
    if task != 'c4':
      raise DataError(f'data.vocab_path={given!r}: the stdlib tasks need a '
                      'local SentencePiece model file; copy it locally')
    return given  # checked when read (needs network)
  path = os.path.abspath(os.path.expanduser(given))
  if not os.path.isfile(path):
    raise DataError(f'data.vocab_path={given!r} does not exist ({path}); '
                    "point it to a SentencePiece .model file or set it to ''")
  return path


def check_data_config(data_cfg) -> None:
  """Raise DataError if `data_cfg` cannot work; cheap (prepares nothing).

  Checks the task name, a user-given data_dir and vocab_path, the vocab size
  of the stdlib tasks, and for c4 that C4 is prepared in the data dir.
  """
  task = _get(data_cfg, 'task', '')
  if task not in TASKS:
    raise DataError(f'data.task={task!r} is unknown; use one of '
                    f'{", ".join(TASKS)}')
  data_dir = paths.resolve_data_dir(data_cfg, create=False)
  user_vocab = _user_vocab_path(data_cfg, task)
  if task == 'c4':
    if not _c4_versions(data_dir):
      raise DataError(
          f'C4 (c4/en) is not prepared in data dir {data_dir}: build it '
          f'there with `tfds build c4/en --data_dir={data_dir}` (downloads '
          f'Common Crawl dumps and needs Apache Beam; see {C4_CATALOG}) '
          f'or point data.data_dir / ${paths.ENV_DATA_DIR} at a data dir '
          'that has it')
  elif not user_vocab:
    vocab.check_vocab_size(_get(data_cfg, 'vocab_size', 0))


def load_dataset(data_cfg, seq_len: int):
  """The dataset for `data_cfg` (config.data) with chunks of seq_len + 1.

  Returns a PackedLMDataset (stdlib tasks) or StreamingLMDataset (c4); see
  routed/data/datasets.py. Raises DataError for anything the user must fix.
  """
  if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
    raise DataError(f'train.seq_len={seq_len!r} must be a positive integer')
  seq_len = int(seq_len)
  check_data_config(data_cfg)
  task = data_cfg.task
  data_dir = paths.resolve_data_dir(data_cfg, create=True)
  if task == 'c4':
    return _load_c4(data_cfg, data_dir, seq_len)
  return _load_stdlib(data_cfg, task, data_dir, seq_len)


def _load_stdlib(data_cfg, task: str, data_dir: str,
                 seq_len: int) -> PackedLMDataset:
  config = STDLIB_CONFIGS[task]
  vocab_path = _user_vocab_path(data_cfg, task)
  if vocab_path:
    vocab_tag = 'spm' + vocab.file_md5(vocab_path)[:10]
  else:
    size = int(_get(data_cfg, 'vocab_size', 0))
    vocab_path = vocab.stdlib_vocab_path(data_dir, config, size)
    vocab_tag = f'v{size}'
  cache_dir = paths.packed_dir(data_dir, f'{task}-{vocab_tag}-L{seq_len}')

  # Fast path: everything cached -> numpy + sentencepiece only, no TF.
  if os.path.isfile(vocab_path):
    md5 = vocab.file_md5(vocab_path)
    splits = packed.load(cache_dir, task, seq_len, md5)
    if splits is not None:
      return PackedLMDataset(task, seq_len, splits, vocab_path,
                             splits.meta['vocab_size'], cache_dir)

  from routed.data import tf_env  # pylint: disable=g-import-not-at-top
  tfds_id = f'{corpus.TFDS_NAME}/{config}'
  if not corpus.tfds_prepared(data_dir, config):
    with _stage(f'preparing stdlib corpus ({tfds_id} from '
                f'{corpus.stdlib_root()}) in {data_dir}'):
      from routed.data import stdlib_tfds  # pylint: disable=g-import-not-at-top
      stdlib_tfds.prepare(data_dir, config)
  if not os.path.isfile(vocab_path):
    with _stage(f'training vocabulary ({size} pieces on the {tfds_id} train '
                f'split) -> {vocab_path}'):
      vocab.train_stdlib_vocab(data_dir, config, size)
  md5 = vocab.file_md5(vocab_path)
  vocab_size = vocab.piece_count(vocab_path)
  with _stage(f'tokenizing and packing {task} (seq_len {seq_len}) -> '
              f'{cache_dir}'):
    from routed.data import tasks  # pylint: disable=g-import-not-at-top
    with tf_env.quiet_native_logs():
      task_obj = tasks.make_task(task, data_dir, vocab_path)
      splits = packed.write(cache_dir, task_obj, task, seq_len, md5,
                            vocab_size)
  return PackedLMDataset(task, seq_len, splits, vocab_path, vocab_size,
                         cache_dir)


def _load_c4(data_cfg, data_dir: str, seq_len: int) -> StreamingLMDataset:
  version = _c4_versions(data_dir)[0]
  tfds_name = f'c4/en:{version}'
  vocab_path = _user_vocab_path(data_cfg, 'c4') or DEFAULT_C4_VOCAB
  from routed.data import tasks  # pylint: disable=g-import-not-at-top
  try:
    vocab_size = tasks.SentencePieceVocabulary(vocab_path).vocab_size
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'data.vocab_path={vocab_path!r} cannot be read ({first_line(e)}); '
        'copy the SentencePiece model to a local file (e.g. gsutil cp '
        f'{DEFAULT_C4_VOCAB} .) and set data.vocab_path to it') from None
  task_obj = tasks.make_task('c4', data_dir, vocab_path, tfds_name=tfds_name)
  return StreamingLMDataset(task_obj, 'c4', seq_len, vocab_path, vocab_size,
                            data_dir, tfds_name)
