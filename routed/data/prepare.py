"""Prepares a corpus into tokenized, packed ArrayRecord shards (routed/data/records.py).

  python -m routed.data.prepare --input='c4/en/c4-train.*.json.gz' --output=DIR \\
      [--text_key=text] [--vocab=MODEL | --vocab_size=N] [--seq_len=512] \\
      [--split=train] [--holdout=0.01] [--num_shards=1 --shard_index=0] [--workers=0]

then `python -m routed.train ... --config.data.path=DIR`. Inputs are globs of
jsonl / json.gz / parquet / plain-text files, or `tfds:NAME` (routed/data/sources.py).

* Tokenizer: --vocab copies a SentencePiece model into DIR; --vocab_size trains one on
  a sample of the input (the settings of routed/data/vocab.py); a DIR that already has
  vocab.model reuses it. Its SHA-256 is recorded in index.json and in every part.
* --split: which split the input's documents go to. With --split=train, a share
  --holdout of the documents (chosen by a hash of their text, so duplicates land
  together) goes to the validation split instead.
* Work is one input part at a time, spread over --workers local processes (0 = one per
  core). --num_shards/--shard_index: this machine prepares parts i with
  i % num_shards == shard_index, so many machines can prepare one corpus into one DIR
  (give them the same --vocab). A finished part is skipped on a rerun, so an
  interrupted prepare resumes where it stopped.
* Bad lines (not JSON, no text field) are counted, skipped and reported at the end. An
  unreadable file, an empty corpus or a DIR of another vocabulary or seq_len is one line
  on stderr and exit status 2; parts already written stay as they are.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import NamedTuple

from routed.data import paths, records, sources, vocab
from routed.data.errors import DataError
from routed.data.packing import Packer

DEFAULT_VOCAB_SIZE = 32000
# Characters of input read to train a vocabulary (vocab.py then samples from them).
VOCAB_SAMPLE_CHARS = 10 * vocab.TRAIN_CHAR_BUDGET
ENCODE_BATCH = 256  # documents tokenized per SentencePiece call


class Job(NamedTuple):
  """One input prepared into one split of DIR."""
  split: str                 # 'train' or 'validation'
  source: str                # what the parts came from (a glob, tfds:NAME, ...), recorded
  parts: list                # [sources.Part]
  holdout: float = 0.0       # share of documents sent to validation (train jobs)
  text_key: str = 'text'


def _held_out(text: str, share: float) -> bool:
  digest = hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') < share * (1 << 64)


# --- one part, in a worker process ----------------------------------------------------

_PROCESSOR = {}


def _processor(path: str):
  if path not in _PROCESSOR:
    _PROCESSOR[path] = vocab.load_processor(path)
  return _PROCESSOR[path]


class _Output:
  """One ArrayRecord file being written under a temporary name."""

  def __init__(self, root: str, split: str, name: str, layout: records.Layout):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.root, self.split, self.layout = root, split, layout
    self.path = os.path.join(root, split, name + '.array_record')
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.tmp = f'{self.path}.tmp'
    self.writer = array_record_module.ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
    self.packer = Packer(layout.row_len)
    self.examples = self.padding = 0

  def write(self, rows) -> None:
    for tokens, segments, positions in zip(*rows):
      self.writer.write(self.layout.encode(tokens, segments, positions))
      self.padding += int((segments == 0).sum())
    self.examples += len(rows[0])

  def close(self) -> dict | None:
    self.write(self.packer.finish())
    self.writer.close()
    if not self.examples:
      os.remove(self.tmp)
      return None
    os.replace(self.tmp, self.path)
    return {'split': self.split, 'file': os.path.relpath(self.path, self.root),
            'examples': self.examples, 'tokens': self.packer.tokens,
            'documents': self.packer.documents, 'padding': self.padding,
            'sha256': records.sha256_file(self.path), 'bytes': os.path.getsize(self.path)}

  def abandon(self) -> None:
    try:
      self.writer.close()
    finally:
      if os.path.exists(self.tmp):
        os.remove(self.tmp)


def prepare_part(output: str, job: Job, index: int, vocab_file: str, vocab_sha: str,
                 layout: records.Layout) -> tuple[str, object]:
  """Writes part `index` of `job`; ('ok', its record) or ('error', one line)."""
  start = time.perf_counter()
  part = job.parts[index]
  name = records.part_name('part', index, len(job.parts))
  outs = {job.split: _Output(output, job.split, name, layout)}
  if job.holdout > 0:
    outs['validation'] = _Output(output, 'validation',
                                 records.part_name('holdout', index, len(job.parts)), layout)
  sp = _processor(vocab_file)
  bad, empty = collections.Counter(), 0
  try:
    pending = {split: [] for split in outs}

    def flush(split):
      docs = pending[split]
      if docs:
        outs[split].write(outs[split].packer.add(sp.encode(docs)))
        docs.clear()

    for text in sources.read_documents(part, job.text_key, bad):
      if not text:
        empty += 1
        continue
      split = 'validation' if job.holdout > 0 and _held_out(text, job.holdout) else job.split
      pending[split].append(text)
      if len(pending[split]) >= ENCODE_BATCH:
        flush(split)
    for split in outs:
      flush(split)
    written = [r for r in (out.close() for out in outs.values()) if r is not None]
  except sources.InputError as e:
    for out in outs.values():
      out.abandon()
    return 'error', str(e)
  record = {'split': job.split, 'source': job.source, 'text_key': job.text_key,
            'index': index, 'of': len(job.parts), 'input': [str(f) for f in part.files],
            'input_bytes': part.size, 'seq_len': layout.row_len - 1, 'vocab_sha256': vocab_sha,
            'outputs': written, 'bad_lines': dict(bad), 'empty_documents': empty,
            'seconds': round(time.perf_counter() - start, 3)}
  # Written last: its presence is what marks the part finished.
  paths.atomic_write_bytes(os.path.join(output, job.split, name + '.json'),
                           json.dumps(record, indent=1).encode())
  return 'ok', record


def _worker(args):
  return prepare_part(*args)


# --- a whole corpus ---------------------------------------------------------------------

def install_vocab(output: str, vocab_file: str) -> dict:
  """Copies the model into DIR (or checks the one there): {'file', 'sha256', 'pieces'}."""
  target = os.path.join(output, records.VOCAB)
  want = records.sha256_file(vocab_file)
  if os.path.isfile(target):
    have = records.sha256_file(target)
    if have != want:
      raise DataError(f'{output} holds shards of another vocabulary ({target}, sha256 '
                      f'{have[:12]}, not {want[:12]} of {vocab_file}); use another --output, '
                      f'or --vocab={target}')
  else:
    with open(vocab_file, 'rb') as f:
      paths.atomic_write_bytes(target, f.read())
  return {'file': records.VOCAB, 'sha256': want, 'pieces': vocab.piece_count(target)}


def check_existing(output: str, seq_len: int, vocab_sha: str, jobs: list[Job]) -> list[dict]:
  """The finished parts already in DIR; DataError if they belong to other data."""
  found = records.part_records(output)
  for rec in found:
    where = os.path.join(output, rec['split'])
    if rec['seq_len'] != seq_len:
      raise DataError(f'{where} holds shards of seq_len {rec["seq_len"]}, not --seq_len='
                      f'{seq_len}; use another --output')
    if rec['vocab_sha256'] != vocab_sha:
      raise DataError(f'{where} holds shards of another vocabulary (sha256 '
                      f'{rec["vocab_sha256"][:12]}); use another --output')
    for job in jobs:
      if job.split == rec['split'] and (job.source, len(job.parts)) != (rec['source'],
                                                                        rec['of']):
        raise DataError(f'{where} was prepared from {rec["source"]!r} ({rec["of"]} parts), '
                        f'not {job.source!r} ({len(job.parts)} parts); use another --output')
  return found


def run_jobs(output: str, jobs: list[Job], *, vocab_file: str, seq_len: int,
             workers: int = 0, num_shards: int = 1, shard_index: int = 0,
             progress: bool = True) -> dict:
  """Prepares this machine's unfinished parts of every job; writes and returns the index.

  Raises DataError (InputError for a file) after every other part has finished.
  """
  os.makedirs(output, exist_ok=True)
  vocab_info = install_vocab(output, vocab_file)
  layout = records.Layout.for_data(seq_len, vocab_info['pieces'])
  done = {(r['split'], r['index']) for r in check_existing(output, seq_len,
                                                           vocab_info['sha256'], jobs)}
  local_vocab = os.path.join(output, records.VOCAB)
  todo = [(output, job, i, local_vocab, vocab_info['sha256'], layout)
          for job in jobs for i in range(len(job.parts))
          if i % num_shards == shard_index and (job.split, i) not in done]
  errors, bad = [], collections.Counter()
  if todo:
    total = sum(args[1].parts[args[2]].size for args in todo)
    bar = _progress_bar(total, len(todo), progress)
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers == 1:
      results = map(_worker, todo)
      pool = None
    else:
      # spawn, not fork: the caller (routed.train) may have started JAX's threads.
      pool = multiprocessing.get_context('spawn').Pool(workers)
      results = pool.imap_unordered(_worker, todo)
    try:
      for status, value in results:
        if status == 'error':
          errors.append(value)
        else:
          bad.update(value['bad_lines'])
          if bar is not None:
            bar.update(value['input_bytes'])
    finally:
      if pool is not None:
        pool.close()
        pool.join()
      if bar is not None:
        bar.close()
  index = records.build_index(output, seq_len, vocab_info, layout,
                              records.part_records(output))
  records.write_index(output, index)
  skipped = ('skipped bad lines: ' + ', '.join(f'{n} {reason}' for reason, n in
                                               sorted(bad.items()))) if bad else ''
  if errors:
    more = f' (and {len(errors) - 1} more parts failed)' if len(errors) > 1 else ''
    raise sources.InputError(errors[0] + more + (f'; {skipped}' if skipped else ''))
  for job in jobs:
    s = index['splits'][job.split]
    if s['complete'] and not s['documents']:
      raise DataError(f'{job.source}: no documents found (text field {job.text_key!r}; '
                      'set --text_key?)' + (f'; {skipped}' if skipped else ''))
  if skipped:
    print(f'routed.data.prepare: {skipped}', file=sys.stderr)
  return index


def _progress_bar(total_bytes: int, parts: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total_bytes, unit='B', unit_scale=True, file=sys.stderr,
              desc=f'routed.data.prepare: {parts} parts', smoothing=0.1)


def sample_texts(parts: list, text_key: str, budget: int = VOCAB_SAMPLE_CHARS) -> list[str]:
  """Documents from the start of every part, spread evenly, up to `budget` characters."""
  per_part = max(budget // max(len(parts), 1), 1)
  texts, bad = [], collections.Counter()
  for part in parts:
    taken = 0
    for text in sources.read_documents(part, text_key, bad):
      texts.append(text)
      taken += len(text)
      if taken >= per_part:
        break
    if sum(map(len, texts)) >= budget:
      break
  return texts


# --- the command ------------------------------------------------------------------------

FLAGS = {'input': None, 'output': None, 'text_key': 'text', 'vocab': '', 'vocab_size': 0,
         'seq_len': 512, 'split': 'train', 'holdout': 0.01, 'num_shards': 1,
         'shard_index': 0, 'workers': 0, 'tfds_data_dir': '', 'progress': True}
FLAG_HELP = {
    'input': 'globs of jsonl / json.gz / parquet / text files, or tfds:NAME',
    'output': 'the prepared directory (then --config.data.path=DIR)',
    'text_key': 'the field holding the text in JSON and parquet records',
    'vocab': 'a SentencePiece model to use (copied into DIR)',
    'vocab_size': 'train a vocabulary of this many pieces on a sample (0: 32,000)',
    'seq_len': 'tokens per packed training row', 'split': 'train | validation',
    'holdout': 'with --split=train, the share of documents sent to validation',
    'num_shards': 'machines preparing this corpus together',
    'shard_index': "this machine's index among them", 'workers': 'local processes (0: one '
    'per core)', 'tfds_data_dir': 'the TFDS data directory for tfds:NAME inputs',
    'progress': 'print a progress line per part'}


def _resolve_vocab(flags, output: str, parts: list) -> str:
  existing = os.path.join(output, records.VOCAB)
  if flags['vocab']:
    path = os.path.abspath(os.path.expanduser(flags['vocab']))
    if not os.path.isfile(path):
      raise DataError(f'--vocab={flags["vocab"]!r}: no such file ({path})')
    return path
  if os.path.isfile(existing):
    size = flags['vocab_size']
    if size and vocab.piece_count(existing) != size:
      raise DataError(f'{output} holds shards of a {vocab.piece_count(existing)}-piece '
                      f'vocabulary, not --vocab_size={size}; use another --output')
    return existing
  if flags['num_shards'] > 1:
    raise DataError('--num_shards > 1: give every machine the same --vocab=MODEL (train '
                    'one first with --vocab_size on one machine, or copy DIR/vocab.model)')
  size = vocab.check_vocab_size(flags['vocab_size'] or DEFAULT_VOCAB_SIZE, '--vocab_size')
  print(f'routed.data.prepare: training a {size}-piece vocabulary on a sample of the '
        'input ...', file=sys.stderr, flush=True)
  model = vocab.train_sentencepiece(sample_texts(parts, flags['text_key']), size,
                                   '--vocab_size')
  # Straight into DIR: an interrupted prepare reuses it when rerun.
  paths.atomic_write_bytes(existing, model)
  return existing


def main(argv: list[str] | None = None) -> int:
  from routed import cli  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS, cli.Help(
        command='python -m routed.data.prepare', doc=__doc__, flags=FLAG_HELP,
        exit_codes={0: 'prepared', 2: cli.BAD_INPUT + '; parts already written stay'}))
    if flags['split'] not in records.SPLITS:
      raise DataError(f'--split={flags["split"]!r}: use train or validation')
    if not 0 <= flags['holdout'] < 1:
      raise DataError(f'--holdout={flags["holdout"]}: must be in [0, 1)')
    if flags['seq_len'] < 1:
      raise DataError(f'--seq_len={flags["seq_len"]}: must be a positive integer')
    if not 0 <= flags['shard_index'] < flags['num_shards']:
      raise DataError(f'--shard_index={flags["shard_index"]} must be in [0, --num_shards='
                      f'{flags["num_shards"]})')
    output = os.path.abspath(os.path.expanduser(flags['output']))
    if os.path.exists(output) and not os.path.isdir(output):
      raise DataError(f'--output={flags["output"]!r} is a file, not a directory')
    parts = sources.list_parts(flags['input'], split=flags['split'],
                               tfds_data_dir=flags['tfds_data_dir'])
    os.makedirs(output, exist_ok=True)
    vocab_file = _resolve_vocab(flags, output, parts)
    holdout = flags['holdout'] if flags['split'] == 'train' else 0.0
    job = Job(flags['split'], flags['input'], parts, holdout, flags['text_key'])
    start = time.perf_counter()
    index = run_jobs(output, [job], vocab_file=vocab_file, seq_len=flags['seq_len'],
                     workers=flags['workers'], num_shards=flags['num_shards'],
                     shard_index=flags['shard_index'], progress=flags['progress'])
  except (cli.UsageError, DataError) as e:
    print(f'routed.data.prepare: {e}', file=sys.stderr)
    return 2
  s = index['splits']
  print(f'routed.data.prepare: {output}: ' + '; '.join(
      f'{name} {v["examples"]} examples, {v["tokens"]} tokens, {v["documents"]} documents'
      + ('' if v['complete'] else ' (incomplete: other shards still to run)')
      for name, v in s.items() if v['sources'] or v['files']) +
      f' ({time.perf_counter() - start:.1f} s)', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
