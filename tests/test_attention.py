"""Attention: every implementation equals the reference (forward and gradients) under
causal and document masks; in the model, documents of a packed row do not see each
other and rotary positions restart per document, Mixture-of-Depths included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed.config import base_config
from routed.model import attention
from routed.model.transformer import build_model
from routed.step import make_loss_fn

B, L, H, DH = 2, 24, 2, 8
VOCAB = 61


def packed_segments():
  """Two rows: three documents then padding (0); one document filling the row."""
  row0 = np.repeat([1, 2, 3, 0], [7, 5, 9, 3])
  return jnp.asarray(np.stack([row0, np.ones(L, np.int64)]), jnp.int32)


def qkv(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (B, L, H, DH), jnp.float32) for k in keys]


def test_reference_hand_case():
  """Two documents of two tokens: token 2 (first of document 2) sees only itself."""
  q = jnp.zeros((1, 4, 1, 2))                    # equal scores: a mean over visible keys
  v = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1, 1) * jnp.ones((1, 4, 1, 2))
  seg = jnp.array([[1, 1, 2, 2]])
  out = attention.reference(q, q, v, seg)[0, :, 0, 0]
  np.testing.assert_allclose(out, [0.0, 0.5, 2.0, 2.5])
  out = attention.reference(q, q, v, None)[0, :, 0, 0]    # one document: causal mean
  np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.5])


@pytest.mark.parametrize('segments', [True, False], ids=['documents', 'causal_only'])
@pytest.mark.parametrize('name', ['dot_product', 'splash', 'auto'])
def test_implementations_equal_reference(name, segments):
  q, k, v = qkv()
  seg = packed_segments() if segments else None
  fn = attention.ATTENTION[name]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, seg)))
  want = attention.reference(q, k, v, seg)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v, seg), want, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.grad(loss(attention.reference), argnums=(0, 1, 2))(q, k, v)
  for got, exp in zip(grads, ref):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


def test_grouped_query_reference_equals_repeated_heads():
  """GQA by hand: 4 query heads on 2 key/value heads = multi-head attention with each
  key/value head repeated for its 2 query heads (heads 0, 1 read kv 0; 2, 3 read kv 1)."""
  q = jax.random.normal(jax.random.key(3), (B, L, 4, DH))
  k, v = qkv(4)[:2]                                      # [B, L, 2, Dh]
  seg = packed_segments()
  repeat = lambda a: jnp.repeat(a, 2, axis=2)
  np.testing.assert_allclose(attention.reference(q, k, v, seg),
                             attention.reference(q, repeat(k), repeat(v), seg), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('name', ['dot_product', 'splash'])
def test_grouped_query_implementations_equal_reference(name):
  """4 query heads sharing 2 key/value heads (splash: its MQA kernel per kv head),
  forward and gradients, over packed documents."""
  q = jax.random.normal(jax.random.key(3), (B, L, 4, DH))
  k, v = qkv(4)[:2]
  seg = packed_segments()
  fn = attention.ATTENTION[name]
  np.testing.assert_allclose(jax.jit(fn)(q, k, v, seg), attention.reference(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, seg)))
  grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  for got, exp in zip(grads, jax.grad(loss(attention.reference), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['dot_product', 'auto'])
def test_bfloat16_traces_every_platform_branch(name):
  """bfloat16 takes the cuDNN branch on GPU; tracing it here (no cuDNN) must fall back
  to the XLA path rather than fail, and the result is the reference's."""
  q, k, v = [a.astype(jnp.bfloat16) for a in qkv()]
  seg = packed_segments()
  got = jax.jit(attention.ATTENTION[name])(q, k, v, seg).astype(jnp.float32)
  want = attention.reference(q, k, v, seg).astype(jnp.float32)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def tiny_cfg(**over):
  c = base_config()
  c.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=64)
  c.moe.update(num_experts=4, eval_capacity_factor=4.0)   # no drops at eval
  c.train.seq_len = L
  for key, value in over.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


@functools.lru_cache(maxsize=None)
def model_fn(**over):
  cfg = tiny_cfg(**over)
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  apply = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(
      t, train=False, positions=pos, segment_ids=seg)[0])
  return cfg, graphdef, nnx.to_pure_dict(state), apply


def doc_row(first, second):
  """One row [first, second] with segment ids 1, 2 and positions restarting at second."""
  tokens = jnp.asarray([list(first) + list(second)], jnp.int32)
  seg = jnp.asarray([[1] * len(first) + [2] * len(second)], jnp.int32)
  pos = jnp.asarray([list(range(len(first))) + list(range(len(second)))], jnp.int32)
  return tokens, pos, seg


@pytest.mark.parametrize('moe_every', [0, 2], ids=['dense', 'switch'])
def test_documents_do_not_see_each_other(moe_every):
  """A document's logits are the same whatever precedes it in the row, and the same
  as when it is a row of its own (positions restart)."""
  _, _, params, apply = model_fn(**{'moe.every': moe_every})
  rng = np.random.default_rng(0)
  a, a2 = rng.integers(1, VOCAB, (2, 10))
  b = rng.integers(1, VOCAB, 14)
  t1, p1, s1 = doc_row(a, b)
  t2, p2, s2 = doc_row(a2, b)
  out1, out2 = apply(params, t1, p1, s1), apply(params, t2, p2, s2)
  np.testing.assert_allclose(out1[:, 10:], out2[:, 10:], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out1[:, :10], out2[:, :10])
  alone = jnp.asarray([list(b) + [0] * 10], jnp.int32)    # b at the start of a row
  pos = jnp.asarray([list(range(24))], jnp.int32)
  out_alone = apply(params, alone, pos, jnp.ones_like(alone))
  np.testing.assert_allclose(out1[:, 10:], out_alone[:, :14], rtol=1e-5, atol=1e-5)
  # Without segment ids (data.cross_document_attention=true), b does see a.
  cross1 = apply(params, t1, jnp.broadcast_to(jnp.arange(24), (1, 24)), None)
  cross2 = apply(params, t2, jnp.broadcast_to(jnp.arange(24), (1, 24)), None)
  assert not np.allclose(cross1[:, 10:], cross2[:, 10:])


def mod_batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, VOCAB, (B, L + 1))
  seg = np.stack([np.repeat([1, 2, 3, 0], [8, 6, 8, 3]), np.ones(L + 1, np.int64)])
  pos = np.stack([np.concatenate([np.arange(n) for n in (8, 6, 8, 3)]), np.arange(L + 1)])
  tokens[seg == 0] = 0
  return {'tokens': jnp.asarray(tokens, jnp.int32), 'segment_ids': jnp.asarray(seg, jnp.int32),
          'positions': jnp.asarray(pos, jnp.int32)}


MOD = {'mod.enabled': True, 'mod.capacity': 0.5, 'mod.eval_capacity': 0.5}


@functools.lru_cache(maxsize=None)
def mod_grads(impl: str, train: bool):
  cfg, graphdef, params, _ = model_fn(**MOD, **{'model.attention': impl})
  loss_fn = make_loss_fn(graphdef, cfg)
  batch = mod_batch()
  return jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), train),
                          has_aux=True))(params)


@pytest.mark.parametrize('name,train', [
    ('splash', True), ('dot_product', False),
    pytest.param('splash', False, marks=pytest.mark.slow),
    pytest.param('dot_product', True, marks=pytest.mark.slow)])
def test_mod_model_equals_reference(name, train):
  """Mixture-of-Depths (MoDE: MoD around MoE blocks) gathers token subsets with their
  positions and segment ids; loss and gradients agree with the reference attention."""
  (g_ref, m_ref), (g, m) = mod_grads('reference', train), mod_grads(name, train)
  np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
  assert 0 < float(m['moe/layer1/mod_chosen']) < 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
