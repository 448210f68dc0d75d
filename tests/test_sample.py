"""routed.sample: generates from a trained checkpoint, refuses non-causal models."""

import json
import os

import numpy as np
import pytest

from routed import cli
from routed.sample import main as sample_main
from routed.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(spec, data_cfg, workdir, **overrides):
  """A seconds-long run (as tests/test_train.py's tiny_args) of config `spec`."""
  settings = {
      'model.d_model': 32, 'model.num_heads': 2, 'model.num_layers': 2, 'model.d_ff': 64,
      'moe.num_experts': 4, 'train.batch_size': 4, 'train.seq_len': 64,
      'train.steps': 6, 'train.warmup_steps': 2, 'train.log_every': 3,
      'eval.every_steps': 0, 'checkpoint.every_steps': 6,
      'data.task': data_cfg.task, 'data.data_dir': data_cfg.data_dir,
      'data.vocab_size': data_cfg.vocab_size,
  }
  settings.update(overrides)
  return ([f'--config={os.path.join(ROOT, spec)}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in settings.items()])


@pytest.fixture(scope='module')
def mode_run(mini_data_cfg, tmp_path_factory):
  """Staged MoDE (Switch MoE inside MoD blocks): both kinds of causal routing at once."""
  workdir = str(tmp_path_factory.mktemp('mode_run'))
  assert train_main(args_for('configs/mode_base.py:tiny', mini_data_cfg, workdir)) == 0
  return workdir


def test_generates_from_a_trained_checkpoint(mode_run, capsys):
  argv = [f'--workdir={mode_run}', '--prompt=import os', '--max_new_tokens=5',
          '--temperature=0']
  assert sample_main(argv) == 0
  first = capsys.readouterr()
  assert first.out.startswith('import os'), first.out
  assert len(first.out.rstrip('\n')) > len('import os')  # new text (maybe blanks)
  assert 'checkpoint step 6' in first.err and 'tokens/s' in first.err
  assert 'MoD causal rule aux_loss' in first.err


def test_cached_and_recomputed_decoding_print_the_same_text(mode_run, tmp_path, capsys):
  """Two prompts of different lengths from a file, greedy: the key/value cache and the
  recomputed window print the same continuations."""
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('import os\n\ndef main(argv):\n')
  outs = []
  for cache in ('--kv_cache', '--nokv_cache'):
    assert sample_main([f'--workdir={mode_run}', f'--prompts_file={prompts}',
                        '--max_new_tokens=8', '--temperature=0', cache]) == 0
    out, err = capsys.readouterr()
    outs.append(out)
    assert ('key/value cache' if cache == '--kv_cache' else 'recomputing') in err
    assert '2 x 8 tokens' in err
  assert outs[0] == outs[1]
  lines = outs[0].splitlines()
  assert lines[0].startswith('import os') and any(l.startswith('def main(argv):') for l in lines)


def test_greedy_continuation_is_the_argmax_of_a_full_forward_pass(mode_run, mini_data_cfg):
  """Decoding in a padded window agrees with one forward pass over the generated text."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from routed import decode, sample  # pylint: disable=g-import-not-at-top
  cfg = sample.load_run_config(mode_run)
  graphdef, params, _, _ = sample.load_params(cfg, mode_run, mini_data_cfg.vocab_size)
  prompt = [5, 9, 13]
  (new,), _ = decode.generate(cfg, graphdef, params, [prompt], max_new_tokens=4)
  ids = jnp.asarray([prompt + new], jnp.int32)
  logits, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, train=False))(params, ids)
  np.testing.assert_array_equal(np.argmax(logits[0, 2:-1], axis=-1), new)


def test_a_continuation_longer_than_the_cache_is_refused(mode_run, capsys):
  assert sample_main([f'--workdir={mode_run}', '--prompt=import os',
                      '--max_new_tokens=64']) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and '--nokv_cache' in err and 'train.seq_len = 64' in err, err


def test_refuses_a_non_causal_model(tmp_path, capsys):
  cfg = cli.load_config(os.path.join(ROOT, 'configs/expert_choice_base.py:tiny'))
  (tmp_path / 'config.json').write_text(cfg.to_json())
  assert sample_main([f'--workdir={tmp_path}', '--prompt=x']) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and 'not causal' in err and 'expert_choice' in err, err


@pytest.mark.parametrize('argv,message', [
    (['--prompt=x'], '--workdir is required'),
    (['--workdir=/nonexistent/run', '--prompt=x'], 'config.json not found'),
    (['--workdir=/tmp', '--prompt=x', '--max_new_tokens=0'], '--max_new_tokens'),
    (['--workdir=/tmp', '--prompt=x', '--top_p=0'], '--top_p'),
    (['--workdir=/tmp', '--prompt=x', '--top_k=-1'], '--top_k'),
    (['--workdir=/tmp'], 'exactly one of --prompt'),
    (['--workdir=/tmp', '--prompts_file=/nonexistent/p.txt'], '--prompts_file: cannot read'),
])
def test_usage_errors_are_one_line(argv, message, capsys):
  assert sample_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and message in err, err


def test_a_run_config_missing_newer_keys_still_loads(tmp_path):
  from routed import sample  # pylint: disable=g-import-not-at-top
  saved = json.loads(cli.load_config(os.path.join(ROOT, 'configs/dense_base.py:tiny')).to_json())
  del saved['mod']  # a run from before Mixture-of-Depths
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  cfg = sample.load_run_config(str(tmp_path))
  assert cfg.mod.enabled is False and cfg.model.d_model == 128


NOISE = ('host bounds', 'TPU_WORKER_HOSTNAMES', 'InitGoogle', 'libtpu')


@pytest.mark.slow  # a fresh process: the full suite runs it (and the AOT compile test)
def test_no_libtpu_noise_from_a_cli_without_a_tpu(mode_run):
  """A CLI started as users start it (a fresh process, JAX_PLATFORMS unset) prints
  its own lines only: libtpu is installed here (the test extra) but has no TPU."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_PLATFORMS', 'TPU_'))}
  done = subprocess.run([sys.executable, '-m', 'routed.sample', f'--workdir={mode_run}',
                         '--prompt=import os', '--max_new_tokens=3', '--temperature=0'],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert not any(n in done.stderr for n in NOISE), done.stderr
  assert done.stderr.splitlines()[0].startswith('checkpoint step 6'), done.stderr


def test_a_config_json_that_is_not_json_is_one_line(tmp_path, capsys):
  (tmp_path / 'config.json').write_text('{"model": {"d_model": 12')
  assert sample_main([f'--workdir={tmp_path}', '--prompt=x']) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and 'does not read as a config' in err, err
