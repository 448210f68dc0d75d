"""TFDS builder for the stdlib corpus (`routed_stdlib/full`, `routed_stdlib/mini`).

A real `tfds.core.GeneratorBasedBuilder`, so the corpus goes through the same
TFDS -> seqio path as C4. It reads local files only (no downloads). Importing
this module imports TFDS and registers the builder; do it lazily.

Features per example: `text` (the file's source, str) and `path` (its path
relative to the stdlib root, str). Splits: `train`, `validation` (by hash of
path; see corpus.py).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile

from routed.data import corpus
from routed.data.tf_env import import_tfds

tfds = import_tfds()

NAME = corpus.TFDS_NAME
DATASET_VERSION = corpus.TFDS_VERSION


class RoutedStdlib(tfds.core.GeneratorBasedBuilder):
  """Source text of the Python standard library (*.py, no site-packages)."""

  name = NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: 'Initial release.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name='full', description='All stdlib *.py files (~31 MB).'),
      tfds.core.BuilderConfig(
          name='mini',
          description='Deterministic ~1.6 MB subset, for tests.'),
  ]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Python %d.%d standard library source from %s, one example per '
            'file.' % (sys.version_info[0], sys.version_info[1],
                       corpus.stdlib_root())),
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        homepage='https://docs.python.org/3/library/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    files = corpus.corpus_files(self.builder_config.name)
    return {split: self._generate_examples(paths)
            for split, paths in files.items()}

  def _generate_examples(self, relpaths):
    root = corpus.stdlib_root()
    for rel in relpaths:
      # The relative path is unique, so it is the example key (TFDS orders
      # examples by a hash of the key: deterministic, and mixes modules).
      yield rel, {'text': corpus.read_source(root, rel), 'path': rel}


def builder(data_dir: str, config: str) -> RoutedStdlib:
  return RoutedStdlib(config=config, data_dir=data_dir)


def prepare(data_dir: str, config: str) -> RoutedStdlib:
  """Build the dataset into data_dir if needed (TFDS writes atomically)."""
  b = builder(data_dir, config)
  tfds.disable_progress_bar()  # our own one-line progress replaces tqdm bars
  # Nothing is downloaded, but TFDS insists on a download dir: use a temp one
  # so no empty `downloads/` is left behind. TFDS also print()s two banner
  # lines to stdout; our progress line already says what is happening.
  with tempfile.TemporaryDirectory(prefix='routed_tfds_') as tmp, \
      contextlib.redirect_stdout(io.StringIO()):
    b.download_and_prepare(
        download_dir=tmp,
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return b
