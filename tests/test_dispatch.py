"""Dispatch backends: every router x every backend equals the einsum oracle.

Capacity backends (gather) are compared with einsum under the same capacity, so
drops happen in both; dropless backends (ragged, tiled, pallas) with einsum under a
capacity large enough that nothing drops (C = S). Outputs and gradients wrt the
tokens, the expert weights and the router parameters must agree. The `pallas`
backend runs its TPU kernels in the Pallas interpreter here.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routed.config import base_config
from routed.model import dispatch
from routed.model.dropless import make_layout, num_tiles
from routed.model.moe import ROUTERS, Experts
from routed.model.routers import Routing

G, S, D, F, E = 2, 11, 16, 24, 4   # S = 11 tokens: not a multiple of any row tile
BACKENDS = ['gather', 'ragged', 'tiled', 'pallas']

# name -> (router, moe overrides). Capacity factor 0.6 makes capacity backends drop.
ROUTER_CASES = {
    'switch': ('switch', {}),
    'topk': ('topk', dict(top_k=2, renormalize=True)),
    'topk_null_topp': ('topk', dict(top_k=2, num_null_experts=1, top_p=0.7)),
    'topk_relu': ('topk', dict(top_k=2, gate='relu')),
    'expert_choice': ('expert_choice', {}),
    'soft': ('soft', {}),
    'sbase': ('sbase', {}),
    'hash': ('hash', {}),
    'reinforce': ('reinforce', {}),
    # SwiGLU experts (wi [E, D, 2F], gate and linear columns interleaved).
    'topk_swiglu': ('topk', dict(top_k=2, renormalize=True)),
}


def moe_cfg(router, capacity_factor, **overrides):
  cfg = base_config().moe
  cfg.update(router=router, num_experts=E, capacity_factor=capacity_factor,
             router_init_scale=4.0, **overrides)
  return cfg


def layer_parts(case, capacity_factor):
  """(graphdef, state) of (router, experts); the same seed gives the same parameters."""
  router, overrides = ROUTER_CASES[case]
  rngs = nnx.Rngs(0)
  r = ROUTERS[router].from_config(moe_cfg(router, capacity_factor, **overrides), D, rngs)
  activation = 'swiglu' if case.endswith('swiglu') else 'gelu'
  experts = Experts(E, D, F, activation=activation, init_std=0.3, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=rngs)
  return nnx.split((r, experts))


def inputs():
  x = jax.random.normal(jax.random.key(1), (G, S, D))
  tokens = jax.random.randint(jax.random.key(2), (G, S), 0, 50)
  cot = jax.random.normal(jax.random.key(3), (G, S, D))
  return x, tokens, cot


# Compiles dominate this file's time: each router's backends share one program,
# compiled without XLA's backend optimisations (about half the compile time).
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_fast(f, *args):
  return jax.jit(f).lower(*args).compile(FAST)(*args)


def value_and_grads(run, graphdef, x, state, tokens, cot):
  """y [G, S, D] and the gradients of <y, cot> wrt (x, router and expert state)."""

  def loss(x, state):
    router, experts = nnx.merge(graphdef, state)
    decision, _, _ = router(x, train=True, rng=jax.random.key(4), token_ids=tokens)
    y = run(x, decision, experts)
    return jnp.sum(y * cot), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, state)
  return y, grads


@functools.lru_cache(maxsize=None)
def router_results(case):
  """{variant: (y, grads)} for every backend, and the two einsum oracles."""
  capped, free = layer_parts(case, 0.6), layer_parts(case, 100.0)
  x, tokens, cot = inputs()

  def all_backends(x, capped_state, free_state):
    out = {'einsum': value_and_grads(dispatch.einsum_dispatch, capped[0], x, capped_state,
                                     tokens, cot),
           'einsum_free': value_and_grads(dispatch.einsum_dispatch, free[0], x, free_state,
                                          tokens, cot)}
    for backend in BACKENDS:
      out[backend] = value_and_grads(dispatch.DISPATCHERS[backend], capped[0], x, capped_state,
                                     tokens, cot)
    return out

  return run_fast(all_backends, x, capped[1], free[1])


def assert_same(got, want):
  y, (dx, dstate) = got
  y0, (dx0, dstate0) = want
  np.testing.assert_allclose(y, y0, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(dx, dx0, rtol=1e-4, atol=2e-5)
  leaves = jax.tree_util.tree_leaves_with_path(dstate)
  leaves0 = jax.tree.leaves(dstate0)
  assert len(leaves) == len(leaves0)
  for (path, a), b in zip(leaves, leaves0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('case', sorted(ROUTER_CASES))
@pytest.mark.parametrize('backend', BACKENDS)
def test_backend_matches_einsum(backend, case):
  results = router_results(case)
  # Dropless = einsum with nothing dropped; expert choice's capacity is its decision.
  dropless = backend in dispatch.DROPLESS and case != 'expert_choice'
  assert_same(results[backend], results['einsum_free' if dropless else 'einsum'])
  assert np.isfinite(np.asarray(results[backend][0])).all()


def test_capacity_really_drops_and_dropless_differs():
  """The two oracles differ here, so the comparisons above can tell the semantics apart."""
  results = router_results('switch')
  assert not np.allclose(results['einsum'][0], results['einsum_free'][0])


# --- degenerate routings, built by hand ---------------------------------------

def hand_routing(expert, capacity):
  """Routing of int [G, S, K] experts, slots in token order, weights 0.5 + t / 100."""
  g, s, k = expert.shape
  onehot = jax.nn.one_hot(expert, E, dtype=jnp.int32)
  flat = onehot.reshape(g, s * k, E)
  slot = (jnp.sum((jnp.cumsum(flat, 1) - flat) * flat, -1)).reshape(g, s, k)
  gate = 0.5 + jnp.arange(g * s * k, dtype=jnp.float32).reshape(g, s, k) / 100
  kept = slot < capacity
  return Routing(expert=expert, slot=slot, weight=jnp.where(kept, gate, 0.0),
                 capacity=capacity, dropless_weight=gate)


HAND_CASES = {
    # Every token on expert 0 (experts 1..3 empty); capacity 3 drops most of them.
    'one_expert_takes_all': jnp.zeros((G, S, 1), jnp.int32),
    # Two choices per token on experts 1 and 3 only: experts 0 and 2 empty.
    'two_experts_empty': jnp.stack([jnp.ones((G, S), jnp.int32),
                                    jnp.full((G, S), 3, jnp.int32)], -1),
}


def hand_value_and_grads(run, routing, x, state, graphdef, cot):
  """y and the gradients of <y, cot> wrt (x, experts, weight, dropless_weight)."""

  def loss(x, state, weight, dropless_weight):
    r = routing.replace(weight=weight, dropless_weight=dropless_weight)
    y = run(x, r, nnx.merge(graphdef, state))
    return jnp.sum(y * cot), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      x, state, routing.weight, routing.dropless_weight)
  return y, grads


@functools.lru_cache(maxsize=None)
def hand_results(name):
  """{variant: (y, grads)}: every backend, each also with NaN-filled buffers, and the
  einsum oracles with the hand capacity (3) and with nothing dropped."""
  experts = Experts(E, D, F, activation='relu', init_std=0.3, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(5))
  graphdef, state = nnx.split(experts)
  x, _, cot = inputs()
  capped = hand_routing(HAND_CASES[name], capacity=3)
  free = capped.replace(capacity=2 * S, weight=capped.dropless_weight)

  def all_backends(x, state):
    einsum = dispatch.einsum_dispatch
    out = {'einsum': hand_value_and_grads(einsum, capped, x, state, graphdef, cot),
           'einsum_free': hand_value_and_grads(einsum, free, x, state, graphdef, cot)}
    for backend in BACKENDS:
      run = dispatch.DISPATCHERS[backend]
      out[backend] = hand_value_and_grads(run, capped, x, state, graphdef, cot)
      out[backend + '_nan'] = hand_value_and_grads(functools.partial(run, fill=jnp.nan), capped,
                                                   x, state, graphdef, cot)
    return out

  return run_fast(all_backends, x, state)


@pytest.mark.parametrize('name', sorted(HAND_CASES))
@pytest.mark.parametrize('backend', BACKENDS)
def test_degenerate_routing(backend, name):
  results = hand_results(name)
  y, (dx, dexp, dw, ddw) = results[backend]
  if backend in dispatch.DROPLESS:
    y0, (dx0, dexp0, dw0, _) = results['einsum_free']
    dw = ddw        # dropless backends read dropless_weight
  else:
    y0, (dx0, dexp0, dw0, _) = results['einsum']
  np.testing.assert_allclose(y, y0, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(dx, dx0, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(dw, dw0, rtol=1e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(dexp), jax.tree.leaves(dexp0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('name', sorted(HAND_CASES))
@pytest.mark.parametrize('backend', BACKENDS)
def test_nan_filled_buffers_do_not_leak(backend, name):
  """Buffer rows that no token owns start as NaN (for pallas, the interpreter also
  fills uninitialised kernel outputs and VMEM scratch with NaN): the output and
  every gradient stay finite and equal those of the ordinary run."""
  results = hand_results(name)
  got, want = results[backend + '_nan'], results[backend]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- the layout ----------------------------------------------------------------

def test_layout_hand_computed():
  # 5 tokens, K = 1, E = 3, Tr = 2: experts [2, 0, 2, 2, 0], token 3 inactive.
  # Expert 0: tokens 1, 4 -> tile 0 (rows 0, 1). Expert 1: empty, no tile.
  # Expert 2: tokens 0, 2 -> tile 1 (rows 2, 3). M = (5 + 3 * 1) // 2 = 4 tiles.
  expert = jnp.array([[2], [0], [2], [2], [0]])
  active = jnp.array([[True], [True], [True], [False], [True]])
  lay = make_layout(expert, active, 3, tile=2)
  assert num_tiles(5, 3, 2) == 4 and lay.padded_rows == 8
  np.testing.assert_array_equal(lay.dest[:, 0], [2, 0, 3, 8, 1])
  np.testing.assert_array_equal(lay.rows, [1, 4, 0, 2, 5, 5, 5, 5])
  np.testing.assert_array_equal(lay.group_sizes, [2, 0, 2])
  assert int(lay.used) == 2
  np.testing.assert_array_equal(lay.tile_expert, [0, 2, 2, 2])  # unused tiles repeat 2
  np.testing.assert_array_equal(lay.tile_rows, [2, 2, 0, 0])


@pytest.mark.parametrize('tile', [1, 4, 8])
def test_layout_invariants(tile):
  rng = np.random.default_rng(tile)
  expert = jnp.asarray(rng.integers(0, 6, (37, 3)))
  active = jnp.asarray(rng.random((37, 3)) < 0.8)
  lay = make_layout(expert, active, 6, tile)
  dest, rows = np.asarray(lay.dest).ravel(), np.asarray(lay.rows)
  act = np.asarray(active).ravel()
  p = lay.padded_rows
  assert (dest[~act] == p).all() and len(set(dest[act])) == act.sum()
  np.testing.assert_array_equal(rows[dest[act]], np.flatnonzero(act))   # exact inverse
  tile_expert, tile_rows = np.asarray(lay.tile_expert), np.asarray(lay.tile_rows)
  for c in np.flatnonzero(act):   # each choice sits in a valid row of its expert's tile
    t, r = divmod(dest[c], tile)
    assert tile_expert[t] == np.asarray(expert).ravel()[c] and r < tile_rows[t]
  assert tile_rows.sum() == act.sum() and int(lay.used) <= lay.num_tiles


def test_row_tile_is_a_power_of_two_near_an_experts_share():
  from routed.model.dispatch_dropless import row_tile  # pylint: disable=g-import-not-at-top
  assert row_tile(4096, 8) == 256 and row_tile(4096, 32) == 128 and row_tile(4096, 128) == 32
  assert row_tile(10, 64) == 8 and row_tile(4096, 8, 16, 128) == 128
  assert row_tile(3000, 32, 16, 64) == 64 and row_tile(100, 32, 16, 64) == 16


# --- training --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('backend', BACKENDS)
def test_trains_with_backend(backend, mini_data_cfg, tmp_path):
  """routed.train runs with --config.moe.dispatch=NAME and the loss is finite."""
  from routed.train import main as train_main   # pylint: disable=g-import-not-at-top
  from test_train import read_metrics, tiny_args  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / backend)
  args = tiny_args(mini_data_cfg, workdir, **{
      'moe.dispatch': backend, 'train.steps': 3, 'train.log_every': 3,
      'train.warmup_steps': 1, 'train.batch_size': 2, 'train.seq_len': 32,
      'eval.every_steps': 0, 'checkpoint.every_steps': 1000,
      'checkpoint.async_save': False})
  assert train_main(args) == 0
  last = read_metrics(workdir)[-1]
  assert last['step'] == 3 and np.isfinite(last['train/loss'])
  assert os.path.isdir(os.path.join(workdir, 'checkpoints'))
