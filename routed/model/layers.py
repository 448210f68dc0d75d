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

from routed.model import kv_cache
from routed.model.attention import ATTENTION


def swiglu(h):
  """SwiGLU (Shazeer 2020) of h = x @ wi [..., 2F] -> [..., F]: silu(x W_gate) * (x W_up).

  wi holds W_gate and W_up interleaved along its last axis (column 2j is hidden unit
  j's gate, column 2j + 1 its linear input), so any contiguous split of that axis (the
  mesh's tensor axis) keeps each unit's pair together, and every dispatch backend,
  which applies the activation to x @ wi, runs SwiGLU unchanged.
  """
  return jax.nn.silu(h[..., 0::2]) * h[..., 1::2]


# model.activation -> fn(x @ wi) -> hidden activations. The gated ones (GATED) read
# two columns of wi per hidden unit: wi is [..., D, 2F] for them, [..., D, F] otherwise.
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'silu': jax.nn.silu, 'swiglu': swiglu}
GATED = ('swiglu',)


def wi_width(activation: str, d_ff: int) -> int:
  """Columns of the input matrix wi for hidden width d_ff: 2F for gated activations."""
  return 2 * d_ff if activation in GATED else d_ff


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

  num_kv_heads Hkv < H: grouped-query attention (Ainslie et al. 2023; MQA at 1): the
  H query heads form Hkv groups of H / Hkv consecutive heads, each sharing one key and
  value head. Parameters: qkv [D, 3, H, Dh] when Hkv = H; otherwise q [D, H, Dh] and
  kv [D, 2, Hkv, Dh]. `implementation` is model.attention (routed/model/attention.py:
  the reference einsum and the kernels tested against it).
  """

  def __init__(self, d_model: int, num_heads: int, *, rope_base: float, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs, implementation: str = 'auto',
               num_kv_heads: int = 0, query_scale: float = 1.0):
    self.num_heads = num_heads
    self.query_scale = query_scale   # μP's score scale (routed/model/mup.py); 1 otherwise
    self.num_kv_heads = num_kv_heads or num_heads
    self.head_dim = d_model // num_heads
    self.rope_base = rope_base
    self.dtype = dtype
    self.attend = ATTENTION[implementation]
    if self.num_kv_heads == num_heads:
      self.qkv = normal_param(rngs, (d_model, 3, num_heads, self.head_dim), init_std,
                              param_dtype)
    else:
      self.q = normal_param(rngs, (d_model, num_heads, self.head_dim), init_std, param_dtype)
      self.kv = normal_param(rngs, (d_model, 2, self.num_kv_heads, self.head_dim), init_std,
                             param_dtype)
    self.out = normal_param(rngs, (num_heads, self.head_dim, d_model), init_std, param_dtype)

  def __call__(self, x, positions, segment_ids=None):
    """x [B, L, D] in sequence order; positions int [B, L] (rotary); segment_ids int
    [B, L] (a token attends only within its document) or None -> [B, L, D]."""
    q, k, v = self.project(x, positions)
    return self.output(self.attend(q, k, v, segment_ids))

  def extend(self, x, positions, cache: dict, valid):
    """Decoding: x [B, T, D] are the next tokens of each row, valid bool [B, T] those
    to append to the key/value cache (routed/model/kv_cache.py); each attends to the
    row's cached tokens and itself. Returns ([B, T, D], the updated cache)."""
    q, k, v = self.project(x, positions)
    cache, slots = kv_cache.append(cache, k, v, valid)
    return self.output(kv_cache.attend(q, cache, slots)), cache

  def project(self, x, positions):
    """x [B, L, D] -> q [B, L, H, Dh], k, v [B, L, Hkv, Dh], rotary positions applied."""
    x = x.astype(self.dtype)
    if self.num_kv_heads == self.num_heads:
      q, k, v = jnp.unstack(jnp.einsum('bld,dthk->tblhk', x, self.qkv[...].astype(self.dtype)))
    else:
      q = jnp.einsum('bld,dhk->blhk', x, self.q[...].astype(self.dtype))
      k, v = jnp.unstack(jnp.einsum('bld,dthk->tblhk', x, self.kv[...].astype(self.dtype)))
    q = rotate(q, positions, self.rope_base)
    if self.query_scale != 1.0:
      q = q * jnp.asarray(self.query_scale, q.dtype)
    return q, rotate(k, positions, self.rope_base), v

  def output(self, ctx):
    """ctx [B, L, H, Dh] -> [B, L, D]."""
    return jnp.einsum('bqhk,hkd->bqd', ctx, self.out[...].astype(self.dtype))


class MLP(nnx.Module):
  """The dense feed-forward layer: act(x W_in) W_out; wi [D, F], or [D, 2F] for a gated
  activation (swiglu), wo [F, D].

  Returns (y, aux) with an empty aux dict so that it is interchangeable with MoELayer.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str, init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.act = ACTIVATIONS[activation]
    self.dtype = dtype
    self.wi = normal_param(rngs, (d_model, wi_width(activation, d_ff)), init_std, param_dtype)
    self.wo = normal_param(rngs, (d_ff, d_model), init_std, param_dtype)

  def __call__(self, x, *, train: bool = False, rng=None, token_ids=None,
               layer_state=None):  # [B, L, D]
    del train, rng, token_ids, layer_state  # dense: nothing to route
    h = self.act(x.astype(self.dtype) @ self.wi[...].astype(self.dtype))
    return h @ self.wo[...].astype(self.dtype), {}
