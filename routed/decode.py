"""Autoregressive decoding of several prompts at once: with a key/value cache, or by
recomputing the window (the oracle), and temperature / top-k / top-p sampling.

  from routed import decode
  new_tokens, seconds_per_token = decode.generate(cfg, graphdef, params, prompts,
                                                  max_new_tokens=64, temperature=0)

Shape letters: B prompts decoded together, P the padded prompt length, W the window
(train.seq_len: the most tokens the model saw in training), V vocabulary.

Cached decoding (kv_cache=True): prefill runs the B prompts, right-padded to P, through
the model once, filling each attention layer's cache (routed/model/kv_cache.py) with
each prompt's real tokens; then every step feeds each row's newest token at its
position, so a token costs one token's forward pass against the cache. Rows of
different lengths decode side by side: each has its own length and positions. A row
has W slots, so prompt + max_new_tokens - 1 must fit in W (decode.fits).

Recompute decoding (kv_cache=False) runs the whole window [B, W] for every token,
each row padded after its last token (causality makes the padding invisible); past W
tokens the window slides. It is the oracle that cached decoding equals.

Routing in both (sampling_config): the model runs in evaluation mode; token-choice MoE
layers drop nothing for capacity (with the cache every token is routed alone, a group
of one; recomputing, the capacity is raised until nothing can drop), so the two paths
compute the same function. Hash routes by token id. Mixture-of-Depths blocks and
causal expert choice decide each token by their causal rules, and a Mixture-of-
Depths block's cache holds only the tokens it processed. Models that are not causal
in evaluation (expert choice without its causal rule, Soft MoE) cannot decode; S-BASE
and RL-R route by token choice at evaluation and decode like it.

Sampling: temperature 0 is greedy; otherwise the logits / temperature, restricted to
the top_k largest (0: all) and to the smallest set whose probability reaches top_p
(1: all), are sampled with the key fold_in(key(seed), step), the same in both paths.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from routed.model import kv_cache
from routed.model.transformer import DTYPES
from routed.routing_state import layer_inputs


def sampling_config(cfg):
  """cfg as decoding runs it (a copy): each prompt is its own routing group, and the
  evaluation capacity factor is the expert count, which makes C = S (nothing drops)
  for every router: a token picks an expert at most once."""
  cfg = copy.deepcopy(cfg)
  cfg.moe.group_size = 0
  cfg.moe.eval_capacity_factor = float(cfg.moe.num_experts + cfg.moe.num_null_experts)
  return cfg


def fits(prompt_lengths, max_new_tokens: int, window: int) -> bool:
  """Whether cached decoding has room: the last token fed is prompt + new - 1."""
  return max(prompt_lengths) + max_new_tokens - 1 <= window


def init_cache(cfg, batch: int) -> dict:
  """{block index: an empty key/value cache of train.seq_len slots per row}."""
  m = cfg.model
  kv_heads, head_dim = m.num_kv_heads or m.num_heads, m.d_model // m.num_heads
  return {i: kv_cache.init(batch, cfg.train.seq_len, kv_heads, head_dim, DTYPES[m.compute_dtype])
          for i in range(m.num_layers)}


def sample_logits(logits, key, temperature, top_k, top_p):
  """logits float32 [B, V] -> token ids int32 [B]; temperature, top_k, top_p scalars
  (traced: one compiled function serves every setting). top_k applies first, then
  top_p over what it kept (renormalised), as transformers' samplers do. Only the work
  a setting needs runs (lax.cond): greedy is an argmax, and the sort over V that the
  filters need is skipped without them."""
  def filtered(scaled):
    v = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]                         # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    ordered = jnp.where(jnp.arange(v) < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # The nucleus: a token stays if the probability above it is still short of top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    last = jnp.minimum(jnp.sum(before < top_p, axis=-1), k) - 1           # the cut's index
    cut = jnp.take_along_axis(ordered, jnp.maximum(last, 0)[:, None], axis=-1)
    return jnp.where(scaled >= cut, scaled, -jnp.inf)

  def sample(_):
    scaled = logits / temperature
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1), filtered, lambda s: s, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample,
                      lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32), None)


def make_functions(graphdef):
  """(prefill, step, recompute), each jitted:

  prefill(params, routing, cache, tokens [B, P], lengths [B], key, sampling) -> (first
    new tokens [B], cache)
  step(params, routing, cache, tokens [B], positions [B], key, sampling) -> (next [B], cache)
  recompute(params, routing, window [B, W], lengths [B], key, sampling) -> next [B]
  sampling = (temperature, top_k, top_p); routing: the run's routing state.
  """
  def forward(params, routing, tokens, **kwargs):
    return nnx.merge(graphdef, params)(tokens, train=False, layer_state=layer_inputs(routing),
                                       **kwargs)

  def prefill(params, routing, cache, tokens, lengths, key, sampling):
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, aux = forward(params, routing, tokens, positions=positions, cache=cache,
                          valid=positions < lengths[:, None])
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample_logits(last, key, *sampling), aux['cache']

  def step(params, routing, cache, tokens, positions, key, sampling):
    logits, aux = forward(params, routing, tokens[:, None], positions=positions[:, None],
                          cache=cache, valid=jnp.ones((tokens.shape[0], 1), jnp.bool_))
    return sample_logits(logits[:, 0], key, *sampling), aux['cache']

  def recompute(params, routing, window, lengths, key, sampling):
    logits, _ = forward(params, routing, window)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample_logits(last, key, *sampling)

  return (jax.jit(prefill, donate_argnums=2), jax.jit(step, donate_argnums=2),
          jax.jit(recompute))


def _padded_length(n: int, window: int) -> int:
  """Prompts are padded to a power of two (at most W): few prefill compilations."""
  return min(window, 1 << max(0, n - 1).bit_length())


def generate(cfg, graphdef, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, kv_cache: bool = True,
             routing=None, functions=None):
  """Continues each prompt (a list of token ids) by max_new_tokens tokens.

  cfg: the run's config as sampling_config returns it (the model must have been built
  from it, or from a config that differs only in routing capacity). Returns (one list
  of new ids per prompt, median seconds per decoding step after the first, for all
  rows together). functions: make_functions(graphdef), to reuse compilations.
  """
  prefill, step, recompute = functions or make_functions(graphdef)
  window, b = cfg.train.seq_len, len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  sampling = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
  key = jax.random.key(seed)
  new, times = np.zeros((b, max_new_tokens), np.int32), []
  if kv_cache:
    if not fits(lengths, max_new_tokens, window):
      raise ValueError(f'prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) '
                       f'- 1 exceeds the window train.seq_len = {window}')
    tokens = np.zeros((b, _padded_length(int(lengths.max()), window)), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, :len(p)] = p
    cache = init_cache(cfg, b)
    token, cache = prefill(params, routing or {}, cache, tokens, lengths,
                           jax.random.fold_in(key, 0), sampling)
    new[:, 0] = np.asarray(token)
    for i in range(1, max_new_tokens):
      start = time.perf_counter()
      token, cache = step(params, routing or {}, cache, token, lengths + i - 1,
                          jax.random.fold_in(key, i), sampling)
      new[:, i] = np.asarray(token)
      times.append(time.perf_counter() - start)   # times[0] includes the compilation
  else:
    ids = [list(p) for p in prompts]
    for i in range(max_new_tokens):
      buffer = np.zeros((b, window), np.int32)
      for r, row in enumerate(ids):
        context = row[-window:]
        buffer[r, :len(context)] = context
      n = np.array([min(len(row), window) for row in ids], np.int32)
      start = time.perf_counter()
      token = np.asarray(recompute(params, routing or {}, buffer, n,
                                   jax.random.fold_in(key, i), sampling))
      times.append(time.perf_counter() - start)
      new[:, i] = token
      for r in range(b):
        ids[r].append(int(token[r]))
  per_step = float(np.median(times[1:])) if len(times) > 1 else float('nan')
  return [row.tolist() for row in new], per_step
