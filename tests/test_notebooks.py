"""The analysis notebooks execute end to end (nbclient, a real Jupyter kernel):
unified_scaling_laws.ipynb on the paper's released runs and our committed CPU-sweep
curves, routing_analysis.ipynb on runs of a tiny sweep made here with routed.sweep,
mup_transfer.ipynb on the μP transfer sweep measured here."""

import os

import pytest

from routed.sweep import cli as sweep_cli

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

pytestmark = pytest.mark.slow  # a kernel start and plots per notebook, plus a tiny sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
PAPER_CURVES = os.path.join(ROOT, '..', 'shared', 'data', 'clark2022', 'curves.csv.gz')
SWEEP_CURVES = os.path.join(ROOT, 'benchmarks', 'unified_scaling_cpu.csv')

# Two Switch runs that differ only in the scope of the load-balance loss.
BALANCE_SWEEP = '''
from routed.config import base_config
from routed.sweep.spec import make_sweep, point, select_variant


def balance():
  c = base_config()
  c.model.update(d_model=32, num_heads=2, num_layers=2, d_ff=64)
  c.moe.update(router='switch', every=2, num_experts=4, balance_shards=2)
  c.train.update(steps=12, batch_size=4, seq_len=64, warmup_steps=2, log_every=4)
  c.eval.update(every_steps=6, num_batches=2)
  c.checkpoint.update(every_steps=12, keep=1, async_save=False)
  c.data.update(task='stdlib_mini', vocab_size=512)
  return make_sweep('balance', c, [point('micro', {'moe.balance_scope': 'micro'}),
                                   point('global', {'moe.balance_scope': 'global'})])


def get_config(variant=''):
  return select_variant({'': balance}, variant)
'''


def execute(name: str) -> list[str]:
  """Runs notebooks/<name> in a fresh kernel (cwd notebooks/); returns its text outputs.
  A cell that raises fails the test (nbclient.exceptions.CellExecutionError)."""
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': NOTEBOOKS}}).execute()
  texts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        texts.append(output.text)
      elif output.output_type in ('display_data', 'execute_result'):
        texts.append(output.data.get('text/markdown', output.data.get('text/plain', '')))
  return texts


@pytest.mark.skipif(not os.path.exists(PAPER_CURVES),
                    reason=f'the paper\'s released curves are not at {PAPER_CURVES}')
def test_unified_scaling_notebook(monkeypatch):
  monkeypatch.setenv('ROUTED_CLARK_CURVES', PAPER_CURVES)
  monkeypatch.setenv('ROUTED_SWEEP_CURVES', SWEEP_CURVES)
  monkeypatch.setenv('ROUTED_BOOTSTRAP', '10')
  text = '\n'.join(execute('unified_scaling_laws.ipynb'))
  for router in ('S-Base', 'RL-R', 'Hash'):
    assert f'| {router} | published |' in text and f'| {router} | fit |' in text
  assert 'not fitted' not in text  # every router of our sweep has enough points
  assert 'alpha_N = 0.07' in text


def test_routing_analysis_notebook(tmp_path, mini_data_dir, monkeypatch, capsys):
  sweep_file = tmp_path / 'balance_sweep.py'
  sweep_file.write_text(BALANCE_SWEEP)
  workdir = tmp_path / 'sweep'
  assert sweep_cli.main([f'--config={sweep_file}', f'--workdir={workdir}', '--launch=inprocess',
                         f'--config.base.data.data_dir={mini_data_dir}']) == 0
  capsys.readouterr()
  monkeypatch.setenv('ROUTED_RUNS', os.pathsep.join([str(workdir / 'micro'),
                                                     str(workdir / 'global')]))
  text = '\n'.join(execute('routing_analysis.ipynb'))
  assert 'micro: 1 MoE layers' in text and 'global: 1 MoE layers' in text
  assert '| micro |' in text and 'train_max_load' in text


def test_mup_transfer_notebook():
  """On the sweep measured here (benchmarks/results/mup_transfer_cpu.json, the default)."""
  text = '\n'.join(execute('mup_transfer.ipynb'))
  assert '30 runs from mup_transfer_cpu.json' in text and '| mup | 128 |' in text
  assert 'standard: best rate' in text and 'mup: best rate' in text
