"""Expert choice routing (Zhou et al. 2022): each expert picks its top-C tokens; and a
causal rule for evaluation and sampling.

Shape letters as in routers.py: G groups, S tokens per group, E experts, C capacity,
K choices recorded per token.

Training. The decision is an ordinary `Routing` with K = E choices per token: choice
k of a token is expert k, its slot is the token's rank among the C tokens that expert
took (>= C when the expert did not take it). NOT causal: an expert ranks all S tokens
of the group, so whether an early token is processed depends on later tokens.

Causal rule (moe.causal_rule = threshold), for evaluation and sampling. Training also
reports, per expert, the router score of the C-th token it took (top_c_score [E],
averaged over groups); routed/routing_state.py keeps its moving average as the
expert's threshold. At evaluation a token goes to every expert whose threshold its
score exceeds, at most moe.eval_max_experts of them (its highest scores), which
depends on that token alone; experts take such tokens in position order up to the
evaluation capacity C = ceil(eval_capacity_factor * S / E), later ones dropped, as in
token choice. Weights are the scores, as in training. Without the rule, evaluation
is top-C selection like training (non-causal).
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
  if every expert took it). Losses: z only (balance needs no loss). Extra metrics:
  experts_per_token (= E * C / S in training, fixed by the capacity; logged for
  comparison with token choice), top_c_score [E] (training: the C-th taken score per
  expert, mean over groups: what the causal rule's thresholds follow). `dropped` is
  the fraction of tokens that no expert took. With layer_state['threshold'] [E]
  outside training: the causal rule of the module docstring.
  """
  causal = False
  summary = 'expert choice: each expert takes its top-C tokens of the sequence'

  def __init__(self, d_model: int, num_experts: int, *, eval_max_experts: int = 0, **kwargs):
    super().__init__(d_model, num_experts, **kwargs)
    self.eval_max_experts = eval_max_experts or num_experts

  @classmethod
  def config_kwargs(cls, moe_cfg) -> dict:
    return dict(super().config_kwargs(moe_cfg), eval_max_experts=moe_cfg.eval_max_experts)

  @classmethod
  def is_causal(cls, train: bool, moe_cfg=None) -> bool:
    return not train and moe_cfg is not None and moe_cfg.causal_rule == 'threshold'

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    if train or moe_cfg.causal_rule != 'threshold':
      return super().describe(moe_cfg, train)
    cap = f', at most {moe_cfg.eval_max_experts} per token' if moe_cfg.eval_max_experts else ''
    return (f"expert choice's causal rule: every expert whose learned threshold the token's "
            f'score exceeds{cap}, capacity factor {moe_cfg.eval_capacity_factor:g}')

  @classmethod
  def cost(cls, moe_cfg, d_model: int, group_size: int) -> RouterCost:
    e = moe_cfg.num_experts
    c = expert_capacity(group_size, e, 1, moe_cfg.capacity_factor)
    return RouterCost(params=d_model * e, matmul_params=d_model * e,
                      expert_rows=e * c / group_size)

  def capacity(self, group_size: int, train: bool) -> int:
    cf = self.capacity_factor if train else self.eval_capacity_factor
    return expert_capacity(group_size, self.num_experts, 1, cf)

  def route(self, logits, train: bool, rng=None, layer_state=None):
    del rng  # deterministic
    probs = jax.nn.softmax(logits, axis=-1)                         # [G, S, E]
    threshold = (layer_state or {}).get('threshold')
    if threshold is not None and not train:
      return self.route_causal(logits, probs, threshold)
    g, s, e = logits.shape
    c = self.capacity(s, train)
    scores, taken = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), c)     # [G, E, C] token ids
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
               'experts_per_token': jnp.mean(jnp.sum(keptf, axis=-1)),
               'top_c_score': jax.lax.stop_gradient(jnp.mean(scores[..., -1], axis=0))}
    return routing, {'z': router_z_loss(logits)}, metrics

  def route_causal(self, logits, probs, threshold):
    """The threshold rule: token t takes expert e iff probs[t, e] > threshold[e], its
    eval_max_experts highest such scores, placed in position order (causal)."""
    values, expert = jax.lax.top_k(probs, self.eval_max_experts)   # [G, S, K]
    active = values > jnp.take(threshold, expert)
    capacity = self.capacity(logits.shape[1], train=False)
    routing, real, kept = self.place(expert, values, active, capacity)
    keptf, realf = kept.astype(jnp.float32), real.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(expert, self.num_experts) * realf[..., None], axis=(0, 1, 2))
    metrics = {'expert_load': counts / jnp.maximum(jnp.sum(counts), 1.0),
               'dropped': 1.0 - jnp.sum(keptf) / jnp.maximum(jnp.sum(realf), 1.0),
               'entropy': entropy(probs),
               'experts_per_token': jnp.mean(jnp.sum(realf, axis=-1))}
    return routing, {'z': router_z_loss(logits)}, metrics
