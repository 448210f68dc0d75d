"""RL-R (Clark et al. 2022): the router is a policy trained with REINFORCE.

Shape letters as in routers.py: G groups, S tokens per group, E experts; B, L as in
layers.py (a routing group is one sequence, so G = B and S = L).

In training each token samples its expert from the router's softmax pi; at
evaluation it takes the argmax. The discrete choice is trained by
  REINFORCE  -mean_t[(r_t - b) * log pi(e_t | x_t)],  r_t = -CE_t (stop-gradient),
with b the mean reward of the batch (an in-batch baseline: no state outside the
params, and unbiased up to the token's own 1/(B*L) share of the mean), plus the
balance and z losses. The policy gradient reaches the router kernel only (its input
is stop-gradient there): one sampled reward per token is noisy, and through the
router input it would also push every earlier layer. The router returns
log pi(e_t | x_t) per token as the loss entry 'reinforce' [G, S]; routed/step.py,
which has the per-token cross-entropy, calls `reinforce_loss`. With several MoE
layers the per-token log-probabilities are averaged over layers (as every loss is),
and all layers share the token's reward.

The combine weight is pi(e_t | x_t), as in Switch. With weight 1 (a pure policy,
trained by REINFORCE alone) the tiny benchmark trained far worse than the dense
model (validation CE +0.23 after 300 steps): early routing is a near-uniform random
draw, and at full weight the experts' outputs on randomly routed tokens swamp the
residual stream; with the gate they fade in as the policy sharpens, and the router
also gets the gate's direct gradient.
Causal: sampling uses per-token noise, capacity fills in position order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from routed.model.routers import Router, router_z_loss


def reinforce_loss(log_prob, token_loss):
  """log_prob [B, L] (differentiable), token_loss [B, L] -> scalar REINFORCE loss.

  reward = -token_loss (no gradient), baseline = mean reward over the batch,
  loss = -mean((reward - baseline) * log_prob).
  """
  reward = -jax.lax.stop_gradient(token_loss)
  advantage = reward - jnp.mean(reward)
  return -jnp.mean(advantage * log_prob)


class ReinforceRouter(Router):
  """Top-1 sampled (training) or argmax (eval) expert; weight pi; capacity in order.

  Combine weights per token: the router probability of the expert (< 1), 0 when
  dropped. Losses: balance, z and the per-token 'reinforce' log-probability (see the
  module docstring).
  """
  causal = True

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    cf = moe_cfg.capacity_factor if train else moe_cfg.eval_capacity_factor
    how = 'expert sampled from' if train else 'argmax of'
    return f'top-1 {how} the REINFORCE-trained router policy, capacity factor {cf:g}'

  def __call__(self, x, *, train: bool, rng=None, token_ids=None, layer_state=None):
    del token_ids
    x, route_rng = self.inputs(x, train, rng)
    # The policy gradient is noisy (one sampled reward per token): it trains the router
    # kernel only. Through x it would also push every earlier layer of the model.
    policy_logits = jax.lax.stop_gradient(x) @ self.kernel[...]
    return self.route(x @ self.kernel[...], train, rng=route_rng, policy_logits=policy_logits,
                      layer_state=layer_state)

  def route(self, logits, train: bool, rng=None, policy_logits=None, layer_state=None):
    """policy_logits: the logits the REINFORCE log-probability is taken from (default
    `logits`; the same values, with gradients to the router kernel only)."""
    policy_logits = logits if policy_logits is None else policy_logits
    log_probs = jax.nn.log_softmax(logits, axis=-1)                  # [G, S, E]
    if train:
      if rng is None:
        raise ValueError('the reinforce router samples in training: pass rng')
      expert = jax.random.categorical(rng, logits, axis=-1)[..., None]
    else:
      expert = jnp.argmax(logits, axis=-1)[..., None]                # [G, S, 1]
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(policy_logits, axis=-1), expert,
                                   axis=-1)[..., 0]
    active = jnp.ones(expert.shape, bool)
    gate = jnp.exp(jnp.take_along_axis(log_probs, expert, axis=-1))   # pi(e | x)
    routing, real, kept = self.place(expert, gate, active,
                                     self.capacity(logits.shape[1], train))
    balance, metrics = self.choice_stats(jnp.exp(log_probs), expert, active, real, kept,
                                         layer_state)
    losses = {'balance': balance, 'z': router_z_loss(logits), 'reinforce': log_prob}
    return routing, losses, metrics
