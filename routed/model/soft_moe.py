"""Soft MoE (Puigcerver et al. 2023): experts process weighted averages of tokens.

Shape letters as in routers.py: G groups, S tokens per group, E experts, D d_model;
P slots per expert (moe.slots_per_expert), the capacity C of the dense tensors.

Soft MoE is not an assignment, so it has its own decision type, `SoftRouting`: dense
dispatch and combine weights. Its `dense()` is what the einsum oracle executes; index-
based dispatch backends, which take a `Routing`, run it through those dense tensors.
NOT causal: every slot averages all S tokens of the sequence, later ones included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from routed.model.routers import RouterBase, RouterCost, entropy


@struct.dataclass
class SoftRouting:
  """Dense soft routing weights.

  dispatch: float32 [G, S, E, P]  weight of token s in slot p of expert e; each slot's
                                  weights sum to 1 over the S tokens
  combine:  float32 [G, S, E, P]  weight of that slot's output in token s's output;
                                  each token's weights sum to 1 over the E * P slots
  capacity: P, slots per expert (static)
  """
  dispatch: jax.Array
  combine: jax.Array
  capacity: int = struct.field(pytree_node=False)

  def dense(self, num_experts: int):
    """(dispatch, combine), float32 [G, S, E, P]: the weights themselves."""
    assert self.dispatch.shape[2] == num_experts, (self.dispatch.shape, num_experts)
    return self.dispatch.astype(jnp.float32), self.combine.astype(jnp.float32)


def soft_weights(logits):
  """logits [G, S, E, P] -> SoftRouting: softmax over tokens per slot (dispatch) and
  over all slots per token (combine)."""
  g, s, e, p = logits.shape
  dispatch = jax.nn.softmax(logits, axis=1)
  combine = jax.nn.softmax(logits.reshape(g, s, e * p), axis=-1).reshape(g, s, e, p)
  return SoftRouting(dispatch=dispatch, combine=combine, capacity=p)


def l2_normalize(x, axis):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


class SoftRouter(RouterBase):
  """Slot parameters Phi [D, E, P]; logits = scale * <x / |x|, Phi / |Phi|> per slot.

  L2-normalising tokens and slot parameters, with a learned scalar scale, keeps the
  logits in [-scale, scale] whatever the width D. The scale starts at sqrt(D), which
  gives logits of unit variance at init, as a plain linear router would have. (The
  reference implementation, vmoe, starts it at 1: logits ~ N(0, 1/D), and in the tiny
  benchmark both softmaxes then stayed uniform, entropy log S, for all 300 steps:
  every slot was the sequence mean and the layer gave every token the same output.)
  No tokens are dropped and nothing is discrete, so every weight is differentiable.
  Losses: none. Metrics:
  expert_load (each expert's share of the combine weight), dropped (always 0),
  entropy (of each token's combine weights over the E * P slots, nats) and
  dispatch_entropy (of each slot's dispatch weights over the S tokens; log S is
  a plain average of the sequence).
  """
  causal = False
  summary = 'soft MoE: every slot averages all tokens of the sequence'

  def __init__(self, d_model: int, num_experts: int, *, slots_per_expert: int,
               rngs: nnx.Rngs):
    self.num_experts = num_experts
    self.slots_per_expert = slots_per_expert
    init = jax.nn.initializers.normal(stddev=d_model ** -0.5)
    self.phi = nnx.Param(init(rngs.params(), (d_model, num_experts, slots_per_expert),
                              jnp.float32))
    self.scale = nnx.Param(jnp.full((), d_model ** 0.5, jnp.float32))

  @classmethod
  def cost(cls, moe_cfg, d_model: int, group_size: int) -> RouterCost:
    # Per token: its logits for the E * P slots, its share of the slot inputs (each
    # slot a weighted sum of the S tokens) and its weighted sum of the slot outputs.
    slots = moe_cfg.num_experts * moe_cfg.slots_per_expert
    return RouterCost(params=d_model * slots + 1, matmul_params=3 * d_model * slots,
                      expert_rows=slots / group_size)

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    return f'{cls.summary}, {moe_cfg.slots_per_expert} slots per expert'

  @classmethod
  def from_config(cls, moe_cfg, d_model: int, rngs: nnx.Rngs):
    return cls(d_model, moe_cfg.num_experts, slots_per_expert=moe_cfg.slots_per_expert,
               rngs=rngs)

  def __call__(self, x, *, train: bool, rng=None, token_ids=None, layer_state=None):
    """x [G, S, D] -> (SoftRouting, losses, metrics); the same in training and eval."""
    del train, rng, token_ids, layer_state  # no balance loss: every slot is filled
    x = l2_normalize(x.astype(jnp.float32), axis=-1)
    phi = l2_normalize(self.phi[...], axis=0)
    routing = soft_weights(self.scale[...] * jnp.einsum('gsd,dep->gsep', x, phi))
    g, s, e, p = routing.combine.shape
    metrics = {
        'expert_load': jnp.mean(jnp.sum(routing.combine, axis=-1), axis=(0, 1)),
        'dropped': jnp.zeros((), jnp.float32),
        'entropy': entropy(routing.combine.reshape(g, s, e * p)),
        'dispatch_entropy': entropy(routing.dispatch, axis=1),
    }
    return routing, {}, metrics
