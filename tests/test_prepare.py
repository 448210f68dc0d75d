"""`python -m routed.data.prepare`: every input format against a hand tokenization,
resumable and sharded preparation, and every bad input as one line with exit 2."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from routed.data import load_dataset, prepare, records, vocab
from routed.data.reader import PreparedDataset
from tests.test_data import _expected_rows, read_file_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 24


@pytest.fixture(scope='module')
def vocab_path(mini_data_cfg):
  return load_dataset(mini_data_cfg, 64).vocab_path


def docs(seed, n):
  rng = np.random.default_rng(seed)
  words = ['routing', 'expert', 'token', 'capacity', 'the', 'of', 'def', 'return', 'é',
           'loss', '\n', '    ', 'π', 'batch']
  return [' '.join(rng.choice(words, rng.integers(1, 40))) for _ in range(n)]


def write_corpus(root):
  """One file of each format; returns {file name: its good documents, in order}."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  expected = {}
  # The released C4 layout: gzip'd JSON lines with text, timestamp and url.
  c4 = docs(0, 30)
  name = 'c4-train.00000-of-01024.json.gz'
  with gzip.open(os.path.join(root, name), 'wt', encoding='utf-8') as f:
    for i, text in enumerate(c4):
      f.write(json.dumps({'text': text, 'timestamp': '2019-04-25T12:57:54Z',
                          'url': f'https://example.com/{i}'}) + '\n')
      if i == 3:
        f.write('{"text": "a bad line, cut off\n')  # not JSON: counted, skipped
      if i == 5:
        f.write(json.dumps({'text': '', 'url': 'empty'}) + '\n')  # an empty document
  expected[name] = c4
  jsonl = docs(1, 12)
  with open(os.path.join(root, 'extra.jsonl'), 'w') as f:
    for text in jsonl:
      f.write(json.dumps({'text': text}) + '\n')
    f.write(json.dumps({'content': 'no text field'}) + '\n')
  expected['extra.jsonl'] = jsonl
  fineweb = docs(2, 20)
  pq.write_table(pa.table({'text': fineweb, 'id': [str(i) for i in range(20)]}),
                 os.path.join(root, 'fineweb-000.parquet'))
  expected['fineweb-000.parquet'] = fineweb
  for i, text in enumerate(docs(3, 3)):
    with open(os.path.join(root, f'note{i}.txt'), 'w', encoding='utf-8') as f:
      f.write(text)
  expected['note*.txt'] = docs(3, 3)
  return expected


def run(*args):
  return prepare.main(list(args) + ['--noprogress'])


@pytest.fixture(scope='module')
def prepared(vocab_path, tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  expected = write_corpus(str(root / 'in'))
  out = root / 'out'
  assert run(f'--input={root}/in/*', f'--output={out}', f'--vocab={vocab_path}',
             f'--seq_len={SEQ}', '--holdout=0', '--workers=1') == 0
  return root, out, expected


def test_every_format_matches_a_hand_tokenization(prepared, vocab_path):
  root, out, expected = prepared
  sp = vocab.load_processor(vocab_path)
  with open(out / records.INDEX) as f:
    index = json.load(f)
  layout = records.Layout.from_json(index['record'])
  # Parts follow the sorted file names; the three text files are one part.
  order = ['c4-train.00000-of-01024.json.gz', 'extra.jsonl', 'fineweb-000.parquet',
           'note*.txt']
  files = index['splits']['train']['files']
  assert [f['file'] for f in files] == [
      f'train/{records.part_name("part", i, 4)}.array_record' for i in range(4)]
  total = 0
  for name, f in zip(order, files):
    want = _expected_rows([sp.encode(t) for t in expected[name]], SEQ + 1)
    assert read_file_rows(out / f['file'], layout) == want, name
    assert f['sha256'] == records.sha256_file(out / f['file'])
    total += sum(len(sp.encode(t)) + 1 for t in expected[name])
  s = index['splits']['train']
  # Every token of every document exactly once: counts agree with the hand count.
  assert s['tokens'] == total and s['documents'] == sum(map(len, expected.values()))
  assert s['bad_lines'] == {'not JSON': 1, "no string field 'text'": 1}
  assert s['empty_documents'] == 1
  assert index['vocab']['sha256'] == records.sha256_file(vocab_path)


def test_holdout_splits_documents_without_loss(prepared, vocab_path):
  root, _, expected = prepared
  out = root / 'holdout'
  assert run(f'--input={root}/in/*', f'--output={out}', f'--vocab={vocab_path}',
             f'--seq_len={SEQ}', '--holdout=0.3', '--workers=1') == 0
  ds = PreparedDataset(str(out), SEQ)
  documents = []
  for split in records.SPLITS:
    stream = []
    for f in ds.index['splits'][split]['files']:
      for tokens, segments, _ in read_file_rows(out / f['file'], ds.layout):
        stream += [t for t, s in zip(tokens, segments) if s]
    while stream:
      end = stream.index(vocab.EOS_ID)
      documents.append(tuple(stream[:end]))
      stream = stream[end + 1:]
  sp = vocab.load_processor(vocab_path)
  want = [tuple(sp.encode(t)) for texts in expected.values() for t in texts]
  assert sorted(documents) == sorted(want)
  assert 0 < ds.index['splits']['validation']['documents'] < len(want) // 2


def test_sharded_prepare_over_two_machines_equals_one_and_reruns_skip(prepared, vocab_path,
                                                                      mini_data_cfg):
  root, out, _ = prepared
  two = root / 'two'
  common = [f'--input={root}/in/*', f'--output={two}', f'--vocab={vocab_path}',
            f'--seq_len={SEQ}', '--holdout=0', '--workers=1', '--num_shards=2']
  assert run(*common, '--shard_index=1') == 0
  with pytest.raises(Exception) as err:  # half done: the reader refuses it
    PreparedDataset(str(two), SEQ)
  assert 'incomplete (2 of 4 parts' in str(err.value)
  assert run(*common, '--shard_index=0') == 0
  with open(out / records.INDEX) as f, open(two / records.INDEX) as g:
    assert json.load(f)['splits']['train']['files'] == json.load(g)['splits']['train']['files']
  mtimes = {p: p.stat().st_mtime for p in (two / 'train').iterdir()}
  assert run(*common[:-1]) == 0  # a rerun of the whole job: every part is done
  assert {p: p.stat().st_mtime for p in (two / 'train').iterdir()} == mtimes
  # Trains: the prepared directory through data.path.
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.path, cfg.task = str(two), 'c4'
  with pytest.raises(Exception) as err:  # holdout 0: no validation split
    load_dataset(cfg, SEQ)
  assert '--split=validation' in str(err.value)


def test_interrupted_prepare_resumes_with_the_missing_part_only(prepared, vocab_path,
                                                                tmp_path):
  root, out, _ = prepared
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'out'
  shutil.copytree(out, copy)
  lost = copy / 'train' / f'{records.part_name("part", 2, 4)}.json'
  lost.unlink()  # killed before the part's record was written
  (copy / 'train' / f'{records.part_name("part", 2, 4)}.array_record').unlink()
  kept = copy / 'train' / f'{records.part_name("part", 0, 4)}.array_record'
  mtime = kept.stat().st_mtime
  assert run(f'--input={root}/in/*', f'--output={copy}', f'--vocab={vocab_path}',
             f'--seq_len={SEQ}', '--holdout=0', '--workers=1') == 0
  assert kept.stat().st_mtime == mtime and lost.exists()
  with open(out / records.INDEX) as f, open(copy / records.INDEX) as g:
    assert json.load(f)['splits'] == json.load(g)['splits']


def snapshot(directory):
  return {p: (p.stat().st_mtime, records.sha256_file(p)) for p in directory.rglob('*')
          if p.is_file()}


def assert_refused(capsys, args, *needles, code=2):
  assert run(*args) == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  for needle in needles:
    assert needle in err[0], err[0]


def test_bad_inputs_are_one_line_and_keep_what_was_written(prepared, vocab_path, tmp_path,
                                                           capsys):
  root, out, _ = prepared
  import shutil  # pylint: disable=g-import-not-at-top
  work = tmp_path / 'out'
  shutil.copytree(out, work)
  before = snapshot(work)
  base = [f'--output={work}', f'--vocab={vocab_path}', f'--seq_len={SEQ}', '--workers=1']
  # Another seq_len, another vocabulary: refused before anything is written.
  assert_refused(capsys, [f'--input={root}/in/*'] + base[:2] + ['--seq_len=32'],
                 'seq_len 24', '--seq_len=32')
  other = tmp_path / 'other.model'
  with open(vocab_path, 'rb') as f:
    model = f.read()
  from routed.data import corpus  # pylint: disable=g-import-not-at-top
  texts = [corpus.read_source(corpus.stdlib_root(), rel)
           for rel in corpus.corpus_files('mini')['validation'][:20]]
  other.write_bytes(vocab.train_sentencepiece(texts, vocab.MIN_VOCAB_SIZE))
  assert model != other.read_bytes()
  assert_refused(capsys, [f'--input={root}/in/*', f'--output={work}', f'--vocab={other}',
                          f'--seq_len={SEQ}'], 'another vocabulary', str(work))
  assert snapshot(work) == before
  # A glob that matches nothing; a corpus without a single document.
  assert_refused(capsys, [f'--input={tmp_path}/none/*.jsonl'] + base, 'matches no files')
  (tmp_path / 'empty').mkdir()
  with open(tmp_path / 'empty' / 'a.jsonl', 'w') as f:
    f.write(json.dumps({'body': 'not under text'}) + '\n' + json.dumps({'text': ''}) + '\n')
  assert_refused(capsys, [f'--input={tmp_path}/empty/*', f'--output={tmp_path / "e"}',
                          f'--vocab={vocab_path}', '--workers=1'],
                 'no documents found', "'text'", '--text_key')
  # A parquet without the column.
  assert_refused(capsys, [f'--input={root}/in/*.parquet', f'--output={tmp_path / "p"}',
                          f'--vocab={vocab_path}', '--text_key=body', '--workers=1'],
                 'fineweb-000.parquet', "no column 'body'")
  assert snapshot(work) == before


def test_an_unreadable_file_fails_alone_in_a_real_process(prepared, vocab_path, tmp_path):
  """Exit 2 and one line naming the file; the other parts are written and resume."""
  root, _, expected = prepared
  corpus = tmp_path / 'in'
  write_corpus(str(corpus))
  broken = corpus / 'c4-train.00001-of-01024.json.gz'
  broken.write_bytes(b'this is not gzip data')
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'routed.data.prepare', f'--input={corpus}/*',
         f'--output={out}', f'--vocab={vocab_path}', f'--seq_len={SEQ}', '--workers=2']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip() and '%|' not in l]  # not the bar
  assert len(lines) == 1 and str(broken) in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
  done = sorted(p.name for p in (out / 'train').glob('*.json'))
  assert len(done) == 4  # every other part finished and recorded
  for name in done:
    with open(out / 'train' / name) as f:
      for o in json.load(f)['outputs']:
        assert records.sha256_file(out / o['file']) == o['sha256']
  broken.unlink()  # fixed (here: removed) -> a rerun keeps the finished parts
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'was prepared from' in proc.stderr  # 5 parts, not 4


def test_trains_on_a_prepared_directory(prepared, vocab_path,
                                        mini_data_cfg):
  from routed.train import main as train_main  # pylint: disable=g-import-not-at-top
  from tests.test_train import read_metrics, tiny_args  # pylint: disable=g-import-not-at-top
  root = prepared[0]
  out = root / 'holdout'  # made by test_holdout_splits_documents_without_loss
  if not (out / records.INDEX).exists():
    assert run(f'--input={root}/in/*', f'--output={out}', f'--vocab={vocab_path}',
               f'--seq_len={SEQ}', '--holdout=0.3', '--workers=1') == 0
  workdir = root / 'run'
  args = tiny_args(mini_data_cfg, workdir, **{
      'data.path': str(out), 'data.task': 'c4', 'train.seq_len': SEQ, 'train.steps': 4,
      'eval.every_steps': 4, 'checkpoint.every_steps': 4})
  assert train_main(args) == 0
  rows = read_metrics(workdir)
  assert rows[-1]['step'] == 4 and np.isfinite(rows[-1]['eval/ce'])
