"""Scale machinery: rematerialisation and multi-sequence routing groups."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed.cli import UsageError
from routed.config import base_config
from routed.model import moe as moe_lib
from routed.model.transformer import build_model
from routed.step import make_loss_fn, token_batch
from routed.validate import validate

VOCAB = 61
L = 12


def tiny_cfg(**over):
  c = base_config()
  c.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=64)
  c.moe.update(num_experts=4)
  c.train.update(seq_len=L, batch_size=8)
  for key, value in over.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


# --- rematerialisation -------------------------------------------------------------

def remat_loss(remat: str):
  """params and loss(params) of a tiny MoDE model (MoD around MoE blocks) in training."""
  cfg = tiny_cfg(**{'model.remat': remat, 'mod.enabled': True, 'mod.capacity': 0.5})
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  batch = token_batch(np.random.default_rng(0).integers(0, VOCAB, (8, L + 1)))
  loss_fn = make_loss_fn(graphdef, cfg)
  return nnx.to_pure_dict(state), lambda p: loss_fn(p, batch, jax.random.key(0), True)[0]


@functools.lru_cache(maxsize=None)
def remat_grads(remat: str):
  params, loss = remat_loss(remat)
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize('remat', [
    'full', pytest.param('dots_saveable', marks=pytest.mark.slow),
    pytest.param('minimal', marks=pytest.mark.slow)])
def test_remat_gradients_equal_the_plain_model(remat):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               remat_grads(remat), remat_grads('none'))


def test_remat_policies_save_less_in_order():
  """Bytes the backward pass keeps from the forward pass (the VJP's residuals, from
  shapes alone): none > dots_saveable > minimal > full."""
  def residual_bytes(remat):
    params, loss = remat_loss(remat)
    leaves = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  sizes = [residual_bytes(r) for r in ('none', 'dots_saveable', 'minimal', 'full')]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes


# --- routing groups ----------------------------------------------------------------

def test_groups_are_position_major_and_invertible():
  a = jnp.arange(12).reshape(4, 3)                     # 4 sequences of 3 tokens
  g = moe_lib.to_groups(a, 2)
  np.testing.assert_array_equal(g, [[0, 3, 1, 4, 2, 5], [6, 9, 7, 10, 8, 11]])
  np.testing.assert_array_equal(moe_lib.from_groups(g, 2), a)
  x = jnp.arange(4 * 3 * 2).reshape(4, 3, 2)
  np.testing.assert_array_equal(moe_lib.from_groups(moe_lib.to_groups(x, 4), 4), x)


@functools.lru_cache(maxsize=None)
def eval_apply(group_size: int):
  cfg = tiny_cfg(**{'moe.eval_capacity_factor': 0.5, 'moe.group_size': group_size})
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  params = nnx.to_pure_dict(state)
  return jax.jit(lambda t: nnx.merge(graphdef, params)(t, train=False))


def test_model_with_groups_of_four_sequences_is_causal():
  """Changing later tokens of all four sequences of a group leaves every earlier
  logit unchanged, with capacity binding (the model-level causality test)."""
  apply = eval_apply(4 * L)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (8, L))
  perturbed = tokens.copy()
  perturbed[:, 7:] = rng.integers(0, VOCAB, (8, L - 7))
  a, aux = apply(jnp.asarray(tokens))
  b, _ = apply(jnp.asarray(perturbed))
  assert float(aux['metrics']['layer1/dropped']) > 0
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:])
  # The group really spans sequences: one sequence's later tokens change another's
  # routing at those positions, so its logits there differ from one-sequence groups.
  one, _ = eval_apply(0)(jnp.asarray(tokens))
  assert not np.allclose(one, a)


@pytest.mark.parametrize('over,key', [
    ({'moe.group_size': 18}, 'moe.group_size'),                       # not k * seq_len
    ({'moe.group_size': 3 * L}, 'moe.group_size'),                    # 3 does not divide 8
    ({'moe.group_size': 4 * L, 'moe.balance_shards': 4}, 'moe.balance_shards'),  # 2 groups
])
def test_bad_group_size_is_one_line(over, key):
  with pytest.raises(UsageError, match=key):
    validate(tiny_cfg(**over))


# --- gradient accumulation ---------------------------------------------------------

def padded_batch():
  """8 rows of two documents each, with padding unevenly spread over the rows (so the
  microbatches hold different numbers of real targets)."""
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, VOCAB, (8, L + 1))
  seg = np.ones((8, L + 1), np.int64)
  seg[:, 6:] = 2
  for row, pad in enumerate([0, 9, 0, 0, 3, 0, 12, 1]):
    if pad:
      seg[row, L + 1 - pad:] = 0
  pos = np.where(seg == 2, np.arange(L + 1) - 6, np.arange(L + 1)) * (seg != 0)
  tokens[seg == 0] = 0
  return {k: jnp.asarray(v, jnp.int32) for k, v in
          (('tokens', tokens), ('segment_ids', seg), ('positions', pos))}


@functools.lru_cache(maxsize=None)
def accumulated(microbatches: int, scope: str):
  from routed.step import accumulated_grads  # pylint: disable=g-import-not-at-top
  cfg = tiny_cfg(**{'train.microbatches': microbatches, 'moe.balance_scope': scope,
                    'moe.balance_shards': 4, 'moe.jitter': 0.0, 'moe.capacity_factor': 1.0})
  validate(cfg)
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  loss_fn = make_loss_fn(graphdef, cfg)
  fn = jax.jit(lambda p, b: accumulated_grads(loss_fn, p, b, jax.random.key(0), microbatches,
                                              scope))
  return fn(nnx.to_pure_dict(state), padded_batch())


@pytest.mark.parametrize('scope', ['micro', 'global'])
def test_four_microbatches_give_the_update_of_one_batch(scope):
  """Gradients and metrics (cross-entropy over unevenly padded rows, balance and z
  losses, expert loads, drops) of microbatches=4 equal microbatches=1 on the same
  batch to float32 rounding (rtol 1e-5)."""
  grads1, metrics1 = accumulated(1, scope)
  grads4, metrics4 = accumulated(4, scope)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads4, grads1)
  assert {'ce', 'loss', 'balance_loss', 'z_loss', 'moe/layer1/dropped'} <= set(metrics1)
  assert float(metrics1['moe/layer1/dropped']) > 0      # capacity binds
  for name, value in metrics1.items():
    np.testing.assert_allclose(metrics4[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


# --- scanned layers ----------------------------------------------------------------

def scan_cfg(scan: bool, layers: int = 4, **over):
  return tiny_cfg(**{'model.scan_layers': scan, 'model.num_layers': layers, **over})


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_layers_equal_the_loop(remat):
  """MoDE (MoD around every other block, MoE in those): the same parameters stacked
  give the same training loss and gradients under nnx.scan, router noise included."""
  from routed.model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  over = {'mod.enabled': True, 'mod.capacity': 0.5, 'model.remat': remat}
  batch = token_batch(np.random.default_rng(0).integers(0, VOCAB, (8, L + 1)))
  out = []
  for scan in (False, True):
    cfg = scan_cfg(scan, **over)
    graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
    if not scan:
      params = nnx.to_pure_dict(state)
    loss_fn = make_loss_fn(graphdef, cfg)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(1), True), has_aux=True))
    out.append(grad(scan_lib.stack_blocks(params, 2) if scan else params))
  (g_loop, m_loop), (g_scan, m_scan) = out
  assert set(m_scan) == set(m_loop)     # per-layer metrics keep their layer names
  for name, value in m_loop.items():
    np.testing.assert_allclose(m_scan[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               scan_lib.unstack_blocks(g_scan), g_loop)


def dot_count(scan: bool, layers: int) -> int:
  cfg = scan_cfg(scan, layers)
  graphdef, state = nnx.split(build_model(cfg, VOCAB, seed=0), nnx.Param)
  forward = lambda p, t: nnx.merge(graphdef, p)(t, train=False)[0]
  text = jax.jit(forward).lower(nnx.to_pure_dict(state), jnp.zeros((8, L), jnp.int32)).as_text()
  return text.count('stablehlo.dot_general')


def test_scan_compiles_one_unit_body():
  """The lowered program's matmuls do not grow with depth under scan_layers (one
  dense + MoE unit body), and do without it."""
  assert dot_count(True, 4) == dot_count(True, 8)
  assert dot_count(False, 8) > dot_count(False, 4) > dot_count(True, 4)


def test_stacked_parameters_have_a_layer_axis_never_split():
  from routed import sharding  # pylint: disable=g-import-not-at-top
  cfg = scan_cfg(True)
  state = nnx.state(build_model(cfg, VOCAB, seed=0), nnx.Param)
  specs = sharding.param_specs(nnx.to_pure_dict(state))
  assert specs['units'][1]['ffn']['experts']['wi'] == jax.sharding.PartitionSpec(
      None, 'expert', 'fsdp', 'tensor')
  assert specs['units'][0]['attn']['qkv'] == jax.sharding.PartitionSpec(
      None, 'fsdp', None, 'tensor', None)


def test_scan_layers_needs_whole_units():
  with pytest.raises(UsageError, match='model.scan_layers'):
    validate(scan_cfg(True, 3))


def test_resuming_in_the_other_layout_is_refused(tmp_path):
  """A workdir written without scan_layers refuses a scan_layers run with one line,
  before any checkpoint is touched; the same layout passes."""
  cfg = scan_cfg(False)
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  (tmp_path / 'config.json').write_text(cfg.to_json())
  validate(cfg, str(tmp_path))
  with pytest.raises(UsageError, match=r'^config key model.scan_layers: the checkpoints in .* '
                     r'were saved with model.scan_layers=false'):
    validate(scan_cfg(True), str(tmp_path))
  assert (tmp_path / 'checkpoints' / '10').is_dir()


def test_scanned_state_saves_and_restores_with_orbax(tmp_path):
  """Stacked parameters and their Adam moments, laid out by the logical-axis rules on
  a mesh, go through an Orbax checkpoint unchanged."""
  from routed import sharding, step as step_lib  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from routed.train_state import create_state  # pylint: disable=g-import-not-at-top
  cfg = scan_cfg(True)
  optimizer = step_lib.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  _, params, opt_state, _ = create_state(cfg, VOCAB, mesh, optimizer)
  assert params['units'][1]['ffn']['experts']['wi'].shape == (2, 4, 32, 64)
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  try:
    ckpt.save(3, params, opt_state, {})
    ckpt.wait()
    zeros = jax.tree.map(jnp.zeros_like, (params, opt_state))
    got_params, got_opt, meta, _ = ckpt.restore(3, *zeros)
  finally:
    ckpt.close()
  assert meta['step'] == 3
  jax.tree.map(np.testing.assert_array_equal, (got_params, got_opt), (params, opt_state))
