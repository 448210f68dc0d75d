"""The causal decision rule of Mixture-of-Depths blocks (mod.causal_rule).

Training routes the top-K tokens of each sequence, which depends on later tokens; at
sampling time a token must be decided alone. The rule is a logit per token whose
sign predicts top-K membership:

  aux_loss   the router's own logit; a binary cross-entropy loss ('mod_causal',
             weight mod.aux_loss_weight) teaches it to be > 0 exactly on top-K tokens.
             Its gradient reaches the router (and, through x, the model below).
  predictor  a small MLP on stop_gradient(x), trained by the same loss; it cannot
             disturb the language model (the paper's second option, ~99% accurate).

Shapes: B batch, L sequence length, D d_model, P predictor hidden width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from routed.model.layers import normal_param

CAUSAL_RULES = ('aux_loss', 'predictor')


class Predictor(nnx.Module):
  """relu(x W1 + b1) w2 + b2 in float32: x [B, L, D] -> logits [B, L]."""

  def __init__(self, d_model: int, hidden: int, *, param_dtype, rngs: nnx.Rngs):
    self.w1 = normal_param(rngs, (d_model, hidden), 1 / math.sqrt(d_model), param_dtype)
    self.b1 = nnx.Param(jnp.zeros((hidden,), param_dtype))
    self.w2 = normal_param(rngs, (hidden,), 1 / math.sqrt(hidden), param_dtype)
    self.b2 = nnx.Param(jnp.zeros((), param_dtype))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    # Normalise: the residual stream's scale grows with depth and training.
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    h = jax.nn.relu(x @ self.w1[...].astype(jnp.float32) + self.b1[...].astype(jnp.float32))
    return h @ self.w2[...].astype(jnp.float32) + self.b2[...].astype(jnp.float32)


def bce(logits, member):
  """Mean binary cross-entropy of logits [B, L] against top-K membership bool [B, L]."""
  labels = jax.lax.stop_gradient(member.astype(jnp.float32))
  return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def accuracy(logits, member):
  """Share of tokens whose causal decision (logit > 0) equals top-K membership."""
  return jnp.mean(((logits > 0) == member).astype(jnp.float32))
