"""Two real processes on localhost (2 CPU devices each, gloo collectives) train as one
job, save one checkpoint together, and a single process continues it on another mesh."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_train import read_metrics, tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ('train/loss', 'train/ce', 'train/balance_loss', 'train/z_loss', 'train/grad_norm')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def args(data_cfg, workdir, steps, **mesh):
  # A constant learning rate after one warmup step, so a run of 4 steps and one of 6
  # take the same first 4 steps.
  overrides = {'train.steps': steps, 'train.warmup_steps': 1, 'train.min_lr_ratio': 1.0,
               'train.log_every': 1, 'eval.every_steps': 0, 'checkpoint.every_steps': 100}
  overrides.update({f'mesh.{k}': v for k, v in mesh.items()})
  return [sys.executable, '-m', 'routed.train'] + tiny_args(data_cfg, workdir, **overrides)


def env(**extra):
  out = dict(os.environ, JAX_PLATFORMS='cpu')
  out.pop('XLA_FLAGS', None)
  out.update(extra)
  return out


def start_two_processes(command):
  """The same routed.train command as processes 0 and 1 of one job, 2 CPU devices each."""
  port = free_port()
  return [subprocess.Popen(
      command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=env(XLA_FLAGS='--xla_force_host_platform_device_count=2',
              ROUTED_COORDINATOR=f'127.0.0.1:{port}', ROUTED_NUM_PROCESSES='2',
              ROUTED_PROCESS_ID=str(i)))
          for i in range(2)]


def assert_same(rows, reference, steps):
  by_step = {r['step']: r for r in reference}
  assert [r['step'] for r in rows] == list(steps)
  for row in rows:
    for name in COMPARED:
      assert abs(row[name] - by_step[row['step']][name]) < 1e-4, (row['step'], name)


@pytest.mark.slow
def test_two_processes_train_save_and_one_process_continues(tmp_path, mini_data_cfg):
  two = tmp_path / 'two_processes'
  procs = start_two_processes(args(mini_data_cfg, two, 4, data=2, expert=2))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # Only process 0 reports progress; both wrote their shards of the checkpoint.
  assert 'step 4/4' in outputs[0] and 'step 4/4' not in outputs[1]
  # Each process decoded its own half of every batch it read (read-ahead included), and
  # no more: the data path scales with hosts instead of reading the whole batch on each.
  for i, out in enumerate(outputs):
    read = re.search(rf'routed.data: process {i} of 2 decoded (\d+) examples in (\d+) '
                     r'batches \(2 rows of each batch of 4\)', out)
    assert read, out[-3000:]
    examples, batches = map(int, read.groups())
    assert batches >= 4 and examples == 2 * batches, read.group(0)
  state = two / 'checkpoints' / '4' / 'state'
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(os.listdir(state))

  one = tmp_path / 'one_process'
  subprocess.run(args(mini_data_cfg, one, 6), cwd=ROOT, env=env(), check=True,
                 capture_output=True)
  reference = read_metrics(one)
  assert_same(read_metrics(two), reference, range(1, 5))

  # One process, one device: restores the two-process checkpoint and continues.
  resumed = tmp_path / 'resumed'
  shutil.copytree(two, resumed)
  proc = subprocess.run(args(mini_data_cfg, resumed, 6), cwd=ROOT, env=env(),
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from checkpoint' in proc.stderr
  assert_same(read_metrics(resumed), reference, range(1, 7))
  with open(resumed / 'config.json') as f:
    assert json.load(f)['mesh']['data'] == -1


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, mini_data_cfg):
  """Preemption notices may reach one host first: jax.distributed's preemption sync
  point makes every process stop after the same step and save together."""
  workdir = tmp_path / 'run'
  procs = start_two_processes(args(mini_data_cfg, workdir, 5000, data=2, expert=2))
  deadline = time.time() + 300
  while time.time() < deadline and not (workdir / 'metrics.jsonl').exists():
    time.sleep(0.2)
  time.sleep(2)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  steps = os.listdir(workdir / 'checkpoints')
  assert len(steps) == 1 and 0 < int(steps[0]) < 5000, steps
  for out in outputs:
    assert f'SIGTERM: saved checkpoint {steps[0]} and stopped' in out
