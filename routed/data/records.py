"""The prepared-data format: fixed-length packed examples in ArrayRecord files.

Every corpus, the embedded stdlib one included, is prepared into one layout
(`python -m routed.data.prepare`, routed/data/prepare.py):

  DIR/index.json              what the directory holds (below); rebuilt from the
                              part records after every prepare run
  DIR/vocab.model             the SentencePiece model the tokens come from
  DIR/<split>/part-IIIII-of-NNNNN.array_record
                              examples of input part I of N of that split's source
  DIR/<split>/holdout-IIIII-of-NNNNN.array_record
                              (validation only) documents of train part I held out
  DIR/<split>/part-IIIII-of-NNNNN.json
                              the part's record: counts, checksums; written last,
                              so it marks a finished part (a rerun skips it)

An example is one ArrayRecord record of L + 1 = seq_len + 1 positions (the
trainer's inputs are [:-1], targets [1:]), three int arrays back to back:

  tokens       [L + 1]  token ids; documents end with EOS; 0 (pad) after the last
  segment_ids  [L + 1]  1, 2, ... for the documents (or pieces of them) in the row,
                        in order; 0 for padding
  positions    [L + 1]  the token's offset within its document; a document that
                        continues from the previous example continues its count

Their dtypes are in index.json (`record`): tokens uint16 when the vocabulary fits,
else uint32; segment ids uint16 (uint32 past 65,535 positions); positions uint32.

index.json: format, seq_len, vocab {file, sha256, pieces}, record (the layout
above), and per split: the source glob(s) and their part counts, whether every part
is done, examples, tokens, documents, bad lines by reason, and each file with its
example count and SHA-256.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import NamedTuple

import numpy as np

from routed.data import paths
from routed.data.errors import DataError

FORMAT_VERSION = 1
INDEX = 'index.json'
VOCAB = 'vocab.model'
SPLITS = ('train', 'validation')
FIELDS = ('tokens', 'segment_ids', 'positions')
# ArrayRecord writer options: one record per chunk, so any example is read alone
# (random access for a global shuffle; Grain's recommended setting).
WRITER_OPTIONS = 'group_size:1'


class Layout(NamedTuple):
  """How one example's bytes are laid out: [(field, numpy dtype name)] and L + 1."""
  row_len: int
  dtypes: tuple  # (tokens, segment_ids, positions) dtype names

  @classmethod
  def for_data(cls, seq_len: int, vocab_pieces: int) -> 'Layout':
    row_len = seq_len + 1
    tokens = 'uint16' if vocab_pieces <= 1 << 16 else 'uint32'
    segments = 'uint16' if row_len < 1 << 16 else 'uint32'
    return cls(row_len, (tokens, segments, 'uint32'))

  def to_json(self) -> dict:
    return {'row_len': self.row_len, 'fields': dict(zip(FIELDS, self.dtypes))}

  @classmethod
  def from_json(cls, d: dict) -> 'Layout':
    return cls(int(d['row_len']), tuple(d['fields'][f] for f in FIELDS))

  def encode(self, tokens, segment_ids, positions) -> bytes:
    """One example's record from three [L + 1] integer arrays."""
    return b''.join(np.asarray(a, dtype).tobytes() for a, dtype in
                    zip((tokens, segment_ids, positions), self.dtypes))

  def decode(self, record: bytes) -> dict:
    """{'tokens', 'segment_ids', 'positions'} int32 [L + 1] of one record."""
    out, offset = {}, 0
    for field, dtype in zip(FIELDS, self.dtypes):
      dtype = np.dtype(dtype)
      out[field] = np.frombuffer(record, dtype, self.row_len, offset).astype(np.int32)
      offset += self.row_len * dtype.itemsize
    if offset != len(record):
      raise DataError(f'a record of {len(record)} bytes does not match the index layout '
                      f'({offset} bytes per example)')
    return out


def part_name(kind: str, index: int, count: int) -> str:
  """'part-00003-of-01024' (kind 'part') or 'holdout-...'."""
  return f'{kind}-{index:05d}-of-{count:05d}'


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def part_records(directory: str) -> list[dict]:
  """Every finished part's record under DIR/<split>/, in file order."""
  out = []
  for split in SPLITS:
    for path in sorted(glob.glob(os.path.join(directory, split, 'part-*.json'))):
      try:
        with open(path) as f:
          out.append(json.load(f))
      except (OSError, ValueError):
        continue  # unreadable: that part is treated as not done, and redone
  return out


def build_index(directory: str, seq_len: int, vocab: dict, layout: Layout,
                records: list[dict]) -> dict:
  """index.json's contents from the part records (see the module docstring)."""
  splits = {}
  for split in SPLITS:
    splits[split] = {'sources': {}, 'examples': 0, 'tokens': 0, 'documents': 0,
                     'padding': 0, 'bad_lines': {}, 'empty_documents': 0, 'files': []}
  for rec in records:
    source = splits[rec['split']]['sources'].setdefault(
        rec['source'], {'parts': rec['of'], 'done': 0, 'text_key': rec['text_key']})
    source['done'] += 1
    bad = splits[rec['split']]
    for reason, n in rec['bad_lines'].items():
      bad['bad_lines'][reason] = bad['bad_lines'].get(reason, 0) + n
    bad['empty_documents'] += rec['empty_documents']
    for out in rec['outputs']:
      s = splits[out['split']]
      for key in ('examples', 'tokens', 'documents', 'padding'):
        s[key] += out[key]
      s['files'].append({k: out[k] for k in ('file', 'examples', 'sha256')})
  for s in splits.values():
    s['files'].sort(key=lambda f: f['file'])
    s['complete'] = all(src['done'] == src['parts'] for src in s['sources'].values())
  return {'format': FORMAT_VERSION, 'seq_len': seq_len, 'vocab': vocab,
          'record': layout.to_json(), 'splits': splits}


def write_index(directory: str, index: dict) -> None:
  paths.atomic_write_bytes(os.path.join(directory, INDEX),
                           json.dumps(index, indent=1).encode())


def read_index(directory: str) -> dict | None:
  try:
    with open(os.path.join(directory, INDEX)) as f:
      index = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise DataError(f'{os.path.join(directory, INDEX)} cannot be read ({e}); rerun '
                    'routed.data.prepare on that directory') from None
  if index.get('format') != FORMAT_VERSION:
    raise DataError(f'{os.path.join(directory, INDEX)} has format {index.get("format")!r}, '
                    f'this routed reads format {FORMAT_VERSION}; prepare the corpus again')
  return index
