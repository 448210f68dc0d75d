"""The expert MLPs applied to per-expert buffers, as the index-based backends run them.

Shape letters as in routers.py: E experts, D d_model, F expert d_ff; R rows per
expert buffer.

The backends read the weights that `Experts` (routed/model/moe.py) stores, wi
[E, D, F] and wo [E, F, D], its activation `act` and compute dtype `dtype`, so they
can pick how to run the product per platform. `Experts.__call__` (a batched einsum,
what the einsum oracle uses) computes the same function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def expert_weights(experts):
  """(wi [E, D, F], wo [E, F, D]) in the experts' compute dtype, and the activation."""
  wi = experts.wi[...].astype(experts.dtype)
  wo = experts.wo[...].astype(experts.dtype)
  return wi, wo, experts.act


def batched_experts(buffers, wi, wo, act):
  """buffers [E, R, D] -> [E, R, D] as one batched matmul pair."""
  h = act(jnp.einsum('erd,edf->erf', buffers, wi))
  return jnp.einsum('erf,efd->erd', h, wo)


def _scanned(buffers, wi, wo, act):
  # XLA:CPU runs a batched dot as one single-threaded matmul per batch entry; a scan
  # over experts runs each expert's two matmuls on all cores, and its gradient
  # writes each expert's weight-gradient slice in place.
  def body(carry, operands):
    x, w1, w2 = operands
    return carry, act(x @ w1) @ w2

  return jax.lax.scan(body, None, (buffers, wi, wo))[1]


def _apply(buffers, wi, wo, act):
  buffers = buffers.astype(wi.dtype)
  return jax.lax.platform_dependent(buffers, wi, wo,
                                    cpu=functools.partial(_scanned, act=act),
                                    default=functools.partial(batched_experts, act=act))


def apply_experts(buffers, experts):
  """buffers [E, R, D] -> [E, R, D]: expert e's MLP on each of its R rows.

  One batched matmul pair on TPU/GPU; a scan over experts on CPU (faster there).
  Experts split over a mesh (expert_parallel.ExpertShard) exchange the buffers with
  the devices that hold them.
  """
  exchange = getattr(experts, 'exchange', None)
  if exchange is not None:
    return exchange(buffers, _apply)
  return _apply(buffers, *expert_weights(experts))
