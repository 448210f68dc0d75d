"""The data pipeline: real TFDS builder, seqio task and caches (no mocks)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from routed.data import DataError, check_data_config, load_dataset
from routed.data import corpus, ordering, paths, vocab

SEQ_LEN = 64  # what conftest's mini_data_dir is prepared for


@pytest.fixture
def mini_ds(mini_data_cfg):
  return load_dataset(mini_data_cfg, SEQ_LEN)


def _cache_files(ds):
  return [os.path.join(ds.cache_dir, n)
          for n in ('train.npy', 'validation.npy', 'meta.json')]


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


def test_tfds_dataset_holds_the_mini_files_with_text(mini_data_dir):
  from routed.data import stdlib_tfds  # pylint: disable=g-import-not-at-top
  b = stdlib_tfds.builder(mini_data_dir, 'mini')
  root = corpus.stdlib_root()
  expected = corpus.corpus_files('mini')
  for split in ('train', 'validation'):
    examples = list(stdlib_tfds.tfds.as_numpy(
        b.as_dataset(split=split, shuffle_files=False)))
    got = {ex['path'].decode(): ex['text'].decode() for ex in examples}
    assert sorted(got) == expected[split]
    rel = expected[split][0]
    assert got[rel] == corpus.read_source(root, rel)


# --- batches -------------------------------------------------------------------

def test_train_batches_are_a_pure_function_of_seed_and_step(mini_ds,
                                                            mini_data_cfg):
  b = mini_ds.train_batch(7, 8, seed=3)
  assert b.shape == (8, SEQ_LEN + 1) and b.dtype == np.int32
  # Same (seed, step) from a fresh object (= a resumed run) -> same batch.
  again = load_dataset(mini_data_cfg, SEQ_LEN)
  np.testing.assert_array_equal(again.train_batch(7, 8, seed=3), b)
  np.testing.assert_array_equal(mini_ds.train_batch(7, 8, seed=3), b)
  assert not np.array_equal(mini_ds.train_batch(8, 8, seed=3), b)
  assert not np.array_equal(mini_ds.train_batch(7, 8, seed=4), b)
  for step in (0, 1, 10_000):  # far past one epoch too
    batch = mini_ds.train_batch(step, 16, seed=0)
    assert batch.min() >= 0 and batch.max() < mini_ds.vocab_size


def test_every_sequence_once_per_epoch():
  n, bs = 10, 4
  idx = np.concatenate([ordering.train_indices(s, bs, 5, n) for s in range(5)])
  np.testing.assert_array_equal(np.sort(idx[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(idx[n:2 * n]), np.arange(n))
  assert not np.array_equal(idx[:n], idx[n:2 * n])  # reshuffled per epoch
  with pytest.raises(ValueError):
    ordering.train_indices(-1, bs, 0, n)


def test_eval_batches_are_fixed_and_cycle(mini_ds):
  first = mini_ds.eval_batches(3, 8)
  assert len(first) == 3
  for a, b in zip(first, mini_ds.eval_batches(3, 8)):
    assert a.shape == (8, SEQ_LEN + 1) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
  n = mini_ds.num_eval_sequences
  many = mini_ds.eval_batches(n // 8 + 2, 8)  # more than the split holds
  assert len(many) == n // 8 + 2
  flat = np.concatenate(many)
  assert len({r.tobytes() for r in flat[:n]}) > 0.99 * n
  np.testing.assert_array_equal(flat[n], flat[0])  # wrapped around
  assert all(b.max() < mini_ds.vocab_size for b in many)


def test_counts_and_describe(mini_ds):
  assert mini_ds.vocab_size == 512
  assert mini_ds.num_train_tokens == mini_ds.num_train_sequences * SEQ_LEN
  assert mini_ds.num_eval_tokens == mini_ds.num_eval_sequences * SEQ_LEN
  assert mini_ds.num_train_tokens > 5 * mini_ds.num_eval_tokens > 0
  line = mini_ds.describe()
  assert '\n' not in line and 'stdlib_mini' in line and mini_ds.cache_dir in line


# --- tokenization and packing -------------------------------------------------

def test_vocabulary_round_trips_python_source(mini_ds):
  v = mini_ds.vocabulary
  assert v.vocab_size == mini_ds.vocab_size and v.eos_id == 1
  snippet = ('class A:\n\tdef f(self, x):  # tab, two spaces\n'
             '        return  {"é": x ** 2}\r\n\n\n    \nπ = 3.14159\n')
  ids = v.encode(snippet)
  assert max(ids) < mini_ds.vocab_size and vocab.UNK_ID not in ids
  assert v.decode(ids) == snippet


def test_packing_is_eos_joined_documents_cut_into_chunks(mini_ds,
                                                         mini_data_dir):
  """The seqio task's output equals tokenizing the train split by hand."""
  from routed.data import stdlib_tfds  # pylint: disable=g-import-not-at-top
  b = stdlib_tfds.builder(mini_data_dir, 'mini')
  sp = vocab.load_processor(mini_ds.vocab_path)
  stream = []
  for ex in stdlib_tfds.tfds.as_numpy(
      b.as_dataset(split='train', shuffle_files=False)):
    stream += sp.encode(ex['text'].decode()) + [vocab.EOS_ID]
  n = len(stream) // (SEQ_LEN + 1)
  expected = np.reshape(stream[:n * (SEQ_LEN + 1)], (n, SEQ_LEN + 1))
  arr = np.load(os.path.join(mini_ds.cache_dir, 'train.npy'))
  np.testing.assert_array_equal(arr, expected)


def test_pack_lm_preprocessor():
  from routed.data import tasks  # pylint: disable=g-import-not-at-top
  tf = tasks.tf
  docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': np.array(d, np.int32)} for d in docs),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  out = [ex['targets'].tolist() for ex in
         tasks.pack_lm(ds, {'targets': 3}).as_numpy_iterator()]
  assert out == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # remainder [10, 11] dropped


def test_vocab_training_is_deterministic(mini_ds, mini_data_dir):
  from routed.data import stdlib_tfds  # pylint: disable=g-import-not-at-top
  b = stdlib_tfds.builder(mini_data_dir, 'mini')
  texts = [ex['text'].decode() for ex in stdlib_tfds.tfds.as_numpy(
      b.as_dataset(split='train', shuffle_files=False))]
  model = vocab.train_sentencepiece(texts, 512)
  with open(mini_ds.vocab_path, 'rb') as f:
    assert model == f.read()


# --- caching -------------------------------------------------------------------

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
          'ds.train_batch(0, 2, 0); ds.eval_batches(1, 2); '
          'print("tensorflow" in sys.modules, "seqio" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, timeout=120)
  assert out.stdout.split() == ['False', 'False'], out.stderr
  assert 'routed.data:' not in out.stderr  # no preparation stage ran


def test_deleted_npy_cache_is_rebuilt_identically(mini_ds, mini_data_cfg,
                                                  tmp_path, capsys):
  data_dir = tmp_path / 'data'
  shutil.copytree(mini_data_cfg.data_dir, data_dir)
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.data_dir = str(data_dir)
  packed_root = data_dir / paths.PACKED_SUBDIR
  for npy in packed_root.glob('*/*.npy'):
    npy.unlink()
  ds = load_dataset(cfg, SEQ_LEN)
  err = capsys.readouterr().err
  assert 'tokenizing and packing' in err and 'training vocabulary' not in err
  for name in ('train.npy', 'validation.npy'):
    np.testing.assert_array_equal(
        np.load(os.path.join(ds.cache_dir, name)),
        np.load(os.path.join(mini_ds.cache_dir, name)))
  with open(os.path.join(ds.cache_dir, 'meta.json')) as f:
    assert json.load(f)['vocab_md5'] == vocab.file_md5(mini_ds.vocab_path)


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


def test_c4_absent_is_a_one_line_error(mini_data_cfg, tmp_path):
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.task, cfg.data_dir = 'c4', str(tmp_path)
  for fn in (check_data_config, lambda c: load_dataset(c, SEQ_LEN)):
    with pytest.raises(DataError) as err:
      fn(cfg)
    _assert_one_line(err, str(tmp_path), 'tfds build c4/en')


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


# --- c4 streaming, on a tiny stand-in --------------------------------------------

def _write_stand_in_c4(data_dir):
  """A few hundred fake documents in TFDS's on-disk format for c4/en:3.1.0.

  Real C4 cannot be prepared here (Common Crawl + Beam); this writes a small
  dataset with C4's features under another builder name, then renames it to
  c4, so the real c4 builder code reads it through seqio.
  """
  import glob  # pylint: disable=g-import-not-at-top
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


def test_c4_streams_deterministically(mini_ds, mini_data_cfg, tmp_path):
  _write_stand_in_c4(str(tmp_path))
  cfg = mini_data_cfg.copy_and_resolve_references()
  cfg.task, cfg.data_dir, cfg.vocab_path = 'c4', str(tmp_path), mini_ds.vocab_path
  check_data_config(cfg)
  ds = load_dataset(cfg, 16)
  assert ds.vocab_size == 512 and 'c4/en:3.1.0' in ds.describe()
  run = [ds.train_batch(step, 4, seed=1) for step in range(4)]
  assert all(b.shape == (4, 17) and b.dtype == np.int32 for b in run)
  assert not np.array_equal(run[0], run[1])
  resumed = load_dataset(cfg, 16)  # a restart at step 2 sees the same batches
  np.testing.assert_array_equal(resumed.train_batch(2, 4, seed=1), run[2])
  np.testing.assert_array_equal(resumed.train_batch(3, 4, seed=1), run[3])
  assert not np.array_equal(resumed.train_batch(2, 4, seed=2), run[2])
  evals = ds.eval_batches(2, 4)
  assert len(evals) == 2 and evals[0].shape == (4, 17)
  for a, b in zip(evals, resumed.eval_batches(2, 4)):
    np.testing.assert_array_equal(a, b)
  assert 'says hello' in ds.vocabulary.decode(np.concatenate(run[0]).tolist())
