"""Router tests: hand-computed cases, invariants, known limits, balance scopes, config checks.

Model-level properties (causality, gradients, every router in a model) are in
tests/test_routing_model.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed import cli
from routed.config import base_config
from routed.model import routers
from routed.model.dispatch import einsum_dispatch
from routed.model.expert_choice import ExpertChoiceRouter
from routed.model.hash_router import HashRouter, hash_expert
from routed.model.moe import MoELayer
from routed.model.reinforce import ReinforceRouter, reinforce_loss
from routed.model.routers import SwitchRouter, TokenChoiceRouter
from routed.model.sbase import SBaseRouter, sinkhorn_log
from routed.model.soft_moe import SoftRouter, SoftRouting, soft_weights
from routed.validate import validate_model, validate_training

D = 8
FAST_COMPILE = {'xla_backend_optimization_level': 0}  # tiny graphs: compile time is all


def make(cls, num_experts, **kwargs):
  args = dict(capacity_factor=1.0, eval_capacity_factor=1.0, init_scale=0.1, jitter=0.0,
              rngs=nnx.Rngs(0))
  args.update(kwargs)
  return cls(D, num_experts, **args)


def route(router, logits, train, rng=None):
  """router.route, jit-compiled: one compile is much cheaper than running op by op."""
  return jax.jit(router.route, static_argnames='train', compiler_options=FAST_COMPILE)(
      logits, train=train, rng=rng)


def call(module, x, train, rng=None, token_ids=None):
  """module(x, train=...), jit-compiled."""
  return jax.jit(lambda x, rng, ids: module(x, train=train, rng=rng, token_ids=ids),
                 compiler_options=FAST_COMPILE)(x, rng, token_ids)


def log(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))[None]  # one group: [1, S, E]


class Scale:
  """Experts that multiply their buffer by (e + 1): easy to follow by hand."""

  def __init__(self, num_experts):
    self.num_experts = num_experts

  def __call__(self, buffers):  # [E, G, C, D]
    return buffers * jnp.arange(1, self.num_experts + 1, dtype=buffers.dtype)[:, None, None, None]


# ---------------------------------------------------------------- token choice


def test_topk_hand_computed():
  # 4 tokens, 3 experts, k = 2, renormalised; C = ceil(0.75 * 4 * 2 / 3) = 2.
  probs = [[0.5, 0.3, 0.2],    # top-2 (0, 1): .5, .3 -> renormalised .625, .375
           [0.6, 0.1, 0.3],    # (0, 2): .6, .3 -> 2/3, 1/3
           [0.1, 0.7, 0.2],    # (1, 2): .7, .2 -> 7/9, 2/9
           [0.4, 0.35, 0.25]]  # (0, 1): .4, .35 -> 8/15, 7/15
  router = make(TokenChoiceRouter, 3, top_k=2, renormalize=True, capacity_factor=0.75)
  routing, losses, metrics = route(router, log(probs), True)
  assert routing.capacity == 2
  np.testing.assert_array_equal(routing.expert[0], [[0, 1], [0, 2], [1, 2], [0, 1]])
  # Slots fill token by token: expert 0 takes tokens 0, 1 (slots 0, 1) and token 3
  # comes third (slot 2 >= C: dropped); expert 1 takes tokens 0, 2, then token 3 is
  # dropped; expert 2 takes tokens 1, 2.
  np.testing.assert_array_equal(routing.slot[0], [[0, 0], [1, 0], [1, 1], [2, 2]])
  np.testing.assert_allclose(routing.weight[0], [[0.625, 0.375], [2 / 3, 1 / 3],
                                                 [7 / 9, 2 / 9], [0, 0]], rtol=1e-5)
  np.testing.assert_allclose(metrics['dropped'], 2 / 8, rtol=1e-6)
  np.testing.assert_allclose(metrics['experts_per_token'], 2.0)
  # f counts all k choices: expert 0 has 3 of 8, expert 1 has 3, expert 2 has 2.
  # P = column means of probs = [1.6, 1.45, 0.95] / 4.
  np.testing.assert_allclose(metrics['expert_load'], [3 / 8, 3 / 8, 2 / 8], rtol=1e-6)
  balance = 3 * (3 / 8 * 0.4 + 3 / 8 * 0.3625 + 2 / 8 * 0.2375)  # = 1.0359375
  np.testing.assert_allclose(losses['balance'], balance, rtol=1e-5)
  np.testing.assert_allclose(losses['z'], 0.0, atol=1e-6)  # logsumexp(log probs) = 0


def test_top_p_hand_computed():
  # top_p = 0.6, at most 3: a choice is active while the mass before it is < 0.6.
  probs = [[0.5, 0.3, 0.2],   # masses before: 0, .5, .8 -> first two active
           [0.7, 0.2, 0.1]]   # masses before: 0, .7, .9 -> only the first
  router = make(TokenChoiceRouter, 3, top_k=3, top_p=0.6, capacity_factor=10.0)
  routing, _, metrics = route(router, log(probs), True)
  np.testing.assert_allclose(routing.weight[0], [[0.5, 0.3, 0.0], [0.7, 0.0, 0.0]], rtol=1e-6)
  assert (routing.slot[0][routing.weight[0] == 0] >= routing.capacity).all()  # no slot taken
  np.testing.assert_allclose(metrics['experts_per_token'], 1.5)
  # f over the 3 active choices: expert 0 twice, expert 1 once.
  np.testing.assert_allclose(metrics['expert_load'], [2 / 3, 1 / 3, 0], rtol=1e-6)


def test_sigmoid_gate_hand_computed():
  # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4; normalised by their
  # sum 3/2: [1/3, 1/2, 1/6]. Top-2 = experts (1, 0); renormalised: (1/2, 1/3) / (5/6).
  logits = jnp.array([[[0.0, np.log(3), -np.log(3)]]])
  router = make(TokenChoiceRouter, 3, top_k=2, gate='sigmoid', renormalize=True,
                capacity_factor=10.0)
  routing, _, metrics = route(router, logits, True)
  np.testing.assert_array_equal(routing.expert[0, 0], [1, 0])
  np.testing.assert_allclose(routing.weight[0, 0], [0.6, 0.4], rtol=1e-6)
  entropy = -(np.log(1 / 3) / 3 + np.log(1 / 2) / 2 + np.log(1 / 6) / 6)
  np.testing.assert_allclose(metrics['entropy'], entropy, rtol=1e-5)


def test_null_experts_hand_computed():
  # 2 real experts + 1 null (index 2), top-2 renormalised over all chosen, null included.
  probs = [[0.5, 0.2, 0.3],   # experts (0, null): .5/.8 = .625 on expert 0; null's .375 is lost
           [0.1, 0.6, 0.3]]   # (1, null): .6/.9 = 2/3 on expert 1
  router = make(TokenChoiceRouter, 2, top_k=2, renormalize=True, num_null_experts=1,
                capacity_factor=0.75)
  routing, _, metrics = route(router, log(probs), True)
  # C = ceil(0.75 * 2 tokens * 2 choices / 3 scored experts) = 1; null choices take no slot.
  assert routing.capacity == 1
  np.testing.assert_allclose(routing.weight[0], [[0.625, 0], [2 / 3, 0]], rtol=1e-6)
  np.testing.assert_array_equal(routing.slot[0, :, 0], [0, 0])
  assert (routing.slot[0, :, 1] >= 1).all()
  np.testing.assert_allclose(metrics['null'], 0.5)       # 2 of 4 choices were null
  np.testing.assert_allclose(metrics['dropped'], 0.0)    # nulls are not drops
  np.testing.assert_allclose(metrics['experts_per_token'], 1.0)
  # Zero compute: the dispatch tensor has one entry per placed real choice only.
  dispatch, _ = routing.dense(2)
  assert float(dispatch.sum()) == 2.0


def test_relu_gate_hand_computed():
  # gates = relu([1, -0.5, 0.25]) = [1, 0, 0.25]; top-3 by gate: experts (0, 2, 1),
  # active where the gate is positive: the first two, weights 1 and 0.25 (unnormalised).
  logits = jnp.array([[[1.0, -0.5, 0.25]]])
  router = make(TokenChoiceRouter, 3, top_k=3, gate='relu', relu_target=1.0,
                capacity_factor=10.0)
  routing, losses, metrics = route(router, logits, True)
  np.testing.assert_array_equal(routing.expert[0, 0, :2], [0, 2])
  np.testing.assert_allclose(routing.weight[0, 0], [1.0, 0.25, 0.0])
  np.testing.assert_allclose(metrics['experts_per_token'], 2.0)
  # L1: f = [1/2, 0, 1/2] (active choices), mean gates = [1, 0, .25]:
  # 3 * (.5 * 1 + .5 * .25) = 1.875, applied since 2 active > target 1.
  np.testing.assert_allclose(losses['relu_l1'], 1.875, rtol=1e-6)
  relaxed = make(TokenChoiceRouter, 3, top_k=3, gate='relu', relu_target=2.0,
                 capacity_factor=10.0)
  np.testing.assert_allclose(route(relaxed, logits, True)[1]['relu_l1'], 0.0)


def test_topk_with_all_experts_is_the_dense_softmax_mixture():
  """k = E and unbounded capacity: y = sum_e softmax(x W)_e * expert_e(x)."""
  cfg = base_config().moe
  cfg.update(router='topk', num_experts=4, top_k=4, capacity_factor=4.0, jitter=0.0,
             router_init_scale=10.0)
  layer = MoELayer(cfg, d_model=D, d_ff=16, activation='gelu', init_std=0.5,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, D))
  y, aux = call(layer, x, True)
  probs = jax.nn.softmax(x @ layer.router.kernel[...], axis=-1)                     # [G, S, E]
  every = layer.experts(jnp.broadcast_to(x, (4,) + x.shape))                         # [E, G, S, D]
  np.testing.assert_allclose(y, jnp.einsum('gse,egsd->gsd', probs, every), rtol=1e-4, atol=1e-5)
  assert float(aux['metrics']['dropped']) == 0


def test_shared_experts_add_a_dense_path():
  cfg = base_config().moe
  cfg.update(router='topk', num_experts=4, top_k=2, num_shared_experts=2, expert_d_ff=8)
  layer = MoELayer(cfg, d_model=D, d_ff=16, activation='relu', init_std=0.5,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert layer.shared.wi.shape == (D, 2 * 8) and layer.experts.wi.shape == (4, D, 8)
  x = jax.random.normal(jax.random.key(2), (2, 6, D))
  y, _ = call(layer, x, False)
  decision, _, _ = call(layer.router, x, False)
  routed = einsum_dispatch(x, decision, layer.experts)
  np.testing.assert_allclose(y - routed, layer.shared(x)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- other routers


def test_expert_choice_hand_computed():
  probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]
  # cf 1: C = ceil(1 * 4 / 2) = 2. Expert 0's top-2 tokens by probability: t0 (.9),
  # t3 (.8); expert 1's: t2 (.7), t1 (.4). Each token is then taken by exactly one.
  router = make(ExpertChoiceRouter, 2, capacity_factor=1.0, eval_capacity_factor=0.5)
  routing, losses, metrics = route(router, log(probs), True)
  assert routing.capacity == 2 and set(losses) == {'z'}
  np.testing.assert_array_equal(routing.expert[0], [[0, 1]] * 4)   # K = E choices
  np.testing.assert_array_equal(routing.slot[0], [[0, 2], [2, 1], [2, 0], [1, 2]])
  np.testing.assert_allclose(routing.weight[0], [[0.9, 0], [0, 0.4], [0, 0.7], [0.8, 0]])
  np.testing.assert_allclose(metrics['dropped'], 0.0)
  np.testing.assert_allclose(metrics['expert_load'], [0.5, 0.5])
  # Eval cf 0.5: C = 1; expert 0 takes t0, expert 1 takes t2; t1 and t3 get nothing.
  routing, _, metrics = route(router, log(probs), False)
  np.testing.assert_allclose(routing.weight[0], [[0.9, 0], [0, 0], [0, 0.7], [0, 0]])
  np.testing.assert_allclose(metrics['dropped'], 0.5)


def test_soft_weights_hand_computed():
  # One token group of 2 tokens, 1 expert with 2 slots; logits [s, p]:
  #   token 0: [0, ln 3], token 1: [0, 0].
  # Dispatch (softmax over tokens per slot): slot 0 [1/2, 1/2], slot 1 [3/4, 1/4].
  # Combine (softmax over slots per token): token 0 [1/4, 3/4], token 1 [1/2, 1/2].
  logits = jnp.array([[[[0.0, np.log(3)]], [[0.0, 0.0]]]])          # [1, 2, 1, 2]
  routing = soft_weights(logits)
  np.testing.assert_allclose(routing.dispatch[0, :, 0], [[0.5, 0.75], [0.5, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(routing.combine[0, :, 0], [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)
  # Identity experts: slot 0 = (x0 + x1) / 2, slot 1 = .75 x0 + .25 x1;
  # y0 = .25 slot0 + .75 slot1 = .6875 x0 + .3125 x1; y1 = .625 x0 + .375 x1.
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  y = einsum_dispatch(x, routing, Scale(1))
  np.testing.assert_allclose(y[0], [[0.6875, 0.3125], [0.625, 0.375]], rtol=1e-6)


def test_soft_router_invariants():
  router = SoftRouter(D, 3, slots_per_expert=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  routing, losses, metrics = call(router, x, True)
  assert isinstance(routing, SoftRouting) and routing.capacity == 2 and losses == {}
  np.testing.assert_allclose(routing.dispatch.sum(axis=1), 1.0, rtol=1e-5)      # per slot
  np.testing.assert_allclose(routing.combine.sum(axis=(2, 3)), 1.0, rtol=1e-5)  # per token
  assert (routing.dispatch >= 0).all() and (routing.combine >= 0).all()
  np.testing.assert_allclose(metrics['expert_load'].sum(), 1.0, rtol=1e-5)
  assert 0 < float(metrics['dispatch_entropy']) <= np.log(5) + 1e-5
  # Tokens are L2-normalised: their scale does not change the routing.
  scaled, _, _ = call(router, 7.0 * x, False)
  np.testing.assert_allclose(scaled.combine, routing.combine, rtol=1e-5, atol=1e-7)


def test_sbase_hand_computed():
  # Both tokens prefer expert 0. One Sinkhorn iteration scales the columns to S/E = 1:
  # column 0 [.9, .6] / 1.5 = [.6, .4]; column 1 [.1, .4] / .5 = [.2, .8]. Row argmax:
  # token 0 -> expert 0 (.6 > .2), token 1 -> expert 1 (.8 > .4): balanced. At eval
  # both take their raw top-1, expert 0.
  probs = [[0.9, 0.1], [0.6, 0.4]]
  balanced = jnp.exp(sinkhorn_log(log(probs), 1))
  np.testing.assert_allclose(balanced[0], [[0.75, 0.25], [1 / 3, 2 / 3]], rtol=1e-5)
  router = make(SBaseRouter, 2, sinkhorn_iters=1, capacity_factor=1.0, eval_capacity_factor=2.0)
  routing, _, _ = route(router, log(probs), True)
  np.testing.assert_array_equal(routing.expert[0, :, 0], [0, 1])
  np.testing.assert_allclose(routing.weight[0, :, 0], [0.9, 0.4], rtol=1e-6)  # router probs
  routing, _, _ = route(router, log(probs), False)
  np.testing.assert_array_equal(routing.expert[0, :, 0], [0, 0])


def test_sbase_balances_a_skewed_router():
  # Every token prefers expert 0; Sinkhorn spreads them anyway (S/E = 8 each).
  logits = jax.random.normal(jax.random.key(0), (2, 32, 4)) + jnp.array([3.0, 0, 0, 0])
  router = make(SBaseRouter, 4, sinkhorn_iters=8, capacity_factor=1.0, eval_capacity_factor=1.0)
  _, _, train_metrics = route(router, logits, True)
  _, _, eval_metrics = route(router, logits, False)
  assert float(jnp.max(train_metrics['expert_load'])) < 0.35
  assert float(eval_metrics['expert_load'][0]) > 0.9


def test_hash_hand_computed_and_a_pure_function_of_token_ids():
  # id 1: 1 * 2654435761 = 0x9E3779B1, >> 16 = 0x9E37 = 40503, mod 8 = 7.
  # id 2: 2 * 2654435761 mod 2^32 = 0x3C6EF362, >> 16 = 0x3C6E = 15470, mod 8 = 6.
  np.testing.assert_array_equal(hash_expert(jnp.array([1, 2]), 8), [7, 6])
  router = HashRouter(8, capacity_factor=8.0, eval_capacity_factor=8.0)
  ids = jnp.array([[1, 2, 5, 1], [3, 1, 2, 9]])
  a, losses, _ = call(router, jax.random.normal(jax.random.key(0), (2, 4, D)), True, token_ids=ids)
  b, _, _ = call(router, jax.random.normal(jax.random.key(1), (2, 4, D)), False, token_ids=ids)
  assert losses == {} and nnx.state(router, nnx.Param) == nnx.State({})
  np.testing.assert_array_equal(a.expert, b.expert)        # the token representation is ignored
  np.testing.assert_array_equal(a.expert[..., 0], hash_expert(ids, 8))
  assert a.expert[0, 0, 0] == a.expert[0, 3, 0] == a.expert[1, 1, 0] == 7  # id 1 anywhere
  np.testing.assert_array_equal(a.weight, 1.0)


def test_reinforce_routing_and_loss_hand_computed():
  router = make(ReinforceRouter, 2, capacity_factor=2.0, eval_capacity_factor=2.0)
  # p = [1/4, 3/4] for every token. Eval: argmax = expert 1, log-prob ln(3/4), and
  # combine weight = its probability 3/4.
  logits = jnp.broadcast_to(jnp.log(jnp.array([0.25, 0.75])), (4, 250, 2))
  routing, losses, _ = route(router, logits, False)
  np.testing.assert_array_equal(routing.expert, 1)
  np.testing.assert_allclose(routing.weight, 0.75, rtol=1e-6)
  np.testing.assert_allclose(losses['reinforce'], np.log(0.75), rtol=1e-6)
  assert losses['reinforce'].shape == (4, 250)
  # Training samples: about 3/4 of 1000 tokens pick expert 1 (binomial sd ~ 0.014).
  routing, losses, _ = route(router, logits, True, rng=jax.random.key(0))
  share = float(jnp.mean(routing.expert == 1))
  assert 0.7 < share < 0.8, share
  np.testing.assert_allclose(losses['reinforce'], jnp.where(routing.expert[..., 0] == 1,
                                                            np.log(0.75), np.log(0.25)), rtol=1e-6)
  # REINFORCE: token losses [1, 3] -> rewards [-1, -3], baseline -2, advantages [1, -1];
  # loss = -mean(adv * logp) = -(ln .5 - ln .25) / 2 = -(ln 2) / 2.
  logp = jnp.log(jnp.array([[0.5, 0.25]]))
  np.testing.assert_allclose(reinforce_loss(logp, jnp.array([[1.0, 3.0]])), -np.log(2) / 2,
                             rtol=1e-6)


def test_reinforce_gradient_favours_choices_with_high_reward():
  # Token 0's choice had the lower loss (positive advantage): a gradient step on the
  # REINFORCE loss must raise the logit of its choice; token 1's the opposite.
  logits = jnp.zeros((1, 2, 2))
  chosen = jnp.array([[0, 0]])

  def loss(z):
    logp = jnp.take_along_axis(jax.nn.log_softmax(z), chosen[..., None], axis=-1)[..., 0]
    return reinforce_loss(logp, jnp.array([[1.0, 3.0]]))

  grad = jax.grad(loss)(logits)
  assert grad[0, 0, 0] < 0 < grad[0, 1, 0]


# ---------------------------------------------------------------- invariants

ROUTINGS = {
    'switch': lambda: make(SwitchRouter, 4),
    'topk': lambda: make(TokenChoiceRouter, 4, top_k=2, renormalize=True),
    'topk_sigmoid': lambda: make(TokenChoiceRouter, 4, top_k=2, gate='sigmoid'),
    'topk_top_p_null': lambda: make(TokenChoiceRouter, 4, top_k=3, top_p=0.5,
                                    num_null_experts=2, renormalize=True),
    'topk_relu': lambda: make(TokenChoiceRouter, 4, top_k=2, gate='relu'),
    'expert_choice': lambda: make(ExpertChoiceRouter, 4),
    'sbase': lambda: make(SBaseRouter, 4),
    'hash': lambda: HashRouter(4, capacity_factor=1.0, eval_capacity_factor=1.0),
    'reinforce': lambda: make(ReinforceRouter, 4),
}
# Routers whose combine weights sum to exactly 1 for a token none of whose choices
# was dropped (the others weight by a router probability, or, relu, unnormalised).
SUMS_TO_ONE = {'topk', 'hash'}


@pytest.mark.parametrize('name,train', [(name, True) for name in sorted(ROUTINGS)] +
                         [('sbase', False), ('reinforce', False)])  # eval routes differently
def test_routing_invariants(name, train):
  router = ROUTINGS[name]()
  x = 3.0 * jax.random.normal(jax.random.key(0), (3, 16, D))
  ids = jax.random.randint(jax.random.key(1), (3, 16), 0, 50)
  routing, _, metrics = call(router, x, train, rng=jax.random.key(2), token_ids=ids)
  c = routing.capacity
  expert, slot, weight = (np.asarray(a) for a in (routing.expert, routing.slot, routing.weight))
  kept = slot < c
  for g in range(3):
    for e in range(4):
      slots = slot[g][(expert[g] == e) & kept[g]]
      assert len(set(slots.tolist())) == len(slots) <= c          # no slot twice, none over C
      if name == 'expert_choice':
        assert sorted(slots.tolist()) == list(range(c))            # exactly C tokens each
  assert (weight >= 0).all() and (weight[~kept] == 0).all()
  sums = weight.sum(-1)
  if name != 'topk_relu':
    assert (sums <= 1 + 1e-5).all()
  if name in SUMS_TO_ONE:
    np.testing.assert_allclose(sums[kept.all(-1)], 1.0, rtol=1e-5)
  # The dense tensors the einsum oracle runs: every slot holds at most one token.
  dispatch, combine = routing.dense(4)
  assert float(dispatch.sum(axis=1).max()) <= 1.0
  np.testing.assert_allclose(combine.sum(axis=(2, 3)), sums, rtol=1e-5, atol=1e-6)
  if name == 'expert_choice':  # the tokens no expert took
    np.testing.assert_allclose(metrics['dropped'], 1 - kept.any(-1).mean(), rtol=1e-6)
  elif expert.shape[-1] == 1:  # top-1: every choice is real, so dropped = not kept
    np.testing.assert_allclose(metrics['dropped'], 1 - kept.mean(), rtol=1e-6)
  assert metrics['expert_load'].shape == (4,)


# ---------------------------------------------------------------- balance scope


def test_balance_scopes_hand_computed():
  # Two shards of one group each, 2 experts. Shard A: every token picks expert 0 with
  # probs [.8, .2]; shard B: expert 1 with [.3, .7].
  probs = jnp.array([[[0.8, 0.2]] * 2, [[0.3, 0.7]] * 2])
  counts = jnp.array([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2])
  # micro: A 2 * (1 * .8) = 1.6, B 2 * (1 * .7) = 1.4, mean 1.5.
  micro, _ = routers.balance_loss(probs, counts, num_shards=2, scope='micro')
  # global: f = [.5, .5]; A 2 * (.5 * .8 + .5 * .2) = 1, B 1, mean 1.
  glob, load = routers.balance_loss(probs, counts, num_shards=2, scope='global')
  np.testing.assert_allclose([micro, glob], [1.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(load, [0.5, 0.5])
  # One shard: f of the whole batch either way, 2 * (.5 * .55 + .5 * .45) = 1.
  one = [routers.balance_loss(probs, counts, num_shards=1, scope=s)[0] for s in ('micro', 'global')]
  np.testing.assert_allclose(one, [1.0, 1.0], rtol=1e-6)


def balance_of(x, scope, shards):
  router = make(TokenChoiceRouter, 4, top_k=2, balance_scope=scope, balance_shards=shards,
                init_scale=10.0)
  return float(call(router, x, False)[1]['balance'])


def test_global_and_micro_agree_on_one_shard_and_differ_when_shards_differ():
  x = jax.random.normal(jax.random.key(0), (4, 16, D))
  assert balance_of(x, 'micro', 1) == pytest.approx(balance_of(x, 'global', 1), rel=1e-6)
  # Shards that route differently (the second half's tokens negated): f differs per shard.
  skewed = jnp.concatenate([x[:2], -x[:2]])
  assert balance_of(skewed, 'micro', 2) > balance_of(skewed, 'global', 2) + 1e-3
  # Identical shards: each shard's f is the global f.
  same = jnp.concatenate([x[:2], x[:2]])
  assert balance_of(same, 'micro', 2) == pytest.approx(balance_of(same, 'global', 2), rel=1e-6)


# ---------------------------------------------------------------- config


def tiny_cfg(**moe):
  c = base_config()
  c.moe.update(**moe)
  c.train.batch_size = 16
  return c


@pytest.mark.parametrize('moe,key', [
    (dict(router='nope'), 'moe.router'),
    (dict(gate='tanh'), 'moe.gate'),
    (dict(router='switch', top_k=2), 'moe.top_k'),
    (dict(router='topk', top_k=9), 'moe.top_k'),
    (dict(router='topk', top_k=2, top_p=1.5), 'moe.top_p'),
    (dict(router='expert_choice', gate='sigmoid'), 'moe.gate'),
    (dict(router='soft', num_null_experts=1), 'moe.num_null_experts'),
    (dict(router='topk', top_k=1, renormalize=True), 'moe.renormalize'),
    (dict(router='topk', top_k=2, gate='relu', renormalize=True), 'moe.renormalize'),
    (dict(router='topk', top_k=2, relu_target=3.0), 'moe.relu_target'),
    (dict(balance_scope='local'), 'moe.balance_scope'),
    (dict(balance_shards=0), 'moe.balance_shards'),
    (dict(num_shared_experts=-1), 'moe.num_shared_experts'),
    (dict(slots_per_expert=0), 'moe.slots_per_expert'),
    (dict(sinkhorn_iters=0), 'moe.sinkhorn_iters'),
    (dict(reinforce_weight=-1.0), 'moe.reinforce_weight'),
    (dict(expert_d_ff=-2), 'moe.expert_d_ff'),
])
def test_bad_routing_config_names_the_key(moe, key):
  with pytest.raises(cli.UsageError, match=f'^config key {key}: '):
    validate_model(tiny_cfg(**moe))


def test_balance_shards_must_divide_the_batches():
  validate_training(tiny_cfg(balance_shards=4))
  with pytest.raises(cli.UsageError, match='^config key moe.balance_shards: .*which 3 slices do not divide'):
    validate_training(tiny_cfg(balance_shards=3))


def test_good_routing_configs_pass():
  for moe in (dict(router='topk', top_k=3, gate='sigmoid', renormalize=True, top_p=0.7,
                   num_null_experts=2, num_shared_experts=1),
              dict(router='topk', top_k=2, gate='relu', relu_target=1.5),
              dict(router='expert_choice'), dict(router='soft', slots_per_expert=4),
              dict(router='sbase'), dict(router='hash'), dict(router='reinforce')):
    validate_model(tiny_cfg(**moe))
