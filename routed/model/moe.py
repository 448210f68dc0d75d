"""The mixture-of-experts FFN: a router, a bank of expert MLPs and a dispatcher.

Shape letters as in routers.py: G groups (one sequence each), S tokens per group,
E experts, C capacity, D d_model, F d_ff.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from routed.model import dispatch as dispatch_lib
from routed.model import routers as routers_lib
from routed.model.layers import ACTIVATIONS, normal_param


class Experts(nnx.Module):
  """E independent MLPs, applied to per-expert buffers: [E, ..., D] -> [E, ..., D]."""

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_experts = num_experts
    self.act = ACTIVATIONS[activation]
    self.dtype = dtype
    self.wi = normal_param(rngs, (num_experts, d_model, d_ff), init_std, param_dtype)
    self.wo = normal_param(rngs, (num_experts, d_ff, d_model), init_std, param_dtype)

  def __call__(self, buffers):
    shape = buffers.shape
    x = buffers.reshape(shape[0], -1, shape[-1]).astype(self.dtype)  # [E, N, D]
    h = self.act(jnp.einsum('end,edf->enf', x, self.wi[...].astype(self.dtype)))
    y = jnp.einsum('enf,efd->end', h, self.wo[...].astype(self.dtype))
    return y.reshape(shape)


class MoELayer(nnx.Module):
  """Drop-in replacement for the dense MLP: x [B, L, D] -> (y [B, L, D], aux).

  Each sequence is one routing group (G = B, S = L): capacity is per sequence, and
  with the causal token-choice routers a token's routing never depends on later
  tokens. aux = {'losses': {name: scalar}, 'metrics': {name: array}}.
  """

  def __init__(self, moe_cfg, *, d_model: int, d_ff: int, activation: str, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    router_cls = routers_lib.ROUTERS[moe_cfg.router]
    self.router = router_cls(
        d_model, moe_cfg.num_experts, top_k=moe_cfg.top_k,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        init_scale=moe_cfg.router_init_scale, jitter=moe_cfg.jitter, rngs=rngs)
    self.experts = Experts(moe_cfg.num_experts, d_model, d_ff, activation=activation,
                           init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dispatch = dispatch_lib.DISPATCHERS[moe_cfg.dispatch]

  def __call__(self, x, *, train: bool, rng=None, token_ids=None):
    routing, losses, metrics = self.router(x, train=train, rng=rng, token_ids=token_ids)
    y = self.dispatch(x.astype(self.experts.dtype), routing, self.experts)
    return y, {'losses': losses, 'metrics': metrics}
