"""S-BASE (Clark et al. 2022): balanced assignment by Sinkhorn in training, top-1 at eval.

Shape letters as in routers.py: G groups, S tokens per group, E experts.

BASE layers solve a balanced linear assignment of tokens to experts; S-BASE
approximates it with a few Sinkhorn normalisations of exp(router logits), so that
every expert receives about S / E tokens, then takes each token's top-1 expert of
the balanced matrix. At evaluation, plain top-1 of the logits. NOT causal in
training (an expert's column normalisation sums over all S tokens of the sequence);
causal at evaluation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from routed.model.routers import Router, router_z_loss


def sinkhorn_log(logits, iterations: int):
  """log of exp(logits) [G, S, E] scaled toward rows summing to 1 and columns to S/E.

  Each iteration normalises the columns (experts) to S/E, then the rows (tokens) to 1.
  Only the column step can change a row's argmax, so iterations = 1 is already a
  balancing step.
  """
  _, s, e = logits.shape
  log_col = math.log(s / e)
  x = logits
  for _ in range(iterations):
    x = x - jax.nn.logsumexp(x, axis=1, keepdims=True) + log_col
    x = x - jax.nn.logsumexp(x, axis=2, keepdims=True)
  return x


class SBaseRouter(Router):
  """Top-1 of the Sinkhorn-balanced scores in training, of the raw logits at eval.

  The assignment is discrete (no gradient); the combine weight is the router softmax
  probability of the assigned expert (as in Switch), which trains the router. Experts
  still have capacity C = ceil(cf * S / E), filled in position order, for the few
  tokens a finite number of iterations leaves unbalanced and for eval routing.
  Combine weights per token: the probability (< 1), 0 when dropped. Losses: balance
  (f from the assignment, so nearly constant in training: Sinkhorn does the
  balancing, and the loss keeps the eval top-1 in view) and z.
  """
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, sinkhorn_iters: int = 8, **kwargs):
    super().__init__(d_model, num_experts, **kwargs)
    self.sinkhorn_iters = sinkhorn_iters

  @classmethod
  def config_kwargs(cls, moe_cfg) -> dict:
    return dict(super().config_kwargs(moe_cfg), sinkhorn_iters=moe_cfg.sinkhorn_iters)

  @classmethod
  def is_causal(cls, train: bool, moe_cfg=None) -> bool:
    del moe_cfg
    return not train

  @classmethod
  def describe(cls, moe_cfg, train: bool) -> str:
    if train:
      return (f'top-1 of the Sinkhorn-balanced scores of the sequence ({moe_cfg.sinkhorn_iters} '
              f'iterations), capacity factor {moe_cfg.capacity_factor:g}')
    return f'top-1 token choice, capacity factor {moe_cfg.eval_capacity_factor:g}'

  def route(self, logits, train: bool, rng=None, layer_state=None):
    del rng  # deterministic
    probs = jax.nn.softmax(logits, axis=-1)                          # [G, S, E]
    scores = sinkhorn_log(jax.lax.stop_gradient(logits), self.sinkhorn_iters) if train else logits
    expert = jnp.argmax(scores, axis=-1)[..., None]                  # [G, S, 1]
    gate = jnp.take_along_axis(probs, expert, axis=-1)
    active = jnp.ones(expert.shape, bool)
    routing, real, kept = self.place(expert, gate, active, self.capacity(logits.shape[1], train))
    balance, metrics = self.choice_stats(probs, expert, active, real, kept, layer_state)
    return routing, {'balance': balance, 'z': router_z_loss(logits)}, metrics
