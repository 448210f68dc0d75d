"""The `gather` dispatch backend: index-based, with expert capacity.

Shape letters as in routers.py: G groups, S tokens per group, K choices per token,
E experts, C capacity, D d_model; T = G * S tokens, B = E * G * C buffer rows.

Each kept choice (slot < C) already names its buffer row (expert, group, slot), so no
sort is needed: a scatter of T * K integers builds the inverse map (buffer row ->
choice), the tokens are gathered into the [E, G, C, D] buffers, the experts run as
one batched matmul, and each token gathers back its choices' rows with their combine
weights. Data movement is O(B * D + T * K * D) whatever E is; only the expert
matmuls (B * D * F, fixed by the capacity factor) remain. Both gathers are
`rows.gather_rows`, whose gradient is a gather too (no scatter-add). The experts
run through expert_mlp.apply_experts (the weights of `Experts`, as in the dropless
backends).

Soft MoE's `SoftRouting` mixes every token into every slot: there is no index to
exploit, so it runs through the dense einsum path (its cost is that of Soft MoE).
"""

from __future__ import annotations

import jax.numpy as jnp

from routed.model.expert_mlp import apply_experts
from routed.model.dispatch_einsum import einsum_dispatch
from routed.model.routers import Routing
from routed.model.rows import combine_rows, gather_rows


def capacity_maps(routing: Routing, num_experts: int):
  """Where each kept choice goes, and which choice fills each buffer row.

  Returns (dest [T, K] int32: buffer row (e * G + g) * C + slot of each choice, B
  when dropped; source [B] int32: choice id t * K + k of each buffer row, T * K when
  the slot is empty). Slots of one expert in one group are distinct (the router's
  contract), so the scatter never collides.
  """
  g, s, k = routing.expert.shape
  c = routing.capacity
  b = num_experts * g * c
  group = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  kept = routing.slot < c
  dest = jnp.where(kept, (routing.expert * g + group) * c + routing.slot, b)
  dest = dest.reshape(g * s, k).astype(jnp.int32)
  source = jnp.full((b,), g * s * k, jnp.int32).at[dest.reshape(-1)].set(
      jnp.arange(g * s * k, dtype=jnp.int32), mode='drop')
  return dest, source


def gather_dispatch(x, decision, experts, *, fill=None):
  """x [G, S, D] -> y [G, S, D]; same result as einsum_dispatch.

  fill: None, or a value written into the expert-output rows of empty slots before
  the combine (tests pass NaN to prove that the combine and its gradient never read
  rows that no token owns).
  """
  if not isinstance(decision, Routing):
    return einsum_dispatch(x, decision, experts)
  g, s, d = x.shape
  e, c = experts.num_experts, decision.capacity
  k = decision.expert.shape[-1]
  dest, source = capacity_maps(decision, e)
  # Buffer row -> token (T when empty: gather_rows makes it a zero row, which is what
  # the one-hot dispatch feeds the experts for an empty slot).
  token = jnp.where(source < g * s * k, source // k, g * s)
  buffers = gather_rows(x.reshape(g * s, d), token, dest)
  out = apply_experts(buffers.reshape(e, g * c, d), experts).reshape(e * g * c, d)
  if fill is not None:
    out = jnp.where((source < g * s * k)[:, None], out, jnp.asarray(fill, out.dtype))
  y = combine_rows(out, dest, source, decision.weight.reshape(g * s, k))
  return y.reshape(g, s, d)
