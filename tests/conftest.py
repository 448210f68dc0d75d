"""Shared fixtures."""

import pytest

MINI_VOCAB_SIZE = 512
MINI_SEQ_LEN = 64


def _mini_data_cfg(data_dir):
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  cfg = base_config().data
  cfg.task = 'stdlib_mini'
  cfg.data_dir = str(data_dir)
  cfg.vocab_size = MINI_VOCAB_SIZE
  return cfg


@pytest.fixture(scope='session')
def mini_data_dir(tmp_path_factory):
  """A data dir with task stdlib_mini prepared once per session (~10 s):
  vocab_size MINI_VOCAB_SIZE, packed for seq_len MINI_SEQ_LEN (other seq_lens
  only need a ~2 s packing pass)."""
  from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('routed_data')
  load_dataset(_mini_data_cfg(data_dir), MINI_SEQ_LEN)
  return str(data_dir)


@pytest.fixture(scope='session')
def mini_data_cfg(mini_data_dir):
  """config.data for stdlib_mini in mini_data_dir. Shared by all tests:
  treat as read-only (`cfg.copy_and_resolve_references()` before changing)."""
  return _mini_data_cfg(mini_data_dir)
