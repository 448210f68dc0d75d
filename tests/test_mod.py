"""Mixture-of-Depths: routing, positions, residual, gradients, causality, FLOPs, MoDE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed import cli
from routed import step as step_lib
from routed.config import base_config
from routed.model import mod as mod_lib
from routed.model import mod_causal
from routed.model.accounting import model_size
from routed.model.transformer import Block, build_model
from routed.validate import validate_model

B, L, D = 2, 16, 16


def tiny_cfg(**mod):
  c = base_config()
  c.model.update(d_model=D, num_heads=2, num_layers=2, d_ff=32)
  c.moe.every = 0
  c.train.seq_len = L
  c.mod.update(enabled=True, every=2, **mod)
  return c


def make_block(cfg, seed=0):
  rngs = nnx.Rngs(params=seed)
  block = Block(cfg, moe=False, rngs=rngs)
  return mod_lib.MoDBlock(cfg.mod, block, d_model=D, param_dtype=jnp.float32, rngs=rngs)


def inputs(seed=1):
  x = jax.random.normal(jax.random.key(seed), (B, L, D))
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  return x, pos


def apply(model, tokens, train):
  """The model's forward pass, jit-compiled (faster than op-by-op for whole models)."""
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, train=train, rng=jax.random.key(0)))(
      params, tokens)


def router_logits(blk, x):
  return np.asarray(x @ blk.router[...])


def test_capacity_one_equals_plain_block_with_router_weight_folded_in():
  blk = make_block(tiny_cfg(capacity=1.0))
  x, pos = inputs()
  out, _ = blk(x, pos, train=True)
  plain, _ = blk.block(x, pos, train=True)
  g = jax.nn.sigmoid(router_logits(blk, x))[..., None]
  # x + g * (block(x) - x): the residual once, the block's update scaled by g.
  np.testing.assert_allclose(out, x + g * (plain - x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, plain, atol=1e-3)  # g ~ 1/2 really scales


def test_selected_indices_are_the_true_topk_and_the_rest_skip():
  cfg = tiny_cfg(capacity=0.25)             # K = round(0.25 * 16) = 4
  assert mod_lib.buffer_size(0.25, L) == 4
  blk = make_block(cfg)
  x, pos = inputs()
  logits = router_logits(blk, x)
  _, _, member, idx, valid = blk.route(x, train=True)
  expected = np.sort(np.argsort(-logits, axis=-1)[:, :4], axis=-1)
  np.testing.assert_array_equal(idx, expected)
  assert bool(valid.all())
  assert np.asarray(member).sum(axis=-1).tolist() == [4, 4]
  out, _ = blk(x, pos, train=True)
  changed = np.any(np.asarray(out) != np.asarray(x), axis=-1)       # [B, L]
  np.testing.assert_array_equal(changed, np.asarray(member))


def test_topk_selection_hand_case():
  logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
  np.testing.assert_array_equal(mod_lib.topk_selection(logits, 2), [[1, 3]])  # in order


def test_causal_selection_hand_cases():
  decide = jnp.array([[True, False, True, True, True], [False] * 5])
  idx, valid = mod_lib.causal_selection(decide, 2)
  # Row 0: the first two chosen tokens (0, 2); token 3 and 4 exceed K=2.
  np.testing.assert_array_equal(idx, [[0, 2], [5, 5]])
  np.testing.assert_array_equal(valid, [[True, True], [False, False]])


def test_routed_tokens_keep_their_true_positions():
  cfg = tiny_cfg(capacity=0.25)
  cfg.model.init_std = 0.5  # attention far from uniform, so positions matter
  blk = make_block(cfg)
  x, pos = inputs()
  out, _ = blk(x, pos, train=True)
  _, _, _, idx, _ = blk.route(x, train=True)
  rows = np.arange(B)[:, None]
  xs = x[rows, idx]
  g = jax.nn.sigmoid(router_logits(blk, x))[rows, idx][..., None]
  true_pos, _ = blk.block(xs, idx, train=True)                       # positions = indices
  np.testing.assert_allclose(out[rows, idx], xs + g * (true_pos - xs), rtol=1e-5, atol=1e-5)
  renumbered, _ = blk.block(xs, pos[:, :4], train=True)             # the bug: 0..K-1
  assert not np.allclose(out[rows, idx], xs + g * (renumbered - xs), atol=1e-2)


@pytest.mark.parametrize('rule', ['aux_loss', 'predictor'])
def test_router_receives_gradients_from_the_lm_loss(rule):
  cfg = tiny_cfg(capacity=0.25, causal_rule=rule, aux_loss_weight=0.0)  # LM loss only
  model = build_model(cfg, 50, 0)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  tokens = step_lib.token_batch(jax.random.randint(jax.random.key(0), (B, L + 1), 0, 50))
  loss_fn = step_lib.make_loss_fn(graphdef, cfg)
  grad_fn = jax.jit(jax.grad(lambda p, t: loss_fn(p, t, None, True), has_aux=True))
  grads, metrics = grad_fn(params, tokens)
  assert float(jnp.abs(grads['blocks'][1]['router']).max()) > 0
  assert 0 <= float(metrics['moe/layer1/mod_causal_acc']) <= 1
  if rule == 'predictor':
    # Stop-gradient inputs: the predictor cannot move the LM, and the LM loss alone
    # (weight 0 for the rule's loss) gives it nothing.
    assert float(jnp.abs(grads['blocks'][1]['predictor']['w1']).max()) == 0
    cfg.mod.aux_loss_weight = 1.0
    loss_fn = step_lib.make_loss_fn(graphdef, cfg)
    grads, _ = jax.jit(jax.grad(lambda p, t: loss_fn(p, t, None, True), has_aux=True))(
        params, tokens)
    assert float(jnp.abs(grads['blocks'][1]['predictor']['w1']).max()) > 0


def test_causal_rule_loss_hand_case():
  logits = jnp.array([[0.0, 2.0, -1.0]])
  member = jnp.array([[True, True, False]])
  # log 2, log(1 + e^-2), log(1 + e^-1)
  want = np.mean([np.log(2), np.log1p(np.exp(-2)), np.log1p(np.exp(-1))])
  np.testing.assert_allclose(mod_causal.bce(logits, member), want, rtol=1e-6)
  np.testing.assert_allclose(mod_causal.accuracy(logits, member), 2 / 3)  # 0 is not > 0


@pytest.mark.parametrize('rule', ['aux_loss', 'predictor'])
def test_sampling_mode_is_causal(rule):
  cfg = tiny_cfg(capacity=0.25, eval_capacity=0.5, causal_rule=rule)
  with cfg.unlocked():
    cfg.model.num_layers = 4
  model = build_model(cfg, 50, 0)
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, 50)
  t = 7
  later = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 17) % 50)
  a, aux = apply(model, tokens, False)
  b, _ = apply(model, later, False)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
  chosen = float(aux['metrics']['layer1/mod_chosen'])
  assert 0 < chosen <= 0.5   # the rule chose some tokens, at most eval_capacity
  assert mod_lib.is_causal(cfg, train=False) and not mod_lib.is_causal(cfg, train=True)


def test_sampling_mode_with_no_token_chosen_is_the_identity():
  blk = make_block(tiny_cfg(capacity=0.25))
  blk.router[...] = -jnp.abs(blk.router[...])    # all-positive inputs: every logit < 0
  x = jnp.abs(inputs()[0]) + 0.1
  out, aux = blk(x, inputs()[1], train=False)
  np.testing.assert_array_equal(out, x)
  assert float(aux['metrics']['mod_chosen']) == 0


def test_flops_fall_with_capacity():
  dense = tiny_cfg()
  dense.mod.enabled = False
  base = model_size(dense, 100)
  flops = [model_size(tiny_cfg(capacity=c), 100).train_flops_per_token
           for c in (1.0, 0.5, 0.125)]
  assert flops[0] > flops[1] > flops[2]
  # Capacity 1: the dense model plus the router (D matmul params, 6 FLOPs each, one block).
  assert flops[0] == base.train_flops_per_token + 6 * D
  # Capacity 1/2 in block 2 of 2: matmuls halve, attention quarters.
  block = 4 * D * D + 2 * D * 32
  want = base.train_flops_per_token + 6 * D - 6 * block / 2 - 6 * 2 * D * L * 3 / 4
  assert flops[1] == pytest.approx(want)


def test_mode_configs():
  staged = cli.load_config('configs/mode_base.py:tiny')
  with staged.unlocked():
    staged.model.update(d_model=D, num_heads=2, d_ff=32)
    staged.train.seq_len = L
  validate_model(staged)
  model = build_model(staged, 50, 0)
  # Staged: the MoE layer sits inside the MoD block and routes only its K tokens.
  assert isinstance(model.blocks[1], mod_lib.MoDBlock)
  assert type(model.blocks[1].block.ffn).__name__ == 'MoELayer'
  _, aux = apply(model, jnp.zeros((1, L), jnp.int32), True)
  assert set(aux['losses']) == {'balance', 'z', 'mod_causal'}
  integrated = cli.load_config('configs/mode_base.py:integrated_tiny')
  validate_model(integrated)
  assert not integrated.mod.enabled
  assert integrated.moe.num_null_experts == integrated.moe.num_experts  # no-op experts


@pytest.mark.parametrize('key,value', [('capacity', 0.0), ('capacity', 1.5),
                                       ('eval_capacity', 0.1), ('causal_rule', 'oracle'),
                                       ('every', 0)])
def test_bad_mod_config_is_a_usage_error(key, value):
  cfg = tiny_cfg()
  cfg.mod[key] = value
  with pytest.raises(cli.UsageError, match=f'mod.{key}'):
    validate_model(cfg)


def test_model_routing_mode_names_mod_and_causality():
  from routed.model import moe  # pylint: disable=g-import-not-at-top
  from routed.model.transformer import is_causal, routing_mode  # pylint: disable=g-import-not-at-top
  cfg = tiny_cfg()
  assert not is_causal(cfg, train=True) and is_causal(cfg, train=False)
  assert 'MoD causal rule' in routing_mode(cfg, train=False)
  assert 'MoD top-' in routing_mode(cfg, train=True)
  cfg.mod.enabled = False
  assert routing_mode(cfg, train=False) == moe.routing_mode(cfg, train=False)
