"""Exports a run's newest checkpoint as a Hugging Face `transformers` model.

  python -m routed.export --workdir=runs/mixtral --out=hf/mixtral [--format=hf]

Writes OUT/config.json, OUT/model.safetensors and the tokenizer (tokenizer.json,
tokenizer_config.json, and the run's SentencePiece model as tokenizer.model), which
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer` load: a
dense SwiGLU model as LlamaForCausalLM, configs/mixtral_like.py's architecture as
MixtralForCausalLM (routed/hf_format.py has the mapping and what it refuses). Their
logits equal routed's evaluated without capacity drops (routed/decode.py's
sampling_config): transformers' Mixtral drops no token, so a routed evaluation at a
capacity factor that drops tokens differs from it on exactly those tokens.

Parameters are written in their stored dtype (model.param_dtype). A model that
transformers cannot express is refused with one line naming the config key, exit 2;
so is an OUT that already holds a model (nothing is overwritten), unless --overwrite.
Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from routed import cli
from routed.sample import NonFiniteParams

FLAGS = {'workdir': None, 'out': None, 'format': 'hf', 'overwrite': False}
FORMATS = ('hf',)
HELP = cli.Help(
    command='python -m routed.export', doc=__doc__,
    flags={'workdir': 'a routed.train run directory (its config.json and newest checkpoint)',
           'out': 'the directory to write the Hugging Face model into',
           'format': 'hf (transformers: config.json, model.safetensors, tokenizer)',
           'overwrite': 'replace a model already in --out'},
    exit_codes={0: 'written', 1: 'the checkpoint holds non-finite parameters',
                2: cli.BAD_INPUT + '; also a model transformers cannot express'},
    reads="WORKDIR/config.json, the run's own: the model and moe keys, the data keys (its "
          'tokenizer)')


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def flat_params(params) -> dict:
  """Restored params (either scan layout) -> {'blocks/0/attn/qkv': numpy array, ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from routed.init_from import flatten  # pylint: disable=g-import-not-at-top
  from routed.model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(np.asarray, params)
  return flatten(scan_lib.unstack_blocks(params) if 'units' in params else params)


def write_tokenizer(vocab_path: str, out: str) -> None:
  """The run's SentencePiece model for transformers' AutoTokenizer: tokenizer.json (a
  `tokenizers` Unigram model of the same pieces and scores, spaces as '▁', byte
  fallback, no dummy prefix: routed's settings, routed/data/vocab.py) and the
  SentencePiece file itself as tokenizer.model. Ids are routed's (0 pad, 1 eos, 2 unk,
  no bos). The two agree on every token except where two segmentations score exactly
  the same (a run of 9 spaces: 8 + 1 or 1 + 8), which they break differently; both
  decode to the same text."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, normalizers  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  with open(vocab_path, 'rb') as f:
    proto.ParseFromString(f.read())
  tokenizer = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                       unk_id=proto.trainer_spec.unk_id, byte_fallback=True))
  tokenizer.normalizer = normalizers.Replace(' ', '▁')
  tokenizer.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                         decoders.Fuse()])
  tokenizer.save(os.path.join(out, 'tokenizer.json'))
  shutil.copyfile(vocab_path, os.path.join(out, 'tokenizer.model'))
  pieces = [p.piece for p in proto.pieces]
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'pad_token': pieces[0],
            'eos_token': pieces[1], 'unk_token': pieces[2], 'add_bos_token': False,
            'add_eos_token': False, 'model_max_length': 1 << 30}
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def export_hf(cfg, params: dict, vocab_size: int, vocab_path: str, out: str) -> dict:
  """Writes the Hugging Face model of flat routed params to out; returns its config."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from routed import hf_format  # pylint: disable=g-import-not-at-top
  config = hf_format.hf_config(cfg, vocab_size)
  tensors = hf_format.to_hf(params)
  os.makedirs(out, exist_ok=True)
  # Written beside, then renamed: an interrupted export leaves no half file behind.
  partial = os.path.join(out, 'model.safetensors.partial')
  save_file(tensors, partial, metadata={'format': 'pt'})
  os.replace(partial, os.path.join(out, 'model.safetensors'))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if vocab_path:
    write_tokenizer(vocab_path, out)
  return config


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS, HELP)
    if flags['format'] not in FORMATS:
      raise cli.UsageError(f"--format: {flags['format']!r} is not one of {', '.join(FORMATS)}")
    out = flags['out']
    if os.path.exists(os.path.join(out, 'model.safetensors')) and not flags['overwrite']:
      raise cli.UsageError(f'--out: {out} already holds a model.safetensors; choose another '
                           'directory or pass --overwrite')
    from routed import hf_format, sample  # pylint: disable=g-import-not-at-top
    cfg = sample.load_run_config(flags['workdir'])
    reason = hf_format.unsupported(cfg)
    if reason:
      raise cli.UsageError(f'cannot export to transformers: {reason}; the Orbax checkpoint '
                           f"in {flags['workdir']} remains this model's format")
    from routed.validate import validate  # pylint: disable=g-import-not-at-top
    validate(cfg)
    from routed.data import DataError, load_dataset  # pylint: disable=g-import-not-at-top
    try:
      data = load_dataset(cfg.data, cfg.train.seq_len)
    except DataError as e:
      raise cli.UsageError(str(e)) from None
    _, params, _, step = sample.load_params(cfg, flags['workdir'], data.vocab_size)
  except cli.UsageError as e:
    log(f'routed.export: {e}')
    return 2
  except NonFiniteParams as e:
    log(f'routed.export: {e}')
    return 1
  config = export_hf(cfg, flat_params(params), data.vocab_size, data.vocab_path, out)
  size = os.path.getsize(os.path.join(out, 'model.safetensors')) / 2**20
  log(f"checkpoint step {step} -> {out}: {config['architectures'][0]} ({size:.1f} MiB, "
      f"{config['torch_dtype']}) and its tokenizer. Its logits are routed's evaluated "
      "without capacity drops (transformers' Mixtral drops no token).")
  return 0


if __name__ == '__main__':
  sys.exit(main())
