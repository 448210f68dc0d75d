"""Today's MoE recipes (issue 15): each option's hand-computed case and a short run.

Aux-loss-free balancing (routed/routing_state.py), fine-grained experts, SwiGLU and
grouped-query attention, sparse upcycling, the ERC loss and causal expert choice.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed import routing_state, step
from routed.checkpoint import Checkpointer
from routed.config import base_config
from routed.model.routers import TokenChoiceRouter
from routed.model.transformer import build_model
from routed.train import main as train_main
from tests.test_train import read_metrics, tiny_args

# --- Aux-loss-free balancing ------------------------------------------------------


def router(num_experts=3, **kwargs):
  return TokenChoiceRouter(4, num_experts, capacity_factor=4.0, eval_capacity_factor=4.0,
                           init_scale=0.1, jitter=0.0, rngs=nnx.Rngs(0), **kwargs)


PROBS = jnp.array([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]])  # [G=1, S=3, E=3]


def test_bias_changes_selection_not_weights():
  """Gates 0.5/0.3/0.2, 0.6/0.3/0.1, 0.4/0.35/0.25 with bias (-0.25, 0, 0): token 0
  scores 0.25 vs 0.3 -> expert 1; token 1 0.35 vs 0.3 -> expert 0; token 2 0.15 vs 0.35
  -> expert 1. Each weight is the chosen expert's gate, not gate + bias."""
  routing, _, metrics = router().route(jnp.log(PROBS), train=True,
                                       layer_state={'bias': jnp.array([-0.25, 0.0, 0.0])})
  np.testing.assert_array_equal(routing.expert[0, :, 0], [1, 0, 1])
  np.testing.assert_allclose(routing.weight[0, :, 0], [0.3, 0.6, 0.35], rtol=1e-6)
  np.testing.assert_array_equal(metrics['choices'], [1, 2, 0])
  # Loads 1/3, 2/3, 0 of the choices: the busiest expert has 2x, the idlest 0x the mean.
  logged = step.without_counts({f'moe/layer1/{k}': v for k, v in metrics.items()})
  np.testing.assert_allclose([logged['moe/layer1/load_max'], logged['moe/layer1/load_min']],
                             [2.0, 0.0], atol=1e-6)
  assert 'moe/layer1/choices' not in logged


def test_bias_with_sigmoid_gate_and_renormalised_top2():
  """Sigmoid scores of logits (2, 1, 0, -1) are 0.881, 0.731, 0.5, 0.269, normalised
  0.370, 0.307, 0.210, 0.113; a bias of +0.2 on expert 3 (0.313) lifts it over expert 1:
  the top 2 are experts 0 and 3, weighted 0.881 and 0.269 renormalised."""
  logits = jnp.array([[[2.0, 1.0, 0.0, -1.0]]])
  r = router(4, top_k=2, gate='sigmoid', renormalize=True)
  routing, _, _ = r.route(logits, train=True, layer_state={'bias': jnp.array([0, 0, 0, 0.2])})
  np.testing.assert_array_equal(routing.expert[0, 0], [0, 3])
  s = jax.nn.sigmoid(jnp.array([2.0, -1.0]))
  np.testing.assert_allclose(routing.weight[0, 0], s / jnp.sum(s), rtol=1e-6)


def test_bias_step_moves_towards_balance():
  """Counts (1, 2, 0, 1), mean 1: expert 1 is over (-u), expert 2 under (+u), the
  others balanced (0)."""
  new = routing_state.bias_step(jnp.array([0.1, 0.1, 0.1, 0.1]), jnp.array([1, 2, 0, 1]), 0.01)
  np.testing.assert_allclose(new, [0.1, 0.09, 0.11, 0.1], rtol=1e-6)


def bias_config(microbatches: int):
  cfg = base_config()
  cfg.model.update(d_model=16, num_heads=2, num_layers=2, d_ff=32)
  cfg.moe.update(num_experts=4, every=2, jitter=0.0, bias_update_rate=0.01,
                 aux_loss_weight=0.0, dispatch='gather')
  cfg.train.update(batch_size=4, seq_len=8, steps=4, warmup_steps=1, microbatches=microbatches)
  return cfg


@pytest.mark.slow  # two train-step compiles; the 8-device scale check covers it too
def test_bias_update_counts_the_whole_batch_over_microbatches():
  """One step in two microbatches moves the bias exactly as the same step in one: the
  update counts every microbatch's choices."""
  tokens = np.random.default_rng(0).integers(0, 32, (4, 9))
  biases = []
  for microbatches in (1, 2):
    cfg = bias_config(microbatches)
    graphdef, state = nnx.split(build_model(cfg, 32, 0), nnx.Param)
    params = nnx.to_pure_dict(state)
    optimizer = step.make_optimizer(cfg.train)
    train_step = step.make_train_step(graphdef, cfg, optimizer)
    _, _, routing, metrics = train_step(params, optimizer.init(params),
                                        routing_state.init_state(cfg), step.token_batch(tokens), 0)
    biases.append(np.asarray(routing[1]['bias']))
    np.testing.assert_array_equal(metrics['moe/layer1/bias'], routing[1]['bias'])
  assert np.any(biases[0] != 0)
  np.testing.assert_array_equal(biases[0], biases[1])


def routing_of(workdir):
  ckpt = Checkpointer(workdir, keep=5, async_save=False)
  try:
    step_ = ckpt.latest_step()
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt.directory, str(step_), 'state'))
  finally:
    ckpt.close()
  return step_, restored


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
def test_aux_loss_free_run_resumes_its_bias(mini_data_cfg, tmp_path):
  """20 steps from the CLI with the bias and no balance loss: the bias is logged and
  checkpointed; a run stopped after its checkpoint 10 (a copy of the workdir without
  checkpoint 20) resumes to the bias and the params of the straight run."""
  options = {'moe.bias_update_rate': 0.01, 'moe.aux_loss_weight': 0.0, 'train.steps': 20,
             'eval.every_steps': 20}
  straight = str(tmp_path / 'straight')
  args = lambda workdir: tiny_args(mini_data_cfg, workdir, **options)
  assert train_main(args(straight)) == 0
  rows = read_metrics(straight)
  assert len(rows[-1]['train/moe/layer1/bias']) == 4
  assert rows[-1]['train/moe/layer1/load_max'] >= 1.0 >= rows[-1]['train/moe/layer1/load_min']
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '20'))
  assert train_main(args(resumed)) == 0
  (s1, a), (s2, b) = routing_of(straight), routing_of(resumed)
  assert s1 == s2 == 20
  assert np.any(np.asarray(jax.tree.leaves(a['routing'])[0]) != 0)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# --- Fine-grained experts, SwiGLU, grouped-query attention -------------------------


def small_config(**overrides):
  cfg = base_config()
  cfg.model.update(d_model=16, num_heads=4, num_layers=2, d_ff=32)
  cfg.moe.update(num_experts=4, every=2, router='topk', top_k=1)
  cfg.train.update(seq_len=8)
  for key, value in overrides.items():
    section, name = key.split('.')
    cfg[section][name] = value
  return cfg


def counted_params(cfg):
  return sum(x.size for x in jax.tree.leaves(nnx.state(build_model(cfg, 50, 0), nnx.Param)))


@pytest.mark.parametrize('overrides', [
    {'model.activation': 'swiglu'},
    {'model.num_kv_heads': 2}, {'model.num_kv_heads': 1},
    {'moe.granularity': 4},
    {'moe.granularity': 2, 'moe.num_shared_experts': 1, 'model.activation': 'swiglu'},
    {'moe.granularity': 2, 'moe.router': 'expert_choice'},
], ids=['swiglu', 'gqa', 'mqa', 'fine4', 'fine2_shared_swiglu', 'fine2_expert_choice'])
def test_parameter_count_matches_accounting(overrides):
  from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
  cfg = small_config(**overrides)
  assert model_size(cfg, 50).total_params == counted_params(cfg)


def test_accounting_by_hand():
  """D = 16, F = 32, H = 4 heads of 4: SwiGLU adds one D x F matrix per MLP (512); two
  kv heads instead of four drop 2 * D * 8 = 256 per block; granularity keeps expert
  parameters and FLOPs, adding only router columns (D per extra expert)."""
  from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
  base = model_size(small_config(), 50)
  swiglu = model_size(small_config(**{'model.activation': 'swiglu'}), 50)
  # Block 0 dense, block 1 with 4 experts: 5 MLPs of 16 x 32 gain a gate matrix each.
  assert swiglu.total_params - base.total_params == 5 * 16 * 32
  # A token's active MLPs: block 0's and one expert's, 3 matmuls per unit.
  assert swiglu.train_flops_per_token - base.train_flops_per_token == 6 * 2 * 16 * 32
  gqa = model_size(small_config(**{'model.num_kv_heads': 2}), 50)
  assert base.total_params - gqa.total_params == 2 * 2 * 16 * 8
  fine = model_size(small_config(**{'moe.granularity': 4}), 50)
  assert fine.total_params - base.total_params == 16 * (16 - 4)     # router: 16 vs 4 experts
  assert fine.train_flops_per_token - base.train_flops_per_token == 6 * 16 * 12


def test_fine_grained_split_by_hand():
  """One expert of width F split in two (granularity 2): with a zero router kernel the
  two halves share the softmax evenly and top-2 takes both at weight 1/2, so the
  layer's output is exactly 1/2 of the unsplit expert act(x W_in) W_out, whose W_in
  and W_out are the halves' side by side."""
  from routed.model.moe import MoELayer  # pylint: disable=g-import-not-at-top
  cfg = base_config().moe
  cfg.update(router='topk', num_experts=1, top_k=1, granularity=2, capacity_factor=4.0,
             jitter=0.0)
  layer = MoELayer(cfg, d_model=8, d_ff=12, activation='relu', init_std=0.5,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert layer.experts.wi.shape == (2, 8, 6) and layer.router.kernel.shape == (8, 2)
  assert layer.router.top_k == 2
  layer.router.kernel[...] = jnp.zeros((8, 2))
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  y, _ = nnx.jit(lambda layer, x: layer(x, train=True, rng=jax.random.key(1)))(layer, x)
  wi = jnp.concatenate([layer.experts.wi[0], layer.experts.wi[1]], axis=1)    # [8, 12]
  wo = jnp.concatenate([layer.experts.wo[0], layer.experts.wo[1]], axis=0)    # [12, 8]
  np.testing.assert_allclose(y, 0.5 * jax.nn.relu(x @ wi) @ wo, rtol=1e-5, atol=1e-6)


def test_swiglu_by_hand():
  """The dense MLP with swiglu: silu(x W_gate) * (x W_up) W_out, W_gate and W_up the
  even and odd columns of wi."""
  from routed.model.layers import MLP  # pylint: disable=g-import-not-at-top
  mlp = MLP(6, 4, activation='swiglu', init_std=0.5, dtype=jnp.float32,
            param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert mlp.wi.shape == (6, 8) and mlp.wo.shape == (4, 6)
  x = jax.random.normal(jax.random.key(0), (1, 3, 6))
  wi = np.asarray(mlp.wi[...])
  gate, up = wi[:, 0::2], wi[:, 1::2]
  want = (jax.nn.silu(x @ gate) * (x @ up)) @ mlp.wo[...]
  np.testing.assert_allclose(mlp(x)[0], want, rtol=1e-5, atol=1e-6)


def test_gqa_layer_shares_key_value_heads():
  """A GQA attention layer (4 query heads, 2 kv heads) = an MHA layer whose key and
  value projections repeat each kv head for its 2 query heads."""
  from routed.model.layers import Attention  # pylint: disable=g-import-not-at-top
  kw = dict(rope_base=10000.0, init_std=0.3, dtype=jnp.float32, param_dtype=jnp.float32,
            implementation='reference')
  gqa = Attention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0), **kw)
  assert gqa.q.shape == (16, 4, 4) and gqa.kv.shape == (16, 2, 2, 4)
  mha = Attention(16, 4, rngs=nnx.Rngs(1), **kw)
  kv = jnp.repeat(gqa.kv[...], 2, axis=2)                               # [D, 2, 4, Dh]
  mha.qkv[...] = jnp.concatenate([gqa.q[...][:, None], kv], axis=1)
  mha.out[...] = gqa.out[...]
  x = jax.random.normal(jax.random.key(2), (2, 7, 16))
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  np.testing.assert_allclose(gqa(x, positions), mha(x, positions), rtol=1e-5, atol=1e-6)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_args(config, data_cfg, workdir, **overrides):
  """A 20-step CLI run of configs/<config> on the mini corpus at a seconds-long width."""
  settings = {'model.d_model': 32, 'model.num_heads': 4, 'model.num_layers': 2,
              'model.d_ff': 64, 'train.batch_size': 4, 'train.seq_len': 64, 'train.steps': 20,
              'train.warmup_steps': 5, 'train.log_every': 10, 'eval.every_steps': 20,
              'eval.num_batches': 2, 'checkpoint.every_steps': 20,
              'data.task': data_cfg.task, 'data.data_dir': data_cfg.data_dir,
              'data.vocab_size': data_cfg.vocab_size, **overrides}
  return ([f'--config={os.path.join(ROOT, "configs", config)}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in settings.items()])


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
@pytest.mark.parametrize('config', ['deepseek_moe.py:tiny', 'mixtral_like.py:tiny'])
def test_recipe_config_trains_from_the_cli(config, mini_data_cfg, tmp_path):
  """DeepSeekMoE (fine-grained + shared experts, sigmoid gate, bias) and Mixtral (SwiGLU
  top-2 experts, GQA): 20 steps, the loss falls, the expert biases are logged."""
  workdir = str(tmp_path)
  assert train_main(config_args(config, mini_data_cfg, workdir)) == 0
  rows = read_metrics(workdir)
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  assert np.isfinite(rows[-1]['eval/ce'])
  if config.startswith('deepseek'):
    assert len(rows[-1]['train/moe/layer0/bias']) == 8 * 4      # 8 experts split 4 ways


# --- Causal expert choice ------------------------------------------------------------


def ec_router(**kwargs):
  from routed.model.expert_choice import ExpertChoiceRouter  # pylint: disable=g-import-not-at-top
  return ExpertChoiceRouter(4, 3, capacity_factor=1.0, eval_capacity_factor=3.0,
                            init_scale=0.1, jitter=0.0, rngs=nnx.Rngs(0), **kwargs)


def test_expert_choice_reports_its_top_c_score():
  """S = 3 tokens, E = 3, capacity factor 1: C = 1, so each expert's top-C score is its
  highest probability: expert 0 max(0.5, 0.6, 0.4) = 0.6, expert 1 0.35, expert 2 0.25."""
  _, _, metrics = ec_router().route(jnp.log(PROBS), train=True)
  np.testing.assert_allclose(metrics['top_c_score'], [0.6, 0.35, 0.25], rtol=1e-6)


def test_threshold_rule_by_hand():
  """Thresholds (0.45, 0.32, 0.3): token 0 (0.5, 0.3, 0.2) takes expert 0; token 1
  (0.6, 0.3, 0.1) expert 0; token 2 (0.4, 0.35, 0.25) expert 1; weights the scores.
  With eval_max_experts 1 and thresholds 0: each token only its top expert."""
  r = ec_router()
  state = {'threshold': jnp.array([0.45, 0.32, 0.3])}
  routing, _, _ = r.route(jnp.log(PROBS), train=False, layer_state=state)
  dispatch, combine = routing.dense(3)
  np.testing.assert_allclose(jnp.sum(combine, axis=-1)[0],
                             [[0.5, 0, 0], [0.6, 0, 0], [0, 0.35, 0]], rtol=1e-6)
  one = ec_router(eval_max_experts=1)
  routing, _, _ = one.route(jnp.log(PROBS), train=False, layer_state={'threshold': jnp.zeros(3)})
  np.testing.assert_array_equal(jnp.sum(routing.dense(3)[0], axis=-1)[0],
                                [[1, 0, 0], [1, 0, 0], [1, 0, 0]])


def test_threshold_rule_is_causal():
  """A later token's score never changes an earlier token's routing under the rule."""
  r = ec_router()
  logits = jax.random.normal(jax.random.key(0), (1, 6, 3))
  changed = logits.at[0, 4:].set(5.0)
  state = {'threshold': jnp.array([0.3, 0.3, 0.3])}
  a = r.route(logits, train=False, layer_state=state)[0].dense(3)[1]
  b = r.route(changed, train=False, layer_state=state)[0].dense(3)[1]
  np.testing.assert_allclose(a[0, :4], b[0, :4])


def test_thresholds_follow_the_top_c_scores():
  """A running mean for the first 1 / rate steps, then a moving average."""
  cfg = base_config()
  cfg.moe.update(router='expert_choice', causal_rule='threshold', threshold_ema=0.5,
                 num_experts=2)
  cfg.model.num_layers = 2
  state = routing_state.init_state(cfg)
  assert list(state) == [1]
  metrics = lambda v: {'moe/layer1/top_c_score': jnp.array(v)}
  state = routing_state.update_state(cfg, state, metrics([0.4, 0.2]), 0)   # rate 1
  np.testing.assert_allclose(state[1]['threshold'], [0.4, 0.2])
  state = routing_state.update_state(cfg, state, metrics([0.2, 0.4]), 1)   # rate 1/2
  np.testing.assert_allclose(state[1]['threshold'], [0.3, 0.3])
  state = routing_state.update_state(cfg, state, metrics([0.5, 0.5]), 5)   # rate 0.5
  np.testing.assert_allclose(state[1]['threshold'], [0.4, 0.4])


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
def test_causal_expert_choice_trains_and_samples(mini_data_cfg, tmp_path, capsys):
  """20 steps of expert choice with the threshold rule from the CLI: evaluation reports
  both rules' cross-entropy, and routed.sample generates from the run."""
  from routed.sample import main as sample_main  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  args = config_args('expert_choice_base.py:tiny', mini_data_cfg, workdir,
                     **{'moe.causal_rule': 'threshold', 'moe.eval_max_experts': 2})
  assert train_main(args) == 0
  row = read_metrics(workdir)[-1]
  assert np.isfinite(row['eval/ce']) and np.isfinite(row['eval/ce_top_c'])
  assert row['eval/ce'] != row['eval/ce_top_c']
  assert len(row['train/moe/layer1/threshold']) == 8
  assert 'causal rule' in capsys.readouterr().err
  assert sample_main([f'--workdir={workdir}', '--prompt=import os', '--max_new_tokens=4']) == 0


# --- Sparse upcycling ----------------------------------------------------------------


def upcycle_config(router='topk', scan=False, **moe):
  cfg = base_config()
  cfg.model.update(d_model=16, num_heads=2, num_layers=4, d_ff=32, scan_layers=scan)
  cfg.moe.update({'router': router, 'num_experts': 4, 'every': 2, 'top_k': 2,
                  'renormalize': router == 'topk', 'jitter': 0.0, 'eval_capacity_factor': 8.0,
                  **moe})
  cfg.train.update(seq_len=12)
  return cfg


def dense_checkpoint(workdir, vocab=40):
  """A dense model (moe.every = 0) saved as a run's checkpoint 5; returns its params."""
  cfg = upcycle_config()
  cfg.moe.every = 0
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, vocab, 7), nnx.Param))
  optimizer = step.make_optimizer(cfg.train)
  ckpt = Checkpointer(workdir, keep=2, async_save=False)
  ckpt.save(5, params, optimizer.init(params), {})
  ckpt.close()
  return cfg, params


def logits_of(cfg, params, tokens):
  graphdef = nnx.split(build_model(cfg, 40, 0), nnx.Param)[0]
  return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, train=False)[0])(params, tokens)


def upcycled(cfg, workdir):
  from routed.init_from import initial_params  # pylint: disable=g-import-not-at-top
  cfg.init.update(from_checkpoint=workdir, upcycle=True)
  fresh = nnx.to_pure_dict(nnx.state(build_model(cfg, 40, 0), nnx.Param))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return initial_params(cfg, fresh, jax.tree.map(lambda _: device, fresh))


@pytest.mark.parametrize('router,scan', [
    ('topk', False), pytest.param('topk', True, marks=pytest.mark.slow),
    pytest.param('expert_choice', False, marks=pytest.mark.slow)])
def test_upcycled_model_starts_as_the_dense_model(router, scan, tmp_path):
  """Every expert a copy of its block's dense MLP: with top-2 weights renormalised (or
  expert choice with C = S, every expert taking every token, weights summing to 1) and
  nothing dropped, the upcycled model's logits are the dense model's; read into the
  scanned layout too."""
  workdir = str(tmp_path)
  dense_cfg, dense = dense_checkpoint(workdir)
  cfg = upcycle_config(router, scan, **({'eval_capacity_factor': 4.0}
                                        if router == 'expert_choice' else {}))
  params = upcycled(cfg, workdir)
  tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, 40)
  np.testing.assert_allclose(logits_of(cfg, params, tokens), logits_of(dense_cfg, dense, tokens),
                             rtol=2e-5, atol=2e-5)
  # The experts really are copies, and the router is not the zero that would make that
  # trivially true.
  block = params['units'][1] if scan else params['blocks'][1]
  wi = np.asarray(block['ffn']['experts']['wi'])
  if scan:
    wi = wi[0]                                          # unit 0's MoE block (block 1)
  np.testing.assert_array_equal(wi[0], wi[3])
  assert np.any(np.asarray(block['ffn']['router']['kernel']) != 0)


def test_upcycling_noise_and_fine_grained_slices(tmp_path):
  """With granularity 2, expert e holds hidden-unit slice e mod 2 of the dense MLP;
  noise 0.1 perturbs each copy by about 0.1 of the weight's std."""
  workdir = str(tmp_path)
  _, dense = dense_checkpoint(workdir)
  cfg = upcycle_config(granularity=2)
  cfg.init.upcycle_noise = 0.1
  wi = np.asarray(upcycled(cfg, workdir)['blocks'][1]['ffn']['experts']['wi'])   # [8, 16, 16]
  src = np.asarray(dense['blocks'][1]['ffn']['wi'])                              # [16, 32]
  assert wi.shape == (8, 16, 16)
  for e in range(8):
    part = src[:, (e % 2) * 16:(e % 2 + 1) * 16]
    rel = np.std(wi[e] - part) / np.std(src)
    assert 0.05 < rel < 0.2, (e, rel)


@pytest.mark.parametrize('change,vocab,needle', [
    ({}, 40, 'embed'),                                  # the data's vocabulary is 512
    pytest.param({'model.d_model': 24}, 512, 'blocks/0/attn/out', marks=pytest.mark.slow),
    pytest.param({'model.num_layers': 2}, 512, 'blocks/2', marks=pytest.mark.slow),
    pytest.param({'model.d_ff': 48}, 512, 'blocks/0/ffn/wi', marks=pytest.mark.slow),
], ids=['vocab', 'width', 'depth', 'd_ff'])
def test_upcycling_mismatch_is_one_line(change, vocab, needle, tmp_path, capsys, mini_data_cfg):
  """A checkpoint of another shape: exit 2, one line naming the parameter; the source
  checkpoint stays as it was."""
  source = str(tmp_path / 'dense')
  dense_checkpoint(source, vocab)
  before = sorted(os.listdir(os.path.join(source, 'checkpoints')))
  overrides = {'model.d_model': 16, 'model.num_heads': 2, 'model.num_layers': 4,
               'model.d_ff': 32, 'moe.router': 'topk', 'moe.top_k': 2, 'moe.num_experts': 4,
               'init.from_checkpoint': source, 'init.upcycle': True, **change}
  argv = tiny_args(mini_data_cfg, str(tmp_path / 'moe'), **overrides)
  assert train_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0] and 'init.from_checkpoint' in err[0], err
  assert sorted(os.listdir(os.path.join(source, 'checkpoints'))) == before


def test_upcycling_from_a_routed_run_is_refused(tmp_path, capsys, mini_data_cfg):
  """A checkpoint with experts is not a dense run: one line, exit 2."""
  source = str(tmp_path / 'moe')
  cfg = upcycle_config()
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, 512, 7), nnx.Param))
  ckpt = Checkpointer(source, keep=2, async_save=False)
  ckpt.save(5, params, step.make_optimizer(cfg.train).init(params), {})
  ckpt.close()
  argv = tiny_args(mini_data_cfg, str(tmp_path / 'again'), **{
      'model.d_model': 16, 'model.num_heads': 2, 'model.num_layers': 4, 'model.d_ff': 32,
      'init.from_checkpoint': source, 'init.upcycle': True})
  assert train_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'not a dense run' in err[0], err


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
def test_upcycled_run_from_the_cli(mini_data_cfg, tmp_path, capsys):
  """A 20-step dense run, then 20 steps upcycled from it (top-2 renormalised): the
  upcycled run's first loss is about the dense run's last (same function), far below
  a fresh model's ln(512) = 6.2."""
  dense = str(tmp_path / 'dense')
  common = {'moe.router': 'topk', 'moe.top_k': 2, 'moe.renormalize': True,
            'train.steps': 20, 'eval.every_steps': 20, 'train.log_every': 1,
            'train.learning_rate': 1e-2}
  assert train_main(tiny_args(mini_data_cfg, dense, **{**common, 'moe.every': 0})) == 0
  upcycle = str(tmp_path / 'upcycled')
  assert train_main(tiny_args(mini_data_cfg, upcycle, **{
      **common, 'init.from_checkpoint': dense, 'init.upcycle': True,
      'train.warmup_steps': 20})) == 0
  assert 'sparse upcycling' in capsys.readouterr().err
  first = read_metrics(upcycle)[0]['train/ce']
  assert first < read_metrics(dense)[0]['train/ce'] - 0.3


# --- Expert-router coupling loss ---------------------------------------------------


def test_erc_loss_two_experts_by_hand():
  """Router embeddings r_0 = (1, 0), r_1 = (0, 2); expert 0's W_in = I, expert 1's
  [[0, 1], [0.5, 0]], ReLU. Responses M = [[1, 1], [2, 1]] (row: proxy, column:
  expert). Off-diagonal terms: (0, 1): relu(1 - 1) + relu(1 - 1) = 0; (1, 0): relu(2 - 1)
  (proxy 1 excites expert 0 more than its own) + relu(2 - 1) (expert 0 answers proxy 1
  more than its own): 2, over E (E - 1) = 2 pairs: 1.0. No expert is coupled."""
  from routed.model.erc import erc_loss, response_matrix  # pylint: disable=g-import-not-at-top
  kernel = jnp.array([[1.0, 0.0], [0.0, 2.0]])                  # [D, E]: columns r_0, r_1
  wi = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.5, 0.0]]])
  np.testing.assert_allclose(response_matrix(kernel.T, wi, jax.nn.relu), [[1, 1], [2, 1]],
                             rtol=1e-5)
  loss, coupled = erc_loss(kernel, wi, jax.nn.relu, noise=0.0)
  np.testing.assert_allclose([loss, coupled], [1.0, 0.0], rtol=1e-5)
  # Expert 0 W_in = [[1, 0], [0, 0.25]], expert 1 [[0.5, 0], [0, 1]]: M = [[1, 0.5],
  # [0.5, 2]], every diagonal entry the largest of its row and column: coupled, loss 0.
  coupled_wi = jnp.array([[[1.0, 0.0], [0.0, 0.25]], [[0.5, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(response_matrix(kernel.T, coupled_wi, jax.nn.relu),
                             [[1, 0.5], [0.5, 2]], rtol=1e-5)
  loss, coupled = erc_loss(kernel, coupled_wi, jax.nn.relu, noise=0.0)
  np.testing.assert_allclose([loss, coupled], [0.0, 1.0], atol=1e-6)


def test_erc_noise_perturbs_the_proxies():
  from routed.model.erc import erc_loss  # pylint: disable=g-import-not-at-top
  kernel = jax.random.normal(jax.random.key(0), (8, 4))
  wi = jax.random.normal(jax.random.key(1), (4, 8, 6))
  clean = erc_loss(kernel, wi, jax.nn.gelu, noise=0.0)[0]
  noisy = [erc_loss(kernel, wi, jax.nn.gelu, noise=0.3, rng=jax.random.key(s))[0]
           for s in range(2)]
  assert noisy[0] != noisy[1] and clean != noisy[0]


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
def test_erc_run_from_the_cli(mini_data_cfg, tmp_path):
  """20 steps with the ERC loss: it is logged with the coupling metric, and falls."""
  workdir = str(tmp_path)
  args = tiny_args(mini_data_cfg, workdir, **{'moe.erc_loss_weight': 1.0, 'train.steps': 20,
                                              'eval.every_steps': 20, 'train.log_every': 5})
  assert train_main(args) == 0
  rows = read_metrics(workdir)
  assert rows[-1]['train/erc_loss'] < rows[0]['train/erc_loss']
  assert 0.0 <= rows[-1]['train/moe/layer1/erc_coupled'] <= 1.0


# --- μP -----------------------------------------------------------------------------


def mup_config(d_model=256, parametrization='mup', **moe):
  cfg = small_config(**{'model.d_model': d_model, 'model.d_ff': 2 * d_model,
                        'model.parametrization': parametrization, 'model.mup_base_width': 64})
  cfg.moe.update(moe)
  return cfg


def test_mup_init_scales_by_hand():
  """w = 256 / 64 = 4. With the same seed, μP's init is the standard one times 1 for
  the embedding and norms (input, vector), 1/√w = 1/2 for attention, MLP and expert
  matrices (hidden), 1/w = 1/4 for the router (output)."""
  flat = lambda cfg: {k: np.asarray(v) for k, v in flatten_params(cfg).items()}
  sp, mp = flat(mup_config(parametrization='standard')), flat(mup_config())
  want = {'embed': 1.0, 'blocks/0/attn_norm/scale': 1.0, 'blocks/0/attn/qkv': 0.5,
          'blocks/0/attn/out': 0.5, 'blocks/0/ffn/wi': 0.5, 'blocks/1/ffn/experts/wo': 0.5,
          'blocks/1/ffn/router/kernel': 0.25}
  for path, factor in want.items():
    np.testing.assert_allclose(mp[path], factor * sp[path], rtol=1e-6, err_msg=path)
  assert set(sp) - set(want) <= {'blocks/0/ffn_norm/scale', 'blocks/1/attn_norm/scale',
                                 'blocks/1/ffn_norm/scale', 'blocks/1/attn/qkv',
                                 'blocks/1/attn/out', 'blocks/0/ffn/wo',
                                 'blocks/1/ffn/experts/wi', 'final_norm/scale'}


def flatten_params(cfg):
  from routed.init_from import flatten  # pylint: disable=g-import-not-at-top
  return flatten(nnx.to_pure_dict(nnx.state(build_model(cfg, 50, 0), nnx.Param)))


def test_mup_learning_rates_by_hand():
  """One AdamW step (no decay) with μP's factors moves each parameter by the standard
  step times 1 (embedding, norms) or 1/w = 1/4 (hidden matrices, router)."""
  cfg = mup_config()
  cfg.train.update(weight_decay=0.0, warmup_steps=0, steps=10, grad_clip=0.0)
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, 50, 0), nnx.Param))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
  standard = step.make_optimizer(cfg.train)
  scaled = step.optimizer_for(cfg, 50)
  move = lambda opt: opt.update(grads, opt.init(params), params)[0]
  from routed.init_from import flatten  # pylint: disable=g-import-not-at-top
  a, b = flatten(move(standard)), flatten(move(scaled))
  for path, factor in {'embed': 1.0, 'final_norm/scale': 1.0, 'blocks/0/attn/qkv': 0.25,
                       'blocks/1/ffn/experts/wi': 0.25, 'blocks/1/ffn/router/kernel': 0.25}.items():
    np.testing.assert_allclose(b[path], factor * a[path], rtol=1e-6, err_msg=path)
    assert np.all(np.asarray(a[path]) != 0)


def test_mup_multipliers_and_the_base_width():
  """w = 4 with 4 heads: head width 64 against 16 at the base, so queries are scaled by
  √(16/64) = 1/2 and scores become q.k / 2 / √64 = q.k * √16 / 64 (μP's 1/Dh rule); tied
  logits / 4. At the base width μP is the standard parametrization exactly."""
  from routed.model import mup  # pylint: disable=g-import-not-at-top
  m = mup_config().model
  assert mup.query_scale(m) == 0.5 and mup.logit_multiplier(m) == 0.25
  base_sp, base_mup = mup_config(64, 'standard'), mup_config(64)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50)
  def logits(cfg):
    graphdef, params = nnx.split(build_model(cfg, 50, 0), nnx.Param)
    return jax.jit(lambda p: nnx.merge(graphdef, p)(tokens)[0])(params)
  np.testing.assert_array_equal(logits(base_sp), logits(base_mup))


@pytest.mark.slow  # a 20-step CLI run (or more): the full suite runs it
def test_mup_run_from_the_cli(mini_data_cfg, tmp_path, capsys):
  """20 steps under μP at 4x the base width; a base width above d_model is refused."""
  workdir = str(tmp_path / 'run')
  args = tiny_args(mini_data_cfg, workdir, **{'model.parametrization': 'mup',
                                              'model.mup_base_width': 8, 'train.steps': 20,
                                              'eval.every_steps': 20})
  assert train_main(args) == 0
  rows = read_metrics(workdir)
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  capsys.readouterr()
  bad = tiny_args(mini_data_cfg, str(tmp_path / 'bad'), **{'model.parametrization': 'mup',
                                                           'model.mup_base_width': 64})
  assert train_main(bad) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'model.mup_base_width' in err[0]


def logit_update(width: int, parametrization: str) -> float:
  """RMS change of the logits after 3 Adam steps at rate 0.01 (no clipping or decay)."""
  c = base_config()
  c.model.update(d_model=width, num_heads=4, num_layers=2, d_ff=4 * width,
                 parametrization=parametrization, mup_base_width=32)
  c.moe.update(num_experts=4, every=2, jitter=0.0)
  c.train.update(batch_size=4, seq_len=16, steps=100, warmup_steps=0, learning_rate=0.01,
                 grad_clip=0.0, weight_decay=0.0)
  graphdef, state = nnx.split(build_model(c, 128, 0), nnx.Param)
  params = nnx.to_pure_dict(state)
  optimizer = step.optimizer_for(c, 128)
  train_step = step.make_train_step(graphdef, c, optimizer)
  batch = step.token_batch(np.random.default_rng(0).integers(0, 128, (4, 17)))
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(batch['tokens'][:, :-1])[0])
  before = forward(params)
  opt_state, routing = optimizer.init(params), routing_state.init_state(c)
  for i in range(3):
    params, opt_state, routing, _ = train_step(params, opt_state, routing, batch, i)
  return float(jnp.sqrt(jnp.mean(jnp.square(forward(params) - before))))


@pytest.mark.slow
def test_mup_coordinate_check():
  """μP's defining property (Yang et al. 2022's coordinate check): the size of the
  logits' update after a few steps does not grow with width, where the standard
  parametrization's does. With 4 layers and 8 experts, 32 -> 256 wide, the standard
  update grew 10x (0.21 -> 2.08) and μP's stayed within 0.19-0.29 (2026-12-03)."""
  sp = [logit_update(w, 'standard') for w in (32, 256)]
  mp = [logit_update(w, 'mup') for w in (32, 256)]
  assert sp[1] / sp[0] > 4, sp
  assert 0.5 < mp[1] / mp[0] < 2, mp
