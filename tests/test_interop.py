"""Hugging Face interop (routed/hf_format.py, routed.export, routed.import_hf): models
move both ways, and `transformers` (PyTorch, CPU) computes routed's logits."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from routed import cli, decode
from routed.checkpoint import Checkpointer
from routed.export import main as export_main
from routed.model.transformer import build_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.array([[3, 17, 250, 9, 41, 5, 300, 12, 7, 99, 2, 64]], np.int32)


def tiny_config(spec, data_cfg, **overrides):
  cfg = cli.load_config(os.path.join(ROOT, 'configs', spec))
  # init_std 0.3: logits of order 1, so that a 1e-4 agreement means something.
  cfg.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=48, init_std=0.3)
  cfg.moe.num_experts = 4
  cfg.train.seq_len = 64
  cfg.data.update(task=data_cfg.task, data_dir=data_cfg.data_dir, vocab_size=data_cfg.vocab_size)
  for key, value in overrides.items():
    section, name = key.split('__')
    cfg[section][name] = value
  return cfg


def saved_run(workdir, cfg, vocab_size):
  """A routed workdir (config.json + an Orbax checkpoint at step 0) of a randomly
  initialised model. Router kernels are scaled up so that every token's top-k is
  decided by a clear margin: float rounding in PyTorch cannot flip a choice."""
  from routed import step as step_lib  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, vocab_size, 0), nnx.Param))
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 300 if 'router' in jax.tree_util.keystr(p) else a, params)
  opt_state = step_lib.optimizer_for(cfg, vocab_size).init(params)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json())
  ckpt = Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(0, params, opt_state, {'seed': 0})
  ckpt.close()
  return params


def routed_logits(cfg, params, vocab_size, tokens=TOKENS):
  graphdef, _ = nnx.split(build_model(decode.sampling_config(cfg), vocab_size, 0), nnx.Param)
  return np.asarray(nnx.merge(graphdef, params)(tokens, train=False)[0])


def hf_logits(path, tokens=TOKENS):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize('spec,overrides,arch', [
    ('mixtral_like.py:tiny', {'model__num_kv_heads': 2}, 'MixtralForCausalLM'),
    # Slow: the Llama round trip below exports a dense model too.
    pytest.param('dense_base.py:tiny', {'model__activation': 'swiglu'}, 'LlamaForCausalLM',
                 marks=pytest.mark.slow),
])
def test_exported_model_computes_routeds_logits(spec, overrides, arch, mini_data_cfg,
                                                tmp_path, capsys):
  cfg = tiny_config(spec, mini_data_cfg, **overrides)
  v = mini_data_cfg.vocab_size
  params = saved_run(str(tmp_path / 'run'), cfg, v)
  out = str(tmp_path / 'hf')
  assert export_main([f'--workdir={tmp_path / "run"}', f'--out={out}']) == 0
  err = capsys.readouterr().err
  assert arch in err and 'without capacity drops' in err
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['architectures'] == [arch]
  got, want = hf_logits(out), routed_logits(cfg, params, v)
  assert np.std(want) > 0.3, np.std(want)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  print(f'{arch}: max |routed - transformers| = {np.max(np.abs(got - want)):.2e} '
        f'(logits std {np.std(want):.2f})')


def hf_llama(path, vocab_size, **overrides):
  """A small randomly initialised transformers Llama saved to path (no download)."""
  settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False,
                  initializer_range=0.3, max_position_embeddings=64)
  settings.update(overrides)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
  model.save_pretrained(path)
  return model


def import_args(hf_dir, workdir, data_cfg):
  return [f'--hf_dir={hf_dir}', f'--workdir={workdir}',
          f'--config={os.path.join(ROOT, "configs", "dense_base.py")}:tiny',
          f'--config.data.task={data_cfg.task}', f'--config.data.data_dir={data_cfg.data_dir}',
          '--config.train.seq_len=64']


def test_a_transformers_llama_imports_and_exports_unchanged(mini_data_cfg, tmp_path, capsys):
  """Llama -> routed: the same logits; routed -> Llama again: the same tensors."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from routed import sample  # pylint: disable=g-import-not-at-top
  from routed.import_hf import main as import_main  # pylint: disable=g-import-not-at-top
  v = mini_data_cfg.vocab_size
  hf_dir, workdir, back = tmp_path / 'llama', tmp_path / 'run', tmp_path / 'back'
  hf_llama(str(hf_dir), v)
  assert import_main(import_args(hf_dir, workdir, mini_data_cfg)) == 0
  assert 'checkpoint step 0' in capsys.readouterr().err
  cfg = sample.load_run_config(str(workdir))
  assert (cfg.model.d_model, cfg.model.num_kv_heads, cfg.model.norm_eps, cfg.moe.every) == (
      32, 2, 1e-5, 0)
  _, params, _, _ = sample.load_params(cfg, str(workdir), v)
  got, want = routed_logits(cfg, params, v), hf_logits(str(hf_dir))
  assert np.std(want) > 0.3
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  print(f'import: max |routed - transformers| = {np.max(np.abs(got - want)):.2e}')
  assert export_main([f'--workdir={workdir}', f'--out={back}']) == 0
  original, exported = load_file(str(hf_dir / 'model.safetensors')), load_file(
      str(back / 'model.safetensors'))
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_import_of_a_misshapen_checkpoint_is_one_line(mini_data_cfg, tmp_path, capsys):
  from routed.import_hf import main as import_main  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'llama'
  hf_llama(str(hf_dir), mini_data_cfg.vocab_size)
  config = json.loads((hf_dir / 'config.json').read_text())
  config['intermediate_size'] = 64        # the tensors say 48
  (hf_dir / 'config.json').write_text(json.dumps(config))
  workdir = tmp_path / 'run'
  capsys.readouterr()                     # transformers' progress bars
  assert import_main(import_args(hf_dir, workdir, mini_data_cfg)) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and 'mlp.gate_proj.weight has shape (48, 32)' in err, err
  assert not workdir.exists()
  config.update(intermediate_size=48, attention_bias=True)
  (hf_dir / 'config.json').write_text(json.dumps(config))
  assert import_main(import_args(hf_dir, workdir, mini_data_cfg)) == 2
  assert 'attention_bias' in capsys.readouterr().err


@pytest.mark.parametrize('spec,overrides,message', [
    ('switch_base.py:tiny', {}, 'moe.router=switch'),
    ('expert_choice_base.py:tiny', {}, 'moe.router=expert_choice'),
    ('mod_base.py:tiny', {}, 'mod.enabled'),
    ('dense_base.py:tiny', {}, 'model.activation=gelu'),
    ('mixtral_like.py:tiny', {'moe__num_shared_experts': 1}, 'moe.num_shared_experts'),
])
def test_export_refuses_what_transformers_cannot_express(spec, overrides, message, tmp_path,
                                                         capsys, mini_data_cfg):
  cfg = tiny_config(spec, mini_data_cfg, **overrides)
  (tmp_path / 'config.json').write_text(cfg.to_json())
  assert export_main([f'--workdir={tmp_path}', f'--out={tmp_path / "hf"}']) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and message in err and 'Orbax checkpoint' in err, err
  assert not (tmp_path / 'hf').exists()


def test_exported_tokenizer_encodes_as_routed(mini_data_cfg, tmp_path):
  from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
  from routed.export import write_tokenizer  # pylint: disable=g-import-not-at-top
  data = load_dataset(mini_data_cfg, 64)
  write_tokenizer(data.vocab_path, str(tmp_path))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  texts = ['import os\n\ndef main(argv):\n    return 0\n', '  x = 1  # héllo ☃\n', 'a\tb\n\n']
  for text in texts:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(data.vocabulary.encode(text)), text
    assert tokenizer.decode(ids) == text
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
