"""Imports a dense Hugging Face checkpoint (Llama-style, safetensors) as a routed run.

  python -m routed.import_hf --hf_dir=llama/ --workdir=runs/llama [--config=FILE[:VARIANT]]
  python -m routed.train --config=configs/mixtral_like.py --workdir=runs/moe \\
      --config.init.from_checkpoint=runs/llama --config.init.upcycle=true ...

Reads HF_DIR/config.json (model_type llama) and its *.safetensors, and writes WORKDIR/
config.json and an Orbax checkpoint at step 0 (the parameters, a fresh optimizer
state), which routed.train resumes, routed.sample samples, and init.from_checkpoint
warm-starts or sparse-upcycles from. The model keys (width, depth, heads, key/value
heads, MLP width, RMSNorm epsilon, rotary base, tied embeddings; SwiGLU, no MoE)
come from the Hugging Face config; every other key (train, data, checkpoint) from
--config (default: routed/config.py's defaults) and its --config.KEY=VALUE overrides.
The mapping is routed/hf_format.py's. data.vocab_size is set to the checkpoint's
vocabulary; the data's tokenizer must have that many pieces (a SentencePiece
HF_DIR/tokenizer.model is copied to WORKDIR/tokenizer.model, for data.vocab_path).

A field routed cannot reproduce (biases, scaled rotary positions, another activation),
a missing or misshapen tensor, or a WORKDIR that already holds a checkpoint is one
line, exit 2; nothing is written then. Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from routed import cli

FLAGS = {'hf_dir': None, 'workdir': None}
HELP = cli.Help(
    command='python -m routed.import_hf', doc=__doc__,
    flags={'hf_dir': 'a Hugging Face model directory (config.json, *.safetensors)',
           'workdir': 'the new routed run directory to write (must hold no checkpoints)'},
    exit_codes={0: 'written', 2: cli.BAD_INPUT},
    reads='optional ' + cli.CONFIG_KEYS + '; the model keys come from HF_DIR/config.json')


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def read_tensors(hf_dir: str) -> dict:
  """{name: numpy array} of every *.safetensors file in hf_dir (bfloat16 kept)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    raise cli.UsageError(f'--hf_dir: {hf_dir} has no *.safetensors file')
  tensors = {}
  for path in files:
    # The flax framework reads bfloat16, which numpy alone cannot.
    with safe_open(path, framework='flax') as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name))
  return tensors


def routed_config(flags, config, hf: dict):
  """The run's config: --config (or the defaults) with the model keys from hf."""
  from routed import hf_format  # pylint: disable=g-import-not-at-top
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  cfg = config if config is not None else base_config()
  try:
    overrides = hf_format.model_overrides(hf)
  except (ValueError, KeyError) as e:
    raise cli.UsageError(f"--hf_dir: {flags['hf_dir']}/config.json: {e}") from None
  overrides['data.vocab_size'] = int(hf['vocab_size'])
  with cfg.unlocked():
    for key, value in overrides.items():
      section, name = key.split('.')
      cfg[section][name] = value
  return cfg


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    config, flags = cli.parse(argv, FLAGS, HELP)
    hf_dir, workdir = flags['hf_dir'], flags['workdir']
    path = os.path.join(hf_dir, 'config.json')
    if not os.path.isfile(path):
      raise cli.UsageError(f'--hf_dir: {path} not found (not a Hugging Face model directory?)')
    with open(path) as f:
      hf = json.load(f)
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise cli.UsageError(f'--workdir: {workdir} already holds checkpoints; import into a '
                           'new directory')
    cfg = routed_config(flags, config, hf)
    from routed.validate import validate  # pylint: disable=g-import-not-at-top
    validate(cfg)
    from routed import hf_format  # pylint: disable=g-import-not-at-top
    try:
      flat = hf_format.from_hf(read_tensors(hf_dir), cfg)
    except ValueError as e:
      raise cli.UsageError(f'--hf_dir: {hf_dir}: {e}') from None
  except cli.UsageError as e:
    log(f'routed.import_hf: {e}')
    return 2
  step = write_run(cfg, flat, workdir)
  tokenizer = os.path.join(hf_dir, 'tokenizer.model')
  if os.path.isfile(tokenizer):
    shutil.copyfile(tokenizer, os.path.join(workdir, 'tokenizer.model'))
  m = cfg.model
  log(f'{hf_dir} -> {workdir}: a dense routed model (d_model {m.d_model}, {m.num_layers} '
      f'layers, {m.num_heads} heads, vocabulary {cfg.data.vocab_size}), checkpoint step {step}')
  return 0


def write_run(cfg, flat: dict, workdir: str) -> int:
  """WORKDIR/config.json and a step-0 checkpoint of the flat unscanned params."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from routed import step as step_lib  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from routed.init_from import unflatten_like  # pylint: disable=g-import-not-at-top
  from routed.model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  from routed.model.transformer import build_model  # pylint: disable=g-import-not-at-top
  from routed.routing_state import init_state  # pylint: disable=g-import-not-at-top
  vocab = cfg.data.vocab_size
  template = jax.eval_shape(lambda: nnx.to_pure_dict(
      nnx.state(build_model(cfg, vocab, cfg.train.seed), nnx.Param)))
  scanned = 'units' in template
  unscanned = scan_lib.unstack_blocks(template) if scanned else template
  params = jax.tree.map(lambda like, a: jax.numpy.asarray(a, like.dtype), unscanned,
                        unflatten_like(unscanned, flat))
  if scanned:
    params = scan_lib.stack_blocks(params, len(template['units']))
  opt_state = step_lib.optimizer_for(cfg, vocab).init(params)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json(indent=2))
  ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=False)
  try:
    ckpt.save(0, params, opt_state, {'seed': cfg.train.seed}, init_state(cfg))
  finally:
    ckpt.close()
  return 0


if __name__ == '__main__':
  sys.exit(main())
