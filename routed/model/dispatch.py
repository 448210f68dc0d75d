"""Dispatchers execute a router's decision: gather tokens, run the experts, combine.

A dispatcher is a function `(x, routing, experts) -> y`:
  x        [G, S, D]  tokens of each routing group
  routing  Routing    from routed/model/routers.py (expert, slot, weight per choice)
  experts  Experts    maps per-expert buffers [E, G, C, D] -> [E, G, C, D]
  y        [G, S, D]  sum over a token's choices of weight * expert output

Shape letters as in routers.py. Tokens dropped by capacity (slot >= C) get no
expert output from that choice; the MoE layer's residual connection carries them.

`einsum` is the readable reference (GShard / T5X style): it materialises one-hot
dispatch and combine tensors of shape [G, S, E, C], so its cost grows with E. Other
backends must agree with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_dispatch_tensors(routing, num_experts: int):
  """One-hot dispatch [G, S, E, C] (0/1) and combine [G, S, E, C] (weights) tensors."""
  expert = jax.nn.one_hot(routing.expert, num_experts, dtype=jnp.float32)     # [G, S, K, E]
  slot = jax.nn.one_hot(routing.slot, routing.capacity, dtype=jnp.float32)    # [G, S, K, C]
  # one_hot of an out-of-range slot is all zeros: dropped choices vanish here.
  dispatch = jnp.einsum('gske,gskc->gsec', expert, slot)
  combine = jnp.einsum('gske,gskc,gsk->gsec', expert, slot, routing.weight.astype(jnp.float32))
  return dispatch, combine


def einsum_dispatch(x, routing, experts):
  dispatch, combine = dense_dispatch_tensors(routing, experts.num_experts)
  dispatch = dispatch.astype(x.dtype)
  buffers = jnp.einsum('gsec,gsd->egcd', dispatch, x)
  out = experts(buffers)
  return jnp.einsum('gsec,egcd->gsd', combine.astype(out.dtype), out)


DISPATCHERS = {'einsum': einsum_dispatch}
