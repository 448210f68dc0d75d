"""Generates text from the latest checkpoint of a training run.

  python -m routed.sample --workdir=runs/mod --prompt='def main(' --max_new_tokens=64

Loads WORKDIR/config.json and the newest checkpoint's parameters, then decodes one
token at a time with the model in evaluation mode: MoE layers route with their
evaluation capacity, Mixture-of-Depths blocks with their causal rule
(routed/model/mod.py). A model that is not causal in that mode (expert choice, soft
MoE: they rank or mix the whole sequence) cannot generate and is refused with one
line and exit status 2, like every other usage error.

Decoding recomputes the whole window each step (no KV cache): the window is a fixed
[1, train.seq_len] buffer, padded after the last token, so one compiled function
serves every step; causality makes the padding invisible. Past train.seq_len tokens
the window slides (the oldest token falls out). --temperature=0 is greedy.
Prints the prompt and its continuation on stdout, tokens/s on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

from routed import cli

FLAGS = {'workdir': None, 'prompt': None, 'max_new_tokens': 64, 'temperature': 1.0,
         'seed': 0}


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_run_config(workdir: str):
  """The config a run was trained with (keys added since then take their defaults)."""
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise cli.UsageError(f'--workdir: {path} not found (not a routed.train workdir?)')
  with open(path) as f:
    saved = json.load(f)
  cfg = base_config()
  try:
    cfg.update(saved)
  except (TypeError, KeyError, AttributeError) as e:
    raise cli.UsageError(f'--workdir: {path} does not read as a config: {e}') from None
  # Each prompt is its own routing group: prompts must not take each other's capacity.
  cfg.moe.group_size = 0
  return cfg


def check_causal(cfg) -> None:
  """Refuses, with one line, a model that sees later tokens when sampling."""
  from routed.model import mod, moe  # pylint: disable=g-import-not-at-top
  if not moe.is_causal(cfg, train=False):
    raise cli.UsageError(
        f'the model is not causal in sampling mode (moe.router={cfg.moe.router} looks at '
        'later tokens of the sequence), so it cannot generate text token by token')
  if not mod.is_causal(cfg, train=False):
    raise cli.UsageError('the Mixture-of-Depths blocks are not causal in sampling mode')


def load_params(cfg, workdir: str, vocab_size: int):
  """(graphdef, params, routing, step) of the newest checkpoint in workdir; routing is
  its routing state (routed/routing_state.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from routed import step as step_lib  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from routed.model.transformer import build_model  # pylint: disable=g-import-not-at-top
  from routed.routing_state import init_state  # pylint: disable=g-import-not-at-top
  model = build_model(cfg, vocab_size, cfg.train.seed)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=False)
  try:
    latest = ckpt.latest_step()
    if latest is None:
      raise cli.UsageError(f'--workdir: {workdir} has no checkpoint yet')
    opt_like = jax.eval_shape(step_lib.optimizer_for(cfg, vocab_size).init, params)
    params, _, _, routing = ckpt.restore(latest, params, opt_like, init_state(cfg))
  finally:
    ckpt.close()
  return graphdef, params, routing, latest


def make_next_token(graphdef):
  """jit(next_token(params, routing, buffer int32 [1, W], n, key, temperature) -> int32 []);
  routing is the routing state (routed/routing_state.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from routed.routing_state import layer_inputs  # pylint: disable=g-import-not-at-top

  def next_token(params, routing, buffer, n, key, temperature):
    model = nnx.merge(graphdef, params)
    logits, _ = model(buffer, train=False, layer_state=layer_inputs(routing))
    last = jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=False)   # [V]
    sampled = jax.random.categorical(key, last / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(last)).astype(jnp.int32)

  return jax.jit(next_token)


def generate(graphdef, params, prompt_ids, *, window: int, max_new_tokens: int,
             temperature: float, seed: int, next_token=None, routing=None):
  """Returns (new token ids, seconds per generated token after the first); routing:
  the run's routing state (load_params)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  next_token = next_token or make_next_token(graphdef)
  ids = list(prompt_ids)
  new, times = [], []
  key = jax.random.key(seed)
  for i in range(max_new_tokens):
    context = ids[-window:]
    buffer = np.zeros((1, window), np.int32)
    buffer[0, :len(context)] = context
    start = time.perf_counter()
    token = int(next_token(params, routing or {}, buffer, np.int32(len(context)),
                           jax.random.fold_in(key, i), np.float32(temperature)))
    times.append(time.perf_counter() - start)
    ids.append(token)
    new.append(token)
  per_token = float(np.median(times[1:])) if len(times) > 1 else float('nan')
  return new, per_token


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS)
    workdir = flags['workdir']
    if flags['max_new_tokens'] < 1:
      raise cli.UsageError(f"--max_new_tokens: must be >= 1, got {flags['max_new_tokens']}")
    if flags['temperature'] < 0:
      raise cli.UsageError(f"--temperature: must be >= 0, got {flags['temperature']}")
    cfg = load_run_config(workdir)
    check_causal(cfg)
    from routed.validate import validate  # pylint: disable=g-import-not-at-top
    validate(cfg)
    from routed.data import DataError, load_dataset  # pylint: disable=g-import-not-at-top
    try:
      data = load_dataset(cfg.data, cfg.train.seq_len)
    except DataError as e:
      raise cli.UsageError(str(e)) from None
    prompt_ids = list(data.vocabulary.encode(flags['prompt']))
    if not prompt_ids:
      raise cli.UsageError('--prompt: encodes to no tokens; give some text')
    graphdef, params, routing, step = load_params(cfg, workdir, data.vocab_size)
  except cli.UsageError as e:
    log(f'routed.sample: {e}')
    return 2
  from routed.model.transformer import routing_mode  # pylint: disable=g-import-not-at-top
  log(f'checkpoint step {step} | {routing_mode(cfg, train=False)}')
  new, per_token = generate(graphdef, params, prompt_ids, window=cfg.train.seq_len,
                            max_new_tokens=flags['max_new_tokens'],
                            temperature=flags['temperature'], seed=flags['seed'],
                            routing=routing)
  print(data.vocabulary.decode(prompt_ids + new), flush=True)
  log(f'{len(new)} tokens, {1 / per_token:.1f} tokens/s (median step after compilation)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
