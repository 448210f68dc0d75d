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
