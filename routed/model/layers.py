"""Dense building blocks of the decoder: RMSNorm, rotary positions, the attention layer, MLP.

Shape letters used in this package:
  B  batch (sequences)            L  sequence length (tokens)
  D  d_model (residual width)     F  d_ff (MLP / expert hidden width)
  H  attention heads              Dh head width = D / H
  V  vocabulary size

Parameters are stored in `param_dtype` and cast to `dtype` (the compute dtype) at use,
so a bfloat16 model can keep float32 master weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routed.model.attention import ATTENTION

ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'silu': jax.nn.silu}


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
  """A parameter drawn from N(0, std^2), truncated at two standard deviations."""
  init = jax.nn.initializers.truncated_normal(stddev=std)
  return nnx.Param(init(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (cheap, and avoids bf16 underflow)."""

  def __init__(self, d_model: int, *, param_dtype, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((d_model,), param_dtype))
    self.eps = eps

  def __call__(self, x):  # [..., D] -> [..., D]
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotate(x, positions, base: float):
  """Rotary position embedding (RoPE), rotate-half form.

  x: [B, L, H, Dh]; positions: int [B, L], a token's position in its document (it
  restarts at each document of a packed row), which routed blocks keep when they
  gather a subset of tokens.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs            # [B, L, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary positions, within documents.

  `implementation` is model.attention (routed/model/attention.py: the reference
  einsum and the kernels tested against it).
  """

  def __init__(self, d_model: int, num_heads: int, *, rope_base: float, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs, implementation: str = 'auto'):
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.rope_base = rope_base
    self.dtype = dtype
    self.attend = ATTENTION[implementation]
    self.qkv = normal_param(rngs, (d_model, 3, num_heads, self.head_dim), init_std, param_dtype)
    self.out = normal_param(rngs, (num_heads, self.head_dim, d_model), init_std, param_dtype)

  def __call__(self, x, positions, segment_ids=None):
    """x [B, L, D] in sequence order; positions int [B, L] (rotary); segment_ids int
    [B, L] (a token attends only within its document) or None -> [B, L, D]."""
    x = x.astype(self.dtype)
    q, k, v = jnp.unstack(jnp.einsum('bld,dthk->tblhk', x, self.qkv[...].astype(self.dtype)))
    q = rotate(q, positions, self.rope_base)
    k = rotate(k, positions, self.rope_base)
    ctx = self.attend(q, k, v, segment_ids)
    return jnp.einsum('bqhk,hkd->bqd', ctx, self.out[...].astype(self.dtype))


class MLP(nnx.Module):
  """The dense feed-forward layer: act(x W_in) W_out.

  Returns (y, aux) with an empty aux dict so that it is interchangeable with MoELayer.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.act = ACTIVATIONS[activation]
    self.dtype = dtype
    self.wi = normal_param(rngs, (d_model, d_ff), init_std, param_dtype)
    self.wo = normal_param(rngs, (d_ff, d_model), init_std, param_dtype)

  def __call__(self, x, *, train: bool = False, rng=None, token_ids=None,
               balance_counts=None):  # [B, L, D]
    del train, rng, token_ids, balance_counts  # dense: nothing to route
    h = self.act(x.astype(self.dtype) @ self.wi[...].astype(self.dtype))
    return h @ self.wo[...].astype(self.dtype), {}
