"""Operator mistakes and their damage, as a long run meets them: a changed config on
resume (routed/config_change.py), two trainers on one workdir, a torn metrics row,
non-finite settings, NaN or unreadable checkpoints when sampling. Real processes and
files, as tests/test_faults.py."""

import hashlib
import json
import os

import pytest

from routed.train import main as train_main
from test_train import read_metrics, tiny_args


def snapshot(workdir):
  """{relative path: sha256} of every file in workdir but the lock (whose holder's name
  each trainer writes)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name == '.train.lock':
        continue
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_a_changed_shape_on_resume_is_refused_and_nothing_moves(mini_data_cfg, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  base = {'train.steps': 10, 'checkpoint.every_steps': 5, 'eval.every_steps': 0}
  assert train_main(tiny_args(mini_data_cfg, workdir, **base)) == 0
  before = snapshot(workdir)
  capsys.readouterr()
  changed = dict(base, **{'train.steps': 15, 'moe.num_experts': 16, 'train.seed': 3})
  assert train_main(tiny_args(mini_data_cfg, workdir, **changed)) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err, err
  assert 'moe.num_experts (4 -> 16)' in err and 'train.seed (0 -> 3)' in err, err
  assert '--allow_config_change=moe.num_experts,train.seed' in err, err
  assert 'train.steps' not in err.split('settings:')[1].split(';')[0]   # may change
  assert snapshot(workdir) == before     # no checkpoint set aside, no file rewritten


@pytest.mark.slow  # a training run or more: the full suite runs it
def test_an_allowed_change_is_recorded_with_its_step(mini_data_cfg, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  base = {'train.steps': 10, 'checkpoint.every_steps': 5, 'eval.every_steps': 0}
  assert train_main(tiny_args(mini_data_cfg, workdir, **base)) == 0
  more = dict(base, **{'train.steps': 15, 'train.learning_rate': 1e-4, 'train.log_every': 5})
  args = tiny_args(mini_data_cfg, workdir, **more) + [
      '--allow_config_change=train.learning_rate']
  assert train_main(args) == 0
  assert 'training from step 10 to 15 (resumed from checkpoint)' in capsys.readouterr().err
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['config_changes'] == [{'step': 10, 'changes': {
      'train.learning_rate': [0.003, 0.0001]}}]
  assert saved['train']['learning_rate'] == 1e-4 and saved['train']['steps'] == 15
  assert [r['step'] for r in read_metrics(workdir)][-1] == 15
  # The record survives further resumes, and the recorded config now reads as 1e-4.
  assert train_main(tiny_args(mini_data_cfg, workdir, **dict(more, **{'train.steps': 20}))) == 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['config_changes'][0]['step'] == 10


@pytest.mark.slow  # a training run or more: the full suite runs it
def test_a_torn_metrics_row_is_dropped_on_resume(mini_data_cfg, tmp_path, capsys):
  """What a kill during a write leaves: a half row at the end of metrics.jsonl."""
  workdir = str(tmp_path / 'run')
  base = {'train.steps': 10, 'checkpoint.every_steps': 5, 'eval.every_steps': 0,
          'train.log_every': 5}
  assert train_main(tiny_args(mini_data_cfg, workdir, **base)) == 0
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 12')
  capsys.readouterr()
  assert train_main(tiny_args(mini_data_cfg, workdir, **dict(base, **{'train.steps': 15}))) == 0
  err = capsys.readouterr().err
  assert 'dropped 1 torn row(s)' in err, err
  assert [r['step'] for r in read_metrics(workdir)] == [5, 10, 15]


@pytest.mark.slow  # a training run or more: the full suite runs it
def test_a_second_trainer_on_a_workdir_is_refused(mini_data_cfg, tmp_path, capsys):
  """The first holds WORKDIR/.train.lock; the second exits 2 naming it, touching nothing."""
  import signal  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  args = tiny_args(mini_data_cfg, workdir, **{'train.steps': 100000, 'eval.every_steps': 0,
                                                'checkpoint.every_steps': 100000,
                                                'train.log_every': 1})
  first = subprocess.Popen([sys.executable, '-m', 'routed.train', *args],
                           stderr=subprocess.PIPE, text=True)
  try:
    # Training (a metrics row written): the lock is held, and SIGTERM saves and exits 0.
    deadline = time.time() + 180
    while not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and time.time() < deadline:
      time.sleep(0.2)
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'another routed.train is running' in err, err
    assert f'pid {first.pid} on host {socket.gethostname()}' in err, err
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 0


def test_non_finite_config_numbers_are_one_line(mini_data_cfg, tmp_path, capsys):
  for key in ('moe.capacity_factor', 'moe.eval_capacity_factor', 'train.learning_rate'):
    for value in ('inf', 'nan'):
      args = tiny_args(mini_data_cfg, str(tmp_path / 'run'), **{key: value})
      assert train_main(args) == 2
      err = capsys.readouterr().err.strip()
      assert '\n' not in err and f'config key {key}: must be a finite number' in err, err
  assert not (tmp_path / 'run').exists()


def test_sample_refuses_a_nan_temperature(capsys):
  from routed.sample import main as sample_main  # pylint: disable=g-import-not-at-top
  for value in ('nan', 'inf', '-1'):
    assert sample_main(['--workdir=/tmp', '--prompt=x', f'--temperature={value}']) == 2
    assert '--temperature: must be a finite number >= 0' in capsys.readouterr().err


@pytest.mark.slow  # a training run or more: the full suite runs it
def test_sample_reports_non_finite_parameters_and_skips_an_unreadable_checkpoint(
    mini_data_cfg, tmp_path, capsys):
  """NaN weights: exit 1 naming the parameter. A truncated newest checkpoint: one line,
  the one before it is sampled, nothing moved."""
  import glob  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from routed.sample import main as sample_main  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  base = {'train.steps': 10, 'checkpoint.every_steps': 5, 'eval.every_steps': 0,
          'checkpoint.keep': 3}
  assert train_main(tiny_args(mini_data_cfg, workdir, **base)) == 0
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', '10', 'state', '**'),
                                recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  capsys.readouterr()
  argv = [f'--workdir={workdir}', '--prompt=import os', '--max_new_tokens=3',
          '--temperature=0']
  assert sample_main(argv) == 0
  err = capsys.readouterr().err
  assert 'checkpoint 10 is unreadable' in err and 'checkpoint step 5' in err, err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '10'))    # not moved
  # A checkpoint whose parameters hold a NaN.
  nan_dir = str(tmp_path / 'nan')
  assert train_main(tiny_args(mini_data_cfg, nan_dir, **dict(base, **{'train.steps': 5}))) == 0
  ckpt = Checkpointer(nan_dir, keep=3, async_save=False)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt.directory, '5', 'state'))
  state['params']['embed'] = np.full_like(np.asarray(state['params']['embed']), np.nan)
  routing = state.get('routing')
  ckpt.save(6, state['params'], state['opt_state'], {'seed': 0}, routing)
  ckpt.close()
  capsys.readouterr()
  assert sample_main([f'--workdir={nan_dir}', '--prompt=import os', '--max_new_tokens=3']) == 1
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and 'non-finite values' in err and 'embed' in err, err


def test_a_config_file_that_fails_in_any_way_is_one_line(tmp_path, capsys):
  """get_config raising anything, returning a plain dict, or lacking a group."""
  cases = {
      'raises.py': ('def get_config():\n  raise RuntimeError("no GPU here")\n',
                    'get_config raised RuntimeError: no GPU here'),
      'plain.py': ('def get_config():\n  return {"model": {}}\n',
                   'returned a dict, not an ml_collections.ConfigDict'),
      'nogroup.py': ('from routed.config import base_config\n'
                     'def get_config():\n  c = base_config()\n  del c["moe"]\n  return c\n',
                     'config group moe is missing'),
  }
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    assert train_main([f'--config={tmp_path / name}', f'--workdir={tmp_path / "w"}']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and message in err, (name, err)
  assert not (tmp_path / 'w').exists()
