"""Bad input: one clear line naming the key or path, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

from routed import cli
from routed.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = os.path.join(ROOT, 'configs', 'switch_base.py')


def test_overrides_parse_to_the_key_type():
  cfg, flags = cli.parse([f'--config={SWITCH}:tiny', '--config.train.steps=7',
                          '--config.moe.capacity_factor=2', '--config.model.tie_embeddings=false',
                          '--config.moe.router=switch', '--workdir=/tmp/x'],
                         {'config': None, 'workdir': None})
  assert cfg.train.steps == 7 and cfg.moe.capacity_factor == 2.0
  assert isinstance(cfg.moe.capacity_factor, float)
  assert cfg.model.tie_embeddings is False
  assert flags == {'workdir': '/tmp/x'}


def test_variants_differ():
  base, _ = cli.parse([f'--config={SWITCH}'], {'config': None})
  tiny, _ = cli.parse([f'--config={SWITCH}:tiny'], {'config': None})
  assert base.model.d_model == 768 and base.moe.num_experts == 128 and base.data.task == 'c4'
  assert tiny.model.d_model < 768 and tiny.data.task == 'stdlib'


@pytest.mark.parametrize('args,needle', [
    (['--config.moe.nope=1'], 'moe.nope'),
    (['--config.nope.x=1'], 'nope'),
    (['--config.train.steps=abc'], 'train.steps'),
    (['--config.model.num_heads=5'], 'model.num_heads'),
    (['--config.moe.capacity_factor=0'], 'moe.capacity_factor'),
    (['--config.moe.eval_capacity_factor=-1'], 'moe.eval_capacity_factor'),
    (['--config.moe.num_experts=0'], 'moe.num_experts'),
    (['--config.moe.router=nope'], 'moe.router'),
    (['--config.moe.dispatch=nope'], 'moe.dispatch'),
    (['--config.train.steps=0'], 'train.steps'),
    (['--config.data.data_dir=/nonexistent/routed-data'], '/nonexistent/routed-data'),
    (['--config.data.task=nope'], 'data.task'),
    (['--bogus=1'], '--bogus'),
    # Issue 15's recipes: each bad value names its key.
    (['--config.moe.granularity=3'], 'moe.granularity'),        # 3 does not divide 512
    (['--config.moe.granularity=2'], 'moe.granularity'),        # switch: fixed top-1
    (['--config.model.num_kv_heads=3'], 'model.num_kv_heads'),  # 3 does not divide 4 heads
    (['--config.moe.bias_update_rate=-0.001'], 'moe.bias_update_rate'),
    (['--config.moe.bias_update_rate=0.001', '--config.moe.router=soft'],
     'moe.bias_update_rate'),
])
def test_config_errors_are_one_line(args, needle, tmp_path, capsys):
  argv = [f'--config={SWITCH}:tiny', f'--workdir={tmp_path / "run"}'] + args
  assert train_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert needle in err and 'Traceback' not in err
  assert not (tmp_path / 'run').exists()  # nothing started


@pytest.mark.parametrize('spec,needle', [
    ('configs/missing.py', 'configs/missing.py'),
    (f'{SWITCH}:huge', 'huge'),
])
def test_bad_config_file_or_variant(spec, needle, tmp_path, capsys):
  assert train_main([f'--config={spec}', f'--workdir={tmp_path}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle in err


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / 'file'
  path.write_text('precious')
  assert train_main([f'--config={SWITCH}:tiny', f'--workdir={path}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(path) in err
  assert path.read_text() == 'precious'


def test_missing_workdir_flag(capsys):
  assert train_main([f'--config={SWITCH}:tiny']) == 2
  assert '--workdir' in capsys.readouterr().err


def test_c4_absent_is_explained(tmp_path, capsys):
  """The default Switch-Base config wants C4, which is not prepared on this machine."""
  argv = [f'--config={SWITCH}', f'--workdir={tmp_path / "run"}']
  assert train_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'data.path' in err and 'routed.data.prepare' in err
  assert not (tmp_path / 'run').exists()  # nothing was created


def test_real_process_exit_code(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'routed.train', f'--config={SWITCH}:tiny',
       f'--workdir={tmp_path}', '--config.model.num_heads=3'],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'model.num_heads' in lines[0], proc.stderr


ENTRY_POINTS = ['routed.train', 'routed.sample', 'routed.sweep', 'routed.sweep.reeval',
                'routed.aot', 'routed.export', 'routed.import_hf', 'routed.data.prepare']


@pytest.mark.parametrize('module', ENTRY_POINTS + ['routed.scaling'])
def test_every_entry_point_has_a_help(module, capsys):
  """--help: what it does, every flag with its default, the exit codes; status 0."""
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module('routed.scaling.cli' if module == 'routed.scaling'
                                else 'routed.sweep.cli' if module == 'routed.sweep' else module)
  with pytest.raises(SystemExit) as done:
    mod.main(['--help'])
  assert done.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: python -m ' + module)
  for name in mod.FLAGS:
    assert f'--{name}=' in out, name
  assert 'exit codes:' in out and '  2  bad input' in out


@pytest.mark.parametrize('module', ['launch.slurm', 'launch.tpu'])
def test_launchers_help_shows_defaults_and_exit_codes(module):
  done = subprocess.run([sys.executable, '-m', module, '--help'], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert '(default' in done.stdout and 'exit codes:' in done.stdout


def test_a_mistyped_flag_or_key_suggests_the_nearest(capsys):
  from routed.sample import main as sample_main  # pylint: disable=g-import-not-at-top
  assert sample_main(['--workdir=/tmp', '--max_new_token=3']) == 2
  assert 'unknown flag --max_new_token (did you mean --max_new_tokens?)' in capsys.readouterr().err
  spec = os.path.join(ROOT, 'configs', 'switch_base.py') + ':tiny'
  assert train_main([f'--config={spec}', '--workdir=/tmp/x', '--config.moe.num_expert=4']) == 2
  assert 'did you mean moe.num_experts?' in capsys.readouterr().err
  assert train_main([f'--config={spec}', '--workdir=/tmp/x', '--config.mdoel.d_model=4']) == 2
  assert 'unknown config key mdoel (did you mean model?)' in capsys.readouterr().err
