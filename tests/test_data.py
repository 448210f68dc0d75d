"""The data pipeline on the embedded corpus: prepared like any corpus, read with Grain
(real ArrayRecord files, no mocks)."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from routed.data import DataError, check_data_config, load_dataset
from routed.data import corpus, load, paths, records, vocab

SEQ_LEN = 64  # what conftest's mini_data_dir is prepared for


@pytest.fixture
def mini_ds(mini_data_cfg):
  return load_dataset(mini_data_cfg, SEQ_LEN)


# --- corpus and split --------------------------------------------------------

def test_split_is_deterministic_and_disjoint_by_path():
  full = corpus.corpus_files('full')
  assert full == corpus.corpus_files('full')
  train, val = set(full['train']), set(full['validation'])
  assert not train & val
  assert train | val == set(corpus.list_stdlib_files())
  assert 0.01 < len(val) / (len(train) + len(val)) < 0.06
  assert not any('site-packages' in p for p in train | val)
  assert all(corpus.split_of(p) == 'validation' for p in val)
  mini = corpus.corpus_files('mini')
  assert mini['train'] and mini['validation']
  assert set(mini['train']) <= train and set(mini['validation']) <= val


def _expected_rows(documents, row_len):
  """Rows of tokens, segment ids and positions for token lists, by hand (a plain loop,
  independent of routed.data.packing)."""
  flat = []  # (token, document, position)
  for d, doc in enumerate(documents):
    for p, token in enumerate(list(doc) + [vocab.EOS_ID]):
      flat.append((token, d, p))
  rows = []
  for start in range(0, len(flat), row_len):
    chunk = flat[start:start + row_len]
    first = chunk[0][1]
    tokens = [t for t, _, _ in chunk] + [0] * (row_len - len(chunk))
    segments = [d - first + 1 for _, d, _ in chunk] + [0] * (row_len - len(chunk))
    positions = [p for _, _, p in chunk] + [0] * (row_len - len(chunk))
    rows.append((tokens, segments, positions))
  return rows


def read_file_rows(path, layout):
  """Every example of one ArrayRecord file, in file order, as (tokens, segments,
  positions) lists."""
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  source = array_record_data_source.ArrayRecordDataSource([str(path)])
  out = []
  for i in range(len(source)):
    ex = layout.decode(source[i])
    out.append(tuple(ex[k].tolist() for k in records.FIELDS))
  return out


def test_stdlib_is_prepared_as_a_corpus_like_any_other(mini_ds):
  """Each part of the prepared mini corpus holds its files' documents, tokenized by
  hand, joined with EOS and cut into rows with segment ids and positions."""
  sp = vocab.load_processor(mini_ds.vocab_path)
  jobs = {job.split: job for job in load.stdlib_jobs('mini')}
  root = corpus.stdlib_root()
  expected_files = corpus.corpus_files('mini')
  for split, job in jobs.items():
    files = [f for part in job.parts for f in part.files]
    assert [os.path.relpath(f, root) for f in files] == expected_files[split]
    for i, part in enumerate(job.parts[:2]):
      docs = [sp.encode(corpus.read_source(root, os.path.relpath(f, root)))
              for f in part.files]
      path = os.path.join(mini_ds.path, split, records.part_name('part', i, len(job.parts))
                          + '.array_record')
      assert read_file_rows(path, mini_ds.layout) == _expected_rows(docs, SEQ_LEN + 1)


# --- batches -------------------------------------------------------------------

def test_train_batches_are_a_pure_function_of_seed_and_step(mini_ds,
                                                            mini_data_cfg):
  b = mini_ds.train_batch(7, 8, seed=3)
  assert set(b) == set(records.FIELDS)
  assert all(v.shape == (8, SEQ_LEN + 1) and v.dtype == np.int32 for v in b.values())
  same = lambda x, y: all(np.array_equal(x[k], y[k]) for k in records.FIELDS)
  # Same (seed, step) from a fresh object (= a resumed run) -> same batch.
  again = load_dataset(mini_data_cfg, SEQ_LEN)
  assert same(again.train_batch(7, 8, seed=3), b)
  assert same(mini_ds.train_batch(7, 8, seed=3), b)
  assert not same(mini_ds.train_batch(8, 8, seed=3), b)
  assert not same(mini_ds.train_batch(7, 8, seed=4), b)
  # Some rows only (another process's share) are those rows of the same batch.
  part = mini_ds.train_batch(7, 8, seed=3, rows=np.array([2, 3, 6]))
  assert all(np.array_equal(part[k], b[k][[2, 3, 6]]) for k in records.FIELDS)
  # The read-ahead iterator yields exactly these batches, from any start.
  it = mini_ds.train_batches(6, 8, seed=3)
  assert not same(next(it), b) and same(next(it), b)
  for step in (0, 1, 10_000):  # far past one epoch too
    batch = mini_ds.train_batch(step, 16, seed=0)
    assert batch['tokens'].min() >= 0 and batch['tokens'].max() < mini_ds.vocab_size


def test_every_example_once_per_epoch_and_reshuffled(mini_ds):
  n = mini_ds.num_train_sequences
  first = {r.tobytes() for r in mini_ds.train_batch(0, n, seed=5)['tokens']}
  every = {bytes(r) for r in _all_train_rows(mini_ds)}
  assert first == every  # every example once (they are distinct rows)
  epoch_two = mini_ds.train_batch(1, n, seed=5)['tokens']
  assert {r.tobytes() for r in epoch_two} == every
  assert not np.array_equal(epoch_two, mini_ds.train_batch(0, n, seed=5)['tokens'])


def _all_train_rows(ds):
  rows = []
  for f in ds.index['splits']['train']['files']:
    rows += [np.asarray(t, np.int32).tobytes() for t, _, _ in
             read_file_rows(os.path.join(ds.path, f['file']), ds.layout)]
  assert len(rows) == ds.num_train_sequences and len(set(rows)) > 0.99 * len(rows)
  return rows


def test_eval_batches_are_fixed_and_cycle(mini_ds):
  first = mini_ds.eval_batches(3, 8)
  assert len(first) == 3
  for a, b in zip(first, mini_ds.eval_batches(3, 8)):
    assert a['tokens'].shape == (8, SEQ_LEN + 1) and a['tokens'].dtype == np.int32
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  n = mini_ds.num_eval_sequences
  many = mini_ds.eval_batches(n // 8 + 2, 8)  # more than the split holds
  assert len(many) == n // 8 + 2
  flat = np.concatenate([b['tokens'] for b in many])
  assert len({r.tobytes() for r in flat[:n]}) > 0.99 * n
  assert {r.tobytes() for r in flat[n:]} <= {r.tobytes() for r in flat[:n]}  # cycled
  assert all(b['tokens'].max() < mini_ds.vocab_size for b in many)


def test_counts_and_describe(mini_ds):
  assert mini_ds.vocab_size == 512
  assert mini_ds.num_train_tokens == mini_ds.num_train_sequences * SEQ_LEN
  assert mini_ds.num_eval_tokens == mini_ds.num_eval_sequences * SEQ_LEN
  assert mini_ds.num_train_tokens > 5 * mini_ds.num_eval_tokens > 0
  line = mini_ds.describe()
  assert '\n' not in line and 'stdlib_mini' in line and mini_ds.path in line


# --- tokenization ----------------------------------------------------------------

def test_vocabulary_round_trips_python_source(mini_ds):
  v = mini_ds.vocabulary
  assert v.vocab_size == mini_ds.vocab_size and v.eos_id == 1
  snippet = ('class A:\n\tdef f(self, x):  # tab, two spaces\n'
             '        return  {"é": x ** 2}\r\n\n\n    \nπ = 3.14159\n')
  ids = v.encode(snippet)
  assert max(ids) < mini_ds.vocab_size and vocab.UNK_ID not in ids
  assert v.decode(ids) == snippet


def test_vocab_training_is_deterministic(mini_ds):
  root = corpus.stdlib_root()
  texts = [corpus.read_source(root, rel) for rel in corpus.corpus_files('mini')['train']]
  model = vocab.train_sentencepiece(texts, 512)
  with open(mini_ds.vocab_path, 'rb') as f:
    assert model == f.read()


# --- caching -------------------------------------------------------------------

def _cache_files(ds):
  return sorted(glob.glob(os.path.join(ds.path, '**', '*'), recursive=True))


def test_second_load_uses_cache_without_tensorflow(mini_ds, mini_data_cfg):
  mtimes = [os.path.getmtime(p) for p in _cache_files(mini_ds)]
  start = time.perf_counter()
  again = load_dataset(mini_data_cfg, SEQ_LEN)
  assert time.perf_counter() - start < 2.0
  assert [os.path.getmtime(p) for p in _cache_files(again)] == mtimes
  code = ('import sys; from routed.data import load_dataset; '
          'from routed.config import base_config; c = base_config().data; '
          f'c.task = "stdlib_mini"; c.data_dir = {mini_data_cfg.data_dir!r}; '
          f'c.vocab_size = 512; ds = load_dataset(c, {SEQ_LEN}); '
          'next(ds.train_batches(0, 2, 0)); ds.eval_batches(1, 2); '
          'print("tensorflow" in sys.modules, "seqio" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, timeout=120)
  assert out.stdout.split() == ['False', 'False'], out.stderr
  assert 'routed.data:' not in out.stderr  # no preparation stage ran


def test_a_lost_part_is_rebuilt_identically(mini_ds, mini_data_cfg, tmp_path, capsys):
  data_dir = tmp_path / 'data'
  shutil.copytree(mini_data_cfg.data_dir, data_dir)
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.data_dir = str(data_dir)
  prepared = data_dir / paths.PREPARED_SUBDIR / os.path.basename(mini_ds.path)
  parts = sorted((prepared / 'train').glob('part-*.array_record'))
  assert len(parts) >= 2
  kept, lost = parts[0], parts[-1]
  kept_mtime = kept.stat().st_mtime
  lost.unlink()
  lost.with_suffix('.json').unlink()  # as if killed while writing this part
  ds = load_dataset(cfg, SEQ_LEN)
  err = capsys.readouterr().err
  assert 'tokenizing and packing' in err and 'training vocabulary' not in err
  assert kept.stat().st_mtime == kept_mtime  # finished parts are not redone
  with open(prepared / records.INDEX) as f:
    rebuilt = json.load(f)
  with open(os.path.join(mini_ds.path, records.INDEX)) as f:
    original = json.load(f)
  assert rebuilt['splits']['train']['files'] == original['splits']['train']['files']
  assert ds.num_train_sequences == mini_ds.num_train_sequences


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / 'x.npy'
  with pytest.raises(RuntimeError):
    with paths.atomic_output(str(target)) as f:
      f.write(b'partial')
      raise RuntimeError('killed')
  assert list(tmp_path.iterdir()) == []


# --- errors --------------------------------------------------------------------

def _assert_one_line(err, *needles):
  msg = str(err.value)
  assert '\n' not in msg
  for needle in needles:
    assert needle in msg, msg


def test_c4_without_a_prepared_path_is_a_one_line_error(mini_data_cfg):
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.task = 'c4'
  for fn in (check_data_config, lambda c: load_dataset(c, SEQ_LEN)):
    with pytest.raises(DataError) as err:
      fn(cfg)
    _assert_one_line(err, 'data.path', 'routed.data.prepare', 'json.gz')


def test_prepared_path_errors_are_one_line(mini_ds, mini_data_cfg, tmp_path):
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.path = str(tmp_path)  # exists, but holds nothing prepared
  with pytest.raises(DataError) as err:
    load_dataset(cfg, SEQ_LEN)
  _assert_one_line(err, 'data.path', str(tmp_path), 'routed.data.prepare')
  cfg.path = mini_ds.path
  assert load_dataset(cfg, SEQ_LEN).num_train_sequences == mini_ds.num_train_sequences
  with pytest.raises(DataError) as err:
    load_dataset(cfg, 32)
  _assert_one_line(err, f'seq_len {SEQ_LEN}', 'train.seq_len=32')
  cfg.path = 'gs://bucket/c4'
  with pytest.raises(DataError) as err:
    load_dataset(cfg, SEQ_LEN)
  _assert_one_line(err, "data.path='gs://bucket/c4'", 'gcsfuse')


@pytest.mark.parametrize('key,value,needle', [
    ('data_dir', '/nonexistent/routed-data', 'data.data_dir'),
    ('task', 'nope', 'data.task'),
    ('vocab_size', 100, 'data.vocab_size'),
    ('vocab_path', '/nonexistent/sp.model', 'data.vocab_path'),
])
def test_bad_config_is_a_one_line_error(mini_data_cfg, key, value, needle):
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg[key] = value
  for fn in (check_data_config, lambda c: load_dataset(c, SEQ_LEN)):
    with pytest.raises(DataError) as err:
      fn(cfg)
    _assert_one_line(err, needle, str(value))


def test_default_data_dir(mini_data_cfg, tmp_path, monkeypatch):
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.data_dir = ''
  monkeypatch.setenv(paths.ENV_DATA_DIR, str(tmp_path / 'env'))
  assert paths.resolve_data_dir(cfg) == str(tmp_path / 'env')
  monkeypatch.delenv(paths.ENV_DATA_DIR)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  expected = tmp_path / 'home' / '.cache' / 'routed' / 'data'
  assert paths.resolve_data_dir(cfg, create=False) == str(expected)
  assert not expected.exists()
  assert paths.resolve_data_dir(cfg) == str(expected) and expected.is_dir()


# --- a TFDS dataset as input: C4's builder, on a tiny stand-in ------------------

def _write_stand_in_c4(data_dir):
  """A few hundred fake documents in TFDS's on-disk format for c4/en:3.1.0.

  Real C4 cannot be prepared here (Common Crawl + Beam); this writes a small
  dataset with C4's features under another builder name, then renames it to
  c4, so the real c4 builder code reads it.
  """
  from routed.data.tf_env import import_tfds  # pylint: disable=g-import-not-at-top
  tfds = import_tfds()
  fields = ('text', 'url', 'content-type', 'content-length', 'timestamp')

  class StandInC4(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('3.1.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {k: tfds.features.Text() for k in fields}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(200, 'train'),
              'validation': self._generate_examples(10, 'validation')}

    def _generate_examples(self, n=0, split=''):
      for i in range(n):
        text = f'The {split} document number {i} says hello. ' * (3 + i % 11)
        yield f'{split}{i}', dict({k: '' for k in fields}, text=text)

  tfds.disable_progress_bar()
  tmp = os.path.join(data_dir, 'tmp')
  StandInC4(config='en', data_dir=tmp).download_and_prepare(
      download_dir=os.path.join(tmp, 'dl'))
  dst = os.path.join(data_dir, 'c4', 'en', '3.1.0')
  shutil.move(os.path.join(tmp, 'stand_in_c4', 'en', '3.1.0'), dst)
  shutil.rmtree(tmp)
  for f in glob.glob(os.path.join(dst, 'stand_in_c4-*')):
    os.rename(f, f.replace('stand_in_c4-', 'c4-'))
  info_path = os.path.join(dst, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  info['name'] = 'c4'
  with open(info_path, 'w') as f:
    json.dump(info, f)


def test_a_tfds_c4_build_is_prepared_and_trains_as_c4(mini_ds, mini_data_cfg, tmp_path):
  from routed.data import prepare  # pylint: disable=g-import-not-at-top
  _write_stand_in_c4(str(tmp_path / 'tfds'))
  out = tmp_path / 'c4'
  for split in ('train', 'validation'):
    assert prepare.main([f'--input=tfds:c4/en:3.1.0', f'--output={out}', '--seq_len=16',
                         f'--tfds_data_dir={tmp_path / "tfds"}', f'--split={split}',
                         '--holdout=0', f'--vocab={mini_ds.vocab_path}', '--workers=1',
                         '--noprogress']) == 0
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.task, cfg.path = 'c4', str(out)
  check_data_config(cfg)
  ds = load_dataset(cfg, 16)
  assert ds.vocab_size == 512
  assert ds.index['splits']['train']['documents'] == 200
  assert ds.index['splits']['validation']['documents'] == 10
  run = [ds.train_batch(step, 4, seed=1)['tokens'] for step in range(2)]
  assert all(b.shape == (4, 17) for b in run) and not np.array_equal(run[0], run[1])
  text = ds.vocabulary.decode(np.concatenate(run[0]).tolist())
  assert 'document number' in text  # rows are shuffled: phrases are cut
