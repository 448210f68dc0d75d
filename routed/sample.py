"""Generates text from the latest checkpoint of a training run.

  python -m routed.sample --workdir=runs/mod --prompt='def main(' --max_new_tokens=64
  python -m routed.sample --workdir=runs/mod --prompts_file=prompts.txt --top_p=0.9

Loads WORKDIR/config.json and the newest checkpoint's parameters and routing state,
then continues the prompt (or each line of --prompts_file, decoded together as one
batch) token by token with the model in evaluation mode (routed/decode.py):
token-choice MoE layers route each token alone and drop nothing for capacity,
Mixture-of-Depths blocks and causal expert choice decide by their causal rules. A
model that is not causal in that mode (expert choice without moe.causal_rule, Soft
MoE: they rank or mix the whole sequence) cannot generate and is refused with
one line and exit status 2, like every other usage error.

Decoding keeps a key/value cache per attention layer (--kv_cache, the default): the
prompts are run once, then each new token costs one token's forward pass, so prompt +
max_new_tokens must fit in train.seq_len. --nokv_cache recomputes the whole window for
every token instead (the oracle the cache is tested against; past train.seq_len the
window slides). --temperature=0 is greedy; --top_k and --top_p restrict sampling.
Prints each prompt with its continuation on stdout, tokens/s on stderr.
"""

from __future__ import annotations

import os
import sys

from routed import cli

FLAGS = {'workdir': None, 'prompt': '', 'prompts_file': '', 'max_new_tokens': 64,
         'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, 'seed': 0, 'kv_cache': True}
HELP = cli.Help(
    command='python -m routed.sample', doc=__doc__,
    flags={'workdir': 'a routed.train run directory (its config.json and newest checkpoint)',
           'prompt': 'the text to continue (or --prompts_file)',
           'prompts_file': 'a file of prompts, one per line, decoded together as a batch',
           'max_new_tokens': 'tokens to generate per prompt',
           'temperature': '0: greedy; otherwise the softmax temperature',
           'top_k': 'sample among the k most likely tokens (0: all)',
           'top_p': 'sample among the most likely tokens holding this probability (1: all)',
           'seed': 'random seed of the sampling', 'kv_cache': 'decode against a key/value '
           'cache (false: recompute the window for every token)'},
    exit_codes={0: 'generated', 1: 'the checkpoint holds non-finite parameters',
                2: cli.BAD_INPUT + '; also a model that is not causal'},
    reads='WORKDIR/config.json, the run\'s own: the model, moe and mod keys, train.seq_len '
          '(the cache length) and the data keys (its tokenizer)')


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_run_config(workdir: str):
  """The config a run was trained with (keys added since then take their defaults)."""
  from routed.config_change import recorded  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise cli.UsageError(f'--workdir: {path} not found (not a routed.train workdir?)')
  with open(path) as f:
    text = f.read()
  try:
    cfg, _ = recorded(text)   # the same reading routed.train resumes with
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise cli.UsageError(f'--workdir: {path} does not read as a config: {e}') from None
  from routed.decode import sampling_config  # pylint: disable=g-import-not-at-top
  return sampling_config(cfg)


def check_causal(cfg) -> None:
  """Refuses, with one line, a model that sees later tokens when sampling."""
  from routed.model import mod, moe  # pylint: disable=g-import-not-at-top
  if not moe.is_causal(cfg, train=False):
    raise cli.UsageError(
        f'the model is not causal in sampling mode (moe.router={cfg.moe.router} looks at '
        'later tokens of the sequence), so it cannot generate text token by token')
  if not mod.is_causal(cfg, train=False):
    raise cli.UsageError('the Mixture-of-Depths blocks are not causal in sampling mode')


class NonFiniteParams(Exception):
  """The checkpoint's parameters hold nan or inf: there is no model to sample from."""


def load_params(cfg, workdir: str, vocab_size: int):
  """(graphdef, params, routing, step) of the newest checkpoint in workdir that reads
  back (an unreadable one is reported in one line and the one before it used, nothing
  moved: sampling only reads); routing is its routing state (routed/routing_state.py).
  Raises NonFiniteParams when its parameters are not all finite."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from routed import step as step_lib  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import Checkpointer, one_line, quiet_abandoned_reads  # pylint: disable=g-import-not-at-top
  from routed.model.transformer import build_model  # pylint: disable=g-import-not-at-top
  from routed.routing_state import init_state  # pylint: disable=g-import-not-at-top
  model = build_model(cfg, vocab_size, cfg.train.seed)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=False)
  try:
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise cli.UsageError(f'--workdir: {workdir} has no checkpoint yet')
    opt_like = jax.eval_shape(step_lib.optimizer_for(cfg, vocab_size).init, params)
    with quiet_abandoned_reads():
      for step in steps:
        try:
          restored, _, _, routing = ckpt.restore(step, params, opt_like, init_state(cfg))
          break
        except Exception as e:  # pylint: disable=broad-except
          log(f'routed.sample: checkpoint {step} is unreadable ({one_line(e)}); trying the '
              'one before')
      else:
        raise cli.UsageError(f'--workdir: no checkpoint in {workdir} reads back with its '
                             'config.json (another model?)')
  finally:
    ckpt.close()
  from routed.init_from import flatten  # pylint: disable=g-import-not-at-top
  bad = next((name for name, leaf in flatten(restored).items()
              if not bool(jax.numpy.isfinite(leaf).all())), None)
  if bad:
    raise NonFiniteParams(f'checkpoint {step} in {workdir} holds non-finite values (nan or '
                          f'inf) in {bad}: there is no model to sample from')
  return graphdef, restored, routing, step


def read_prompts(flags) -> list[str]:
  """The prompt texts: --prompt, or the non-empty lines of --prompts_file."""
  if bool(flags['prompt']) == bool(flags['prompts_file']):
    raise cli.UsageError('give exactly one of --prompt=TEXT and --prompts_file=FILE')
  if flags['prompt']:
    return [flags['prompt']]
  try:
    with open(flags['prompts_file']) as f:
      prompts = [line.rstrip('\n') for line in f if line.strip()]
  except OSError as e:
    raise cli.UsageError(f"--prompts_file: cannot read {flags['prompts_file']}: "
                         f'{e.strerror}') from None
  if not prompts:
    raise cli.UsageError(f"--prompts_file: {flags['prompts_file']} has no prompts")
  return prompts


def check_flags(flags) -> None:
  if flags['max_new_tokens'] < 1:
    raise cli.UsageError(f"--max_new_tokens: must be >= 1, got {flags['max_new_tokens']}")
  if not flags['temperature'] >= 0 or flags['temperature'] == float('inf'):   # nan too
    raise cli.UsageError(f"--temperature: must be a finite number >= 0, got "
                         f"{flags['temperature']}")
  if flags['top_k'] < 0:
    raise cli.UsageError(f"--top_k: must be >= 0 (0: no limit), got {flags['top_k']}")
  if not 0 < flags['top_p'] <= 1:
    raise cli.UsageError(f"--top_p: must be in (0, 1], got {flags['top_p']}")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS, HELP)
    workdir = flags['workdir']
    check_flags(flags)
    texts = read_prompts(flags)
    cfg = load_run_config(workdir)
    check_causal(cfg)
    from routed.validate import validate  # pylint: disable=g-import-not-at-top
    validate(cfg)
    from routed.data import DataError, load_dataset  # pylint: disable=g-import-not-at-top
    try:
      data = load_dataset(cfg.data, cfg.train.seq_len)
    except DataError as e:
      raise cli.UsageError(str(e)) from None
    prompts = [list(data.vocabulary.encode(text)) for text in texts]
    if not all(prompts):
      raise cli.UsageError('--prompt: encodes to no tokens; give some text')
    from routed.decode import fits  # pylint: disable=g-import-not-at-top
    if flags['kv_cache'] and not fits([len(p) for p in prompts], flags['max_new_tokens'],
                                      cfg.train.seq_len):
      raise cli.UsageError(
          f"--max_new_tokens: the longest prompt ({max(map(len, prompts))} tokens) + "
          f"{flags['max_new_tokens']} new ones do not fit in the key/value cache "
          f'(train.seq_len = {cfg.train.seq_len}); ask for fewer, or --nokv_cache to slide '
          'the window')
    graphdef, params, routing, step = load_params(cfg, workdir, data.vocab_size)
  except cli.UsageError as e:
    log(f'routed.sample: {e}')
    return 2
  except NonFiniteParams as e:
    log(f'routed.sample: {e}')
    return 1
  from routed import decode  # pylint: disable=g-import-not-at-top
  from routed.model.transformer import routing_mode  # pylint: disable=g-import-not-at-top
  log(f'checkpoint step {step} | {routing_mode(cfg, train=False)} | '
      f"{'key/value cache' if flags['kv_cache'] else 'recomputing the window'}")
  new, per_step = decode.generate(
      cfg, graphdef, params, prompts, max_new_tokens=flags['max_new_tokens'],
      temperature=flags['temperature'], top_k=flags['top_k'], top_p=flags['top_p'],
      seed=flags['seed'], kv_cache=flags['kv_cache'], routing=routing)
  for prompt, continuation in zip(prompts, new):
    print(data.vocabulary.decode(prompt + continuation), flush=True)
  speed = (f'{len(prompts) / per_step:.1f} tokens/s (median step after compilation)'
           if per_step == per_step else 'too few steps to time')   # nan below 3 tokens
  log(f'{len(prompts)} x {flags["max_new_tokens"]} tokens, {speed}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
