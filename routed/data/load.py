"""Entry points: `load_dataset(data_cfg, seq_len)` and `check_data_config`.

Every dataset is a prepared directory (routed/data/records.py) read through Grain
(routed/data/reader.py):

  data.path set        that directory, made by `python -m routed.data.prepare`
  task stdlib[_mini]   the embedded corpus, prepared on first use into the data dir's
                       cache by the same code as any corpus, one stage a line on stderr:
                         1. training vocabulary    SentencePiece on the train split
                         2. tokenizing and packing  routed.data.prepare's workers
  task c4              needs data.path: C4 prepared from its released json.gz files
                       (or from a TFDS build, --input=tfds:c4/en)

Every stage is skipped when its output is cached; a cached load imports neither
TensorFlow nor seqio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

from routed.data import corpus, paths, records, sources, vocab
from routed.data.errors import DataError
from routed.data.reader import PreparedDataset

TASKS = ('stdlib', 'stdlib_mini', 'c4')
STDLIB_CONFIGS = {'stdlib': 'full', 'stdlib_mini': 'mini'}
STDLIB_PART_BYTES = 1 << 20  # parts of the stdlib corpus: several per core
C4_HOWTO = ("python -m routed.data.prepare --input='c4/en/c4-train.*.json.gz' "
            "--output=DIR --vocab_size=32000 (and --split=validation --input="
            "'c4/en/c4-validation.*.json.gz'), then --config.data.path=DIR")


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


def _user_vocab_path(data_cfg) -> str:
  """Validated data.vocab_path ('' when unset)."""
  given = str(_get(data_cfg, 'vocab_path', ''))
  if not given:
    return ''
  path = os.path.abspath(os.path.expanduser(given))
  if not os.path.isfile(path):
    raise DataError(f'data.vocab_path={given!r} does not exist ({path}); '
                    "point it to a SentencePiece .model file or set it to ''")
  return path


def _data_path(data_cfg) -> str:
  given = str(_get(data_cfg, 'path', ''))
  if not given:
    return ''
  if '://' in given:
    # ArrayRecord's reader opens local files; on GCS, mount the bucket (gcsfuse).
    raise DataError(f'data.path={given!r}: give a local path; for a bucket, mount it '
                    'with gcsfuse (gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and set '
                    'data.path=/mnt/BUCKET/DIR')
  path = os.path.abspath(os.path.expanduser(given))
  if not os.path.isfile(os.path.join(path, records.INDEX)):
    raise DataError(f'data.path={given!r} holds no prepared data ({path}/{records.INDEX} '
                    'is missing); prepare it with python -m routed.data.prepare '
                    f'--input=GLOB --output={given}')
  return path


def check_data_config(data_cfg) -> None:
  """Raise DataError if `data_cfg` cannot work; cheap (prepares nothing)."""
  task = _get(data_cfg, 'task', '')
  if task not in TASKS:
    raise DataError(f'data.task={task!r} is unknown; use one of '
                    f'{", ".join(TASKS)}')
  if _data_path(data_cfg):
    return
  if task == 'c4':
    raise DataError(f'data.task=c4 needs data.path, a prepared C4 directory: {C4_HOWTO}')
  paths.resolve_data_dir(data_cfg, create=False)
  if not _user_vocab_path(data_cfg):
    vocab.check_vocab_size(_get(data_cfg, 'vocab_size', 0))


def load_dataset(data_cfg, seq_len: int) -> PreparedDataset:
  """The dataset for `data_cfg` (config.data) with examples of seq_len + 1 tokens.

  Raises DataError for anything the user must fix.
  """
  if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
    raise DataError(f'train.seq_len={seq_len!r} must be a positive integer')
  seq_len = int(seq_len)
  check_data_config(data_cfg)
  path = _data_path(data_cfg)
  if path:
    return PreparedDataset(path, seq_len)
  data_dir = paths.resolve_data_dir(data_cfg, create=True)
  return _load_stdlib(data_cfg, data_cfg.task, data_dir, seq_len)


def stdlib_jobs(config: str) -> list:
  """The stdlib corpus as prepare jobs: one document per file, split by file."""
  # Imported here: `python -m routed.data.prepare` must not find itself imported.
  from routed.data import prepare  # pylint: disable=g-import-not-at-top
  root = corpus.stdlib_root()
  files = corpus.corpus_files(config, root)
  return [prepare.Job(split, f'stdlib:{config}/{split} ({root})', sources.group_files(
      'python', [os.path.join(root, rel) for rel in files[split]], STDLIB_PART_BYTES))
          for split in records.SPLITS]


def _load_stdlib(data_cfg, task: str, data_dir: str, seq_len: int) -> PreparedDataset:
  config = STDLIB_CONFIGS[task]
  vocab_path = _user_vocab_path(data_cfg)
  if vocab_path:
    vocab_tag = 'spm' + vocab.file_md5(vocab_path)[:10]
  else:
    size = int(_get(data_cfg, 'vocab_size', 0))
    vocab_path = vocab.stdlib_vocab_path(data_dir, config, size)
    vocab_tag = f'v{size}'
  cache_dir = paths.prepared_dir(data_dir, f'{task}-{vocab_tag}-L{seq_len}')

  # Fast path: everything cached -> numpy, sentencepiece and Grain only.
  if os.path.isfile(vocab_path):
    try:
      index = records.read_index(cache_dir)
    except DataError:
      index = None
    if (index is not None and
        index['vocab']['sha256'] == records.sha256_file(vocab_path) and
        all(index['splits'][s]['complete'] for s in records.SPLITS) and
        all(os.path.isfile(os.path.join(cache_dir, f['file']))
            for s in records.SPLITS for f in index['splits'][s]['files'])):
      return PreparedDataset(cache_dir, seq_len)
    if index is not None and index['vocab']['sha256'] != records.sha256_file(vocab_path):
      shutil.rmtree(cache_dir)  # a cache of a vocabulary that is gone: rebuild it

  if not os.path.isfile(vocab_path):
    with _stage(f'training vocabulary ({size} pieces on the stdlib {config} train split) '
                f'-> {vocab_path}'):
      vocab.train_stdlib_vocab(data_dir, config, size)
  with _stage(f'tokenizing and packing {task} (seq_len {seq_len}) -> {cache_dir}'):
    from routed.data import prepare  # pylint: disable=g-import-not-at-top
    prepare.run_jobs(cache_dir, stdlib_jobs(config), vocab_file=vocab_path,
                     seq_len=seq_len, progress=False)
  return PreparedDataset(cache_dir, seq_len)
