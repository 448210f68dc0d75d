"""Model tests: shapes, causality, Switch capacity semantics, losses, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed.config import base_config
from routed.model import routers
from routed.model.accounting import model_size
from routed.model.dispatch import einsum_dispatch
from routed.model.moe import Experts
from routed.model.transformer import build_model

VOCAB = 97


def tiny_config(**moe):
  c = base_config()
  c.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=64)
  c.moe.update(num_experts=4, **moe)
  c.train.seq_len = 12
  return c


@pytest.fixture(scope='module')
def switch_model():
  cfg = tiny_config(eval_capacity_factor=0.5)  # small capacity: dropping happens
  model = build_model(cfg, VOCAB, seed=0)
  graphdef, state = nnx.split(model, nnx.Param)
  apply = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, train=False), )
  return cfg, nnx.to_pure_dict(state), apply


def test_shapes_and_aux(switch_model):
  cfg, params, apply = switch_model
  tokens = jnp.zeros((3, 12), jnp.int32)
  logits, aux = apply(params, tokens)
  assert logits.shape == (3, 12, VOCAB) and logits.dtype == jnp.float32
  assert set(aux['losses']) == {'balance', 'z'}
  # Block 2 of 2 is the MoE block (every other block, counting from 1).
  assert aux['metrics']['layer1/expert_load'].shape == (4,)
  assert 'layer0/expert_load' not in aux['metrics']


def test_switch_model_is_causal(switch_model):
  """Changing later tokens leaves earlier logits unchanged, dropping included."""
  _, params, apply = switch_model
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (4, 12))
  perturbed = tokens.copy()
  perturbed[:, 7:] = rng.integers(0, VOCAB, (4, 5))
  a, aux = apply(params, jnp.asarray(tokens))
  b, _ = apply(params, jnp.asarray(perturbed))
  assert float(aux['metrics']['layer1/dropped']) > 0  # capacity really binds here
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_switch_routing_hand_computed():
  # One group of 5 tokens, 2 experts, capacity factor 0.8:
  # C = ceil(0.8 * 5 * 1 / 2) = ceil(2.0) = 2 slots per expert.
  # argmax experts by token: [0, 0, 1, 0, 1]; expert 0 fills slots 0, 1 with tokens
  # 0 and 1, so token 3 (its third) is dropped; expert 1 takes tokens 2, 4 in slots 0, 1.
  logits = jnp.log(jnp.array([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]]]))
  router = routers.SwitchRouter(2, 2, capacity_factor=0.8, eval_capacity_factor=0.8,
                                init_scale=0.1, jitter=0.0, rngs=nnx.Rngs(0))
  routing, losses, metrics = router.route(logits, train=True)
  assert routing.capacity == 2
  np.testing.assert_array_equal(routing.expert[0, :, 0], [0, 0, 1, 0, 1])
  np.testing.assert_array_equal(routing.slot[0, :, 0], [0, 1, 0, 2, 1])
  np.testing.assert_allclose(routing.weight[0, :, 0], [0.9, 0.6, 0.7, 0.0, 0.9], rtol=1e-6)
  np.testing.assert_allclose(metrics['dropped'], 1 / 5, rtol=1e-6)
  # f = [3/5, 2/5]; P = mean probs = [2.7/5, 2.3/5]; balance = 2 * (0.6*0.54 + 0.4*0.46).
  np.testing.assert_allclose(metrics['expert_load'], [0.6, 0.4], rtol=1e-6)
  np.testing.assert_allclose(losses['balance'], 2 * (0.6 * 0.54 + 0.4 * 0.46), rtol=1e-5)
  # z-loss: logsumexp of log-probabilities is log(1) = 0.
  np.testing.assert_allclose(losses['z'], 0.0, atol=1e-6)


def test_balance_loss_is_one_when_uniform():
  probs = jnp.full((2, 8, 4), 0.25)
  first = jnp.tile(jnp.arange(4), 4).reshape(2, 8)
  loss, load = routers.balance_loss(probs, jax.nn.one_hot(first, 4))
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(load, 0.25, rtol=1e-6)


@pytest.mark.parametrize('capacity_factor', [0.3, 1.0, 4.0])
def test_switch_capacity_invariants(capacity_factor):
  router = routers.SwitchRouter(16, 4, capacity_factor=capacity_factor, eval_capacity_factor=1,
                                init_scale=10.0, jitter=0.0, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 40, 16))
  routing, _, metrics = router(x, train=True)
  c = routing.capacity
  assert c == routers.expert_capacity(40, 4, 1, capacity_factor)
  kept = routing.slot < c
  for g in range(3):
    for e in range(4):
      slots = np.asarray(routing.slot[g][(routing.expert[g] == e) & kept[g]])
      assert len(slots) <= c and len(set(slots.tolist())) == len(slots)  # no slot used twice
  w = np.asarray(routing.weight)
  assert (w >= 0).all() and (w <= 1).all()
  assert (w[~np.asarray(kept)] == 0).all() and (w[np.asarray(kept)] > 0).all()
  np.testing.assert_allclose(metrics['dropped'], 1 - np.mean(kept), rtol=1e-6)


def test_einsum_dispatch_hand_computed():
  """Experts that scale by (e + 1): y = weight * (expert + 1) * x, 0 when dropped."""
  routing = routers.Routing(expert=jnp.array([[[0], [1], [0]]]), slot=jnp.array([[[0], [0], [1]]]),
                            weight=jnp.array([[[0.5], [0.25], [0.0]]]), capacity=1)

  class Scale:
    num_experts = 2

    def __call__(self, buffers):  # [E, G, C, D]
      return buffers * jnp.arange(1, 3, dtype=buffers.dtype)[:, None, None, None]

  x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
  y = einsum_dispatch(x, routing, Scale())
  np.testing.assert_allclose(y, [[[0.5, 1.0], [1.5, 2.0], [0.0, 0.0]]])


def test_router_gets_gradients():
  cfg = tiny_config()
  model = build_model(cfg, VOCAB, seed=0)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p)(jnp.ones((2, 12), jnp.int32), train=True,
                                         rng=jax.random.key(0))
    return jnp.mean(logits ** 2) + aux['losses']['balance']

  grads = jax.grad(loss)(params)
  router_grad = grads['blocks'][1]['ffn']['router']['kernel']
  assert float(jnp.abs(router_grad).sum()) > 0


def test_experts_apply_their_own_weights():
  experts = Experts(3, 4, 8, activation='relu', init_std=0.5, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 2, 5, 4))
  y = experts(x)
  for e in range(3):
    expected = jax.nn.relu(x[e] @ experts.wi[e]) @ experts.wo[e]
    np.testing.assert_allclose(y[e], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('every,tie,moe', [
    (2, True, {}), (0, False, {}), (1, True, {}),
    (2, True, {'router': 'topk', 'top_k': 2, 'num_null_experts': 2}),
    (2, True, {'expert_d_ff': 24, 'num_shared_experts': 2}),
    (2, True, {'router': 'expert_choice'}), (2, True, {'router': 'soft', 'slots_per_expert': 2}),
    (2, True, {'router': 'hash'}), (2, True, {'router': 'sbase'}),
    (2, True, {'router': 'reinforce'})])
def test_parameter_count_matches_accounting(every, tie, moe):
  cfg = tiny_config(every=every)
  cfg.model.tie_embeddings = tie
  cfg.moe.update(moe)
  model = build_model(cfg, VOCAB, seed=0)
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert model_size(cfg, VOCAB).total_params == counted


def test_flops_follow_what_each_router_runs():
  """Per MoE layer and token: expert choice runs E * C / S expert MLPs, Soft MoE
  E * P / S plus its token mixing, hash no router matmul."""
  base = tiny_config()
  d, f, e, s = base.model.d_model, base.model.d_ff, base.moe.num_experts, base.train.seq_len
  switch = model_size(base, VOCAB).train_flops_per_token
  expert = 2 * d * f

  def flops(**moe):
    cfg = tiny_config()
    cfg.moe.update(moe)
    return model_size(cfg, VOCAB).train_flops_per_token

  assert flops(router='hash') == switch - 6 * d * e
  c = -(-2 * s // e)  # ceil(cf * S / E), cf 2
  assert flops(router='expert_choice', capacity_factor=2.0) == pytest.approx(
      switch + 6 * (e * c / s - 1) * expert)
  assert flops(router='soft', slots_per_expert=2) == pytest.approx(
      switch + 6 * (3 * d * e * 2 - d * e) + 6 * (e * 2 / s - 1) * expert)
  assert flops(num_shared_experts=1) == switch + 6 * expert


def test_dense_and_switch_have_matched_active_flops():
  switch = tiny_config()
  dense = tiny_config(every=0)
  s, d = model_size(switch, VOCAB), model_size(dense, VOCAB)
  router_flops = 6 * 32 * 4 * 1  # D x E router matmul in the one MoE block
  assert s.train_flops_per_token - d.train_flops_per_token == router_flops
  assert s.total_params > d.total_params


def test_moe_1b_counts():
  """configs/moe_1b.py: 1,073,842,176 active and 13,556,090,880 total parameters
  (vocabulary 32,000, tied embeddings), counted by hand from its shape."""
  from routed import cli  # pylint: disable=g-import-not-at-top
  cfg = cli.load_config('configs/moe_1b.py')
  d, f, e, v = 2048, 4096, 64, 32000
  attn, norms, mlp = 4 * d * d, 2 * d, 2 * d * f
  dense_block = attn + norms + mlp
  moe_fixed = attn + norms + d * e                      # + the router kernel
  embed = v * d + d                                     # tied embedding, final norm
  total = 12 * dense_block + 12 * (moe_fixed + e * mlp) + embed
  active = 12 * dense_block + 12 * (moe_fixed + 2 * mlp) + embed
  size = model_size(cfg, v)
  assert (size.total_params, size.active_params) == (total, active) == (
      13_556_090_880, 1_073_842_176)
