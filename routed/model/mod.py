"""Mixture-of-Depths (Raposo et al. 2024): a block that only some tokens run through.

Shape letters as in layers.py (B batch, L sequence length, D d_model), plus
  K  tokens per sequence that run through a routed block (its static buffer size)

A scalar router scores every token: logit r = x . w_r, weight g = sigmoid(r). In
training the top-K tokens of each sequence (K = round(mod.capacity * L), at least 1)
are gathered, in sequence order and with their positions and segment ids, into a [B, K, D]
buffer that runs through the plain Block (attention among the chosen tokens, then the
MLP or MoE layer), so compute really falls with capacity. The block's update
(block(x) - x) of a chosen token is multiplied by g, which is what trains the router,
and scattered back; every other token passes on the residual. The residual is added
once: out = x + g * (block(x) - x) for chosen tokens, out = x otherwise.

Top-K over the sequence sees the future, so training is not causal. Evaluation and
sampling use the causal rule instead (routed/model/mod_causal.py): a token is chosen
when the rule's logit is > 0 and fewer than K_eval = round(mod.eval_capacity * L)
earlier tokens of its sequence were chosen; this depends only on tokens <= t and
keeps a static buffer. Unfilled buffer slots come after the chosen tokens, so
causal attention (by order in the buffer) keeps real tokens from seeing them, and
their outputs are dropped on the scatter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from routed.model import mod_causal
from routed.model.layers import normal_param


def mod_blocks(cfg) -> list[bool]:
  """For each block, whether it is a Mixture-of-Depths block."""
  every = cfg.mod.every if cfg.mod.enabled else 0
  return [every > 0 and (i + 1) % every == 0 for i in range(cfg.model.num_layers)]


def buffer_size(capacity: float, seq_len: int) -> int:
  """K: tokens per sequence a routed block processes, in [1, seq_len]."""
  return min(seq_len, max(1, int(math.floor(capacity * seq_len + 0.5))))


def is_causal(cfg, train: bool) -> bool:
  """Whether MoD keeps the model causal: top-K routing in training is not."""
  return not (cfg.mod.enabled and any(mod_blocks(cfg)) and train)


def describe(cfg, train: bool) -> str:
  mod = cfg.mod
  if train:
    return f'MoD top-{mod.capacity:g} of each sequence (sees later tokens)'
  return f'MoD causal rule {mod.causal_rule}, at most {mod.eval_capacity:g} of each sequence'


def topk_selection(logits, k: int):
  """True top-k of each row, in sequence order: logits [B, L] -> indices int32 [B, K]."""
  _, idx = jax.lax.top_k(logits, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def causal_selection(decide, k: int):
  """The first K tokens of each row with decide True: bool [B, L] -> (idx [B, K], valid [B, K]).

  Slot of a chosen token = number of chosen tokens before it; tokens past slot K-1
  are not chosen. Unfilled slots have valid False and index L (out of range).
  """
  b, l = decide.shape
  slot = jnp.cumsum(decide.astype(jnp.int32), axis=-1) - 1            # [B, L]
  chosen = decide & (slot < k)
  slot = jnp.where(chosen, slot, k)                                   # k = dropped
  tokens = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  idx = jax.vmap(lambda s, t: jnp.full((k,), l, jnp.int32).at[s].set(t, mode='drop'))(slot, tokens)
  return idx, idx < l


class MoDBlock(nnx.Module):
  """A routed wrapper around a plain Block: x [B, L, D] -> (out [B, L, D], aux)."""

  def __init__(self, mod_cfg, block, *, d_model: int, param_dtype, rngs: nnx.Rngs):
    self.block = block
    self.capacity = mod_cfg.capacity
    self.eval_capacity = mod_cfg.eval_capacity
    self.causal_rule = mod_cfg.causal_rule
    # Small init, as for MoE routers: weights start near sigmoid(0) = 1/2 for all tokens.
    self.router = normal_param(rngs, (d_model,), math.sqrt(mod_cfg.router_init_scale / d_model),
                               param_dtype)
    self.predictor = (mod_causal.Predictor(d_model, mod_cfg.predictor_d_ff,
                                           param_dtype=param_dtype, rngs=rngs)
                      if mod_cfg.causal_rule == 'predictor' else None)

  def route(self, x, *, train: bool):
    """Router logits, topk membership, and the chosen (idx, valid): see the module doc."""
    b, l, _ = x.shape
    logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)   # [B, L]
    k_train = buffer_size(self.capacity, l)
    top = topk_selection(logits, k_train)
    member = jnp.zeros((b, l), jnp.bool_).at[jnp.arange(b)[:, None], top].set(True)
    rule = (logits if self.predictor is None
            else self.predictor(jax.lax.stop_gradient(x)))                  # [B, L]
    if train:
      idx, valid = top, jnp.ones_like(top, jnp.bool_)
    else:
      idx, valid = causal_selection(rule > 0, buffer_size(self.eval_capacity, l))
    return logits, rule, member, idx, valid

  def __call__(self, x, positions, segment_ids=None, *, train: bool, rng=None, token_ids=None,
               layer_state=None, cache=None, valid=None):
    if cache is not None:
      return self.extend(x, positions, token_ids, layer_state, cache, valid)
    b, l, _ = x.shape
    logits, rule, member, idx, valid = self.route(x, train=train)
    safe = jnp.where(valid, idx, 0)
    gather = lambda a: jnp.take_along_axis(a, safe.reshape(safe.shape + (1,) * (a.ndim - 2)), 1)
    xs = gather(x)                                                           # [B, K, D]
    # Unfilled slots (index 0 here) sit after every chosen token, so causal attention
    # hides them; their outputs are dropped on the scatter below.
    ids = None if token_ids is None else gather(token_ids)
    segs = None if segment_ids is None else gather(segment_ids)
    ys, aux = self.block(xs, gather(positions), segs, train=train, rng=rng, token_ids=ids,
                         layer_state=layer_state)
    weight = jax.nn.sigmoid(gather(logits)) * valid                          # [B, K]
    delta = (ys - xs) * weight[..., None].astype(ys.dtype)
    scatter = jax.vmap(lambda d, i: jnp.zeros((l,) + d.shape[1:], d.dtype).at[i].add(
        d, mode='drop'))
    out = x + scatter(delta, idx).astype(x.dtype)
    losses = dict(aux.get('losses', {}))
    metrics = dict(aux.get('metrics', {}))
    losses['mod_causal'] = mod_causal.bce(rule, member)
    metrics['mod_causal_acc'] = mod_causal.accuracy(rule, member)
    metrics['mod_chosen'] = jnp.sum(valid) / (b * l)
    return out, {'losses': losses, 'metrics': metrics}

  def extend(self, x, positions, token_ids, layer_state, cache, valid):
    """Decoding (routed/model/kv_cache.py): the causal rule decides each new token of
    x [B, T, D] given how many of its row's earlier tokens this block took (the
    inner block's cache length), as causal_selection does for a whole sequence of
    the cache's S slots. Only chosen tokens enter the block's cache; the others pass
    on the residual."""
    logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)   # [B, T]
    rule = logits if self.predictor is None else self.predictor(x)
    decide = (rule > 0) & valid
    slot = cache['length'][:, None] + jnp.cumsum(decide.astype(jnp.int32), axis=1) - 1
    chosen = decide & (slot < buffer_size(self.eval_capacity, cache['k'].shape[1]))
    y, aux = self.block(x, positions, train=False, token_ids=token_ids,
                        layer_state=layer_state, cache=cache, valid=chosen)
    weight = jax.nn.sigmoid(logits) * chosen
    return x + ((y - x) * weight[..., None].astype(y.dtype)).astype(x.dtype), aux
