"""End-to-end training: loss falls, outputs are written, runs resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from routed import cli
from routed.checkpoint import Checkpointer
from routed.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = os.path.join(ROOT, 'configs', 'switch_base.py')


def tiny_args(data_cfg, workdir, **overrides):
  """Command-line flags of a seconds-long Switch run on the mini corpus."""
  settings = {
      'model.d_model': 32, 'model.num_heads': 2, 'model.num_layers': 2, 'model.d_ff': 64,
      'moe.num_experts': 4, 'train.batch_size': 4, 'train.seq_len': 64,
      'train.steps': 30, 'train.warmup_steps': 5, 'train.log_every': 10,
      'eval.every_steps': 15, 'eval.num_batches': 2, 'checkpoint.every_steps': 10,
      'data.task': data_cfg.task, 'data.data_dir': data_cfg.data_dir,
      'data.vocab_size': data_cfg.vocab_size,
  }
  settings.update(overrides)
  return ([f'--config={SWITCH}:tiny', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in settings.items()])


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_params(workdir, args):
  """The params of the latest checkpoint in workdir, restored without templates."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(workdir, keep=5, async_save=False)
  step = ckpt.latest_step()
  path = os.path.join(ckpt.directory, str(step), 'state')
  restored = ocp.StandardCheckpointer().restore(path)
  ckpt.close()
  return step, restored['params']


@pytest.fixture(scope='module')
def finished_run(mini_data_cfg, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  args = tiny_args(mini_data_cfg, workdir, **{'train.learning_rate': 1e-2})
  assert train_main(args) == 0
  return workdir, args


def test_loss_falls_and_metrics_are_written(finished_run, mini_data_cfg):
  workdir, _ = finished_run
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows] == [10, 15, 20, 30]
  for r in rows:
    assert {'step', 'train/loss', 'train/ce'} <= set(r)
  assert 'eval/ce' in rows[1] and 'eval/ce' in rows[-1]
  ln_vocab = np.log(mini_data_cfg.vocab_size)
  assert rows[-1]['train/ce'] < ln_vocab - 1.0, (rows[-1]['train/ce'], ln_vocab)
  assert rows[-1]['eval/ce'] < ln_vocab - 1.0
  assert rows[-1]['train/ce'] < rows[0]['train/ce']
  assert len(rows[-1]['train/moe/layer1/expert_load']) == 4
  # TensorBoard (clu's writer): numbers as scalars, the per-expert load as a histogram.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                              size_guidance={'tensors': 0})
  events.Reload()
  plugin = lambda tag: events.SummaryMetadata(tag).plugin_data.plugin_name
  assert plugin('train/loss') == 'scalars' and plugin('eval/ce') == 'scalars'
  assert plugin('train/moe/layer1/expert_load') == 'histograms'
  assert [e.step for e in events.Tensors('train/loss')] == [10, 15, 20, 30]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 30


def test_keeps_last_checkpoints(finished_run):
  workdir, _ = finished_run
  ckpt = Checkpointer(workdir, keep=2, async_save=False)
  assert ckpt.all_steps() == [20, 30]  # keep=2 in the tiny config
  ckpt.close()


def test_rerun_of_a_finished_run_does_nothing(finished_run, capsys):
  workdir, args = finished_run
  before = read_metrics(workdir)
  assert train_main(args) == 0
  assert 'already finished' in capsys.readouterr().err
  assert read_metrics(workdir) == before


def test_checkpoint_round_trip(tmp_path):
  params = {'blocks': {0: {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}},
            'embed': np.ones((4, 2), np.float32)}
  opt_state = ({'count': np.array(3, np.int32)}, {'mu': np.full((2, 3), 0.5, np.float32)})
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=True)
  ckpt.save(7, params, opt_state, {'seed': 3})
  ckpt.wait()
  p, o, meta, _ = ckpt.restore(7, params, opt_state)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, p, params)
  jax.tree.map(np.testing.assert_array_equal, o, opt_state)
  assert meta == {'step': 7, 'data_position': 7, 'seed': 3}


INTERRUPTED = {'train.steps': 40, 'checkpoint.every_steps': 4, 'checkpoint.keep': 20,
               'eval.every_steps': 0}


@pytest.fixture(scope='module')
def straight_run(mini_data_cfg, tmp_path_factory):
  """An uninterrupted 40-step run: the reference of the interrupted ones."""
  straight = str(tmp_path_factory.mktemp('straight'))
  args = tiny_args(mini_data_cfg, straight, **INTERRUPTED)
  assert train_main(args) == 0
  return straight, args


def start_and_wait_for_checkpoint(args, workdir, min_step):
  """Starts routed.train in a subprocess; returns it once checkpoint >= min_step exists."""
  proc = subprocess.Popen([sys.executable, '-m', 'routed.train'] + args, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= min_step:
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run finished before it could be stopped: ' + proc.stderr.read()
  return proc


def assert_resumes_to_straight(straight_run, workdir, args):
  assert train_main(args) == 0  # the same command again
  step_a, a = final_params(straight_run[0], args)
  step_b, b = final_params(workdir, args)
  assert step_a == step_b == 40
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # metrics.jsonl reads as one run: no step logged twice.
  steps = [r['step'] for r in read_metrics(workdir)]
  assert steps == sorted(set(steps))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(mini_data_cfg, tmp_path, straight_run):
  """A run killed with SIGKILL and started again ends with identical parameters."""
  killed = str(tmp_path / 'killed')
  args = tiny_args(mini_data_cfg, killed, **INTERRUPTED)
  proc = start_and_wait_for_checkpoint(args, killed, 12)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  step_at_kill, _ = final_params(killed, args)
  assert 12 <= step_at_kill < 40
  assert_resumes_to_straight(straight_run, killed, args)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(mini_data_cfg, tmp_path, straight_run):
  """SIGTERM (preemption): the step in flight finishes, a checkpoint of exactly that
  step is saved, the process exits 0 within seconds; the same command resumes and
  ends with the uninterrupted run's parameters."""
  stopped = str(tmp_path / 'stopped')
  args = tiny_args(mini_data_cfg, stopped, **INTERRUPTED)
  proc = start_and_wait_for_checkpoint(args, stopped, 8)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGTERM)  # a second one (SLURM's requeue path) changes nothing
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-2000:]
  assert time.time() - sent < 30
  saved = [l for l in stderr.splitlines() if 'SIGTERM: saved checkpoint' in l]
  assert len(saved) == 1, stderr[-2000:]
  step_at_stop, _ = final_params(stopped, args)
  assert f'saved checkpoint {step_at_stop} ' in saved[0]
  assert 8 <= step_at_stop < 40
  assert 'done:' not in stderr
  assert_resumes_to_straight(straight_run, stopped, args)


def test_peak_flops_table_gives_mfu_without_a_flag():
  import types  # pylint: disable=g-import-not-at-top
  from routed import hardware  # pylint: disable=g-import-not-at-top
  per = hardware.peak_flops_per_device
  assert per('TPU v5 lite') == 197e12 and per('TPU v5p') == 459e12 and per('TPU v5') == 459e12
  assert per('TPU v6 lite') == 918e12 and per('TPU v4') == 275e12
  assert per('NVIDIA H100 80GB HBM3') == 989e12 and per('NVIDIA H100 PCIe') == 756e12
  assert per('NVIDIA H200') == 989e12 and per('NVIDIA A100-SXM4-80GB') == 312e12
  assert per('cpu') == 0.0
  chips = [types.SimpleNamespace(device_kind='TPU v5 lite')] * 8
  assert hardware.peak_flops(0.0, chips) == 8 * 197e12
  assert hardware.peak_flops(1e15, chips) == 1e15          # train.peak_flops wins
  assert hardware.peak_flops(0.0, [types.SimpleNamespace(device_kind='cpu')]) == 0.0
