"""Causal self-attention over packed documents: one reference, fast kernels tested against it.

Shape letters as in layers.py: B batch, L tokens (queries and keys alike: this is
self-attention), H heads, Dh head width.

Every implementation computes the same function of q [B, L, H, Dh], k, v [B, L, Hkv,
Dh] (rotary positions already applied; Hkv divides H: grouped-query attention, query
head h reading key/value head h // (H / Hkv)) and segment_ids int [B, L]:

  query i attends to key j  iff  j <= i  and  segment_ids[j] == segment_ids[i]

Causality is by index in the array, so callers keep tokens in sequence order
(Mixture-of-Depths gathers its subsets in order, unfilled slots last). A token always
sees itself, so no softmax row is empty. segment_ids=None: one document per row, the
causal mask alone (data.cross_document_attention=true).

Implementations (config key model.attention):
  reference    einsum scores in float32 [B, H, L, L], masked, softmax: the oracle.
  dot_product  jax.nn.dot_product_attention. Causality is native (is_causal); the
               document mask is a boolean [B, 1, L, L], since that API takes no segment
               ids. On GPU with bfloat16/float16 it asks for cuDNN flash attention;
               float32, and every other platform, use its XLA path.
  splash       the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu): a
               causal mask and segment ids natively, never an [L, L] tensor; L is padded
               to its block size. On TPU only; elsewhere the Pallas interpreter runs it
               (tests). Under a mesh it runs per device (shard_map: batch, and heads
               over `tensor` when they divide).
  auto         splash on TPU, dot_product on GPU, reference elsewhere (the fastest on
               CPU: benchmarks/RESULTS.md). Chosen when the program is lowered, so
               routed.aot for a TPU topology compiles splash.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from routed.sharding import RULES, mesh_axes_here

SPLASH_BLOCK = 512      # largest splash block (tokens); short sequences use one block
_LANES = 128            # splash blocks are multiples of the TPU lane width


def _mask(segment_ids, length: int):
  """bool [B or 1, 1, L, L]: causal, and within a document when segment_ids is given."""
  idx = jnp.arange(length)
  mask = (idx[:, None] >= idx[None, :])[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def masked(q, k, v, mask):
  """Softmax attention under an explicit mask: q [B, Lq, H, Dh], k, v [B, Lk, Hkv, Dh],
  mask bool [B or 1, 1, Lq, Lk] (query i may read key j) -> [B, Lq, H, Dh]. Scores in
  float32. The reference below, and decoding against a key/value cache (kv_cache.py)."""
  b, lq, h, dh = q.shape
  groups = h // k.shape[2]
  qg = q.reshape(b, lq, k.shape[2], groups, dh)      # query head h = kv head * groups + g
  scores = jnp.einsum('bqngk,bsnk->bngqs', qg, k).astype(jnp.float32) / math.sqrt(dh)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bngqs,bsnk->bqngk', probs, v).reshape(b, lq, h, dh)


def reference(q, k, v, segment_ids=None):
  """The oracle: q [B, L, H, Dh], k, v [B, L, Hkv, Dh] -> [B, L, H, Dh]."""
  return masked(q, k, v, _mask(segment_ids, q.shape[1]))


def dot_product(q, k, v, segment_ids=None, *, implementation: str | None = 'xla'):
  """jax.nn.dot_product_attention with a causal and a document mask."""
  mask = None if segment_ids is None else _mask(segment_ids, q.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation=implementation)


def _cudnn_or_xla(q, k, v, segment_ids=None):
  # cuDNN's flash attention takes half precision and head widths up to 128 only, and
  # JAX checks for cuDNN when tracing: where it is missing (a CPU host exporting for
  # GPU, or tracing this branch for another platform) the XLA path is traced instead.
  if q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0:
    try:
      return dot_product(q, k, v, segment_ids, implementation='cudnn')
    except (RuntimeError, NotImplementedError, ValueError):
      pass
  return dot_product(q, k, v, segment_ids, implementation='xla')


def _splash_kernel(heads: int, length: int, block: int, interpret: bool, shared_kv: bool):
  # Built per trace, not cached: the kernel holds arrays made inside the trace. Its mask
  # preprocessing is cached by splash itself. Imported here: only splash needs it.
  # shared_kv: the MQA kernel, `heads` query heads reading one key/value head.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  make = kernel.make_splash_mqa if shared_kv else kernel.make_splash_mha
  run = make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  return run, kernel.SegmentIds


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
  b, l, h, dh = q.shape
  kv_heads = k.shape[2]
  block = min(SPLASH_BLOCK, -(-l // _LANES) * _LANES)
  padded = -(-l // block) * block
  if segment_ids is None:
    segment_ids = jnp.ones((b, l), jnp.int32)
  # Padding goes after every real token (causality hides it) in a segment of its own.
  pad = lambda a, value: jnp.pad(a, [(0, 0), (0, padded - l)] + [(0, 0)] * (a.ndim - 2),
                                 constant_values=value)
  seg = pad(segment_ids.astype(jnp.int32), -1)
  heads_first = lambda a: jnp.transpose(pad(a, 0), (0, 2, 1, 3))        # [B, H, Lp, Dh]
  scale = jnp.asarray(1 / math.sqrt(dh), q.dtype)  # splash does not scale the scores
  q, k, v = heads_first(q * scale), heads_first(k), heads_first(v)
  if kv_heads == h:
    run, segments = _splash_kernel(h, padded, block, interpret, shared_kv=False)
    out = jax.vmap(lambda q1, k1, v1, s1: run(q1, k1, v1, segment_ids=segments(q=s1, kv=s1)))(
        q, k, v, seg)
  else:
    # Grouped-query: the MQA kernel per key/value head, on that head's group of queries.
    groups = h // kv_heads
    run, segments = _splash_kernel(groups, padded, block, interpret, shared_kv=True)
    per_head = lambda s1: jax.vmap(lambda q1, k1, v1: run(
        q1, k1, v1, segment_ids=segments(q=s1, kv=s1)))
    out = jax.vmap(lambda q1, k1, v1, s1: per_head(s1)(q1, k1, v1))(
        q.reshape(b, kv_heads, groups, padded, dh), k, v, seg).reshape(b, h, padded, dh)
  return jnp.transpose(out, (0, 2, 1, 3))[:, :l]


def splash(q, k, v, segment_ids=None, *, interpret: bool = False):
  """The splash kernel, per device under a mesh: q, k, v [B, L, H, Dh] -> [B, L, H, Dh]."""
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = mesh_axes_here()
  if mesh is None:
    return local(q, k, v, segment_ids)
  batch = tuple(a for a in RULES['batch'] if a in mesh.axis_names)
  tensor = RULES['heads']
  # Heads split over `tensor` only when the key/value heads split too (each device
  # then holds whole groups of query heads with their shared key/value head).
  heads = (tensor if tensor in mesh.axis_names and k.shape[2] % mesh.shape[tensor] == 0
           else None)
  spec = P(batch, None, heads, None)
  # check_vma=False: the kernel's pallas_call does not declare how its output varies
  # over the mesh; every device's output is its own slice, as out_specs says.
  per_device = functools.partial(jax.shard_map, mesh=mesh, out_specs=spec, check_vma=False)
  if segment_ids is None:
    return per_device(lambda q, k, v: local(q, k, v, None), in_specs=(spec,) * 3)(q, k, v)
  return per_device(local, in_specs=(spec,) * 3 + (P(batch, None),))(q, k, v, segment_ids)


def _on_platform(q, k, v, segment_ids, **branches):
  """branches: platform (or default) -> fn(q, k, v, segment_ids), picked when the
  program is lowered (so an AOT compile for TPU from a CPU host gets the TPU branch)."""
  if segment_ids is None:
    drop = lambda fn: lambda q, k, v: fn(q, k, v, None)
    return jax.lax.platform_dependent(q, k, v, **{p: drop(fn) for p, fn in branches.items()})
  return jax.lax.platform_dependent(q, k, v, segment_ids, **branches)


# model.attention -> fn(q, k, v, segment_ids=None) -> [B, L, H, Dh].
ATTENTION = {
    'reference': reference,
    'dot_product': lambda q, k, v, segment_ids=None: _on_platform(
        q, k, v, segment_ids, cuda=_cudnn_or_xla, default=dot_product),
    # Mosaic on TPU; the Pallas interpreter elsewhere (slow: for tests and AOT checks).
    'splash': lambda q, k, v, segment_ids=None: _on_platform(
        q, k, v, segment_ids, tpu=splash,
        default=functools.partial(splash, interpret=True)),
    'auto': lambda q, k, v, segment_ids=None: _on_platform(
        q, k, v, segment_ids, tpu=splash, cuda=_cudnn_or_xla, default=reference),
}
IMPLEMENTATIONS = tuple(ATTENTION)
