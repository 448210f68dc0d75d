"""Expert choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Shape letters as in routers.py: G groups, S tokens per group, E experts, C capacity.

The decision is an ordinary `Routing` with K = E choices per token: choice k of a
token is expert k, its slot is the token's rank among the C tokens that expert took
(>= C when the expert did not take it). NOT causal: an expert ranks all S tokens of
the sequence, so whether an early token is processed depends on later tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from routed.model.routers import (Router, RouterCost, Routing, entropy, expert_capacity,
                                  router_z_loss)


class ExpertChoiceRouter(Router):
  """Router softmax over experts per token; each expert takes its top-C tokens.

  C = ceil(cf * S / E): on average cf experts per token, perfect balance by
  construction (every expert fills exactly C slots), a token gets 0..E experts.
  Combine weight of a (token, expert) pair = the token's router probability of that
  expert, so a token's weights are non-negative and sum to at most 1 (exactly 1 only
  if every expert took it). Losses: z only (balance needs no loss). Extra metric:
  experts_per_token (= E * C / S, fixed by the capacity; logged for comparison with
  token choice). `dropped` is the fraction of tokens that no expert took.
  """
  causal = False
  summary = 'expert choice: each expert takes its top-C tokens of the sequence'

  @classmethod
  def cost(cls, moe_cfg, d_model: int, group_size: int) -> RouterCost:
    e = moe_cfg.num_experts
    c = expert_capacity(group_size, e, 1, moe_cfg.capacity_factor)
    return RouterCost(params=d_model * e, matmul_params=d_model * e,
                      expert_rows=e * c / group_size)

  def capacity(self, group_size: int, train: bool) -> int:
    cf = self.capacity_factor if train else self.eval_capacity_factor
    return expert_capacity(group_size, self.num_experts, 1, cf)

  def route(self, logits, train: bool, rng=None, balance_counts=None):
    del balance_counts  # no balance loss: every expert takes exactly C tokens
    del rng  # deterministic
    g, s, e = logits.shape
    c = self.capacity(s, train)
    probs = jax.nn.softmax(logits, axis=-1)                         # [G, S, E]
    _, taken = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), c)          # [G, E, C] token ids
    # rank[g, e, s] = position of token s in expert e's top-C, or C if not taken.
    gi = jnp.arange(g)[:, None, None]
    ei = jnp.arange(e)[None, :, None]
    rank = jnp.full((g, e, s), c, jnp.int32).at[gi, ei, taken].set(
        jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (g, e, c)))
    slot = jnp.swapaxes(rank, 1, 2)                                 # [G, S, E]
    kept = slot < c
    routing = Routing(expert=jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e)),
                      slot=slot, weight=jnp.where(kept, probs, 0.0), capacity=c)
    keptf = kept.astype(jnp.float32)
    metrics = {'expert_load': jnp.sum(keptf, axis=(0, 1)) / jnp.sum(keptf),
               'dropped': jnp.mean(1.0 - jnp.max(keptf, axis=-1)),
               'entropy': entropy(probs),
               'experts_per_token': jnp.mean(jnp.sum(keptf, axis=-1))}
    return routing, {'z': router_z_loss(logits)}, metrics
