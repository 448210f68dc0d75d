"""The `einsum` dispatch backend: the dense one-hot reference (GShard / T5X style).

Shape letters as in routers.py: G groups, S tokens per group, E experts, C capacity,
D d_model. Every decision type turns itself into dense dispatch and combine tensors of
shape [G, S, E, C] (`decision.dense(E)`), so this runs any router, honours capacity,
and costs O(G * S * E * C * D): the oracle the index-based backends are tested
against, and their path for decision types they have no index for (Soft MoE).
"""

from __future__ import annotations

import jax.numpy as jnp


def dense_dispatch_tensors(decision, num_experts: int):
  """Dispatch [G, S, E, C] and combine [G, S, E, C] float32 tensors of any decision."""
  return decision.dense(num_experts)


def einsum_dispatch(x, decision, experts):
  """x [G, S, D] -> y [G, S, D] through per-expert buffers [E, G, C, D]."""
  dispatch, combine = dense_dispatch_tensors(decision, experts.num_experts)
  dispatch = dispatch.astype(x.dtype)
  buffers = jnp.einsum('gsec,gsd->egcd', dispatch, x)
  out = experts(buffers)
  return jnp.einsum('gsec,egcd->gsd', combine.astype(out.dtype), out)
