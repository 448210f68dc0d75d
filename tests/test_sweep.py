"""routed.sweep: the sweep config format, printed commands that rebuild each point, and a
real tiny sweep that is killed, resumed (finished points skipped) and gathered into
curves.csv in the paper's schema."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from routed import cli
from routed.scaling import COLUMNS, load_curves, select
from routed.sweep import cli as sweep_cli
from routed.sweep import reeval
from routed.sweep import spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIFIED = os.path.join(ROOT, 'configs', 'sweeps', 'unified_scaling.py')

# A two-point sweep of seconds-long runs on the mini corpus (its data dir comes in as
# a --config.base override, as a user would point a sweep at their data).
TINY_SWEEP = '''
from routed.config import base_config
from routed.sweep.spec import make_sweep, point, select_variant


def tiny():
  c = base_config()
  c.model.update(d_model=32, num_heads=2, num_layers=2, d_ff=64)
  c.moe.update(every=2, num_experts=2)
  c.train.update(steps=6, batch_size=4, seq_len=64, warmup_steps=2, log_every=3, seed=42)
  c.eval.update(every_steps=3, num_batches=2)
  c.checkpoint.update(every_steps=3, keep=1, async_save=False)
  c.data.update(task='stdlib_mini', vocab_size=512)
  return make_sweep('tiny', c, [
      point('dense', {'moe.every': 0, 'moe.num_experts': 1}, model_size_label='tiny'),
      point('sbase-e2', {'moe.router': 'sbase'}, model_size_label='tiny'),
  ])


def get_config(variant=''):
  return select_variant({'': tiny}, variant)
'''


def test_point_config_applies_overrides():
  base = cli.load_config(f'{UNIFIED}:cpu').base
  sweep = spec.make_sweep('t', base, [spec.point('p', {'moe.num_experts': 4,
                                                       'train.learning_rate': 1})])
  cfg = spec.point_config(sweep, 'p')
  assert cfg.moe.num_experts == 4 and cfg.train.learning_rate == 1.0
  assert sweep.base.moe.num_experts == base.moe.num_experts  # base untouched
  with pytest.raises(ValueError, match='unknown config key moe.experts'):
    spec.make_sweep('t', base, [spec.point('p', {'moe.experts': 4})])
  with pytest.raises(ValueError, match='appears twice'):
    spec.make_sweep('t', base, [spec.point('p', {}), spec.point('p', {})])
  with pytest.raises(ValueError, match='hyper_id'):
    spec.make_sweep('t', base, [spec.point('a/b', {})])


@pytest.mark.parametrize('variant, count', [('cpu', 30), ('', 168)])
def test_print_mode_commands_rebuild_each_point(tmp_path, capsys, variant, count):
  sweep_args = [f'--config={UNIFIED}:{variant}', f'--workdir={tmp_path}', '--launch=print',
                '--config.base.train.steps=123']
  assert sweep_cli.main(sweep_args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == count
  sweep = cli.load_config(f'{UNIFIED}:{variant}')
  with sweep.unlocked():
    sweep.base.train.steps = 123
  for line in lines[::7]:
    argv = shlex.split(line)
    assert argv[:3] == ['python', '-m', 'routed.train']
    cfg, flags = cli.parse(argv[3:], {'config': None, 'workdir': None})
    hyper_id = os.path.basename(flags['workdir'])
    assert spec.flatten(cfg) == spec.flatten(spec.point_config(sweep, hyper_id))
  ids = [os.path.basename(shlex.split(line)[-2].partition('=')[2]) for line in lines]
  assert len(set(ids)) == count
  # The paper's grid: dense + 3 routers x E in 2..512, for 6 sizes.
  if not variant:
    assert {i.split('-')[0] for i in ids} == {'dense', 'sbase', 'hash', 'reinforce'}


@pytest.mark.parametrize('argv, message', [
    (['--launch=fast'], '--launch: expected one of'),
    (['--only=nothing-matches'], 'matches none of the 30 points'),
    ([f'--config={UNIFIED}:cpu@dense-cpu-s'], 'not one of its points'),
    ([f'--config={UNIFIED}:huge'], "unknown variant 'huge'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
  base = [f'--config={UNIFIED}:cpu', f'--workdir={tmp_path}', '--launch=print']
  assert sweep_cli.main(base + argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1


def _trainers_of(workdir: str) -> list[int]:
  """PIDs of processes whose command line mentions workdir (our trainers)."""
  pids = []
  for pid in os.listdir('/proc'):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if workdir.encode() in f.read() and int(pid) != os.getpid():
          pids.append(int(pid))
    except (OSError, ValueError):
      pass
  return pids


def _wait_for(condition, timeout: float, what: str):
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.2)


@pytest.mark.slow
def test_killed_sweep_resumes_and_writes_curves(tmp_path, mini_data_dir, capsys):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(TINY_SWEEP)
  workdir = str(tmp_path / 'sweep')
  args = [f'--config={sweep_file}', f'--workdir={workdir}',
          f'--config.base.data.data_dir={mini_data_dir}']
  log = open(tmp_path / 'first.log', 'w')
  first = subprocess.Popen([sys.executable, '-m', 'routed.sweep', *args], stdout=log,
                           stderr=subprocess.STDOUT, cwd=ROOT)
  # Kill the sweep (SIGKILL: no clean-up) while its second point is training.
  _wait_for(lambda: os.path.exists(os.path.join(workdir, 'sbase-e2', 'config.json')) or
            first.poll() is not None, 240, 'the second point to start')
  first.send_signal(signal.SIGKILL)
  first.wait()
  log.close()
  dense_metrics = os.path.join(workdir, 'dense', 'metrics.jsonl')
  with open(dense_metrics) as f:
    dense_before = f.read()
  # The trainer of the killed sweep's point dies with it (it would race a restarted sweep).
  _wait_for(lambda: not _trainers_of(workdir), 30, 'the orphaned trainer to exit')

  assert sweep_cli.main(args) == 0
  err = capsys.readouterr().err
  assert '1 of 2 points already finished: skipped' in err
  assert '2 of 2 points finished' in err
  with open(dense_metrics) as f:
    assert f.read() == dense_before  # the finished point did not run again
  with open(os.path.join(workdir, 'sbase-e2', 'train.log')) as f:
    assert f.read().count('$ python -m routed.train') == 2  # killed once, then resumed

  curves = load_curves(os.path.join(workdir, 'curves.csv'))
  assert curves.names == list(COLUMNS)
  rows = {(h, s): i for i, (h, s) in enumerate(zip(curves['hyper_id'], curves['step']))}
  assert set(rows) == {(h, s) for h in ('dense', 'sbase-e2') for s in (3.0, 6.0)}
  final = {h: rows[(h, 6.0)] for h in ('dense', 'sbase-e2')}
  column = lambda name: {h: curves[name][i] for h, i in final.items()}
  assert column('router_type') == {'dense': 'Dense', 'sbase-e2': 'S-Base'}
  assert column('num_experts') == {'dense': 1, 'sbase-e2': 2}
  assert column('routing_frequency') == {'dense': 0, 'sbase-e2': 0.5}
  assert set(column('k').values()) == {1} and set(column('seed').values()) == {42}
  # N is the dense model's non-embedding count: the same for every E of one shape.
  # 2 blocks x (4 x 32^2 attention + 2 x 32 x 64 MLP + 2 x 32 norms) + 32 final norm.
  assert set(column('dense_parameter_count').values()) == {2 * (4096 + 4096 + 64) + 32}
  total = column('total_parameter_count')
  # The second expert and the 32 x 2 router: 2 x 32 x 64 + 64 parameters more.
  assert total['sbase-e2'] - total['dense'] == 2 * 32 * 64 + 64
  assert np.all(curves['tokens'] == curves['step'] * 4 * 64)
  assert np.all(np.isfinite(curves['loss_validation'])) and np.all(np.isnan(curves['loss_c4']))
  last_eval = [r for r in map(json.loads, dense_before.splitlines()) if 'eval/ce' in r][-1]
  assert curves['loss_validation'][final['dense']] == pytest.approx(last_eval['eval/ce'])
  assert curves['loss_train'][final['dense']] == pytest.approx(last_eval['train/ce'])
  # One analysis reads both data sets: our curves select like the paper's.
  points = select(curves, 'S-Base')
  assert sorted(points.router_type.tolist()) == ['Dense', 'S-Base']

  # Re-evaluation with another eval capacity factor leaves the dense model's loss as it
  # was (no capacity there) and writes final-step curves.
  out = str(tmp_path / 'reeval.csv')
  assert reeval.main(args + ['--eval_capacity_factor=4', f'--out={out}']) == 0
  again = load_curves(out)
  assert again['hyper_id'].tolist() == ['dense', 'sbase-e2'] and set(again['step']) == {6.0}
  assert again['loss_validation'][0] == pytest.approx(last_eval['eval/ce'], rel=1e-5)
  assert 'sbase-e2: eval/ce' in capsys.readouterr().out

  # Everything finished: a rerun runs nothing, print mode has nothing to print.
  assert sweep_cli.main(args + ['--launch=inprocess']) == 0
  assert '2 of 2 points already finished' in capsys.readouterr().err
  assert sweep_cli.main(args + ['--launch=print']) == 0
  assert capsys.readouterr().out == ''
  # A changed sweep on the same workdir stops before anything runs, naming the key.
  assert sweep_cli.main(args + ['--config.base.train.learning_rate=0.5']) == 2
  err = capsys.readouterr().err
  assert 'train.learning_rate' in err and err.count('\n') == 1


def test_a_garbage_point_config_is_one_line(tmp_path, capsys):
  """A point directory whose config.json is not JSON (a torn write, an editor accident)."""
  point = tmp_path / 'dense-cpu-s'
  point.mkdir()
  (point / 'config.json').write_text('{"model": {"d_model": 12')
  argv = [f'--config={UNIFIED}:cpu', f'--workdir={tmp_path}', '--launch=print']
  assert sweep_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'config.json does not read as JSON' in err, err
  assert (point / 'config.json').read_text() == '{"model": {"d_model": 12'
