"""Failures that must lose nothing, each in a real routed.train process: a corrupted
latest checkpoint, a non-finite loss, a read-only workdir, a disk that fills mid-run."""

import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train import ROOT, final_params, read_metrics, tiny_args

FAST = {'eval.every_steps': 0, 'train.log_every': 1}


def train(args, prefix=()):
  return subprocess.run([*prefix, sys.executable, '-m', 'routed.train'] + args, cwd=ROOT,
                        capture_output=True, text=True, check=False)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('routed.train:')]


def assert_finite_checkpoints(workdir, args):
  step, params = final_params(workdir, args)
  for leaf in jax.tree.leaves(params):
    assert np.all(np.isfinite(leaf))
  return step


@pytest.fixture(scope='module')
def run_of_20(mini_data_cfg, tmp_path_factory):
  """A finished 20-step run with checkpoints at 10 and 20, copied by each test."""
  workdir = str(tmp_path_factory.mktemp('run20') / 'run')
  args = tiny_args(mini_data_cfg, workdir, **{'train.steps': 20, 'checkpoint.every_steps': 10},
                   **FAST)
  proc = train(args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def copy_run(run_of_20, tmp_path, mini_data_cfg, steps):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_of_20, workdir)
  return workdir, tiny_args(mini_data_cfg, workdir, **{'train.steps': steps,
                                                       'checkpoint.every_steps': 10}, **FAST)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(run_of_20, tmp_path,
                                                               mini_data_cfg):
  workdir, args = copy_run(run_of_20, tmp_path, mini_data_cfg, 30)
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', '20', 'state', '**'),
                                recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  proc = train(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith('routed.train: checkpoint 20 is unreadable ('), lines
  # Orbax's abandoned reads are not reported one traceback each (routed/checkpoint.py).
  assert 'Traceback' not in proc.stderr and 'coroutine' not in proc.stderr, proc.stderr[-3000:]
  assert 'training from step 10 to 30 (resumed from checkpoint)' in proc.stderr
  # The compile-time line comes before the first progress line.
  after = proc.stderr.split('training from step 10 to 30')[1].splitlines()[1:]
  assert after[0].startswith('compiled train step in ') and after[1].startswith('step '), after
  assert glob.glob(os.path.join(workdir, 'checkpoints', 'corrupt-20-*'))
  assert assert_finite_checkpoints(workdir, args) == 30
  steps = [r['step'] for r in read_metrics(workdir)]
  assert steps == list(range(1, 31))  # rows 11-20 of the lost checkpoint were rewritten


@pytest.mark.parametrize('mode', ['stop', 'skip'])
def test_non_finite_loss_is_never_saved(mode, tmp_path, mini_data_cfg):
  """A learning rate of 1e30 blows the parameters up to inf within a few steps."""
  workdir = str(tmp_path / 'run')
  args = tiny_args(mini_data_cfg, workdir, **{
      'train.steps': 12, 'train.learning_rate': 1e30, 'train.warmup_steps': 1,
      'train.grad_clip': 0.0, 'checkpoint.every_steps': 1, 'checkpoint.keep': 20,
      'train.nonfinite': mode}, **FAST)
  proc = train(args)
  lines = error_lines(proc.stderr)
  if mode == 'stop':
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and 'had a non-finite loss or gradient' in lines[0], lines
    bad = int(lines[0].split('step ')[1].split()[0])
    assert assert_finite_checkpoints(workdir, args) < bad
    assert 'Traceback' not in proc.stderr
  else:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any('the step was skipped' in l for l in lines), lines
    assert assert_finite_checkpoints(workdir, args) == 12
    assert read_metrics(workdir)[-1]['train/skipped'] == 1.0


def read_only_command(workdir):
  """A command prefix that runs with workdir read-only: a read-only bind mount in a
  private mount namespace as root (root ignores permission bits), else chmod."""
  if os.geteuid() != 0:
    for path, _, names in os.walk(workdir):
      for name in names + ['.']:
        os.chmod(os.path.join(path, name), 0o555 if name == '.' else 0o444)
    return []
  probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True, check=False)
  if probe.returncode != 0:
    pytest.skip('cannot make a read-only mount here (unshare -m failed)')
  return ['unshare', '-m', 'sh', '-c',
          f'mount --bind {workdir} {workdir} && mount -o remount,ro,bind {workdir} {workdir} '
          '&& exec "$@"', 'sh']


def test_read_only_workdir_fails_clearly_and_keeps_checkpoints(run_of_20, tmp_path,
                                                               mini_data_cfg):
  workdir, args = copy_run(run_of_20, tmp_path, mini_data_cfg, 30)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  proc = train(args, prefix=read_only_command(workdir))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert error_lines(proc.stderr) == [f'routed.train: --workdir: {workdir} is not writable '
                                      '(Read-only file system)'] or os.geteuid() != 0
  assert len(error_lines(proc.stderr)) == 1 and 'Traceback' not in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before
  assert assert_finite_checkpoints(workdir, args) == 20


@pytest.mark.slow
def test_disk_full_mid_run_fails_the_save_and_keeps_earlier_checkpoints(run_of_20, tmp_path,
                                                                       mini_data_cfg):
  """Files may grow to 64 KiB only (RLIMIT_FSIZE): metrics lines still fit, a
  checkpoint does not, as on a disk that has filled up."""
  workdir, args = copy_run(run_of_20, tmp_path, mini_data_cfg, 30)
  proc = train(args, prefix=('bash', '-c', 'ulimit -f 64 && exec "$@"', 'bash'))
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, lines
  assert lines[0].startswith('routed.train: could not save checkpoint 30 in ')
  assert lines[0].endswith('earlier checkpoints are intact')
  assert 'Traceback' not in proc.stderr
  assert assert_finite_checkpoints(workdir, args) == 20
  # With room again, the same command resumes from checkpoint 20 and finishes.
  proc = train(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'training from step 20 to 30' in proc.stderr
