"""The key/value cache of one attention layer, for decoding token by token.

Shape letters as in layers.py: B rows (prompts decoded together), T tokens fed in this
call (the prompt at prefill, 1 per decoding step), S cache slots (train.seq_len), H
query heads, Hkv key/value heads, Dh head width.

A cache is a dict of arrays
  k, v    [B, S, Hkv, Dh]  keys (rotary positions already applied) and values
  length  int32 [B]        slots filled in each row
Row b's first length[b] slots hold the tokens this layer has processed, in sequence
order. Slot and position differ in a Mixture-of-Depths block: its layers process only
the tokens its causal rule chose, so their caches hold just those (with their true
rotary positions) and a skipped token has no key there.

Each call appends the tokens marked valid (prompt padding and unchosen tokens are
not) after the row's filled slots, then every query attends to the slots up to and
including its own: the same function as the reference attention over the tokens
processed so far (attention.masked computes both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from routed.model.attention import masked


def init(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> dict:
  """An empty cache of `slots` slots per row."""
  shape = (batch, slots, kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'length': jnp.zeros((batch,), jnp.int32)}


def append(cache: dict, k, v, valid):
  """Writes the valid tokens of k, v [B, T, Hkv, Dh] after each row's filled slots.

  valid bool [B, T]. Returns (cache, slots int32 [B, T]): the slot each token was written
  to (for an invalid token, the slot of the last valid token before it). Tokens past
  the last slot are not written: callers keep the rows within S (routed/decode.py).
  """
  slots = cache['length'][:, None] + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  target = jnp.where(valid, slots, cache['k'].shape[1])                  # S: dropped
  write = jax.vmap(lambda c, t, new: c.at[t].set(new.astype(c.dtype), mode='drop'))
  cache = {'k': write(cache['k'], target, k), 'v': write(cache['v'], target, v),
           'length': cache['length'] + jnp.sum(valid, axis=1, dtype=jnp.int32)}
  return cache, slots


def attend(q, cache: dict, slots):
  """q [B, T, H, Dh] at cache slots int32 [B, T] -> [B, T, H, Dh]: query t reads slots
  0..slots[t] of its row (its own key included, as in causal self-attention)."""
  reach = jnp.arange(cache['k'].shape[1])[None, None, :] <= slots[:, :, None]   # [B, T, S]
  return masked(q, cache['k'].astype(q.dtype), cache['v'].astype(q.dtype), reach[:, None])
