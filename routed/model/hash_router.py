"""Hash routing (Roller et al. 2021): the expert is a fixed hash of the token id.

Shape letters as in routers.py: G groups, S tokens per group, E experts.

Nothing is learned and the router has no parameters: token id t always goes to expert
hash(t) mod E, whatever its context, with combine weight 1. Causal (experts fill
their C slots in position order, as in Switch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from routed.model.routers import RouterBase, RouterCost, Routing, expert_capacity, slots_in_order

# Knuth's multiplicative hash: floor(2^32 / golden ratio). The product's high bits
# mix all bits of the id, so consecutive ids land on unrelated experts.
_MULTIPLIER = 2654435761


def hash_expert(token_ids, num_experts: int):
  """int [...] token ids -> int32 [...] experts: ((id * 2654435761) mod 2^32 >> 16) mod E."""
  mixed = token_ids.astype(jnp.uint32) * jnp.uint32(_MULTIPLIER)   # wraps mod 2^32
  return ((mixed >> 16) % jnp.uint32(num_experts)).astype(jnp.int32)


class HashRouter(RouterBase):
  """Top-1 by hash of the token id, weight 1, capacity in position order.

  Combine weights per token: exactly 1, or 0 when dropped. Losses: none (nothing to
  train). Metrics: expert_load, dropped, entropy (0: the routing is deterministic).
  """
  causal = True
  summary = 'hash of the token id'

  @classmethod
  def cost(cls, moe_cfg, d_model: int, group_size: int) -> RouterCost:
    del moe_cfg, d_model, group_size
    return RouterCost(params=0, matmul_params=0, expert_rows=1)  # a table lookup

  def __init__(self, num_experts: int, *, capacity_factor: float,
               eval_capacity_factor: float):
    self.num_experts = num_experts
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor

  @classmethod
  def from_config(cls, moe_cfg, d_model: int, rngs):
    del d_model, rngs  # no parameters
    return cls(moe_cfg.num_experts, capacity_factor=moe_cfg.capacity_factor,
               eval_capacity_factor=moe_cfg.eval_capacity_factor)

  def __call__(self, x, *, train: bool, rng=None, token_ids=None, layer_state=None):
    """token_ids int [G, S] -> (Routing, losses, metrics); x is only used for its shape."""
    del rng, layer_state  # fixed routing: no balance loss
    s = x.shape[1]
    e = self.num_experts
    cf = self.capacity_factor if train else self.eval_capacity_factor
    capacity = expert_capacity(s, e, 1, cf)
    expert = hash_expert(token_ids, e)[..., None]                    # [G, S, 1]
    onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32)
    slot = slots_in_order(onehot)
    kept = slot < capacity
    routing = Routing(expert=expert, slot=slot, weight=kept.astype(jnp.float32),
                      capacity=capacity, dropless_weight=jnp.ones(expert.shape, jnp.float32))
    metrics = {'expert_load': jnp.mean(onehot[:, :, 0].astype(jnp.float32), axis=(0, 1)),
               'dropped': 1.0 - jnp.mean(kept.astype(jnp.float32)),
               'entropy': jnp.zeros((), jnp.float32)}
    return routing, {}, metrics
