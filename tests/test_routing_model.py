"""Every router inside the model: causality as declared, gradients reach the router,
the evaluation line names the routing mode.

One tiny model per router configuration (one block, with an MoE FFN) and one
compiled function of it, shared by the tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed import step
from routed.config import base_config
from routed.model.moe import is_causal, routing_mode
from routed.model.transformer import build_model

VOCAB, SEQ = 37, 12
# Tiny graphs: skipping XLA's backend optimisations halves compile time, which is
# nearly all of these tests' time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}

CONFIGS = {
    'switch': dict(router='switch'),
    'topk': dict(router='topk', top_k=2, renormalize=True),
    'topk_sigmoid_shared': dict(router='topk', top_k=2, gate='sigmoid', renormalize=True,
                                num_shared_experts=1),
    'topk_top_p_null': dict(router='topk', top_k=3, top_p=0.5, num_null_experts=2),
    'topk_relu': dict(router='topk', top_k=2, gate='relu'),
    'expert_choice': dict(router='expert_choice'),
    'soft': dict(router='soft', slots_per_expert=2),
    'sbase': dict(router='sbase'),
    'hash': dict(router='hash'),
    'reinforce': dict(router='reinforce'),
}
# Causal in training too (sbase is causal only at eval; expert_choice and soft never).
CAUSAL_IN_TRAINING = {'switch', 'topk', 'topk_sigmoid_shared', 'topk_top_p_null', 'topk_relu',
                      'hash', 'reinforce'}
CAUSAL_AT_EVAL = CAUSAL_IN_TRAINING | {'sbase'}


def tiny_config(name):
  c = base_config()
  c.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32)
  # Small capacities so that dropping really happens, in training and at eval.
  c.moe.update(num_experts=4, every=1, capacity_factor=0.5, eval_capacity_factor=0.5,
               router_init_scale=1.0, **CONFIGS[name])
  c.train.seq_len = SEQ
  return c


class Compiled:
  """A tiny model of one router config and one jit-compiled function of its params.

  run(params, pair [2, B, L], batch [B, L + 1], rng) -> (logits of both token sets in
  eval mode, the same in training mode, eval aux, loss gradient, loss metrics): one
  compile per config. The pair is vmapped with an unbatched rng, so both token sets
  see the same router noise (jitter, sampling).
  """

  def __init__(self, name):
    self.cfg = tiny_config(name)
    self.graphdef, state = nnx.split(build_model(self.cfg, VOCAB, seed=0), nnx.Param)
    self.params = nnx.to_pure_dict(state)
    loss_fn = step.make_loss_fn(self.graphdef, self.cfg)

    def run(params, pair, batch, rng):
      def apply(tokens, train):
        return nnx.merge(self.graphdef, params)(tokens, train=train, rng=rng)
      eval_logits, eval_aux = jax.vmap(lambda t: apply(t, False))(pair)
      train_logits, _ = jax.vmap(lambda t: apply(t, True))(pair)
      grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, rng, True)
      return eval_logits, train_logits, eval_aux, grads, metrics

    tokens, other = perturbed_pair()
    batch = step.token_batch(np.random.default_rng(1).integers(0, VOCAB, (4, SEQ + 1)))
    self.results = jax.jit(run, compiler_options=FAST_COMPILE)(
        self.params, jnp.stack([tokens, other]), batch, jax.random.key(3))


_COMPILED = {}


@pytest.fixture(scope='module')
def compiled():
  def get(name):
    if name not in _COMPILED:
      _COMPILED[name] = Compiled(name)
    return _COMPILED[name]
  yield get
  _COMPILED.clear()


def perturbed_pair(split=7):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (4, SEQ))
  other = tokens.copy()
  other[:, split:] = rng.integers(0, VOCAB, (4, SEQ - split))
  return jnp.asarray(tokens), jnp.asarray(other)


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_causality_is_as_declared(compiled, name, train):
  """Changing later tokens leaves earlier logits unchanged exactly for causal routers."""
  m = compiled(name)
  causal = name in (CAUSAL_IN_TRAINING if train else CAUSAL_AT_EVAL)
  assert is_causal(m.cfg, train=train) == causal
  eval_logits, train_logits, eval_aux, _, metrics = m.results
  a, b = train_logits if train else eval_logits
  if name != 'soft':  # capacity really binds here
    dropped = metrics['moe/layer0/dropped'] if train else eval_aux['metrics']['layer0/dropped'][0]
    assert float(dropped) > 0
  if causal:
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
  else:  # the declaration is not vacuous: the future does leak
    assert not np.allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_gradients_reach_the_router(compiled, name):
  grads, metrics = compiled(name).results[3:]
  for block in grads['blocks'].values():
    ffn = block['ffn']
    if name == 'hash':
      assert 'router' not in ffn  # nothing to learn
      continue
    for leaf in jax.tree.leaves(ffn['router']):
      assert float(jnp.abs(leaf).sum()) > 0, name
  assert np.isfinite(float(metrics['loss']))


def test_reinforce_loss_trains_the_router_kernel_only():
  """The REINFORCE term's gradient: non-zero on the router, zero everywhere else."""
  cfg = tiny_config('reinforce')
  cfg.moe.update(aux_loss_weight=0.0, z_loss_weight=0.0)
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  params = nnx.to_pure_dict(state)
  tokens = step.token_batch(np.random.default_rng(1).integers(0, VOCAB, (4, SEQ + 1)))
  loss_fns = []
  for weight in (1.0, 0.0):
    cfg.moe.reinforce_weight = weight
    loss_fns.append(step.make_loss_fn(graphdef, cfg))

  def reinforce_grads(p):  # the same forward pass (and samples) with and without it
    with_rl, without = (jax.grad(lambda q: f(q, tokens, jax.random.key(0), True)[0])(p)
                        for f in loss_fns)
    return jax.tree.map(jnp.subtract, with_rl, without)

  grads = jax.jit(reinforce_grads, compiler_options=FAST_COMPILE)(params)
  router = grads['blocks'][0]['ffn'].pop('router')
  assert float(jnp.abs(router['kernel']).sum()) > 0
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_allclose(leaf, 0.0, atol=1e-6)


def test_eval_metrics_leave_out_the_reinforce_loss(compiled):
  m = compiled('reinforce')
  tokens = step.token_batch(np.random.default_rng(1).integers(0, VOCAB, (4, SEQ + 1)))
  metrics = step.make_eval_step(m.graphdef, m.cfg)(m.params, {}, tokens)
  assert 'reinforce_loss' not in metrics and 'balance_loss' in metrics


def test_routing_mode_line():
  assert routing_mode(tiny_config('switch'), train=False) == (
      'eval routing switch: top-1 token choice, softmax gate, capacity factor 0.5; causal')
  assert 'NON-CAUSAL' in routing_mode(tiny_config('expert_choice'), train=False)
  assert 'NON-CAUSAL' in routing_mode(tiny_config('soft'), train=False)
  assert 'NON-CAUSAL' in routing_mode(tiny_config('sbase'), train=True)
  assert routing_mode(tiny_config('sbase'), train=False).endswith('; causal')
  dense = tiny_config('switch')
  dense.moe.every = 0
  assert is_causal(dense, train=True) and routing_mode(dense, train=False) == (
      'dense model (no routing)')


def test_padding_targets_carry_no_loss():
  """Targets whose segment id is 0 (a part's last, padded row) are left out of the mean."""
  cfg = tiny_config('switch')
  cfg.moe.every = 0  # dense: no capacity, so other tokens cannot change a token's output
  model = build_model(cfg, VOCAB, seed=0)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, SEQ + 1))
  batch = step.token_batch(tokens)
  padded = dict(batch, segment_ids=batch['segment_ids'].at[:, -4:].set(0))
  loss_fn = jax.jit(step.make_loss_fn(graphdef, cfg), static_argnums=3,
                    compiler_options=FAST_COMPILE)
  _, metrics = loss_fn(params, padded, None, False)
  logits, _ = model(jnp.asarray(tokens[:, :-1]), train=False, rng=None)
  token_ce = step.token_cross_entropy(logits, jnp.asarray(tokens[:, 1:]))
  np.testing.assert_allclose(metrics['ce'], jnp.mean(token_ce[:, :-4]), rtol=1e-5)
  _, full = loss_fn(params, batch, None, False)
  np.testing.assert_allclose(full['ce'], jnp.mean(token_ce), rtol=1e-5)
