"""The decoder-only language model: embed, N pre-norm blocks, norm, logits.

Shape letters: B batch, L sequence length, D d_model, V vocabulary (see layers.py).
Block i (counting from 1) has an MoE FFN when moe.every > 0 and i % moe.every == 0
(Switch: every other block); all other blocks have the dense MLP. moe.every = 0 gives
a dense model.

Rematerialisation (model.remat) wraps each block in jax.checkpoint: the backward pass
recomputes what the policy does not save, trading FLOPs for activation memory.
  none           save everything the backward pass needs (most memory, no recompute)
  dots_saveable  save every matmul output; recompute the elementwise work (norms,
                 activations, softmax): a little compute for much of the memory
  minimal        save only matmuls without batch dimensions (the projections x @ W);
                 recompute attention scores and probabilities and the expert matmuls
  full           save only each block's input; recompute the whole block (least
                 memory, about one more forward pass)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routed.model.layers import MLP, Attention, RMSNorm, normal_param
from routed.model import mod as mod_lib
from routed.model import moe as moe_lib
from routed.model import mup
from routed.model import scan as scan_lib
from routed.model.moe import MoELayer
from routed.model.mod import MoDBlock, mod_blocks
from routed.sharding import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.remat -> what jax.checkpoint saves of a block (see the module docstring).
REMAT_POLICIES = {
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}
REMAT = ('none',) + tuple(REMAT_POLICIES)
RESIDUAL = ('batch', None, None)  # logical dims of the residual stream [B, L, D]


def moe_blocks(cfg) -> list[bool]:
  """For each block, whether its FFN is an MoE layer."""
  every = cfg.moe.every
  return [every > 0 and (i + 1) % every == 0 for i in range(cfg.model.num_layers)]


class Block(nnx.Module):
  """x + attn(norm(x)), then x + ffn(norm(x)); ffn is an MLP or an MoELayer."""

  def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs):
    m = cfg.model
    dtype, param_dtype = DTYPES[m.compute_dtype], DTYPES[m.param_dtype]
    self.attn_norm = RMSNorm(m.d_model, param_dtype=param_dtype, eps=m.norm_eps)
    self.attn = Attention(m.d_model, m.num_heads, rope_base=m.rope_base, init_std=m.init_std,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          implementation=m.attention, num_kv_heads=m.num_kv_heads,
                          query_scale=mup.query_scale(m))
    self.ffn_norm = RMSNorm(m.d_model, param_dtype=param_dtype, eps=m.norm_eps)
    ffn_args = dict(d_model=m.d_model, d_ff=m.d_ff, activation=m.activation,
                    init_std=m.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn = (MoELayer(cfg.moe, **ffn_args, group_sequences=moe_lib.group_sequences(cfg),
                         microbatches=cfg.train.microbatches)
                if moe else MLP(**ffn_args))

  def __call__(self, x, positions, segment_ids=None, *, train: bool, rng=None, token_ids=None,
               layer_state=None, cache=None, valid=None):
    """cache (decoding): the attention layer's key/value cache, extended by the tokens
    marked valid [B, T] and returned as aux['cache']; routed/model/kv_cache.py."""
    if cache is None:
      x = x + self.attn(self.attn_norm(x), positions, segment_ids)
      y, aux = self.ffn(self.ffn_norm(x), train=train, rng=rng, token_ids=token_ids,
                        layer_state=layer_state)
      return x + y, aux
    h, cache = self.attn.extend(self.attn_norm(x), positions, cache, valid)
    x = x + h
    # Decoding routes every token alone (a group of one): no token can take another's
    # expert capacity, so nothing drops.
    b, t, d = x.shape
    ids = None if token_ids is None else token_ids.reshape(b * t, 1)
    y, aux = self.ffn(self.ffn_norm(x).reshape(b * t, 1, d), train=False, token_ids=ids,
                      layer_state=layer_state)
    return x + y.reshape(b, t, d), dict(aux, cache=cache)


class Transformer(nnx.Module):
  """tokens int [B, L] -> (logits float32 [B, L, V], aux).

  positions int [B, L]: rotary positions, counted within each document (default
  0..L-1); segment_ids int [B, L]: a token attends only to earlier tokens with its own
  segment id (default None: the whole row is one document). layer_state: {block
  index: dict} of what each MoE layer's router reads besides its input: the routing
  state (routed/routing_state.py) and, for the `global` balance scope when the step
  runs in microbatches, the step's expert counts (routed/step.py).

  aux = {'losses': {name: mean over MoE layers}, 'metrics': {f'layer{i}/{name}': value}}.
  Losses are averaged (not summed) over MoE layers, so a loss weight means the same
  whatever the depth; a per-token entry (REINFORCE's log-probabilities [B, L]) is
  averaged over layers token by token.

  Decoding (routed/decode.py): cache {block index: key/value cache} (kv_cache.py) and
  valid bool [B, L] (the tokens to append: not prompt padding) run the tokens as the
  continuation of each row's cached ones, at the given positions, in evaluation mode;
  aux['cache'] is the updated cache.
  """

  def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
    m = cfg.model
    self.dtype = DTYPES[m.compute_dtype]
    self.tie_embeddings = m.tie_embeddings
    self.logit_multiplier = mup.logit_multiplier(m)   # μP: tied logits / w; else 1
    self.embed = normal_param(rngs, (vocab_size, m.d_model), m.init_std, DTYPES[m.param_dtype])

    def make_block(i, rngs):
      is_moe, is_mod = moe_blocks(cfg)[i], mod_blocks(cfg)[i]
      block = Block(cfg, moe=is_moe, rngs=rngs)
      # Mixture-of-Depths (routed/model/mod.py) wraps the blocks it routes.
      return MoDBlock(cfg.mod, block, d_model=m.d_model, param_dtype=DTYPES[m.param_dtype],
                      rngs=rngs) if is_mod else block

    self.period = scan_lib.block_period(cfg) if m.scan_layers else 0
    if self.period:
      # The repeating unit, stacked along a layer axis (routed/model/scan.py).
      self.num_units = m.num_layers // self.period
      self.units = scan_lib.stacked_units(
          lambda rngs: nnx.List([make_block(j, rngs) for j in range(self.period)]),
          self.num_units, rngs)
    else:
      self.blocks = nnx.List([make_block(i, rngs) for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, param_dtype=DTYPES[m.param_dtype], eps=m.norm_eps)
    self.remat = m.remat
    if not m.tie_embeddings:
      self.unembed = normal_param(rngs, (m.d_model, vocab_size), m.init_std,
                                  DTYPES[m.param_dtype])

  def __call__(self, tokens, *, train: bool = False, rng=None, positions=None,
               segment_ids=None, layer_state=None, cache=None, valid=None):
    b, l = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    # What block i reads besides x: its routers' layer_state and its decoding cache.
    states = {}
    for name, per_block in (('routing', layer_state), ('cache', cache)):
      for i, value in (per_block or {}).items():
        states.setdefault(i, {})[name] = value
    def run(block, x, rng, state):
      state = state or {}
      return block(x, positions, segment_ids, train=train, rng=rng, token_ids=tokens,
                   layer_state=state.get('routing'), cache=state.get('cache'), valid=valid)
    if self.remat != 'none' and cache is None:
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    layer_aux = []   # (block index, aux) in block order
    # Before every block the residual stream is kept split by sequence over the mesh's
    # batch axes (constrain).
    if self.period:
      p, u = self.period, self.num_units
      keys = None if rng is None else jax.vmap(lambda i: jax.random.fold_in(rng, i))(
          jnp.arange(u * p)).reshape(u, p)
      stacked = {j: jax.tree.map(lambda *a: jnp.stack(a), *[states[v * p + j] for v in range(u)])
                 for j in range(p) if j in states}
      x, auxes = scan_lib.run_units(
          self.units, x, lambda block, x, key, c: run(block, constrain(x, RESIDUAL), key, c),
          keys, stacked)
      layer_aux = [(v * p + j, jax.tree.map(lambda a, v=v: a[v], auxes[j]))
                   for v in range(u) for j in range(p)]
    else:
      for i, block in enumerate(self.blocks):
        block_rng = None if rng is None else jax.random.fold_in(rng, i)
        x, aux = run(block, constrain(x, RESIDUAL), block_rng, states.get(i))
        layer_aux.append((i, aux))
    losses, metrics, new_cache = {}, {}, {}
    for i, aux in layer_aux:
      if 'cache' in aux:
        new_cache[i] = aux['cache']
      for name, value in aux.get('losses', {}).items():
        losses.setdefault(name, []).append(value)
      for name, value in aux.get('metrics', {}).items():
        metrics[f'layer{i}/{name}'] = value
    x = self.final_norm(constrain(x, RESIDUAL))
    if self.tie_embeddings:
      logits = jnp.einsum('bld,vd->blv', x, self.embed[...].astype(self.dtype))
      if self.logit_multiplier != 1.0:
        logits = logits * self.logit_multiplier
    else:
      logits = x @ self.unembed[...].astype(self.dtype)
    # Over layers only: a per-token loss entry ('reinforce', [B, L]) keeps its shape.
    losses = {name: jnp.mean(jnp.stack(values), axis=0) for name, values in losses.items()}
    aux = {'losses': losses, 'metrics': metrics}
    if cache is not None:
      aux['cache'] = new_cache
    return logits.astype(jnp.float32), aux


def build_model(cfg, vocab_size: int, seed: int) -> Transformer:
  """The model with its initial parameters (μP's under model.parametrization=mup)."""
  model = Transformer(cfg, vocab_size, rngs=nnx.Rngs(params=seed))
  if cfg.model.parametrization == 'mup':
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, mup.scale_init(nnx.to_pure_dict(state), cfg.model))
    nnx.update(model, state)
  return model


def is_causal(cfg, train: bool) -> bool:
  """Whether the model's output at position t depends only on tokens <= t (MoE and MoD)."""
  return moe_lib.is_causal(cfg, train) and mod_lib.is_causal(cfg, train)


def routing_mode(cfg, train: bool) -> str:
  """One line saying how the whole model routes (MoE layers, MoD blocks) in training or
  evaluation; printed with every evaluation and by routed.sample."""
  parts = [moe_lib.routing_mode(cfg, train)] if cfg.moe.every else []
  if cfg.mod.enabled and any(mod_blocks(cfg)):
    parts.append(mod_lib.describe(cfg, train))
  return ' | '.join(parts) or 'dense model (no routing)'
