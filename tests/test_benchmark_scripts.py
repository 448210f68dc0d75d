"""The CPU benchmark scripts still run: benchmarks/dispatch.py, the data, AOT, recipes
and μP-transfer scripts and the GPU kernel tuner in their smallest settings (timings
are not checked: they belong in RESULTS.md)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import dispatch  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_dispatch_benchmark_prints_every_column(capsys):
  argv = ['--experts=4', '--backends=gather,tiled,experts', '--rounds=1', '--batch=2',
          '--seq=32', '--d_model=16', '--d_ff=32']
  assert dispatch.main(argv) == 0
  out = capsys.readouterr().out
  header = '| E | gather ms (x dense) | tiled ms (x dense) | experts ms (x dense) |'
  assert header in out
  row = next(line for line in out.splitlines() if line.startswith('| 4 |'))
  assert row.count('x)') == 3
  assert 'Command: python benchmarks/' in out and '--backends=gather,tiled,experts' in out


def test_data_benchmark_prints_every_section(tmp_path, capsys):
  import data  # pylint: disable=g-import-not-at-top
  argv = ['--sections=prepare,reader,resume', '--corpus_mb=0.3', '--files=2',
          '--vocab_size=512', '--seq_len=32', '--batch_size=4', '--read_batches=2',
          '--rounds=1', f'--workdir={tmp_path}']
  assert data.main(argv) == 0
  out = capsys.readouterr().out
  for header in ('### prepare', '### reader', '### resume', '| 1,000,000 |',
                 'reader / demand', 'json.gz MB/s per core'):
    assert header in out, out
  # The corpus is in the released C4 layout.
  assert sorted(os.listdir(tmp_path / 'c4')) == ['c4-train.00000-of-00002.json.gz',
                                                  'c4-train.00001-of-00002.json.gz']


@pytest.mark.slow
def test_aot_scale_prints_a_row_per_case(capsys):
  """One real routed.aot compile (the quickstart shape for 4 v5p chips, experts split
  over 2 and their d_ff over tensor=2) becomes a table row; an unknown case is exit 2."""
  import aot_scale  # pylint: disable=g-import-not-at-top
  assert aot_scale.main(['--cases=nope']) == 2
  assert aot_scale.main(['--cases=smoke']) == 0
  row = next(line for line in capsys.readouterr().out.splitlines()
             if line.startswith('| switch_base.py:tiny'))
  assert 'fits' in row and 'auto -> splash' in row and 'expert=2 tensor=2' in row, row


@pytest.mark.slow
def test_recipes_benchmark_prints_its_table(tmp_path, mini_data_dir, monkeypatch, capsys):
  """Two recipes (one upcycled from its own dense run), 4 steps each, on the mini
  corpus: a table row each; an unknown recipe is exit 2 before any training."""
  import recipes  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('ROUTED_DATA_DIR', mini_data_dir)
  assert recipes.main(['--recipes=nope']) == 2
  assert recipes.main(['--recipes=aux_free,upcycled_top2', '--seeds=0', '--steps=4',
                       '--eval_batches=1', '--task=stdlib_mini', '--vocab_size=512',
                       f'--workdir={tmp_path}']) == 0
  out = capsys.readouterr().out
  assert '| aux_free |' in out and '| upcycled_top2 |' in out
  assert os.path.exists(tmp_path / 'results.json')


@pytest.mark.slow
def test_mup_transfer_benchmark_prints_its_table(tmp_path, mini_data_dir, monkeypatch, capsys):
  import mup_transfer  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('ROUTED_DATA_DIR', mini_data_dir)
  assert mup_transfer.main(['--widths=32,64', '--lrs=1e-2', '--parametrizations=mup',
                            '--steps=2', '--eval_batches=1', '--task=stdlib_mini',
                            '--vocab_size=512', f'--workdir={tmp_path}']) == 0
  out = capsys.readouterr().out
  assert '| mup | 32 |' in out and '| mup | 64 |' in out and 'μP base width 32' in out
