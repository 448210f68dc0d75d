"""Reading a corpus's documents: jsonl, json.gz, parquet, plain text, or TFDS.

An input is cut into *parts*; each part is read by one worker and becomes one
output file per split (routed/data/prepare.py). A part is

  one JSON-lines file   *.jsonl, *.json (one JSON object per line; the released C4
                        files are c4-train.00000-of-01024.json.gz, gzip'd JSON lines)
  one parquet file      *.parquet (a string column; FineWeb's shards)
  plain text files      any other name: one document per file (UTF-8), consecutive
                        files grouped into parts of up to TEXT_PART_FILES files / bytes
  Python source files   *.py: the same, decoded as Python decodes them (PEP 263)
  one TFDS shard        tfds:NAME (e.g. tfds:c4/en:3.1.0) read from --tfds_data_dir

`text_key` names the JSON field or parquet column. A line that is not a JSON
object, or lacks a string `text_key`, is a *bad line*: counted by reason and
skipped. A file that cannot be read at all raises InputError naming it.
"""

from __future__ import annotations

import collections
import glob as glob_lib
import gzip
import json
import os
from typing import Iterator, NamedTuple

from routed.data.errors import DataError, first_line

TFDS_PREFIX = 'tfds:'
TEXT_PART_FILES = 1024
TEXT_PART_BYTES = 64 << 20


class InputError(DataError):
  """A file (or TFDS shard) of the corpus cannot be read."""


class Part(NamedTuple):
  """One unit of work: the files (or TFDS shard) that become one output part."""
  kind: str          # jsonl | parquet | text | python | tfds
  files: tuple       # paths; for tfds: (name, data_dir, split, shard index)
  size: int          # bytes of input, for progress and ETA (0 when unknown)


def kind_of(path: str) -> str:
  name = path.lower().removesuffix('.gz')
  if name.endswith(('.jsonl', '.json')):
    return 'jsonl'
  if path.lower().endswith('.parquet'):
    return 'parquet'
  if path.endswith('.py'):
    return 'python'
  return 'text'


def group_files(kind: str, files: list[str], part_bytes: int = TEXT_PART_BYTES) -> list[Part]:
  """Consecutive one-document files as parts of up to TEXT_PART_FILES files or
  `part_bytes` bytes (a file larger than that is a part of its own)."""
  parts, group, size = [], [], 0
  for path in files:
    n = os.path.getsize(path)
    if group and (len(group) >= TEXT_PART_FILES or size + n > part_bytes):
      parts.append(Part(kind, tuple(group), size))
      group, size = [], 0
    group.append(path)
    size += n
  if group:
    parts.append(Part(kind, tuple(group), size))
  return parts


def list_parts(spec: str, *, split: str = 'train', tfds_data_dir: str = '') -> list[Part]:
  """The parts of an input: a glob of files, or tfds:NAME. Raises DataError."""
  if spec.startswith(TFDS_PREFIX):
    return _tfds_parts(spec[len(TFDS_PREFIX):], split, tfds_data_dir)
  files = sorted(f for f in glob_lib.glob(os.path.expanduser(spec), recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise InputError(f'--input={spec!r} matches no files')
  parts, run = [], []  # run: consecutive one-document files of one kind
  for path in files + [None]:
    kind = kind_of(path) if path else None
    if run and kind != kind_of(run[-1]):
      parts += group_files(kind_of(run[-1]), run)
      run = []
    if kind in ('text', 'python'):
      run.append(path)
    elif kind:
      parts.append(Part(kind, (path,), os.path.getsize(path)))
  return parts


def _tfds_parts(name: str, split: str, data_dir: str) -> list[Part]:
  from routed.data.tf_env import import_tfds  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    shards = builder.info.splits[split].num_shards
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'--input=tfds:{name}: no prepared {split} split in '
                     f'{data_dir or "the default TFDS data dir"} ({first_line(e)})') from None
  size = builder.info.splits[split].num_bytes // max(shards, 1)
  return [Part('tfds', (name, data_dir, split, i), size) for i in range(shards)]


def read_documents(part: Part, text_key: str, bad: collections.Counter) -> Iterator[str]:
  """The documents of a part, in order; bad lines are counted in `bad`."""
  reader = {'jsonl': _jsonl, 'parquet': _parquet, 'text': _text, 'python': _python,
            'tfds': _tfds}[part.kind]
  yield from reader(part, text_key, bad)


def _jsonl(part: Part, key: str, bad: collections.Counter) -> Iterator[str]:
  path = part.files[0]
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rt', encoding='utf-8', errors='replace') as f:
      for line in f:
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError:
          bad['not JSON'] += 1
          continue
        text = record.get(key) if isinstance(record, dict) else None
        if not isinstance(text, str):
          bad[f'no string field {key!r}'] += 1
          continue
        yield text
  except (OSError, EOFError, UnicodeError) as e:  # unreadable, not gzip, truncated
    raise InputError(f'{path}: cannot be read ({first_line(e)})') from None


def _parquet(part: Part, key: str, bad: collections.Counter) -> Iterator[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = part.files[0]
  try:
    f = pq.ParquetFile(path)
    if key not in f.schema_arrow.names:
      raise InputError(f'{path}: has no column {key!r} (columns: '
                       f'{", ".join(f.schema_arrow.names)}); set --text_key')
    for batch in f.iter_batches(columns=[key], batch_size=1024):
      for text in batch.column(0).to_pylist():
        if isinstance(text, str):
          yield text
        else:
          bad[f'no string field {key!r}'] += 1
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (pyarrow's own errors)
    raise InputError(f'{path}: cannot be read as parquet ({first_line(e)})') from None


def _text(part: Part, key: str, bad: collections.Counter) -> Iterator[str]:
  del key, bad
  for path in part.files:
    try:
      with open(path, 'rb') as f:
        raw = f.read()
    except OSError as e:
      raise InputError(f'{path}: cannot be read ({e.strerror})') from None
    yield raw.decode('utf-8', errors='replace').removeprefix('\ufeff')


def _python(part: Part, key: str, bad: collections.Counter) -> Iterator[str]:
  del key, bad
  from routed.data.corpus import read_source  # pylint: disable=g-import-not-at-top
  for path in part.files:
    try:
      yield read_source(os.path.dirname(path), os.path.basename(path))
    except OSError as e:
      raise InputError(f'{path}: cannot be read ({e.strerror})') from None


def _tfds(part: Part, key: str, bad: collections.Counter) -> Iterator[str]:
  from routed.data.tf_env import import_tfds  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  name, data_dir, split, shard = part.files
  try:
    ds = tfds.load(name, split=f'{split}[{shard}shard]', data_dir=data_dir or None,
                   shuffle_files=False, download=False)
    for example in tfds.as_numpy(ds):
      text = example.get(key)
      if isinstance(text, bytes):
        yield text.decode('utf-8', errors='replace')
      else:
        bad[f'no string field {key!r}'] += 1
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'tfds:{name} {split} shard {shard}: cannot be read '
                     f'({first_line(e)})') from None
